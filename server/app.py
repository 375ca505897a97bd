"""The ServerApp: reads the run config and hands the grid to the phase driver."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.operator_logging import SERVER_LOGGERS, configure_operator_logging
from server.phase_driver import PhaseDriver

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_operator_logging(loggers=SERVER_LOGGERS)
    config = RunConfig.from_flower(context.run_config)
    PhaseDriver(grid, context, config).run_all()
