"""``python -m agent``: one worker, started plainly (the zygote's fallback, and docker's).

With ``AUTONOMITE_IDENTITY`` (the process backend, isolation on) it first imports what a
worker needs, as the zygote does, and only then takes its identity (``agent/sandbox.py``):
after the uid change the interpreter's own files may not be readable any more, and no
worker code has run yet.
"""

import os

from agent.contract import Env

if Env.IDENTITY in os.environ:
    import json

    from agent import sandbox
    from agent.zygote import preload

    preload([])
    parent = os.getppid()
    sandbox.enter(sandbox.Identity.from_json(json.loads(os.environ.pop(Env.IDENTITY))))
    if os.getppid() != parent:  # the runtime died meanwhile (later, the lifeline says: agent/lifeline.py)
        os._exit(1)

from agent.worker import main

main()
