"""The words a worker's status port uses for its own state: one contract, read by the
runtime's pool (actors/pool_machine.py) and written by the worker (agent/worker.py)."""

from typing import Literal

ReportedState = Literal["starting", "idle", "claimed", "busy", "draining"]
