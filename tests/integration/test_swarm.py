"""The swarm backend against a real, private Docker engine in swarm mode (one node)."""

from __future__ import annotations

import json
import signal
from concurrent.futures import ThreadPoolExecutor

import docker
import pytest

from agent.contract import status_token
from tests.support import Client, Serve, metric_value, wait_until
from tests.swarm_stack import PrivateSwarm


@pytest.fixture(scope="module")
def swarm(docker_worker_image, log_root):
    stack = PrivateSwarm(log_root / "dockerd-swarm.log").start()
    try:
        stack.load(docker.from_env(version="auto", timeout=600), docker_worker_image["image"])
        yield stack
    finally:
        stack.stop()
    # Nothing of the private engine is left: no directory, no mount (its netns handle).
    assert not stack.root.exists() and str(stack.root) not in open("/proc/self/mounts").read()


@pytest.fixture
def swarm_backend(swarm, docker_worker_image) -> dict:
    return {"backend": "swarm", "workers": {"image": docker_worker_image["image"], "engine_url": swarm.url}}


def services(swarm: PrivateSwarm, client_id: str) -> list:
    return swarm.engine.services.list(filters={"label": f"autonomite.client={client_id}"})


def container_of(swarm: PrivateSwarm, worker_id: str):
    return next(c for c in swarm.containers() if c.labels.get("autonomite.worker") == worker_id)


def test_a_trigger_reaches_a_swarm_worker_and_the_pool_refills(run_serve, swarm, swarm_backend, lk_a, lk_b):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=2)
    beta = Client("beta", lk_b, min_idle=1, max_size=1)
    serve = run_serve([alpha, beta], **swarm_backend)
    [service] = services(swarm, "alpha")
    spec = service.attrs["Spec"]
    task = spec["TaskTemplate"]
    assert spec["Labels"]["autonomite.client"] == "alpha" and task["ContainerSpec"]["Labels"]["autonomite.client"] == "alpha"
    assert task["ContainerSpec"]["Image"].startswith("sha256:"), "the image by ID, so no task asks a registry"
    assert task["RestartPolicy"]["Condition"] == "none" and spec["Mode"]["Replicated"]["Replicas"] == 1
    assert task["Resources"]["Limits"]["MemoryBytes"] == 1024 * 2**20  # the pool's limits
    [worker] = serve.pool("alpha")["workers"]
    assert container_of(swarm, worker["id"]).attrs["HostConfig"]["NetworkMode"] == "host"

    r = serve.trigger(alpha, "room-swarm")
    assert r.status == 200, r.body
    identity = f"agent-{r.body['worker_id']}"
    wait_until(lambda: identity in [p.identity for p in lk_a.active_agents("room-swarm")], 30, "the agent in the room")
    lk_a.delete_room("room-swarm")
    # The session ends, its service is removed, and the pool is back at min_idle.
    wait_until(lambda: r.body["worker_id"] not in {s.attrs["Spec"]["Labels"]["autonomite.worker"]
                                                  for s in services(swarm, "alpha")}, 60, "the service removed")
    wait_until(lambda: serve.pool("alpha")["idle"] == 1 and serve.pool("alpha")["leased"] == 0, 60, "refill")
    assert metric_value(serve.metrics(), "autonomite_worker_exits_total", client="alpha", cause="session_end") == 1


def test_credentials_reach_a_swarm_worker_as_a_secret_never_in_its_service_spec(run_serve, swarm, swarm_backend,
                                                                                lk_a, lk_b):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=1, pool={"pids": 200})
    beta = Client("beta", lk_b, min_idle=1, max_size=1)
    serve = run_serve([alpha, beta], **swarm_backend)
    [worker] = serve.pool("alpha")["workers"]
    [service] = services(swarm, "alpha")
    # What anyone with manager access reads (docker service inspect): no secret value at all.
    spec = json.dumps(service.attrs)
    for secret in (lk_a.secret, lk_b.secret, alpha.token, beta.token, serve.admin, status_token(serve.admin, worker["id"])):
        assert secret not in spec
    container = service.attrs["Spec"]["TaskTemplate"]["ContainerSpec"]
    assert container["Env"] == ["HOME=/tmp", "AUTONOMITE_SETTINGS_FILE=/run/secrets/autonomite-worker"]
    [ref] = container["Secrets"]
    uid = container["User"].split(":")[0]
    assert ref["File"] == {"Name": "autonomite-worker", "UID": uid, "GID": uid, "Mode": 0o400}
    assert "Data" not in swarm.engine.secrets.get(ref["SecretID"]).attrs["Spec"], "the API never gives a secret back"
    # The same hardening as the docker backend.
    assert container["ReadOnly"] and container["CapabilityDrop"] == ["ALL"] and int(uid) >= 300_000
    assert service.attrs["Spec"]["TaskTemplate"]["Resources"]["Limits"]["Pids"] == 200
    assert services(swarm, "beta")[0].attrs["Spec"]["TaskTemplate"]["ContainerSpec"]["User"] != container["User"]
    # The worker itself, as its node sees it: the client's uid, no capability, no new privileges.
    done = container_of(swarm, worker["id"]).exec_run(["cat", "/proc/1/status"])
    status = dict(line.split(":\t", 1) for line in done.output.decode().splitlines() if ":\t" in line)
    assert status["Uid"].split()[0] == uid and status["CapEff"] == "0000000000000000"
    assert status["CapBnd"] == "0000000000000000" and status["NoNewPrivs"] == "1"
    # It registered with its client's LiveKit (read from the secret file), and serves.
    r = serve.trigger(alpha, "room-secret")
    assert r.status == 200, r.body
    lk_a.delete_room("room-secret")
    # The secret goes with its service.
    wait_until(lambda: {s.name for s in swarm.engine.secrets.list()} == {s.name for s in swarm.engine.services.list()},
               60, "the ended worker's secret removed with its service")


def test_concurrent_triggers_on_swarm_never_lease_a_worker_twice(run_serve, swarm_backend, lk_a):
    alpha = Client("alpha", lk_a, min_idle=2, max_size=3)
    serve = run_serve([alpha], dispatch={"max_wait_s": 0}, **swarm_backend)
    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda i: serve.trigger(alpha, f"room-swarm-{i}"), range(6)))
    ok = [r for r in responses if r.status == 200]
    assert len(ok) == 2 and len({r.body["worker_id"] for r in ok}) == 2
    assert all(r.status == 503 and r.headers.get("Retry-After") for r in responses if r.status != 200)
    for r in ok:
        lk_a.delete_room(r.body["room_name"])


def test_a_killed_swarm_container_is_replaced_and_its_service_removed(run_serve, swarm, swarm_backend, lk_a):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=1)
    serve = run_serve([alpha], **swarm_backend)
    [worker] = serve.pool("alpha")["workers"]
    container_of(swarm, worker["id"]).kill()
    wait_until(lambda: (p := serve.pool("alpha"))["idle"] == 1 and p["workers"][0]["id"] != worker["id"], 90,
               "a replacement")
    wait_until(lambda: len(services(swarm, "alpha")) == 1, 30, "the dead worker's service removed")


def test_a_restarted_runtime_adopts_its_swarm_workers_without_duplicates(
    run_serve, swarm, swarm_backend, lk_a, tmp_path, log_root
):
    alpha = Client("alpha", lk_a, min_idle=2, max_size=3)
    first = run_serve([alpha], **swarm_backend)
    before = {w["id"] for w in first.pool("alpha")["workers"]}
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    assert {s.attrs["Spec"]["Labels"]["autonomite.worker"] for s in services(swarm, "alpha")} == before
    # The same config (so the same admin token, from which status tokens derive) again.
    second = Serve(first.config, first.env, log_root / f"{tmp_path.name}-second.log").start()
    try:
        after = wait_until(lambda: (p := second.pool("alpha")) and p["idle"] == 2 and {w["id"] for w in p["workers"]},
                           60, "the adopted workers idle")
        assert after == before, "the restarted runtime must adopt exactly the workers that were running"
        assert len(services(swarm, "alpha")) == 2
        assert second.trigger(alpha, "room-adopted").status == 200
        lk_a.delete_room("room-adopted")
    finally:
        second.stop()


def test_placement_that_no_node_matches_is_a_clear_start_error(run_serve, swarm, swarm_backend, lk_a):
    gamma = Client("gamma", lk_a, min_idle=1, max_size=1, placement=["node.labels.tier==voice"])
    serve = run_serve([gamma], wait_ready=False, backend="swarm",
                      workers={**swarm_backend["workers"], "ready_timeout_s": 20})
    pool = wait_until(lambda: (p := serve.pool("gamma")) and p["last_error"] and p, 120, "a failed start")
    assert "no suitable node" in pool["last_error"] and pool["idle"] == 0
    assert not [c for c in swarm.containers() if c.labels.get("autonomite.client") == "gamma"]


def test_an_image_the_swarm_does_not_have_is_a_clear_start_error(run_serve, swarm, lk_a):
    delta = Client("delta", lk_a, min_idle=1, max_size=1)
    serve = run_serve([delta], wait_ready=False, backend="swarm",
                      workers={"image": "autonomite-agent:never-loaded", "engine_url": swarm.url})
    # generous: a busy 2-core CI
    pool = wait_until(lambda: (p := serve.pool("delta")) and p["last_error"] and p, 150, "a failed start")
    assert "not found on the manager" in pool["last_error"] and pool["idle"] == 0
    assert not services(swarm, "delta")
