"""The authority's Flower ServerApp.

`make_server_app` is what the embedded simulation uses (config, paths and a progress callback
come from the caller); the module-level `app` is what `flwr run .` loads, configured from the
run config in pyproject.toml's [tool.flwr.app.config] and `--run-config` overrides.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients.schema import federation_silos
from server.authority import RunResult, run_authority
from server.config import AuthorityConfig, parse_flat
from server.federation import Federation

log = logging.getLogger(__name__)

PATH_KEYS = ("data-dir", "out-dir")


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
        fed = Federation(grid, federation_silos(data_dir), cfg.join_timeout, cfg.reply_timeout)
        result = run_authority(fed, cfg, data_dir, out_dir, progress, resume=resume)
        if on_result is not None:
            on_result(result)

    return app



CellDone = Callable[[int, RunResult | None, str, float], None]


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
        psi_cache: dict = {}
        for i, (cfg, out_dir, resume) in enumerate(cells):
            fed = Federation(grid, federation_silos(data_dir), cfg.join_timeout,
                             cfg.reply_timeout)
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
    # One subdirectory per Flower run, so a later run never overwrites an earlier one.
    out_dir = Path(str(run_config.get("out-dir", "runs/flwr"))).resolve() / str(context.run_id)
    cfg = parse_flat(AuthorityConfig, run_config, ignore=PATH_KEYS)
    log.info("authority: data %s, outputs %s", data_dir, out_dir)
    fed = Federation(grid, federation_silos(data_dir), cfg.join_timeout, cfg.reply_timeout)
    run_authority(fed, cfg, data_dir, out_dir)
