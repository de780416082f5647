"""Errors a user can fix: the CLI prints their message without a traceback."""

from __future__ import annotations

from clients.protocol.messages import ProtocolError
from clients.protocol.reasons import ReasonError
from clients.protocol.tables import SiloDataError
from clients.silo.drift import DriftError
from crypto.at_rest import AtRestError
from crypto.identity import IdentifierError
from crypto.psi import PsiError
from crypto.tls import CredentialError
from server.audit_log import AuditLogError
from server.checkpoint import CheckpointError
from server.config import ConfigError
from server.explanations import ExplanationError
from server.federation import FederationError
from server.labels import LabelDataError
from server.ledger import LedgerError
from server.rescore import RescoreError
from server.split import SplitError
from simulations.data.paths import PathArgumentError
from simulations.data.real_data import DataImportError
from simulations.run.deploy import DeploymentError
from simulations.run.grid import SweepError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    CheckpointError,
    SiloDataError,
    LabelDataError,
    LedgerError,
    IdentifierError,
    AtRestError,
    FederationError,
    ProtocolError,
    PsiError,
    SplitError,
    SweepError,
    DataImportError,
    DeploymentError,
    CredentialError,
    FileExistsError,
    PermissionError,
    RescoreError,
    ExplanationError,
    AuditLogError,
    ReasonError,
    DriftError,
    PathArgumentError,
    # A path under a regular file, wherever one is taken that has no check of its own: the
    # message names the path, and a traceback would add nothing.
    NotADirectoryError,
)
