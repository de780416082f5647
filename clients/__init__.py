"""The party side: everything a silo or a region deploys.

clients.protocol is the one door the authority (server/) may import: messages, schema, model
spec, DP-SGD wiring and accounting maths shared by both sides. clients.silo and clients.region
are each side's private code (app, data, trainer, ...), independent of each other; clients.node
is what both find their node's things with.

Never imports server/ or simulations/: a silo deploys without the authority's code.
"""
