"""Where things live on disk.

Party tables sit in their own directory, one subdirectory per party as each would hold them;
the generator's truth sits beside them in `simulation/`, never inside a party's folder. A run
directory holds only what the authority publishes plus the experiment's comparisons.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from crypto.at_rest import AUTO, keystore_path
from crypto.identity import check_party_name

RUN_FILE = "run.json"  # a run directory's parties and engine, written when it is claimed
# run.json's engine for a directory `flwr run .` made and `fedscore finish` completed.
FLWR_ENGINE = "flwr run"


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


class PathArgumentError(ValueError):
    """A directory given on the command line that cannot be made; nothing was written."""


class RunDirError(FileExistsError):
    """The run (or party) directory already holds results of another kind."""


def check_new_dir(path: Path, flag: str) -> None:
    """Refuse, before anything is made, a directory `path` that cannot be created or used: a
    file in its place, a file among its parents (`--out afile/r`), or a nearest existing parent
    this user cannot write. An existing directory passes (whether it may be reused is the
    caller's rule)."""
    path = Path(path)
    try:
        if path.exists():
            if not path.is_dir():
                raise PathArgumentError(f"{flag} {path}: a file is there, not a directory; "
                                        f"choose another {flag}")
            return
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    except PermissionError:
        raise PathArgumentError(f"{flag} {path}: a parent directory cannot be read (permission "
                                f"denied); choose another {flag}") from None
    if parent.is_symlink() and not parent.is_dir():
        raise PathArgumentError(f"{flag} {path}: {parent} is a broken symbolic link; choose "
                                f"another {flag}")
    if not parent.is_dir():
        raise PathArgumentError(f"{flag} {path}: {parent} is a file, so no directory can be "
                                f"made under it; choose a {flag} path whose parent is a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PathArgumentError(f"{flag} {path}: cannot create directories in {parent} "
                                f"(permission denied); choose a writable place for {flag}")


def default_parties_dir(out_dir: Path) -> Path:
    """`runs/x` -> `runs/x.parties`: next to the run, never inside it."""
    return out_dir.with_name(out_dir.name + ".parties")


def run_parties(run_dir: Path) -> Path:
    """The parties directory a run ran on, as its run.json records it."""
    return Path(json.loads((Path(run_dir) / RUN_FILE).read_text())["parties"])


def run_keystore(run_dir: Path) -> Path | None:
    """The keystore a run directory's files were written with (None: plaintext): its
    config.json's `storage.keystore` against its parties, for readers of a finished run."""
    config = json.loads((Path(run_dir) / "config.json").read_text())
    return keystore_path(config.get("storage.keystore", AUTO), run_parties(run_dir))


def resume_command(out_dir: Path) -> str | None:
    """The command that continues the unfinished run in `out_dir` (from its checkpoint, or
    from the start when it stopped before one: `run_experiment`; a `flwr run .` output:
    `fedscore finish`), or None."""
    if (out_dir / "metrics.json").exists():
        return None
    how = run_record(out_dir)
    if how is None:
        # `flwr run .` writes the federation's results and no run.json of its own.
        return finish_command(out_dir) if (out_dir / "authority.json").exists() else None
    if not (out_dir / "config.json").exists():
        return None
    if how.get("engine") == FLWR_ENGINE:
        return finish_command(out_dir, how.get("parties"))
    return f"fedscore run --resume {out_dir}"


def finish_command(out_dir: Path, parties: str | None = None) -> str:
    """The command that completes a `flwr run .` output into a run directory."""
    where = shlex.quote(parties) if parties else "PARTIES_DIR (the data-dir it ran on)"
    return f"fedscore finish {shlex.quote(str(out_dir))} --parties {where}"


def run_record(out_dir: Path) -> dict | None:
    """run.json (parties, engine), or None when there is none."""
    path = out_dir / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None


# ---- a sweep's layout (simulations/run/sweep.py writes it, simulations/report reads it) ---------

EPSILON_KEY = "privacy.epsilon"


def grid_columns(grid_keys: Iterable[str]) -> list[str]:
    """sweep.csv's and summary.csv's columns that name a grid point: `epsilon` (every cell has
    one, swept or not), then each other grid key by its dotted name, sorted."""
    return ["epsilon", *sorted(str(k) for k in grid_keys if k != EPSILON_KEY)]
