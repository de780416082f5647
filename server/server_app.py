"""The authority's Flower ServerApp.

`make_server_app` is what the embedded simulation uses (config, paths and a progress callback
come from the caller); the module-level `app` is what `flwr run .` loads, configured from the
run config in pyproject.toml's [tool.flwr.app.config] and `--run-config` overrides.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients.schema import SILOS
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
        fed = Federation(grid, SILOS, cfg.join_timeout, cfg.reply_timeout)
        result = run_authority(fed, cfg, data_dir, out_dir, progress, resume=resume)
        if on_result is not None:
            on_result(result)

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
    fed = Federation(grid, SILOS, cfg.join_timeout, cfg.reply_timeout)
    run_authority(fed, cfg, data_dir, out_dir)
