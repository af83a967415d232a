"""A runtime's instance id: kept across a crash, never shared by two live runtimes; and
each client's uid, derived from its id, never shared by two clients."""

from __future__ import annotations

import subprocess
import sys

import pytest

from runtime.backends.base import BackendError
from runtime.backends.uids import UidBook, client_uid
from runtime.instance import Instance
from runtime.settings import UidRange

HOLD = "import sys, time; from pathlib import Path; from runtime.instance import Instance; " \
       "i = Instance.claim(Path(sys.argv[1])); print(i.id, flush=True); time.sleep(60)"


def hold_in_another_process(state_dir) -> tuple[subprocess.Popen, str]:
    """A runtime that claims an id in ``state_dir`` and holds it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(state_dir)], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def test_two_live_runtimes_never_share_an_id(tmp_path):
    first = Instance.claim(tmp_path)
    second = Instance.claim(tmp_path)
    assert first.id != second.id and len(first.id) == 8
    first.release(forget=True), second.release(forget=True)


def test_a_runtime_that_died_leaves_its_id_to_the_next_one(tmp_path):
    proc, held = hold_in_another_process(tmp_path)
    try:
        assert Instance.claim(tmp_path).id != held, "a live runtime's id is never taken"
    finally:
        proc.kill()
        proc.wait()
    # Killed (as by SIGKILL): its lock went with it, its file stayed; the next start takes it.
    assert {Instance.claim(tmp_path).id for _ in range(2)} >= {held}


def test_a_clean_stop_that_leaves_nothing_forgets_its_id(tmp_path):
    kept, forgotten = Instance.claim(tmp_path), Instance.claim(tmp_path)
    kept.release(forget=False)
    forgotten.release(forget=True)
    assert Instance.claim(tmp_path).id == kept.id
    assert not (tmp_path / f"instance-{forgotten.id}").exists()


def test_a_client_s_uid_is_stable_and_in_its_range():
    uids = UidRange(first=500_000, count=1000)
    assert client_uid("alpha", uids) == client_uid("alpha", uids)
    assert all(500_000 <= client_uid(c, uids) < 501_000 for c in ("alpha", "beta", "gamma"))
    assert client_uid("alpha", uids) != client_uid("beta", uids)


def test_two_clients_on_one_uid_are_refused_not_shared():
    uids = UidRange(first=500_000, count=1)  # every client on one uid
    book = UidBook(uids)
    assert book.uid("alpha") == 500_000
    assert book.uid("alpha") == 500_000, "the same client again is fine"
    with pytest.raises(BackendError, match="client 'beta' would run as uid 500000, the uid of client 'alpha'"):
        book.uid("beta")


def test_an_adopted_container_s_uid_stays_its_client_s():
    book = UidBook(UidRange(first=500_000, count=1))
    book.note("beta", 500_000)  # found running at start
    with pytest.raises(BackendError, match="the uid of client 'beta'"):
        book.uid("alpha")
