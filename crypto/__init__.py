"""Identity protection: normalisation, keyed hashing, private set intersection.

A leaf package: it imports nothing from clients/, server/ or simulations/.
"""
