"""Saving a worker's log is best effort and bounded: what a caller (a removal) waits for."""

from __future__ import annotations

import threading
import time

from runtime.backends.worker_logs import WorkerLogs


def test_a_log_is_written_where_the_worker_s_log_belongs(tmp_path):
    logs = WorkerLogs(tmp_path, wait_s=5)
    assert logs.save("alpha", "w1", lambda: b"one\ntwo\nthree\n") is True
    assert (tmp_path / "alpha" / "w1.log").read_bytes() == b"one\ntwo\nthree\n"
    assert logs.tail("alpha", "w1", 2) == "two\nthree"
    assert logs.tail("alpha", "nobody", 2) == ""


def test_a_read_that_hangs_costs_its_caller_the_bound_and_no_more(tmp_path):
    release = threading.Event()
    logs = WorkerLogs(tmp_path, wait_s=0.2)
    began = time.monotonic()
    try:
        assert logs.save("alpha", "w1", lambda: release.wait(30) and b"late") is False
        assert time.monotonic() - began < 2
    finally:
        release.set()


def test_a_failed_read_or_write_returns_at_once_and_leaves_no_partial_file(tmp_path):
    logs = WorkerLogs(tmp_path / "file-not-dir", wait_s=30)
    (tmp_path / "file-not-dir").write_text("a file where the directory should be")
    began = time.monotonic()
    assert logs.save("alpha", "w1", lambda: b"x") is False  # mkdir fails
    assert logs.save("alpha", "w2", lambda: 1 / 0) is False  # the read fails
    assert time.monotonic() - began < 2, "a failure is not waited out to the bound"


def test_hung_saves_are_capped_and_new_ones_skipped(tmp_path):
    release = threading.Event()
    logs = WorkerLogs(tmp_path, wait_s=0.05, max_in_flight=2)
    try:
        for worker in ("w1", "w2"):
            assert logs.save("alpha", worker, lambda: release.wait(30) and b"") is False
        reads = []
        assert logs.save("alpha", "w3", lambda: reads.append(1) or b"") is False
        assert reads == [], "past the cap, no read is even begun"
    finally:
        release.set()
