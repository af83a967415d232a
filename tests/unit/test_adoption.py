"""A crash of serve: what a worker does when its runtime dies (agent/orphan.py), what the
next runtime does with what it finds (runtime/backends/adoption.py), and the state file
that connects them (runtime/backends/instance_state.py)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

from agent.orphan import Orphan
from runtime.backends.adoption import WorkerRecord, runtime_gone, verdict
from runtime.backends.instance_state import BOOT_ID, InstanceState, start_time

RECORD = WorkerRecord("w1", "alpha", "alpha--w1", 4711, "fp", pid=1234, started=999, token="tok", uid=200_001,
                      cgroups=("/sys/fs/cgroup/memory/x/worker-w1",), cgroup_version=1)


# -- the worker's side -------------------------------------------------------------------------

def test_only_a_session_outlives_the_runtime():
    assert Orphan.on_runtime_gone(in_session=True) == "stay"
    assert Orphan.on_runtime_gone(in_session=False) == "exit"


def test_an_orphan_nobody_follows_ends_at_the_bound():
    orphan = Orphan(bound_s=30, gone_at=100)
    assert orphan.remaining(100, heard_at=99) == 30
    assert orphan.remaining(129.5, heard_at=99) == 0.5
    assert orphan.remaining(130, heard_at=99) <= 0
    assert not orphan.adopted(heard_at=99)


def test_a_runtime_that_follows_it_keeps_the_session_going_and_its_death_restarts_the_bound():
    orphan = Orphan(bound_s=30, gone_at=100)
    assert orphan.adopted(heard_at=105)
    assert orphan.remaining(500, heard_at=499) == 29  # followed all along: far past gone_at + bound
    assert orphan.remaining(529, heard_at=499) == 0  # the adopter died at 499: the whole bound again


# -- the next runtime's side ----------------------------------------------------------------------

def test_a_session_is_adopted():
    for state in ("busy", "draining"):
        assert verdict(RECORD, 999, {"worker_id": "w1", "state": state, "job_id": "J"}) == "adopt"


def test_a_worker_in_no_session_is_removed():
    for state in ("starting", "idle", "claimed", "draining"):
        assert verdict(RECORD, 999, {"worker_id": "w1", "state": state, "job_id": None}) == "remove"


def test_a_port_that_says_another_worker_or_nothing_is_not_adopted():
    assert verdict(RECORD, 999, {"worker_id": "w2", "state": "busy", "job_id": "J"}) == "remove"
    assert verdict(RECORD, 999, None) == "remove"


def test_an_exited_worker_or_a_reused_pid_is_gone():
    assert verdict(RECORD, None, None) == "gone"
    assert verdict(RECORD, 1000, {"worker_id": "w1", "state": "busy", "job_id": "J"}) == "gone"


def test_a_runtime_is_gone_when_its_pid_is_free_or_another_process():
    assert runtime_gone(5, None) and runtime_gone(5, 6) and not runtime_gone(5, 5)


def test_a_record_survives_the_file_and_a_bad_one_raises():
    assert WorkerRecord.from_json(json.loads(json.dumps(RECORD.to_json()))) == RECORD
    assert "tok" not in repr(RECORD)
    for bad in ({}, {**RECORD.to_json(), "pid": "x"}):
        try:
            WorkerRecord.from_json(bad)
        except (KeyError, TypeError, ValueError):
            continue
        raise AssertionError(f"accepted {bad}")


# -- the state file ---------------------------------------------------------------------------------

def test_the_state_file_is_the_runtimes_alone_and_goes_at_a_clean_stop(tmp_path):
    state = InstanceState(tmp_path / "state")
    state.add(RECORD)
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state.path).st_mode) == 0o600
    assert json.loads(state.path.read_text())["workers"][0]["token"] == "tok"
    state.close()
    assert state.path.exists()  # a worker it names is still running
    state.remove("w1")
    state.close()
    assert not state.path.exists()


def test_only_files_of_dead_runtimes_are_taken_and_each_once(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_file = directory / f"{dead.stdout.strip()}-12345.json"
    dead_file.write_text(json.dumps({"boot": BOOT_ID, "workers": [RECORD.to_json(), {"bad": 1}]}))
    before_reboot = directory / "999999996-1.json"
    before_reboot.write_text(json.dumps({"boot": "another", "workers": [RECORD.to_json()]}))
    alive_file = directory / f"{os.getppid()}-{start_time(os.getppid())}.json"  # a live runtime beside us
    alive_file.write_text(json.dumps({"workers": [RECORD.to_json()]}))
    (directory / "999999999-1.json").write_text("not json")
    state = InstanceState(directory)
    taken = [(path.name, records) for path, records in state.left_by_the_dead()]
    assert (dead_file.name, [RECORD]) in taken and ("999999999-1.json", []) in taken
    assert (before_reboot.name, []) in taken  # its pids may name other processes now: none is touched
    assert all(name != alive_file.name for name, _ in taken)
    assert not dead_file.exists() and alive_file.exists()
    assert list(state.left_by_the_dead()) == []


def test_a_bad_state_file_is_ignored_once_even_when_handling_it_fails(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / "999999997-1.json").write_text(json.dumps({"workers": 5}))  # not a list
    (directory / "999999998-1.json").write_text(json.dumps({"boot": BOOT_ID, "workers": [RECORD.to_json()]}))
    (directory / "999999998-1.tmp").write_text("a write the crash cut short")
    (directory / "instance-abc123").touch()  # a docker runtime's id shares the directory
    state = InstanceState(directory)
    seen = []
    try:
        for path, records in state.left_by_the_dead():
            seen.append((path.name, records))
            if records:
                raise RuntimeError("taking the record over failed")
    except RuntimeError:
        pass
    assert seen == [("999999997-1.json", []), ("999999998-1.json", [RECORD])]
    assert sorted(p.name for p in directory.iterdir()) == ["instance-abc123"]  # none is read again
    assert list(state.left_by_the_dead()) == []
