"""The door: what the silos, the regions and the authority agree on, and all the authority
(server/) may import of clients/.

Messages and their checks, the schema, the model spec and the bottom model, the DP-SGD wiring
and accounting maths both sides compute, reason-code maths, reading a party's table, wire
capture, and the horizontal topology's region protocol. Never imports clients.silo or
clients.region (lint-imports checks it).
"""
