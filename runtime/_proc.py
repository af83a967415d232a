"""Child processes that cannot outlive the runtime."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` for Popen: the kernel sends SIGTERM to the child when we die, even by SIGKILL.

    Linux ties this to the thread that forked the child; our spawning threads live as long
    as the runtime does, so in practice it is the runtime's death.
    """
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def prctl(option: int, value: int) -> None:
    """Linux's prctl(2), for the few process attributes Python does not wrap."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value)
