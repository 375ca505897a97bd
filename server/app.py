"""The ServerApp: reads the run config and hands the grid to the phase driver."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.phase_driver import PhaseDriver

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = RunConfig.from_flower(context.run_config)
    PhaseDriver(grid, context, config).run_all()
