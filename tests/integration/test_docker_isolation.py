"""Docker backend: a compromised worker of one client reaches nothing of another client.

The attacker is ``tests/container_probe.py``, run in client alpha's worker container with
``docker exec`` and the container's own user: the same uid, capabilities, no_new_privs,
seccomp filter, namespaces and cgroup as the worker (the test checks that first). Its
targets are client beta's worker (another container on the same engine and the same host
network) and alpha's own limits.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import docker as docker_sdk
import pytest

from runtime.settings import CLIENT_UIDS
from tests.support import Client

PROBE = Path(__file__).resolve().parent.parent / "container_probe.py"
FORKS = 200  # the fork bomb's bound
MEMORY_MB, PIDS = 384, 128  # alpha's limits: a worker fits, and a 200-fork bomb does not


@pytest.fixture
def engine():
    client = docker_sdk.from_env(version="auto")
    yield client
    client.close()


def container_of(engine, client_id: str):  # noqa: ANN001, ANN201
    [container] = engine.containers.list(filters={"label": f"autonomite.client={client_id}"})
    return container


def probe(container, args: dict) -> dict:  # noqa: ANN001
    """Run the probe in ``container`` as the container's own user (docker exec's default)."""
    done = subprocess.run(["docker", "exec", "-i", container.id, "python", "-", json.dumps(args)],
                          input=PROBE.read_text(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_a_compromised_worker_reaches_nothing_of_another_client(run_serve, docker_worker_image, engine, lk_a, lk_b):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=1, pool={"memory_mb": MEMORY_MB, "pids": PIDS})
    beta = Client("beta", lk_b, min_idle=1, max_size=1)
    serve = run_serve([alpha, beta], backend="docker", workers={"image": docker_worker_image["image"]})
    a, b = container_of(engine, "alpha"), container_of(engine, "beta")
    b_pid = b.attrs["State"]["Pid"]

    report = probe(a, {"target_pids": [b_pid], "memory_bytes": MEMORY_MB * 2**20, "forks": FORKS})
    print(json.dumps({k: v for k, v in report.items() if k not in ("self_context", "worker_context")}, indent=1))

    # Each client runs as a uid of its own, from the configured range; gid the same.
    uids = CLIENT_UIDS
    a_uid, b_uid = (int(c.attrs["Config"]["User"].split(":")[0]) for c in (a, b))
    assert a_uid != b_uid and all(uids.first <= u < uids.first + uids.count for u in (a_uid, b_uid))
    host = a.attrs["HostConfig"]
    assert host["CapDrop"] == ["ALL"] and "no-new-privileges:true" in host["SecurityOpt"] and host["ReadonlyRootfs"]
    assert host["PidsLimit"] == PIDS and host["MemorySwap"] == host["Memory"] == MEMORY_MB * 2**20

    # The probe is the worker, as far as the kernel can tell.
    assert report["self"] == report["worker"], "the probe must run with exactly the worker's identity"
    assert report["self_context"] == report["worker_context"]
    me = report["self"]
    assert me["Uid"] == [str(a_uid)] * 4 and me["Gid"] == [str(a_uid)] * 4
    assert set(me["Groups"]) <= {str(a_uid)}, "no supplementary group but its own"
    assert me["CapEff"] == me["CapPrm"] == me["CapBnd"] == me["CapAmb"] == ["0000000000000000"]
    assert me["NoNewPrivs"] == ["1"] and me["Seccomp"] == ["2"]

    # beta's worker: not visible, and its environment, memory, ptrace and signals all denied.
    assert b_pid not in report["visible_pids"]
    for what, outcome in report["targets"][str(b_pid)].items():
        assert outcome["got"] is None and outcome["error"], f"{what} of beta's worker: {outcome}"
    assert lk_b.secret not in json.dumps(report) and beta.token not in json.dumps(report)
    # No sniffing: no packet socket, no raw socket.
    for kind, outcome in report["raw_sockets"].items():
        assert outcome["error"] == "EPERM", f"{kind}: {outcome}"
    # A fork bomb stops at the pids limit, well before its bound.
    assert report["fork_bomb"]["forked"] < FORKS and report["fork_bomb"]["error"] == "EAGAIN", report["fork_bomb"]
    # Twice the memory limit is never given: the allocating process is killed.
    assert report["allocation"] == {"completed": False, "ended_by": "signal 9"}, report["allocation"]
    # Nothing in the image can raise privileges.
    assert report["privileged_files"] == []

    # beta never noticed: its worker runs on and still serves.
    b.reload()
    assert b.status == "running" and b.attrs["State"]["Pid"] == b_pid
    assert serve.pool("beta")["idle"] == 1
