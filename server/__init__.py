"""The scoring authority: the Flower ServerApp, alignment, training protocol and scoring.

Never imports simulations/: the authority cannot see the generator or the true probabilities.
"""
