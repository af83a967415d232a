"""The runtime's end of isolation, in milliseconds: uids, secrets out of the environment,
files closed to other users, the worker identity's JSON round trip."""

from __future__ import annotations

import os
import stat

import pytest

from agent.sandbox import Identity
from runtime.isolation import UidPool, close_to_others, take_secrets_from_environ
from runtime.settings import placeholders


def test_uids_go_round_robin_and_a_uid_in_use_is_never_handed_out_twice():
    pool = UidPool(1000, 3)
    first = [pool.take(), pool.take()]
    pool.give_back(1000)
    assert first == [1000, 1001] and pool.take() == 1002 and pool.take() == 1000  # the freed one, last
    with pytest.raises(RuntimeError, match="all 3 worker uids are in use"):
        pool.take()


def test_the_variables_a_config_reads_leave_the_environment(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("runtime: {admin_token: ${ADMIN}}\nclients: [{api_token: '${TOKEN}'}]\n")
    monkeypatch.setenv("ADMIN", "a" * 16)
    monkeypatch.setenv("TOKEN", "t" * 16)
    monkeypatch.setenv("UNRELATED", "stays")
    assert placeholders(config) == {"ADMIN", "TOKEN"}
    taken = take_secrets_from_environ(placeholders(config))
    assert taken == {"ADMIN": "a" * 16, "TOKEN": "t" * 16}
    assert "ADMIN" not in os.environ and "TOKEN" not in os.environ and os.environ["UNRELATED"] == "stays"


def test_closing_to_others_keeps_owner_and_group_and_reports_what_changed(tmp_path):
    (tmp_path / "docs" / "deep").mkdir(parents=True)
    (tmp_path / "docs" / "deep" / "a.md").write_text("x")
    os.chmod(tmp_path / "docs" / "deep" / "a.md", 0o664)
    os.chmod(tmp_path / "docs", 0o750)  # already closed
    changed = close_to_others(tmp_path / "docs", recursive=True)
    assert changed == [tmp_path / "docs" / "deep", tmp_path / "docs" / "deep" / "a.md"]
    assert stat.S_IMODE((tmp_path / "docs" / "deep" / "a.md").stat().st_mode) == 0o660
    assert close_to_others(tmp_path / "docs", recursive=True) == []
    assert close_to_others(tmp_path / "missing") == []


def test_an_identity_travels_as_json_unchanged():
    identity = Identity(uid=200001, gid=200001, cgroup_procs=("/sys/fs/cgroup/pids/x/cgroup.procs",),
                        mount_namespace=True, seccomp=True)
    assert Identity.from_json(identity.to_json()) == identity
    assert Identity.from_json({}) == Identity()


def test_a_private_tmp_keeps_the_workers_own_program_when_it_lives_there(tmp_path, monkeypatch):
    """A checkout and its virtualenv under /tmp (a CI clone) must stay visible to a worker
    in its own mount namespace: only they are mounted back into its private /tmp."""
    from agent.sandbox import _program_dirs_under

    checkout = tmp_path / "checkout"
    (checkout / ".venv" / "lib").mkdir(parents=True)
    monkeypatch.setattr("sys.path", [str(checkout / ".venv" / "lib"), str(checkout), "/nonexistent"])
    monkeypatch.setattr("sys.prefix", str(checkout / ".venv"))
    assert str(checkout) in _program_dirs_under(str(tmp_path))  # the outermost one only
    assert not any(p.startswith(str(checkout) + "/") for p in _program_dirs_under(str(tmp_path)))
    assert _program_dirs_under(str(tmp_path / "elsewhere")) == []


def test_the_way_back_to_the_program_is_traversable_whatever_the_umask(tmp_path):
    import os
    import stat

    from agent.sandbox import _make_traversable

    old = os.umask(0o077)
    try:
        _make_traversable(str(tmp_path / "a" / "b" / "checkout"), str(tmp_path))
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "checkout"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
