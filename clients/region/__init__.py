"""A region's private side (horizontal topology): its Flower ClientApp, its table and its local
training round.

The server never imports it, and the silos' side neither (lint-imports checks both): what the
server needs of a region is in clients.protocol.region.
"""
