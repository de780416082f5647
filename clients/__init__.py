"""The silo side: a silo's table, its bottom model, local training, and the Flower ClientApp.

Never imports server/ or simulations/: a silo deploys without the authority's code.
"""
