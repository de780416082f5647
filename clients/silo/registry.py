"""The silo's message handlers register here (`@handlers.query("hello")`,
`@handlers.train("step")`, Flower's style), each behind one guard that answers the silo's
errors: bad input, refusals (its policy, its journal, the roster, the run's announced mode)
and protocol errors.
"""

from __future__ import annotations

import logging

from clients.node import Guard, Handlers
from clients.protocol import messages as m
from clients.protocol.tables import SiloDataError
from clients.silo.policy import PolicyError, PolicyRefusalError
from clients.silo.run_checks import RunModeRefusalError
from clients.silo.state import RefusedError
from crypto.psi import PsiError
from crypto.roster import RosterError

log = logging.getLogger(__name__)

handlers = Handlers(Guard(
    "silo", log,
    input_errors=(SiloDataError, PolicyError),
    refusals=(PolicyRefusalError, RefusedError, RosterError, RunModeRefusalError),
    protocol_errors=(m.ProtocolError, PsiError),
))
