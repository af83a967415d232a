"""Test helpers: real servers and a real ``autonomite serve`` process, driven over HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from livekit import api

from runtime.backends.ports import free_port
from runtime.dev.devserver import LiveKitServer

# Every secret a test makes is recorded here; conftest scans all logs for them at the end.
ISSUED_SECRETS: list[str] = []


def new_secret(prefix: str) -> str:
    value = f"{prefix}-{secrets.token_hex(16)}"
    ISSUED_SECRETS.append(value)
    return value


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def livekit_signature(api_key: str, api_secret: str, body: str) -> str:
    """The Authorization value LiveKit sends with a webhook ``body``: a JWT whose sha256 claim covers it."""
    from livekit import api

    body_hash = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    return api.AccessToken(api_key, api_secret).with_sha256(body_hash).to_jwt()


@dataclass
class LiveKitProject:
    """One client's LiveKit: a real server with its own key pair."""

    server: LiveKitServer
    key: str
    secret: str

    @property
    def url(self) -> str:
        return self.server.url

    def call(self, fn: Callable[[api.LiveKitAPI], Any]) -> Any:
        async def run() -> Any:
            async with api.LiveKitAPI(self.url.replace("ws://", "http://"), self.key, self.secret) as lk:
                return await fn(lk)

        return asyncio.run(run())

    def participants(self, room: str) -> list:
        async def list_(lk: api.LiveKitAPI) -> list:
            rooms = await lk.room.list_rooms(api.ListRoomsRequest(names=[room]))
            if not rooms.rooms:
                return []
            return list((await lk.room.list_participants(api.ListParticipantsRequest(room=room))).participants)

        return self.call(list_)

    def active_agents(self, room: str) -> list:
        return [
            p
            for p in self.participants(room)
            if p.kind == api.ParticipantInfo.Kind.AGENT and p.state == api.ParticipantInfo.State.ACTIVE
        ]

    def dispatches(self, room: str) -> list:
        async def list_(lk: api.LiveKitAPI) -> list:
            return list(await lk.agent_dispatch.list_dispatch(room))

        return self.call(list_)

    def delete_room(self, room: str) -> None:
        self.call(lambda lk: lk.room.delete_room(api.DeleteRoomRequest(room=room)))


def start_livekit(log_dir: Path, name: str) -> LiveKitProject:
    key, secret = f"{name}key", new_secret(f"{name}-lk-secret")
    server = LiveKitServer({key: secret}, log_path=log_dir / f"livekit-{name}.log").start()
    return LiveKitProject(server, key, secret)


@dataclass
class Client:
    id: str
    project: LiveKitProject
    token: str = ""
    min_idle: int = 1
    max_size: int = 3
    agents: list[dict] = field(default_factory=lambda: [{"name": "support", "system_prompt": "You are helpful."}])
    knowledge_dir: str | None = None
    placement: list[str] = field(default_factory=list)  # swarm constraints, e.g. node.labels.tier==voice
    pool: dict = field(default_factory=dict)  # more pool settings, e.g. {"memory_mb": 256, "pids": 64}
    webhook_url: str | None = None  # session webhooks go there, signed with webhook_secret
    webhook_secret: str = ""

    def __post_init__(self) -> None:
        self.token = self.token or new_secret(f"{self.id}-token")
        if self.webhook_url and not self.webhook_secret:
            self.webhook_secret = new_secret(f"{self.id}-whsec")


def write_config(path: Path, clients: list[Client], **runtime: Any) -> dict[str, str]:
    """Write a config that reads every secret from ``${VAR}``; return that environment."""
    env = {"TEST_ADMIN_TOKEN": runtime.pop("admin_token", None) or new_secret("admin")}
    entries = []
    for c in clients:
        up = c.id.upper()
        env[f"{up}_TOKEN"], env[f"{up}_LK_SECRET"] = c.token, c.project.secret
        entries.append(
            {
                "id": c.id,
                "name": f"{c.id.title()} Inc",
                "api_token": f"${{{up}_TOKEN}}",
                "livekit": {"url": c.project.url, "api_key": c.project.key, "api_secret": f"${{{up}_LK_SECRET}}"},
                "pool": {"min_idle": c.min_idle, "max_size": c.max_size,
                         **({"placement": c.placement} if c.placement else {}), **c.pool},
                "agents": c.agents,
                **({"knowledge_dir": c.knowledge_dir} if c.knowledge_dir else {}),
                **({"webhook": {"url": c.webhook_url, "secret": f"${{{up}_WEBHOOK_SECRET}}"}} if c.webhook_url else {}),
            }
        )
        if c.webhook_url:
            env[f"{up}_WEBHOOK_SECRET"] = c.webhook_secret
    workers = {"log_dir": str(path.parent / "workers"), **runtime.pop("workers", {})}
    settings = {
        "runtime": {
            "workers": workers,
            "backend": "process",
            "gateway": {"host": "127.0.0.1", "port": free_port()},
            "admin_token": "${TEST_ADMIN_TOKEN}",
            "state_dir": str(path.parent / "state"),
            "scaler": {"interval_s": 0.2, "high_water": 0.8, "low_water": 0.3, "scale_down_after_s": 30},
            **runtime,
        },
        "clients": entries,
    }
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return env


@dataclass
class Response:
    status: int
    headers: dict
    body: Any


class Serve:
    """``autonomite serve`` as a real subprocess, as a user runs it."""

    def __init__(self, config: Path, env: dict[str, str], log_path: Path, args: tuple[str, ...] = (),
                 prefix: tuple[str, ...] = ()) -> None:
        """``args``: more ``serve`` arguments; ``prefix``: a command that runs it (e.g. unshare)."""
        self.config, self.env, self.log_path = config, env, log_path
        self.args, self.prefix = args, prefix
        settings = yaml.safe_load(config.read_text())
        self.port = settings["runtime"]["gateway"]["port"]
        self.admin = env["TEST_ADMIN_TOKEN"]
        self.proc: subprocess.Popen | None = None

    def start(self, ready_timeout: float = 90.0, wait_ready: bool = True, wait_up: bool = True) -> Serve:
        """``wait_up=False``: return at once (the address may be another runtime's, or none)."""
        full_env = {**os.environ, **self.env}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "runtime.server.cli", "serve", "--config", str(self.config), *self.args],
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if not wait_up:
            return self
        wait_until(lambda: self._up(), 30, "the gateway to listen")
        if wait_ready:
            wait_until(lambda: self.get("/readyz").status == 200, ready_timeout, "every pool to reach min_idle")
        return self

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            return self.get("/healthz").status == 200
        except OSError:
            return False

    def request(self, method: str, path: str, body: Any = None, token: str | None = None, raw: bytes | None = None,
                headers: dict | None = None) -> Response:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, hdrs, payload = r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            status, hdrs, payload = e.code, dict(e.headers), e.read()
        try:
            parsed = json.loads(payload) if payload else None
        except ValueError:
            parsed = payload.decode(errors="replace")
        return Response(status, hdrs, parsed)

    def get(self, path: str, token: str | None = None) -> Response:
        return self.request("GET", path, token=token)

    def trigger(self, client: Client, room: str, agent: str = "support", **extra: Any) -> Response:
        body = {"client_id": client.id, "agent": agent, "room_name": room, **extra}
        return self.request("POST", "/api/v1/trigger", body, token=client.token)

    def start_session(self, client: Client, room: str, **extra: Any) -> Response:
        """Trigger, and wait until the leased agent is active in the room on its LiveKit."""
        r = self.trigger(client, room, **extra)
        assert r.status == 200, r.body
        wait_until(lambda: client.project.active_agents(room), 30, f"the agent in {room}")
        return r

    def stats(self) -> dict:
        r = self.get("/api/v1/containers/pool/stats", token=self.admin)
        assert r.status == 200, r
        return r.body["clients"]

    def pool(self, client_id: str) -> dict:
        """This client's pool alone (``?client=``); {} for a client the runtime does not know."""
        r = self.get(f"/api/v1/containers/pool/stats?client={client_id}", token=self.admin)
        assert r.status in (200, 404), r
        return r.body["clients"][client_id] if r.status == 200 else {}

    def metrics(self) -> str:
        return self.get("/metrics").body

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0, drain_s: float = 1.0) -> int:
        """Stop it as an operator who will not wait for live calls: SIGTERM drains, and
        SIGTERM again ``drain_s`` later (if it still runs) ends the sessions and stops."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig == signal.SIGTERM:
                try:
                    self.proc.wait(drain_s)
                except subprocess.TimeoutExpired:
                    self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


def proc_stat(pid: int) -> tuple[str, int, int]:
    """(state, parent pid, session id) of a process, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[3])


def children_of(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, ppid, _ = proc_stat(int(entry.name))
            except (OSError, IndexError):
                continue
            if ppid == pid and state != "Z":
                found.append(int(entry.name))
    return found


def comm(pid: int) -> str:
    """The process name ps shows: ``zygote`` and ``worker`` for the zygote and its forks."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 if absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        sample, _, value = line.rpartition(" ")
        head, _, rest = sample.partition("{")
        if head != name:
            continue
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if got == want:
            return float(value)
    return 0.0


def backend_of(serve: Serve) -> str:
    return yaml.safe_load(serve.config.read_text())["runtime"].get("backend", "process")


def worker_environ(serve: Serve, ref: str) -> str:
    """What a worker holds, whatever the backend: for a container, its configured environment;
    for a process, its whole memory (its live environment included: ``/proc/PID/environ``
    shows only what it was exec'd with, which for a forked worker is the zygote's)."""
    if backend_of(serve) == "process":
        return process_memory(int(ref)).decode("latin-1")
    out = subprocess.run(["docker", "inspect", "--format", "{{json .Config.Env}}", ref], capture_output=True, text=True)
    return "\0".join(json.loads(out.stdout))


def process_memory(pid: int) -> bytes:
    """Every readable byte of a process's memory (root, or the same user and ptrace allowed)."""
    chunks = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or line.rstrip().endswith(("[vvar]", "[vsyscall]", "[vvar_vclock]")):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                chunks.append(mem.read(end - start))
            except OSError:
                continue
    return b"".join(chunks)


def worker_alive(serve: Serve, ref: str) -> bool:
    if backend_of(serve) == "process":
        return pid_alive(int(ref))
    out = subprocess.run(["docker", "inspect", "--format", "{{.State.Running}}", ref], capture_output=True, text=True)
    return out.stdout.strip() == "true"


async def converse(url: str, token: str, messages: list[str], timeout: float = 30.0) -> list[str]:
    """Join as the end user, read the agent's greeting, then send each message and read its reply.

    Text only: the user writes on LiveKit's ``lk.chat`` topic and the agent answers on
    ``lk.transcription``, as the livekit-agents room I/O does.
    """
    from livekit import rtc

    from runtime.dev.chat import agent_replies

    room = rtc.Room()
    replies = agent_replies(room)
    await room.connect(url, token)
    texts = []
    try:
        texts.append((await asyncio.wait_for(replies.get(), timeout))[1])  # the greeting
        for message in messages:
            await room.local_participant.send_text(message, topic="lk.chat")
            texts.append((await asyncio.wait_for(replies.get(), timeout))[1])
    finally:
        await room.disconnect()
    return texts


def kill_worker(serve: Serve, ref: str) -> None:
    """SIGKILL a worker from outside the runtime, as the OOM killer or `docker kill` would."""
    if backend_of(serve) == "process":
        os.kill(int(ref), signal.SIGKILL)
    else:
        subprocess.run(["docker", "kill", ref], check=True, capture_output=True)


class ChatProcess:
    """``autonomite chat`` as a person runs it: lines typed on stdin, its output read as it comes."""

    def __init__(self, serve: Serve, client: Client, *args: str) -> None:
        import threading

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.server.cli", "chat", "--gateway", f"http://127.0.0.1:{serve.port}",
             "--token", client.token, "--client", client.id, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.lines: list[str] = []
        # On a thread, so each expected line is awaited with a deadline.
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def printed(self, prefix: str, containing: str = "") -> bool:
        return any(line.startswith(prefix) and containing in line for line in list(self.lines))

    def type(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def leave(self) -> int:
        """Ctrl-D, and its exit code."""
        self.proc.stdin.close()
        return self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)  # the pipe is at its end once the process is gone
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.stdout.close()


class WebhookReceiver:
    """A real HTTP receiver for session webhooks, on loopback, in a thread of its own.

    ``seen``: (path, headers, body, monotonic time) of each request; ``answers[path](n)``:
    the status for that path's n-th request (1-based), or None to hang until ``close``.
    ``port``: a fixed one (a receiver back on the same address after an outage), or 0."""

    def __init__(self, port: int = 0) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.cond = threading.Condition()
        self.seen: list[tuple[str, dict[str, str], bytes, float]] = []
        self.answers: dict[str, Callable[[int], int | None]] = {}
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.cond:
                    receiver.seen.append((self.path, dict(self.headers.items()), body, time.monotonic()))
                    n = len([s for s in receiver.seen if s[0] == self.path])
                    receiver.cond.notify_all()
                status = receiver.answers.get(self.path, lambda n: 200)(n)
                if status is None:
                    receiver.release.wait(30)
                    return
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            allow_reuse_address = True  # back on the same port after an outage
            daemon_threads = True

        self.server = Server(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def of(self, path: str) -> list[tuple[str, dict[str, str], bytes, float]]:
        with self.cond:
            return [r for r in self.seen if r[0] == path]

    def wait(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), "the receiver did not see what was expected in time"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
