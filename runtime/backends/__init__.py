"""Where workers run. The pool sees only :class:`WorkerBackend`."""

from runtime.backends.base import BackendError, WorkerBackend, WorkerHandle, WorkerSpec
from runtime.backends.process import ProcessBackend

__all__ = ["BackendError", "ProcessBackend", "WorkerBackend", "WorkerHandle", "WorkerSpec"]
