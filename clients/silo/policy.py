"""The silo operator's policy: what this silo releases whatever the authority asks.

Read from `policy.json` in the silo's directory; without one the strict defaults hold. The
authority's settings (explain.reasons, corrections, aggregation) are requests; a request
beyond this policy is refused with `REFUSED` (clients/protocol/messages.py) and a message naming the
key the operator would change.

  min_group           any aggregate a silo reports (the training summary, reason codes'
                      reference; a tree's per-bin sums and partitions of a node, the
                      training positions a tree or scorecard run bins and sums over)
                      covers at least this many DISTINCT people
  explain             at most this many reason codes per person (0: none)
  corrections         "none", "all", or a list of fields the silo accepts corrections of
  require_secure_sum  refuse a run whose contributions travel in plaintext (every tree or
                      scorecard run: its answers are per silo, with no secure sum)
  allow_concat        allow split learning (the authority sees each silo's embeddings)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from crypto.private_files import write_atomic

POLICY_FILE = "policy.json"
MAX_REASONS = 16


class PolicyError(ValueError):
    """A policy file the silo cannot enforce as written."""


class PolicyRefusalError(Exception):
    """A request this silo's policy does not allow; the message names the policy key."""

    def __init__(self, key: str, detail: str, path: Path | None = None) -> None:
        where = f"{path}" if path else f"{POLICY_FILE} in the silo's directory"
        super().__init__(f"refused by silo policy {key!r}: {detail}; the silo's operator can "
                         f"change {key!r} in {where}")
        self.key = key


@dataclass(frozen=True)
class SiloPolicy:
    min_group: int = 100
    explain: int = 0
    corrections: str | tuple[str, ...] = "none"
    require_secure_sum: bool = True
    allow_concat: bool = False
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.min_group, bool) or not isinstance(self.min_group, int) or \
                self.min_group < 1:
            raise PolicyError(f"min_group={self.min_group!r}: a whole number of people >= 1")
        if isinstance(self.explain, bool) or not isinstance(self.explain, int) or \
                not 0 <= self.explain <= MAX_REASONS:
            raise PolicyError(f"explain={self.explain!r}: a whole number 0..{MAX_REASONS}")
        if isinstance(self.corrections, list):
            object.__setattr__(self, "corrections", tuple(self.corrections))
        if isinstance(self.corrections, tuple):
            if not all(isinstance(f, str) and f for f in self.corrections):
                raise PolicyError("corrections: a list of field names")
        elif self.corrections not in ("none", "all"):
            raise PolicyError(f"corrections={self.corrections!r}: \"none\", \"all\" or a list "
                              "of fields")
        for key in ("require_secure_sum", "allow_concat"):
            if not isinstance(getattr(self, key), bool):
                raise PolicyError(f"{key}={getattr(self, key)!r}: true or false")

    # ---- checks -------------------------------------------------------------------------------

    def check_group(self, what: str, positions_distinct: int) -> None:
        if positions_distinct < self.min_group:
            raise PolicyRefusalError("min_group", f"{what} over {positions_distinct} distinct "
                                     f"people, below the minimum group of {self.min_group}",
                                     self.path)

    def check_people(self, what: str, positions: np.ndarray) -> None:
        """An aggregate over a few people, or over one person listed many times, is that
        person's exact value: refuse below the minimum group of DISTINCT people."""
        distinct = len(np.unique(positions))
        if distinct != len(positions):
            raise PolicyRefusalError("min_group", f"{what} over positions listed more than once "
                                     f"({len(positions)} positions, {distinct} distinct)",
                                     self.path)
        self.check_group(what, distinct)

    def check_explain(self, asked: int) -> None:
        if asked > self.explain:
            raise PolicyRefusalError("explain", f"{asked} reason codes asked, this silo allows "
                                     f"{self.explain}", self.path)

    def check_correction(self, field_: str) -> None:
        allowed = self.corrections == "all" or (isinstance(self.corrections, tuple)
                                                and field_ in self.corrections)
        if not allowed:
            raise PolicyRefusalError("corrections", f"a correction of field {field_!r} needs the "
                                     "silo operator's approval", self.path)

    def check_model(self, *, secure: bool, outputs: int, kind: str = "mlp") -> None:
        if kind != "mlp" and self.require_secure_sum:
            # The trees' per-bin sums and split bits, the scorecard's partial logits: each
            # silo's own answers, read one by one by the authority. No sum hides them.
            raise PolicyRefusalError("require_secure_sum", f"a model.kind={kind} run sends "
                                     "this silo's answers (per-bin sums, partitions, partial "
                                     "logits) to the authority in plaintext, with no secure "
                                     "sum", self.path)
        if outputs != 1 and not self.allow_concat:
            raise PolicyRefusalError("allow_concat", "split learning (aggregation.mode=concat) "
                                     "shows the authority this silo's embeddings", self.path)
        if not secure and self.require_secure_sum:
            raise PolicyRefusalError("require_secure_sum", "the run sends contributions in "
                                     "plaintext (secure aggregation off)", self.path)

    # ---- file ---------------------------------------------------------------------------------

    def to_json(self) -> str:
        data = asdict(self)
        del data["path"]
        if isinstance(self.corrections, tuple):
            data["corrections"] = list(self.corrections)
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def load(cls, silo_dir: Path) -> SiloPolicy:
        """The policy in `silo_dir`, else the strict defaults."""
        path = Path(silo_dir) / POLICY_FILE
        if not path.exists():
            return cls(path=path)
        try:
            raw = json.loads(path.read_text(), parse_constant=_no_constants)
        except (json.JSONDecodeError, ValueError) as exc:
            raise PolicyError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise PolicyError(f"{path} must hold an object of policy keys")
        known = {"min_group", "explain", "corrections", "require_secure_sum", "allow_concat"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PolicyError(f"{path}: unknown key(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known))}")
        try:
            return cls(**raw, path=path)
        except PolicyError as exc:
            raise PolicyError(f"{path}: {exc}") from None

    def write(self, silo_dir: Path) -> None:
        write_atomic(Path(silo_dir) / POLICY_FILE, self.to_json(), public=True)


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not a policy value")

