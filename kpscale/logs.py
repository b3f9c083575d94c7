"""The console log of kpscale's commands and training workers: kpscale's own INFO lines, other
libraries' warnings.

MLflow and Ray say at INFO what they create and connect to (database tables, an experiment,
each report to Ray Train with all its metrics); that is not what the user ran the command for.
Ray Train's own `ray.train` logger keeps its INFO lines: they say when workers start, where a
checkpoint went, and why a failed worker group is restarted. A MLFLOW_LOGGING_LEVEL the user
set wins."""

from __future__ import annotations

import logging
import os


def setup() -> None:
    """For a command's process, and again in each Ray Train worker (whose root logger Ray Train
    has configured: basicConfig leaves it, the level still applies)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("kpscale").setLevel(logging.INFO)
    # MLflow gives its loggers their own handler and level when imported, from this variable.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
