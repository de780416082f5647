"""A silo's private side: its Flower ClientApp, its table, its trainer, corrections,
explanations, drift, policy and enrolment.

The authority (server/) never imports it, and the regions' side neither (lint-imports checks
both): what the authority needs of a silo is in clients.protocol.
"""
