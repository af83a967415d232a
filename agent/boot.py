"""What a worker does first, before any code of its own runs.

- **No new privileges.** ``PR_SET_NO_NEW_PRIVS``: nothing this process or its children
  exec can gain privileges (setuid bits, file capabilities). The docker backend sets it on
  the container; Swarm can only from Engine 25 (API 1.46) on, so the worker sets it on
  itself as well, and on every backend it holds from here on whatever the engine did.
- **Settings from a file.** The swarm backend hands a worker its settings and credentials
  as a Docker secret, a file on a tmpfs only that container sees, instead of plain
  environment in the service spec that anyone with manager access can read
  (``runtime/backends/swarm.py``). ``AUTONOMITE_SETTINGS_FILE`` names it: a JSON object of
  the variables that other backends put in the environment. They go into ``os.environ``
  (livekit-agents reads its credentials from there), never into the spec.
"""

from __future__ import annotations

import ctypes
import json
import os

from agent.contract import Env

PR_SET_NO_NEW_PRIVS = 38


def boot() -> None:
    if ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    path = os.environ.pop(Env.SETTINGS_FILE, None)
    if path:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
        os.environ.update({str(k): str(v) for k, v in settings.items()})
