"""Tenants cannot touch each other on the process backend: attacks from inside a worker.

A probe (``tests/isolation_probe.py``) becomes exactly one of alpha's workers (its uid,
gid, groups, capabilities, no_new_privs, seccomp filter, cgroups and namespaces, checked
field by field against the worker's ``/proc/PID/status``) and attacks another client's
worker, alpha's other worker, the zygote and ``serve``: memory, environ, ptrace, signals,
the knowledge, log and config files, the status ports and the admin API, a raw socket,
a fork bomb and an allocation of twice its memory limit. Every attack must be denied.
Positive controls show that each target is really there and reachable by the right party.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
import yaml

from agent.contract import status_token
from tests.support import Client, children_of, comm, metric_value, pid_alive, wait_until

PROJECT = Path(__file__).resolve().parents[2]
MEMORY_MB, PIDS = 256, 64


def zygote_of(pid: int) -> int:
    return wait_until(lambda: next((p for p in children_of(pid) if comm(p) == "zygote"), None), 60, "the zygote")


def listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on (read as root from its fds and /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            ports.add(int(fields[1].split(":")[1], 16))
    return ports


def status_port(pid: int, worker_id: str, admin: str) -> int:
    """The worker's status port: the one that answers its own token (a positive control)."""
    for port in listening_ports(pid):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/status",
                                         headers={"Authorization": f"Bearer {status_token(admin, worker_id)}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                if json.loads(r.read()).get("worker_id") == worker_id:
                    return port
        except (OSError, ValueError):
            continue
    raise AssertionError(f"no status port of worker {worker_id} answers its own token")


def workers(serve, client_id: str) -> list[tuple[str, int]]:
    """(id, pid) of the pool's workers that have a process yet (a starting one may not)."""
    return sorted((w["id"], int(w["ref"])) for w in serve.pool(client_id)["workers"] if w["ref"])


def own_namespaces(pid: int) -> list[str]:
    """nsenter's options for the namespaces the worker does not share with us."""
    return [f"--{flag}" for kind, flag in (("pid", "pid"), ("mnt", "mount"))
            if os.readlink(f"/proc/{pid}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}")]


def run_probe(worker: int, plan: dict) -> dict:
    """The probe, started as root in the worker's namespaces, becomes the worker and attacks."""
    enter = own_namespaces(worker)
    ns = ["nsenter", "--target", str(worker), *enter, "--"] if enter else []
    plan = {**plan, "worker": 1 if "--pid" in enter else worker}
    out = subprocess.run([*ns, sys.executable, "-m", "tests.isolation_probe", json.dumps(plan)], cwd=PROJECT,
                         env={**os.environ, "PYTHONPATH": str(PROJECT)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def open_dir():
    """A directory every user may enter, as an operator's /etc/autonomite or /srv would be
    (pytest's own tmp is 0700, which would hide the files from the probe whatever the runtime did)."""
    path = Path(tempfile.mkdtemp(prefix="autonomite-isolation-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=[False, True], ids=["plain", "namespaces"])
def tenants(request, run_serve, lk_a, lk_b, open_dir):
    docs = {}
    for name in ("alpha", "beta"):
        docs[name] = open_dir / f"docs-{name}"
        docs[name].mkdir(mode=0o755)
        (docs[name] / "secret-plans.md").write_text(f"{name}'s confidential plans.\n")
        os.chmod(docs[name] / "secret-plans.md", 0o644)  # as an operator's umask leaves it
    pool = {"memory_mb": MEMORY_MB, "pids": PIDS}
    alpha = Client("alpha", lk_a, min_idle=2, max_size=2, knowledge_dir=str(docs["alpha"]), pool=pool,
                   agents=[{"name": "a", "system_prompt": "Alpha", "enable_rag": True}])
    beta = Client("beta", lk_b, min_idle=1, max_size=1, knowledge_dir=str(docs["beta"]), pool=pool,
                  agents=[{"name": "b", "system_prompt": "Beta", "enable_rag": True}])
    # The config is written 0644, as an operator's umask leaves it: serve must close it.
    serve = run_serve([alpha, beta], isolation={"namespaces": request.param}, workdir=open_dir)
    return serve, alpha, beta, docs, request.param


def test_a_worker_reaches_nothing_of_another_tenant_nor_of_the_runtime(tenants):
    serve, alpha, beta, docs, namespaces = tenants
    (a_id, a_pid), (a2_id, a2_pid) = workers(serve, "alpha")
    [(b_id, b_pid)] = workers(serve, "beta")
    zygote = zygote_of(serve.proc.pid)
    log_dir = serve.config.parent / "workers"
    b_port, a2_port = status_port(b_pid, b_id, serve.admin), status_port(a2_pid, a2_id, serve.admin)
    a_token = status_token(serve.admin, a_id)
    gateway = f"http://127.0.0.1:{serve.port}"
    plan = {
        "targets": {"itself": a_pid, "alpha's other worker": a2_pid, "beta's worker": b_pid, "the zygote": zygote,
                    "serve": serve.proc.pid},
        "read": {"beta's knowledge directory": str(docs["beta"]),
                 "beta's document": str(docs["beta"] / "secret-plans.md"),
                 "alpha's own document (the runtime hands it over)": str(docs["alpha"] / "secret-plans.md"),
                 "the log directory": str(log_dir), "beta's worker log": str(log_dir / "beta" / f"{b_id}.log"),
                 "the zygote's log": str(log_dir / "zygote.log"), "the config file": str(serve.config)},
        "write_into": {"beta's knowledge directory": str(docs["beta"]),
                       "alpha's own knowledge directory": str(docs["alpha"]),
                       "the log directory": str(log_dir), "alpha's log directory": str(log_dir / "alpha")},
        "append": {"beta's worker log": str(log_dir / "beta" / f"{b_id}.log"),
                   "its own log (it has a descriptor, not the file)": str(log_dir / "alpha" / f"{a_id}.log")},
        "http": {"beta's status port, with its own token": (f"http://127.0.0.1:{b_port}/status", a_token),
                 "beta's status port, with no token": (f"http://127.0.0.1:{b_port}/status", None),
                 "alpha's other worker's status port, own token": (f"http://127.0.0.1:{a2_port}/status", a_token),
                 "the admin API, no token": (f"{gateway}/api/v1/containers/pool/stats", None),
                 "the admin API, its own token": (f"{gateway}/api/v1/containers/pool/stats", a_token)},
        "allocate_mb": 2 * MEMORY_MB,
    }
    if namespaces:  # its own pid and mount namespaces: it does not even see the others
        assert own_namespaces(a_pid) == ["--pid", "--mount"]
    report = run_probe(a_pid, plan)
    assert report["identity"] == [], "the probe must have exactly the worker's identity"
    if namespaces:
        assert report["results"]["beta's worker: read environ"] == "denied: ENOENT", report["results"]
    allowed = {k: v for k, v in report["results"].items() if not v.startswith("denied")}
    assert not allowed, json.dumps(allowed, indent=1)
    assert len(report["results"]) >= 45, report["results"]
    # Nothing was harmed: every worker serves on, the pools are as they were.
    assert all(pid_alive(p) for p in (a_pid, a2_pid, b_pid, zygote, serve.proc.pid))
    assert workers(serve, "alpha") == [(a_id, a_pid), (a2_id, a2_pid)] and workers(serve, "beta") == [(b_id, b_pid)]
    assert [line for line in (docs["beta"] / "secret-plans.md").read_text().splitlines()] == ["beta's confidential plans."]
    # The attacks are not refused because the targets are out of the runtime's reach too.
    assert serve.get("/api/v1/containers/pool/stats", token=serve.admin).status == 200
    serve.start_session(beta, "room-after-the-probe", agent="b")


def test_the_seccomp_filter_alone_denies_even_root(tmp_path):
    """The filter on its own (uid 0, every capability): each denied call fails with EPERM,
    ordinary work goes on. So the filter is a layer of its own, not the uid's shadow."""
    script = r"""
import ctypes, json, os, socket, subprocess, sys
from agent.sandbox import Identity, enter
from tests.isolation_probe import attempt, ptrace_attach, raw_socket, vm_read
libc = ctypes.CDLL(None, use_errno=True)
child = subprocess.Popen(["sleep", "30"])
def call(nr, *args):
    if libc.syscall(nr, *args) == -1:
        raise OSError(ctypes.get_errno(), "")
    return "returned"
enter(Identity(uid=None, seccomp=True))
results = {
    "ptrace": attempt(lambda: ptrace_attach(child.pid)),
    "process_vm_readv": attempt(lambda: vm_read(child.pid)),
    "raw packet socket": attempt(lambda: raw_socket(socket.AF_PACKET, socket.SOCK_RAW)),
    "raw IP socket": attempt(lambda: raw_socket(socket.AF_INET6, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 58)),
    "mount": attempt(lambda: call(165, b"none", b"/mnt", b"tmpfs", 0, None)),
    "bpf": attempt(lambda: call(321, 0, 0, 0)),
    "keyctl": attempt(lambda: call(250, 0, 0, 0, 0)),
    "kexec_load": attempt(lambda: call(246, 0, 0, 0, 0)),
    "perf_event_open": attempt(lambda: call(298, 0, 0, -1, -1, 0)),
    "unshare(CLONE_NEWUSER)": attempt(lambda: call(272, 0x10000000)),
    "io_uring_setup": attempt(lambda: call(425, 1, 0)),
}
ok = {"tcp socket": attempt(lambda: raw_socket(socket.AF_INET, socket.SOCK_STREAM)),
      "a subprocess": attempt(lambda: subprocess.run(["true"], check=True).returncode)}
child.kill()
print(json.dumps({"denied": results, "allowed": ok}))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, env={**os.environ, "PYTHONPATH": str(PROJECT)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert all(v == "denied: EPERM" for v in report["denied"].values()), report["denied"]
    assert all(v.startswith("ALLOWED") for v in report["allowed"].values()), report["allowed"]


def test_a_worker_past_its_memory_limit_dies_alone_and_its_pool_says_oom(run_serve, lk_a, lk_b):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=1, pool={"memory_mb": MEMORY_MB})
    beta = Client("beta", lk_b, min_idle=1, max_size=1, pool={"memory_mb": MEMORY_MB})
    serve = run_serve([alpha, beta])
    [(victim_id, victim)], [(_, bystander)] = workers(serve, "alpha"), workers(serve, "beta")
    zygote = zygote_of(serve.proc.pid)
    memory = Path(next(f"/sys/fs/cgroup/memory{line.split(':', 2)[2]}" for line in
                       Path(f"/proc/{victim}/cgroup").read_text().splitlines() if line.split(":")[1] == "memory"))
    assert int((memory / "memory.limit_in_bytes").read_text()) == MEMORY_MB * 1024 * 1024
    # The worker itself goes past its limit: its limit drops to just above what it uses,
    # and a session (joining a room, WebRTC) needs more.
    (memory / "memory.limit_in_bytes").write_text(str(int((memory / "memory.usage_in_bytes").read_text()) + 2 ** 20))
    serve.trigger(alpha, "room-oom")  # whatever it answers: the leased worker is killed on the way
    wait_until(lambda: metric_value(serve.metrics(), "autonomite_worker_exits_total", client="alpha", cause="oom") == 1,
               60, "an exit recorded as oom")
    assert not pid_alive(victim)
    assert pid_alive(bystander) and pid_alive(zygote) and serve.proc.poll() is None, "it died alone"
    wait_until(lambda: not memory.exists(), 10, "the dead worker's cgroup removed")
    # Replaced (the trigger's second attempt may well have leased the replacement).
    wait_until(lambda: (ids := {w for w, _ in workers(serve, "alpha")}) and victim_id not in ids, 60, "a replacement")


NOBODY = 65534
# The interpreter may live where an unprivileged user cannot reach it (here: pyenv under
# /root, mode 0700). This wrapper gives the unprivileged serve a mount namespace of its own
# in which that directory is an empty tmpfs with only the interpreter bound back in; the
# host is not changed. "$1": the directory to cover, "$2": the one to keep, the rest: argv.
UNPRIVILEGED = r"""
set -e
hide=$1 keep=$2 stage=$3; shift 3
if [ -n "$hide" ]; then
  mount --bind "$keep" "$stage"
  mount -t tmpfs -o mode=0755 tmpfs "$hide"
  mkdir -p "$keep"
  mount --move "$stage" "$keep"
fi
exec setpriv --reuid 65534 --regid 65534 --clear-groups --inh-caps=-all -- "$@"
"""


def closed_ancestor(path: str) -> str:
    """The outermost ancestor of ``path`` that other users cannot enter, or ''."""
    parts = Path(path).parts
    for i in range(2, len(parts) + 1):
        if not os.stat(Path(*parts[:i])).st_mode & 0o001:
            return str(Path(*parts[:i]))
    return ""


@pytest.fixture
def unprivileged_serve(lk_a, tmp_path):
    """``serve`` as uid 65534 (nobody): no uids to hand out, no cgroups delegated to it."""
    from tests.support import write_config

    started = []
    work = Path(tempfile.mkdtemp(prefix="autonomite-unprivileged-"))  # pytest's own tmp is 0700
    stage = tmp_path / "stage"
    stage.mkdir()

    def start(clients: list[Client], wait_ready: bool = True, **runtime) -> tuple[subprocess.Popen, Path, dict]:
        config = work / "clients.yaml"
        env = write_config(config, clients, **runtime)
        os.chown(work, NOBODY, NOBODY)
        os.chown(config, NOBODY, NOBODY)
        port = yaml.safe_load(config.read_text())["runtime"]["gateway"]["port"]
        log = work / "serve.log"
        hide = closed_ancestor(sys.base_prefix)
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", UNPRIVILEGED, "sh", hide,
             sys.base_prefix, str(stage), sys.executable, "-m", "runtime.server.cli", "serve", "--config", str(config)],
            cwd=work, env={**os.environ, **env, "PYTHONPATH": str(PROJECT)}, stdout=open(log, "ab"),
            stderr=subprocess.STDOUT)
        started.append(proc)
        if wait_ready:
            def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                        return r.status == 200
                except OSError:
                    return False

            wait_until(ready, 90, "the unprivileged serve to be ready")
        return proc, log, {"port": port, "admin": env["TEST_ADMIN_TOKEN"]}

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    shutil.rmtree(work, ignore_errors=True)


def serve_of(wrapper: subprocess.Popen) -> int:
    """The serve process itself (the wrapper execs it, after unshare forked once or not)."""
    def find() -> int | None:
        for pid in [wrapper.pid, *children_of(wrapper.pid)]:
            if b"runtime.server.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        return None

    return wait_until(find, 30, "the serve process")


def test_without_root_serve_starts_applies_what_it_can_and_says_what_it_could_not(unprivileged_serve, lk_a):
    alpha = Client("alpha", lk_a, min_idle=2, max_size=2)
    wrapper, log, info = unprivileged_serve([alpha])
    serve = serve_of(wrapper)
    lines = [line for line in log.read_text().splitlines() if "could not apply" in line]
    assert len(lines) == 1 and "a uid per worker (serve runs as uid 65534" in lines[0] and "cgroups (" in lines[0], lines
    assert "applied no_new_privs, non-dumpable, seccomp;" in lines[0]
    zygote = zygote_of(serve)
    with urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{info['port']}/api/v1/containers/pool/stats",
            headers={"Authorization": f"Bearer {info['admin']}"}), timeout=5) as r:
        refs = sorted(int(w["ref"]) for w in json.loads(r.read())["clients"]["alpha"]["workers"])
    worker, other = refs
    status = {k: v for k, _, v in (line.partition(":\t") for line in Path(f"/proc/{worker}/status").read_text().splitlines())}
    assert status["Uid"].split() == ["65534"] * 4 and status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert int(status["CapEff"], 16) == 0
    # The worker shares serve's uid here; not being dumpable is what keeps it out of serve,
    # the zygote and its sibling (signals, from the same uid, it can still send: see README).
    report = run_probe(worker, {"targets": {"serve": serve, "the zygote": zygote, "the other worker": other},
                                "signals": False})
    assert report["identity"] == [], report["identity"]
    allowed = {k: v for k, v in report["results"].items() if not v.startswith("denied")}
    assert not allowed, json.dumps(allowed, indent=1)
    assert len(report["results"]) == 15


def test_required_isolation_refuses_to_start_without_root(unprivileged_serve, lk_a):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=1)
    wrapper, log, _ = unprivileged_serve([alpha], wait_ready=False, isolation={"required": True})
    assert wrapper.wait(60) == 1
    text = log.read_text()
    assert "cannot start: runtime.isolation.required is set, but this host cannot give workers: a uid per worker" \
        in text, text[-2000:]


def test_serve_keeps_the_secrets_it_read_from_its_environment_from_its_children(tmp_path):
    """``serve --with-livekit`` starts livekit-server as a child that inherits serve's
    environment: the config's ${VAR} secrets must be gone from it, other variables not."""
    from runtime.backends.ports import free_port
    from tests.support import new_secret

    port, config = free_port(), tmp_path / "clients.yaml"
    secrets = {"ADMIN": new_secret("admin"), "TOKEN": new_secret("token"), "LK_SECRET": new_secret("lk-secret")}
    config.write_text(yaml.safe_dump({
        "runtime": {"admin_token": "${ADMIN}", "gateway": {"port": free_port()},
                    "workers": {"log_dir": str(tmp_path / "workers")}},
        "clients": [{"id": "alpha", "name": "Alpha", "api_token": "${TOKEN}",
                     "livekit": {"url": f"ws://127.0.0.1:{port}", "api_key": "alphakey", "api_secret": "${LK_SECRET}"},
                     "pool": {"min_idle": 1, "max_size": 1}, "agents": [{"name": "a", "system_prompt": "A"}]}],
    }))
    proc = subprocess.Popen([sys.executable, "-m", "runtime.server.cli", "serve", "--config", str(config), "--with-livekit"],
                            cwd=PROJECT, env={**os.environ, **secrets, "PYTHONPATH": str(PROJECT), "PLAIN_MARKER": "1"},
                            stdout=open(tmp_path / "serve.log", "ab"), stderr=subprocess.STDOUT)
    livekit = None
    try:
        livekit = wait_until(lambda: next((p for p in children_of(proc.pid) if comm(p) == "server"), None), 60,
                             "the livekit-server child")
        environ = Path(f"/proc/{livekit}/environ").read_bytes().split(b"\0")
        assert b"PLAIN_MARKER=1" in environ, "the child inherits serve's environment"
        for name, value in secrets.items():
            assert not any(value.encode() in entry for entry in environ), f"{name} reached a child"
    finally:
        proc.terminate()  # while serve may still be starting: it must still stop its child
        proc.wait(60)
    wait_until(lambda: not pid_alive(livekit), 30, "the livekit-server child stopped with serve")
