"""Docker backend: a compromised worker of one client reaches nothing of another client,
nor of the runtime.

The attacker is the process backend's probe (``tests/isolation_probe.py``), fed to the
container's own python by ``docker exec`` in one of alpha's worker containers. Exec gives
it the container's user, capabilities, no_new_privs, seccomp filter, namespaces and
cgroup; the probe checks each of them against the worker's (pid 1 there) before it
attacks. Its targets: beta's worker and alpha's other worker (other containers on the same
engine and the same host network), ``serve``, their files, status ports and the admin API,
and alpha's own limits. Every attack must be denied.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import docker as docker_sdk
import pytest

from agent.contract import status_token
from runtime.settings import CLIENT_UIDS
from tests.support import Client

PROBE = Path(__file__).resolve().parent.parent / "isolation_probe.py"
FORKS = 200  # the fork bomb's bound
MEMORY_MB, PIDS = 384, 128  # alpha's limits: a worker fits, and a 200-fork bomb does not


@pytest.fixture
def engine():
    client = docker_sdk.from_env(version="auto")
    yield client
    client.close()


@pytest.fixture
def open_dir():
    """A directory every user may enter, as an operator's /srv would be (pytest's tmp is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="autonomite-docker-isolation-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def containers_of(engine, client_id: str) -> list:
    return sorted(engine.containers.list(filters={"label": f"autonomite.client={client_id}"}), key=lambda c: c.id)


def probe(container, plan: dict) -> dict:
    """The probe in ``container``, as the container's own user (docker exec's default)."""
    done = subprocess.run(["docker", "exec", "-i", container.id, "python", "-", json.dumps(plan)],
                          input=PROBE.read_text(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_compromised_worker_reaches_nothing_of_another_client(run_serve, docker_worker_image, engine, lk_a, lk_b,
                                                                open_dir):
    docs = {}
    for name in ("alpha", "beta"):  # readable by every user: only the mount keeps them apart
        docs[name] = open_dir / f"docs-{name}"
        docs[name].mkdir(mode=0o755)
        (docs[name] / "secret-plans.md").write_text(f"{name}'s confidential plans.\n")
        os.chmod(docs[name] / "secret-plans.md", 0o644)
    alpha = Client("alpha", lk_a, min_idle=2, max_size=2, knowledge_dir=str(docs["alpha"]),
                   pool={"memory_mb": MEMORY_MB, "pids": PIDS})
    beta = Client("beta", lk_b, min_idle=1, max_size=1, knowledge_dir=str(docs["beta"]))
    serve = run_serve([alpha, beta], backend="docker", workers={"image": docker_worker_image["image"]},
                      workdir=open_dir)
    a, a2 = containers_of(engine, "alpha")
    [b] = containers_of(engine, "beta")
    a_id, b_id = a.labels["autonomite.worker"], b.labels["autonomite.worker"]
    b_port, a2_port = b.labels["autonomite.port"], a2.labels["autonomite.port"]
    a_token, gateway = status_token(serve.admin, a_id), f"http://127.0.0.1:{serve.port}"
    log_dir = serve.config.parent / "workers"
    pids = {"alpha's other worker": a2.attrs["State"]["Pid"], "beta's worker": b.attrs["State"]["Pid"],
            "serve": serve.proc.pid}
    plan = {
        "become": False, "worker": 1,  # docker exec: the probe already is the worker, pid 1 is the worker
        "targets": pids,  # as the host numbers them
        "read": {"beta's knowledge directory": str(docs["beta"]), "beta's document": str(docs["beta"] / "secret-plans.md"),
                 "the log directory": str(log_dir), "the config file": str(serve.config),
                 "serve's root, through /proc": f"/proc/{serve.proc.pid}/root{serve.config}"},
        "write_into": {"beta's knowledge directory": str(docs["beta"]), "alpha's own knowledge (/knowledge)": "/knowledge",
                       "the log directory": str(log_dir), "the image's root filesystem (/var/tmp)": "/var/tmp",
                       "the image's home": "/home/agent"},
        "http": {"beta's status port, with its own token": (f"http://127.0.0.1:{b_port}/status", a_token),
                 "beta's status port, with no token": (f"http://127.0.0.1:{b_port}/status", None),
                 "alpha's other worker's status port, own token": (f"http://127.0.0.1:{a2_port}/status", a_token),
                 "the admin API, no token": (f"{gateway}/api/v1/containers/pool/stats", None),
                 "the admin API, its own token": (f"{gateway}/api/v1/containers/pool/stats", a_token)},
        "allocate_mb": 2 * MEMORY_MB, "forks": FORKS, "privileged_files": "/",
    }
    report = probe(a, plan)
    print(json.dumps(report, indent=1))

    # One list of everything that is wrong, so that a broken protection shows with the rest.
    problems = [f"identity: {d}" for d in report["identity"]]  # the probe must be exactly the worker
    problems += [f"{k}: {v}" for k, v in report["results"].items() if not v.startswith("denied")]
    problems += worker_privileges(a)
    a_uid, a2_uid, b_uid = (int(c.attrs["Config"]["User"].split(":")[0]) for c in (a, a2, b))
    if not a_uid == a2_uid != b_uid:
        problems.append(f"uids: alpha {a_uid} and {a2_uid}, beta {b_uid}: not one per client")
    assert problems == [], "\n".join(problems)
    assert all(CLIENT_UIDS.first <= u < CLIENT_UIDS.first + CLIENT_UIDS.count for u in (a_uid, b_uid))
    assert len(report["results"]) >= 30, report["results"]
    # The attacks are not refused because the targets are out of everyone's reach.
    assert serve.get("/api/v1/containers/pool/stats", token=serve.admin).status == 200
    # Nothing was harmed: beta's worker runs on and serves.
    b.reload()
    assert b.status == "running" and b.attrs["State"]["Pid"] == pids["beta's worker"]
    assert (docs["beta"] / "secret-plans.md").read_text() == "beta's confidential plans.\n"
    r = serve.start_session(beta, "room-after-the-probe")
    assert r.body["worker_id"] == b_id
    lk_b.delete_room("room-after-the-probe")


def worker_privileges(container) -> list[str]:
    """What the worker process itself (pid 1 of its container, read from the host) holds
    that it should not: its client's uid and gid, no group, no capability in any set,
    no_new_privs and a seccomp filter."""
    uid = container.attrs["Config"]["User"].split(":")[0]
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{container.attrs['State']['Pid']}/status")
                  .read_text().splitlines() if ":\t" in line)
    want = {"Uid": "\t".join([uid] * 4), "Gid": "\t".join([uid] * 4), "NoNewPrivs": "1", "Seccomp": "2",
            **{caps: "0000000000000000" for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}}
    wrong = [f"the worker's {k}: {status[k].strip()!r}, not {v!r}" for k, v in want.items() if status[k].strip() != v]
    # runc lists a numeric user's own gid as its one supplementary group: nothing beyond it.
    if status["Groups"].split() not in ([], [uid]):
        wrong.append(f"the worker's Groups: {status['Groups'].strip()!r}, not its own gid only")
    return wrong
