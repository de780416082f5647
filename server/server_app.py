"""The authority's Flower ServerApp.

`make_server_app` is what the embedded simulation uses (config, paths and a progress callback
come from the caller); the module-level `app` is what `flwr run .` loads, configured from the
run config in pyproject.toml's [tool.flwr.app.config] and `--run-config` overrides.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients.protocol.schema import federation_silos
from server.config import AuthorityConfig, ConfigError
from server.config_keys import parse_flat
from server.federation import Federation, federation_roster
from server.run_lock import claim

if TYPE_CHECKING:  # the training stack (torch) loads when a run starts, not on import
    from server.authority import RunResult

log = logging.getLogger(__name__)

FAILURE_FILE = "authority-failed.json"
# Run config keys that are not authority settings.
PATH_KEYS = ("data-dir", "out-dir", "run-dir", "resume", "run-lock")


def _federation(grid: Grid, cfg: AuthorityConfig, data_dir: Path) -> Federation:
    return Federation(grid, federation_silos(data_dir), cfg.join_timeout, cfg.reply_timeout,
                      cfg.retries, roster=federation_roster(data_dir))


def make_server_app(
    cfg: AuthorityConfig,
    data_dir: Path,
    out_dir: Path,
    progress: Callable[..., None] | None = None,
    on_result: Callable[[RunResult], None] | None = None,
    resume: bool = False,
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from server.authority import run_authority  # torch loads when a run starts (see top)

        fed = _federation(grid, cfg, data_dir)
        result = run_authority(fed, cfg, data_dir, out_dir, progress, resume=resume)
        if on_result is not None:
            on_result(result)

    return app



CellDone = Callable[[int, "RunResult | None", str, float], None]


def make_cells_app(
    cells: list[tuple[AuthorityConfig, Path, bool]],
    data_dir: Path,
    progress: Callable[..., None] | None,
    on_done: CellDone,
) -> ServerApp:
    """Several runs (config, out dir, resume) one after another in one federation session, on
    the same tables: PSI runs once. A failing run is reported through `on_done` (result None,
    the error) and the next one starts: the silos reset their state at every alignment."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from server.authority import run_authority  # torch loads when a run starts (see top)

        psi_cache: dict = {}
        for i, (cfg, out_dir, resume) in enumerate(cells):
            fed = _federation(grid, cfg, data_dir)
            t0 = time.perf_counter()
            try:
                result = run_authority(fed, cfg, data_dir, out_dir, progress, resume=resume,
                                       psi_cache=psi_cache)
            except Exception as exc:  # recorded for this cell; the sweep goes on
                log.exception("run %s failed", out_dir.name)
                on_done(i, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)
                continue
            on_done(i, result, "", time.perf_counter() - t0)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    data_dir = Path(str(run_config.get("data-dir", "parties/default"))).resolve()
    out_dir = _out_dir(run_config, context.run_id)
    resume = bool(run_config.get("resume", False))
    cfg = parse_flat(AuthorityConfig, run_config, ignore=PATH_KEYS)
    if cfg.topology != "vertical":
        raise ConfigError("topology=horizontal runs on the simulation engine (fedscore run); "
                          "this ServerApp serves the vertical topology")
    from server.authority import run_authority  # torch loads when a run starts (see top)

    log.info("authority: data %s, outputs %s", data_dir, out_dir)
    try:
        # `flwr run` claims its run directory like `fedscore run` does; `run-lock` is the token
        # of the `fedscore deploy` that launched this run and holds the directory for it.
        with claim(out_dir, "flwr run (ServerApp)",
                   join_token=str(run_config.get("run-lock") or "") or None):
            run_authority(_federation(grid, cfg, data_dir), cfg, data_dir, out_dir,
                          progress=report_progress, resume=resume)
    except Exception as exc:
        # Whoever launched `flwr run` reads why the authority stopped from the run directory,
        # not from Flower's log stream.
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / FAILURE_FILE).write_text(json.dumps(
            {"error": type(exc).__name__, "message": str(exc)}) + "\n")
        raise


PROGRESS_PREFIX = "fedscore-progress "
_progress_log = logging.getLogger("fedscore.progress")


def report_progress(phase: str, done: float, total: float | None, **info: object) -> None:
    """Progress as one JSON line on stderr, which `flwr run --stream` relays to whoever
    launched the run (`fedscore deploy` draws its progress bars from it)."""
    if not _progress_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        _progress_log.addHandler(handler)
        _progress_log.setLevel(logging.INFO)
        _progress_log.propagate = False
    _progress_log.info("%s%s", PROGRESS_PREFIX,
                       json.dumps({"phase": phase, "done": done, "total": total, **info}))


def _out_dir(run_config: dict, run_id: int) -> Path:
    """`run-dir` names the run directory itself (`fedscore deploy`, which resumes into it);
    otherwise each Flower run gets its own subdirectory of `out-dir`, so a later run never
    overwrites an earlier one."""
    if run_config.get("run-dir"):
        return Path(str(run_config["run-dir"])).resolve()
    return Path(str(run_config.get("out-dir", "runs/flwr"))).resolve() / str(run_id)
