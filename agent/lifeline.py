"""A worker's end of its lifeline to the runtime that started it (the process backend).

The runtime keeps the only write end of a pipe and gives each worker the read end
(``AUTONOMITE_LIFELINE_FD``). End of file there means the runtime died, even by SIGKILL:
the kernel closes a dead process's descriptors. Unlike PR_SET_PDEATHSIG it leaves the
choice to the worker (``agent/orphan.py`` decides: a session goes on, anything else exits),
and unlike watching the parent pid it works in a pid namespace of the worker's own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from agent.contract import Env
from agent.orphan import END_MESSAGE, Orphan

if TYPE_CHECKING:
    from agent.lease_book import LeaseBook

logger = logging.getLogger("autonomite.agent")


def watch_lifeline(loop: asyncio.AbstractEventLoop, state: LeaseBook) -> asyncio.Event:
    """The runtime holds the only write end of a pipe whose read end we were given: end of
    file on it means the runtime died (even by SIGKILL). No polling, and it works in a pid
    namespace of our own, where the runtime's pid means nothing."""
    gone = asyncio.Event()
    fd = os.environ.get(Env.LIFELINE_FD)
    if not fd:  # not started by a process backend (a container): its engine keeps it
        return gone

    def readable() -> None:
        if os.read(int(fd), 64):  # the runtime never writes; only end of file matters
            return
        loop.remove_reader(int(fd))
        state.runtime_gone = True  # before anything else runs: no claim is taken from now on
        gone.set()

    loop.add_reader(int(fd), readable)
    return gone


async def outlive_runtime(state: LeaseBook, runtime_gone: asyncio.Event) -> None:
    """Returns when this worker must end because its runtime died (agent/orphan.py decides)."""
    await runtime_gone.wait()
    orphan = Orphan(state.config.orphan_timeout_s, time.monotonic())
    if orphan.on_runtime_gone(in_session=state.accepted_job is not None) == "exit":
        logger.warning("the runtime is gone and this worker is in no session: exiting")
        return
    logger.warning("the runtime is gone; the session goes on, ended if no runtime follows this worker for %g s",
                   orphan.bound_s)
    while (left := orphan.remaining(time.monotonic(), state.heard_at)) > 0:
        await asyncio.sleep(min(left, 1.0))
    logger.warning("no runtime followed this worker for %g s (adopted: %s): ending the session", orphan.bound_s,
                   "yes" if orphan.adopted(state.heard_at) else "no")
    if state.end_session is None:
        return
    state.end_session(END_MESSAGE, False, True)
    await asyncio.Event().wait()  # the session's end (session_over) ends the worker
