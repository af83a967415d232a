"""Which serve owns which open sessions, and which one sends (runtime/sessions/owners.py):
told by flock, so a runtime's death, however it dies, frees what it held."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from runtime.sessions.owners import Owner, when_sole_sender


def test_an_owner_is_alive_while_its_lock_is_held_and_gone_after(tmp_path):
    a, b = Owner(tmp_path), Owner(tmp_path)
    assert b.alive(a.id) and a.alive(a.id)
    assert not b.alive("12345-deadbeef") and not b.alive(None) and not b.alive("../etc")
    a.release()
    assert not b.alive(a.id)


def test_the_sender_lock_passes_to_the_waiting_runtime_when_its_holder_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, threading, time\n"
            "from pathlib import Path\n"
            "from runtime.sessions.owners import when_sole_sender\n"
            f"when_sole_sender(Path({str(tmp_path)!r}), lambda: print('sending', flush=True))\n"
            "time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "sending"
        started = threading.Event()
        when_sole_sender(tmp_path, started.set)
        assert not started.wait(0.5), "two runtimes must not send at once"
        holder.kill()
        assert started.wait(10), "the waiting runtime takes over once the holder is gone"
    finally:
        holder.kill()
        holder.wait(5)
