"""The one contract between the runtime and its workers, as both ends see it.

- **The worker's configuration** (:class:`WorkerConfig`) and the names of the environment
  variables that carry it (:class:`Env`): the runtime's backends set them, the worker reads
  them. ``to_env`` and ``from_env`` are the two ends, kept side by side. Its agent catalog
  is typed (:class:`CatalogAgent`, :class:`ProviderChoice`): the runtime's settings make it
  (``AgentSettings.for_worker``), the worker's providers and session read it.
- **The status port**: its vocabulary (:data:`ReportedState`), where it is and the token it
  asks for (:class:`StatusAddress`, :func:`status_token`), and how the runtime reads it
  (:func:`read_status`). Served by the worker (``agent/status_server.py``), read by the
  pool (``actors/``) and the handoff (``runtime/livekit/handoff.py``).

The runtime imports nothing else of ``agent/`` to talk to a worker.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, NamedTuple, TypedDict, cast, get_args

ReportedState = Literal["starting", "idle", "claimed", "busy", "draining"]
# Why a session ended, as its record and its webhook say it. The worker reports the first
# five; the runtime knows the rest (a worker that died, a restart that found it gone).
EndCause = Literal["user_left", "room_finished", "no_show", "room_deleted", "drained", "worker_failed",
                   "runtime_restart"]
DEFAULT_END_OF_TURN_S = 0.55  # silero's own silence window; AgentSettings.end_of_turn_s defaults to it


@dataclass(frozen=True)
class ProviderChoice:
    """An agent's LLM, STT or TTS as its worker gets it: this client's key, revealed."""

    provider: str = "offline"
    model: str | None = None
    voice_id: str | None = None
    api_key: str | None = field(default=None, repr=False)
    first_token_s: float | None = None  # the offline LLM only

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ProviderChoice | None:
        if not data:
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class CatalogAgent:
    """One agent of the client's catalog, as its workers receive it (checked already by
    the runtime's settings; a worker trusts its own runtime)."""

    name: str
    system_prompt: str = ""
    enable_rag: bool = False
    voice_id: str = "alloy"  # the cloud TTS voice, unless the TTS choice names its own
    llm: ProviderChoice = ProviderChoice()
    stt: ProviderChoice | None = None  # none: text-only input
    tts: ProviderChoice | None = None  # none: text-only output
    end_of_turn_s: float = DEFAULT_END_OF_TURN_S

    @property
    def offline_speech(self) -> bool:
        return self.stt is not None and self.stt.provider == "offline"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CatalogAgent:
        return cls(
            name=str(data["name"]),
            system_prompt=str(data.get("system_prompt") or ""),
            enable_rag=bool(data.get("enable_rag")),
            voice_id=str(data.get("voice_id") or "alloy"),
            llm=ProviderChoice.from_json(data.get("llm")) or ProviderChoice(),
            stt=ProviderChoice.from_json(data.get("stt")),
            tts=ProviderChoice.from_json(data.get("tts")),
            end_of_turn_s=float(data.get("end_of_turn_s", DEFAULT_END_OF_TURN_S)),
        )


class Status(TypedDict, total=False):
    """What a worker's status port answers (``agent/lease_book.py`` writes it). Every key
    may be missing from an older or a stand-in worker; a reader says what it assumes."""

    worker_id: str
    client_id: str
    agent_name: str
    state: ReportedState
    registered: bool  # with LiveKit, right now
    lease_id: str | None  # the lease it holds, if any
    job_id: str | None  # the LiveKit job it accepted, if any
    in_room: bool  # its agent joined the session's room
    user_joined: bool  # an end user did
    end_cause: EndCause | None  # the session is over, and why
    etag: str  # changes whenever anything above does (long polls wait on it)


class Milestones(NamedTuple):
    """How far a worker's session got, from its status: what the session's record is made of."""

    in_room: bool = False
    user_joined: bool = False
    end_cause: EndCause | None = None


class Env:
    """The environment variables a worker is started with (besides LiveKit's own
    ``LIVEKIT_URL``, ``LIVEKIT_API_KEY`` and ``LIVEKIT_API_SECRET``)."""

    WORKER_ID = "AUTONOMITE_WORKER_ID"
    CLIENT_ID = "AUTONOMITE_CLIENT_ID"
    AGENT_NAME = "AUTONOMITE_AGENT_NAME"
    STATUS_HOST = "AUTONOMITE_STATUS_HOST"
    STATUS_PORT = "AUTONOMITE_STATUS_PORT"
    STATUS_TOKEN = "AUTONOMITE_STATUS_TOKEN"
    CATALOG = "AUTONOMITE_CATALOG"
    USER_JOIN_TIMEOUT_S = "AUTONOMITE_USER_JOIN_TIMEOUT_S"
    REJOIN_GRACE_S = "AUTONOMITE_REJOIN_GRACE_S"
    ORPHAN_TIMEOUT_S = "AUTONOMITE_ORPHAN_TIMEOUT_S"
    KNOWLEDGE_DIR = "AUTONOMITE_KNOWLEDGE_DIR"  # the client's documents, as a directory (containers)
    KNOWLEDGE_FD = "AUTONOMITE_KNOWLEDGE_FD"  # or as a memfd the runtime filled (process backend)
    LIFELINE_FD = "AUTONOMITE_LIFELINE_FD"  # end of file there: the runtime died (agent/lifeline.py)
    IDENTITY = "AUTONOMITE_IDENTITY"  # a plain start's identity to take (agent/__main__.py)
    SETTINGS_FILE = "AUTONOMITE_SETTINGS_FILE"  # swarm: the whole configuration, as a secret (agent/boot.py)


@dataclass
class WorkerConfig:
    """What the runtime tells a worker through its environment."""

    worker_id: str
    client_id: str
    agent_name: str
    status_port: int
    catalog: list[CatalogAgent]
    user_join_timeout_s: float = 120.0
    rejoin_grace_s: float = 10.0  # runtime.settings.WorkerSettings.rejoin_grace_s
    status_host: str = "127.0.0.1"  # where the status port listens (another node's runtime probes it)
    status_token: str = field(default="", repr=False)  # every status call must carry it
    orphan_timeout_s: float = 300.0  # in session, no runtime following it this long: end (agent/orphan.py)

    def to_env(self) -> dict[str, str]:
        return {
            Env.STATUS_HOST: self.status_host,
            Env.STATUS_TOKEN: self.status_token,
            Env.WORKER_ID: self.worker_id,
            Env.CLIENT_ID: self.client_id,
            Env.AGENT_NAME: self.agent_name,
            Env.STATUS_PORT: str(self.status_port),
            Env.CATALOG: json.dumps([agent.to_json() for agent in self.catalog]),
            Env.USER_JOIN_TIMEOUT_S: str(self.user_join_timeout_s),
            Env.ORPHAN_TIMEOUT_S: str(self.orphan_timeout_s),
            Env.REJOIN_GRACE_S: str(self.rejoin_grace_s),
        }

    @classmethod
    def from_env(cls) -> WorkerConfig:
        return cls(
            worker_id=os.environ[Env.WORKER_ID],
            client_id=os.environ[Env.CLIENT_ID],
            agent_name=os.environ[Env.AGENT_NAME],
            status_port=int(os.environ[Env.STATUS_PORT]),
            catalog=[CatalogAgent.from_json(a) for a in json.loads(os.environ.get(Env.CATALOG, "[]"))],
            user_join_timeout_s=float(os.environ.get(Env.USER_JOIN_TIMEOUT_S, "120")),
            rejoin_grace_s=float(os.environ.get(Env.REJOIN_GRACE_S, "10")),
            status_host=os.environ.get(Env.STATUS_HOST, "127.0.0.1"),
            status_token=os.environ.get(Env.STATUS_TOKEN, ""),
            orphan_timeout_s=float(os.environ.get(Env.ORPHAN_TIMEOUT_S, "300")),
        )


@dataclass(frozen=True)
class StatusAddress:
    """Where a worker's status port is and the token it asks for.

    The port answers claims and ends sessions, so every call carries a per-worker token
    (``Authorization: Bearer``). The token is derived from a runtime secret and the worker
    id (:func:`status_token`): a restarted runtime can still talk to the workers it adopts,
    and no worker can reach another's port with its own."""

    host: str
    port: int
    token: str = field(default="", repr=False)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def status_token(key: str, worker_id: str) -> str:
    return hmac.new(key.encode(), f"worker-status:{worker_id}".encode(), hashlib.sha256).hexdigest()[:32]


def read_status(
    address: StatusAddress, timeout: float = 1.0, wait: float = 0.0, since: str | None = None
) -> Status | None:
    """A worker's status; with ``since``, once it differs from that etag (or after ``wait``).
    None when it did not answer, or answered something that is not a status."""
    query = f"?since={urllib.parse.quote(since)}&wait={wait:g}" if since else ""
    request = urllib.request.Request(address.url(f"/status{query}"), headers=address.headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout + (wait if since else 0)) as r:
            return parse_status(json.loads(r.read()))
    except (OSError, ValueError):
        return None


def parse_status(raw: object) -> Status | None:
    """``raw`` as a :class:`Status`, or None if it is not one: a worker is untrusted code, so
    its answer is checked before the pool acts on it."""
    if not isinstance(raw, dict) or raw.get("state", "starting") not in get_args(ReportedState):
        return None
    if not all(isinstance(raw.get(k, False), bool) for k in ("registered", "in_room", "user_joined")):
        return None
    if raw.get("end_cause") not in (None, *get_args(EndCause)):
        return None
    return cast(Status, {k: v for k, v in raw.items() if k in Status.__annotations__})
