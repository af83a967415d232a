"""What only the docker backend has: containers killed from outside, runtime restarts, images."""

from __future__ import annotations

import os
import signal
import subprocess

import docker as docker_sdk
import pytest

from tests.support import Client, Serve, metric_value, wait_until


@pytest.fixture
def docker_backend(docker_worker_image) -> dict:
    return {"backend": "docker", "workers": dict(docker_worker_image)}


def containers(client_id: str, all: bool = False) -> list:  # the SDK's own name
    engine = docker_sdk.from_env(version="auto")
    try:
        # ignore_removed: a container removed between the listing and its inspection is not an error
        return engine.containers.list(all=all, filters={"label": f"autonomite.client={client_id}"}, ignore_removed=True)
    finally:
        engine.close()


@pytest.fixture(params=["full", "read-only"])
def breakable_log_dir(request, tmp_path):
    """A log directory on a tiny tmpfs the test mounts, and a call that breaks it: fills it
    to the last byte or remounts it read-only. Broken only once serve runs (serve refuses
    to start on a log directory it cannot write). Unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "logs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True, capture_output=True)

    def fill() -> None:
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            for _ in range(1000):  # 256 KiB in 4 KiB writes: ENOSPC long before the bound
                os.write(fd, b"\0" * 4096)
            raise AssertionError("the tmpfs never filled up")
        except OSError:
            pass
        finally:
            os.close(fd)

    def remount_read_only() -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)

    try:
        (mount / "workers").mkdir()
        yield mount / "workers", fill if request.param == "full" else remount_read_only
    finally:
        subprocess.run(["umount", str(mount)], check=True, capture_output=True)


def test_containers_are_labelled_named_limited_and_on_the_host_network(run_serve, docker_backend, lk_a):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=2)
    serve = run_serve([alpha], **docker_backend)
    [worker] = serve.pool("alpha")["workers"]
    [c] = containers("alpha")
    assert c.id.startswith(worker["ref"])
    assert c.name == f"autonomite-alpha-{worker['id']}"
    assert c.labels["autonomite.pool"] == "alpha" and c.labels["autonomite.worker"] == worker["id"]
    host = c.attrs["HostConfig"]
    assert host["NetworkMode"] == "host"
    assert host["NanoCpus"] == 1_000_000_000 and host["Memory"] == 1024 * 1024 * 1024
    assert host["RestartPolicy"]["Name"] in ("", "no")
    assert "registered as alpha--" in c.logs().decode()


def test_a_log_directory_that_takes_no_log_leaves_no_container_behind(breakable_log_dir, run_serve, docker_backend,
                                                                      lk_a):
    log_dir, break_it = breakable_log_dir
    alpha = Client("alpha", lk_a, min_idle=2, max_size=2)
    serve = run_serve([alpha], backend="docker", workers={**docker_backend["workers"], "log_dir": str(log_dir)})
    [ended, _] = serve.pool("alpha")["workers"]
    break_it()  # the disk fills up (or turns read-only) while serve runs
    subprocess.run(["docker", "kill", ended["ref"]], check=True, capture_output=True)  # an end: wait() saves, removes
    wait_until(lambda: not [c for c in containers("alpha", all=True) if c.id.startswith(ended["ref"])], 30,
               "the ended container removed though its log could not be saved")
    wait_until(lambda: (p := serve.pool("alpha"))["idle"] == 2 and ended["id"] not in {w["id"] for w in p["workers"]},
               60, "a replacement")
    assert serve.stop() == 0  # a stop: stop() saves, removes
    assert containers("alpha", all=True) == [], "no container left, running or exited"
    assert "not saved" in serve.log()
    assert not [p for p in log_dir.rglob("*.log") if p.stat().st_size]


def test_a_killed_idle_container_is_replaced(run_serve, docker_backend, lk_a):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=2)
    serve = run_serve([alpha], **docker_backend)
    [idle] = serve.pool("alpha")["workers"]
    subprocess.run(["docker", "kill", idle["ref"]], check=True, capture_output=True)
    wait_until(
        lambda: (p := serve.pool("alpha"))["idle"] == 1 and p["workers"][0]["id"] != idle["id"], 60, "a replacement"
    )
    assert metric_value(serve.metrics(), "autonomite_worker_exits_total", client="alpha", cause="crashed") == 1


def test_a_runtime_killed_with_sigkill_is_adopted_never_duplicated(run_serve, docker_backend, lk_a):
    alpha = Client("alpha", lk_a, min_idle=2, max_size=3)
    serve = run_serve([alpha], **docker_backend)
    serve.start_session(alpha, "room-survivor")
    wait_until(lambda: serve.pool("alpha")["idle"] == 2, 60, "the idle floor")
    before = sorted(c.id[:12] for c in containers("alpha"))
    assert len(before) == 3

    serve.stop(signal.SIGKILL)
    assert sorted(c.id[:12] for c in containers("alpha")) == before  # containers outlive a SIGKILL
    serve.start()
    pool = wait_until(lambda: (p := serve.pool("alpha")) and p["starting"] == 0 and p, 60, "adoption")
    assert sorted(w["ref"] for w in pool["workers"]) == before
    assert pool["leased"] == 1 and pool["idle"] == 2
    assert len(containers("alpha")) <= 3
    # The adopted session ends normally; the pool refills without going past max_size.
    lk_a.delete_room("room-survivor")
    wait_until(lambda: serve.pool("alpha")["leased"] == 0, 30, "the adopted session to end")
    wait_until(lambda: serve.pool("alpha")["idle"] == 2, 60, "refill")
    assert len(containers("alpha")) <= 3


def test_containers_of_a_removed_client_are_removed_at_start(run_serve, docker_backend, lk_a, lk_b):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=1)
    beta = Client("beta", lk_b, min_idle=1, max_size=1)
    first = run_serve([alpha, beta], **docker_backend)
    assert len(containers("beta")) == 1
    first.stop(signal.SIGKILL)
    # The same runtime (its state directory: it takes over its instance id), beta gone from the config.
    run_serve([alpha], state_dir=str(first.config.parent / "state"), **docker_backend)
    assert containers("beta") == []


def test_two_runtimes_on_one_engine_leave_each_other_s_workers_alone(run_serve, docker_backend, lk_a, lk_b):
    """Overlapping client ids: both serve alpha; beta is a client the second does not know."""
    first = run_serve([Client("alpha", lk_a, min_idle=1, max_size=1), Client("beta", lk_b, min_idle=1, max_size=1)],
                      **docker_backend)
    firsts = {c.id[:12]: c.labels["autonomite.instance"] for c in containers("alpha") + containers("beta")}
    assert len(firsts) == 2 and len(set(firsts.values())) == 1

    # A second runtime, its own state directory, on the same engine: it neither adopts the
    # first's alpha nor removes the first's beta (a client it does not know).
    second = run_serve([Client("alpha", lk_a, min_idle=1, max_size=1)], **docker_backend)
    [own] = second.pool("alpha")["workers"]
    assert own["ref"] not in firsts
    [container] = [c for c in containers("alpha") if c.id.startswith(own["ref"])]
    assert container.labels["autonomite.instance"] not in firsts.values()
    assert {c.id[:12] for c in containers("alpha") + containers("beta")} == set(firsts) | {own["ref"]}

    assert second.stop() == 0  # it stops its own workers only
    assert {c.id[:12] for c in containers("alpha", all=True) + containers("beta", all=True)} == set(firsts)
    assert {w["ref"] for w in first.pool("alpha")["workers"] + first.pool("beta")["workers"]} == set(firsts)
    assert first.pool("alpha")["idle"] == 1 and first.pool("beta")["idle"] == 1
    r = first.start_session(Client("beta", lk_b, token=first.env["BETA_TOKEN"]), "room-other-runtime")
    assert r.body["worker_id"] in {w["id"] for w in first.pool("beta")["workers"]}
    lk_b.delete_room("room-other-runtime")
    assert first.stop() == 0
    assert containers("alpha", all=True) == containers("beta", all=True) == []


def test_a_rolling_restart_on_docker_hands_over_without_touching_the_new_runtime_s_workers(run_serve, docker_backend,
                                                                                          lk_a):
    """The same config and state directory, as the README's one-liner: the old runtime still
    holds its instance id, so the new one makes another; each stops only its own workers."""
    alpha = Client("alpha", lk_a, min_idle=1, max_size=2)
    first = run_serve([alpha], **docker_backend)
    [old] = [c.id[:12] for c in containers("alpha")]
    second = Serve(first.config, first.env, first.log_path.with_name("serve-2.log"), args=("--replace",))
    try:
        second.start(wait_up=False)  # the address answers already: the old runtime's
        wait_until(lambda: first.proc.poll() is not None, 120, "the old runtime to hand over and exit")
        assert first.proc.returncode == 0, first.log()[-3000:]
        assert second.get("/readyz").status == 200
        [new] = second.pool("alpha")["workers"]
        assert {c.id[:12] for c in containers("alpha", all=True)} == {new["ref"]} != {old}
        assert len({c.labels["autonomite.instance"] for c in containers("alpha")}) == 1
        second.start_session(alpha, "room-after-the-handover")
        lk_a.delete_room("room-after-the-handover")
    finally:
        assert second.stop() == 0
    assert containers("alpha", all=True) == []


def test_a_bad_image_fails_clearly_with_backoff_and_no_crash_loop(run_serve, docker_backend, lk_a):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=1)
    docker_backend["workers"]["image"] = "autonomite-no-such-image:missing"
    serve = run_serve([alpha], wait_ready=False, **docker_backend)
    pool = wait_until(lambda: (p := serve.pool("alpha")).get("last_error") and p, 30, "a start failure")
    assert "docker image 'autonomite-no-such-image:missing' not found" in pool["last_error"]
    wait_until(lambda: metric_value(serve.metrics(), "autonomite_pool_start_backoff_seconds", client="alpha") > 0.5,
               30, "the backoff to grow")
    failures = metric_value(serve.metrics(), "autonomite_worker_start_failures_total", client="alpha")
    assert 2 <= failures <= 8, "backoff doubles: a handful of attempts in this time, not a crash loop"
    assert "not found" in serve.log() and serve.get("/healthz").status == 200
    assert metric_value(serve.metrics(), "autonomite_actor_restarts_total", actor="pool") == 0


def test_serve_without_a_docker_engine_fails_at_start(tmp_path, lk_a):
    from tests.support import Serve, write_config

    config = tmp_path / "clients.yaml"
    env = write_config(config, [Client("alpha", lk_a)], backend="docker")
    env["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"
    serve = Serve(config, env, tmp_path / "serve.log")
    with pytest.raises(AssertionError, match="serve exited with 1"):
        serve.start()
    assert "cannot start: docker backend: cannot reach the Docker engine" in serve.log()
    assert list((tmp_path / "state").iterdir()) == [], "an instance id with nothing to adopt is not kept"
