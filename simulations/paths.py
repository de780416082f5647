"""Where things live on disk.

Party tables sit in their own directory, one subdirectory per party as each would hold them;
the generator's truth sits beside them in `simulation/`, never inside a party's folder. A run
directory holds only what the authority publishes plus the experiment's comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crypto.identity import check_party_name


@dataclass(frozen=True)
class Parties:
    root: Path

    def party(self, name: str) -> Path:
        return self.root / check_party_name(name)

    @property
    def truth(self) -> Path:
        return self.root / "simulation" / "truth.parquet"

    @property
    def population_json(self) -> Path:
        return self.root / "simulation" / "population.json"


def default_parties_dir(out_dir: Path) -> Path:
    """`runs/x` -> `runs/x.parties`: next to the run, never inside it."""
    return out_dir.with_name(out_dir.name + ".parties")
