"""Configuration: pydantic models for the runtime and its clients, loaded from YAML.

The YAML shape is the public interface of the product, so the models forbid unknown
keys (a typo must not silently fall back to a default) and every error names the file,
the field path and the reason. ``${VAR}`` placeholders are filled from the environment
before validation; secrets are held as ``SecretStr`` so a stray ``repr`` never shows them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from agent.contract import DEFAULT_END_OF_TURN_S, CatalogAgent
from runtime.outbound import check_url
from runtime.secrets import fingerprint

_ID = r"^[a-z0-9][a-z0-9_-]{0,31}$"
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# ``${VAR}`` is not valid YAML inside a flow mapping ({url: ..., api_key: ${KEY}}), the shape
# the config uses; so placeholders become this marker before parsing and are filled after.
_MARKER = re.compile(r"⟪([A-Za-z_][A-Za-z0-9_]*)⟫")


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names file, field and reason."""


class FieldError(ValueError):
    """A model validator's refusal of one field below it (``loc``, relative to the model):
    ``load_settings`` names that field, not the model, in its ConfigError."""

    def __init__(self, loc: tuple[str | int, ...], reason: str) -> None:
        super().__init__(f"{_dotted(loc)}: {reason}")
        self.loc, self.reason = loc, reason


def _long_enough(token: SecretStr) -> SecretStr:
    if len(token.get_secret_value()) < 16:
        raise ValueError("must be at least 16 characters")
    return token


Token = Annotated[SecretStr, AfterValidator(_long_enough)]  # a bearer token: guessable if short


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AuthFailureSettings(_Model):
    """After ``max`` failed authentications from one address within ``window_s``, that
    address gets 429 until its oldest failure is ``window_s`` old."""

    max: int = Field(default=20, ge=1, le=100_000)
    window_s: float = Field(default=60.0, gt=0, le=86_400)


class GatewaySettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # A connection must deliver a complete request head this soon after it opens or after
    # its previous response, or it is closed (slowloris); an idle keep-alive one too.
    header_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    body_timeout_s: float = Field(default=10.0, gt=0, le=3600)  # reading a request body: else 408
    auth_failures: AuthFailureSettings = AuthFailureSettings()


class MetricsSettings(_Model):
    """A listener of its own for ``/metrics``, which names every client: with it, the public
    gateway no longer serves ``/metrics`` and only who reaches this address can scrape."""

    host: str = Field(default="127.0.0.1", pattern=r"^[A-Za-z0-9.:-]{1,253}$")  # an address or a host name
    port: int = Field(ge=1, le=65535)  # no 0: a scraper must know where to look


class ScalerSettings(_Model):
    interval_s: float = Field(default=1.0, gt=0, le=3600)
    high_water: float = Field(default=0.8, gt=0, le=1)
    low_water: float = Field(default=0.3, ge=0, lt=1)
    scale_down_after_s: float = Field(default=30.0, ge=0)
    step: int = Field(default=1, ge=1, le=100)
    # A client at zero (min_idle 0, no worker, nothing leased or starting) for this long has
    # its pool stopped: no thread, no timer, no metrics series. Its next trigger starts it.
    stop_idle_pool_after_s: float = Field(default=60.0, ge=1, le=86_400)

    @model_validator(mode="after")
    def _waters_ordered(self) -> ScalerSettings:
        if self.low_water >= self.high_water:
            raise ValueError("low_water must be below high_water")
        return self


class SupervisorSettings(_Model):
    max_restarts: int = Field(default=3, ge=0)
    within_s: float = Field(default=10.0, gt=0)
    shutdown_timeout_s: float = Field(default=15.0, gt=0)


class ShutdownSettings(_Model):
    """How ``serve`` goes down on SIGTERM: it drains. Live sessions go on for up to
    ``drain_timeout_s``; those still running then are ended, their agent saying
    ``end_message`` to the caller first."""

    drain_timeout_s: float = Field(default=600.0, gt=0, le=86_400)
    end_message: str = Field(
        default="I'm sorry, this service is restarting and has to end our call now. Please call again in a minute.",
        min_length=1, max_length=500)


class UidRange(_Model):
    """Where workers' uids (and gids, the same number) come from: ids no other user of the
    host (or of any swarm node) has, and no file on it is owned by. The process backend
    takes one per worker from ``runtime.isolation.uids``; the docker and swarm backends
    derive one per client from ``runtime.workers.client_uids`` (runtime/backends/uids.py)."""

    first: int = Field(default=200_000, ge=1000, le=2**31 - 2)
    count: int = Field(default=65_536, ge=1, le=2**24)

    @model_validator(mode="after")
    def _fits(self) -> UidRange:
        if self.first + self.count > 2**31 - 1:
            raise ValueError("first + count must stay below 2147483647")
        return self


# docker and swarm backends: clear of the process backend's default range (runtime.isolation.uids)
CLIENT_UIDS = UidRange(first=300_000, count=2**24)


class WorkerSettings(_Model):
    """How workers are started, whatever the backend."""

    ready_timeout_s: float = Field(default=60.0, gt=0)
    lease_timeout_s: float = Field(default=60.0, gt=0)  # a leased worker with no job by then is retired
    user_join_timeout_s: float = Field(default=120.0, gt=0)  # a session whose user never joins ends then
    # A session whose last end user left ends only if none is back within this: a caller
    # whose connection dropped rejoins under the same identity, which LiveKit reports as a
    # leave and a join. LiveKit (v1.13.5) waits 5 s for a dropped participant to resume
    # before it calls them gone, and a client then rejoins within moments: 10 s covers both.
    rejoin_grace_s: float = Field(default=10.0, ge=0, le=600)
    log_dir: Path = Path("logs/workers")
    # A worker in a session whose runtime died goes on while a runtime follows it (the next
    # serve adopts it); once none has for this long, it ends the session and exits.
    orphan_timeout_s: float = Field(default=300.0, gt=0, le=86_400)
    # process backend: fork workers from a pre-imported zygote (agent/zygote.py) instead of
    # starting each with a fresh interpreter; a plain start remains the fallback.
    zygote: bool = True
    image: str = "autonomite-agent:latest"  # docker backend; a client may name its own
    volumes: list[str] = Field(default_factory=list)  # docker backend: "host:container[:ro]"
    engine_url: str | None = None  # swarm backend: the manager's Docker API (default: DOCKER_HOST)
    # docker and swarm backends: each client's containers run as ``first + sha256(id) % count``
    client_uids: UidRange = CLIENT_UIDS


class IsolationSettings(_Model):
    """Process backend: what each worker becomes after the fork (agent/sandbox.py)."""

    enabled: bool = True
    # Refuse to start unless every part applies (root, cgroups; namespaces if asked for),
    # instead of starting with what needs no privilege and logging what is missing.
    required: bool = False
    uids: UidRange = UidRange()
    # A pid and a mount namespace per worker (a fresh /proc, private /tmp and /dev/shm).
    namespaces: bool = False


class DispatchSettings(_Model):
    """How long a trigger may take to put an agent in the room before it is refused.

    A 200 means the leased worker *accepted* the job: the runtime waits up to
    ``accept_timeout_s`` for that, deletes a dispatch that was not accepted, and tries
    another idle worker, ``attempts`` times in all.
    """

    accept_timeout_s: float = Field(default=4.0, gt=0, le=60)
    attempts: int = Field(default=2, ge=1, le=5)
    # A trigger that finds no idle worker while its pool may still grow waits this long for
    # the worker started for it (a burst), first come, first served; then 503. 0 turns it off.
    max_wait_s: float = Field(default=3.0, ge=0, le=60)

    @property
    def deadline_s(self) -> float:
        """The longest a trigger can take: the wait for a worker, then each attempt's pool
        answer (2 s), claim (2 s), dispatch (4 s), accept and deleting an unaccepted
        dispatch (4 s), all bounded in actors/dispatch.py and runtime/livekit/handoff.py."""
        return self.max_wait_s + self.attempts * (self.accept_timeout_s + 14.0) + 1.0


class WebhookSettings(_Model):
    """Session webhooks to each client (runtime/sessions/webhooks.py): how they are sent and
    retried. A client's URL must reach a public address unless ``allow_private``."""

    allow_private: bool = False
    timeout_s: float = Field(default=5.0, gt=0, le=60)  # per request: connect, and each read
    retry_base_s: float = Field(default=1.0, gt=0, le=3600)  # backoff: full jitter under base * 2^(attempt-1)
    retry_max_s: float = Field(default=300.0, gt=0, le=86_400)  # ... capped here
    retry_for_s: float = Field(default=86_400.0, gt=0, le=30 * 86_400)  # then the event is marked failed
    max_pending_per_client: int = Field(default=10_000, ge=1, le=10_000_000)  # past it the oldest fail


class SessionSettings(_Model):
    """Every trigger's record (runtime/sessions), kept in ``state_dir``: on unless turned off."""

    record: bool = True  # false: no records, no usage, no session webhooks (nothing is kept)


class RuntimeSettings(_Model):
    backend: Literal["process", "docker", "swarm"] = "process"
    gateway: GatewaySettings = GatewaySettings()
    metrics: MetricsSettings | None = None  # none: /metrics stays on the gateway, as before
    dispatch: DispatchSettings = DispatchSettings()
    admin_token: Token
    scaler: ScalerSettings = ScalerSettings()
    supervisor: SupervisorSettings = SupervisorSettings()
    workers: WorkerSettings = WorkerSettings()
    isolation: IsolationSettings = IsolationSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    webhooks: WebhookSettings = WebhookSettings()
    sessions: SessionSettings = SessionSettings()
    # The runtime's own, private (0700): the process backend's per-instance record of its
    # workers, from which the next runtime adopts sessions after a crash
    # (runtime/backends/instance_state.py); the docker and swarm backends' instance id
    # (runtime/instance.py). One per deployment: two deployments never share it.
    state_dir: Path = Path("state")
    fault_injection: bool = False

    @model_validator(mode="after")
    def _metrics_apart(self) -> RuntimeSettings:
        m, gw = self.metrics, self.gateway
        if m is not None and m.port == gw.port and (m.host == gw.host or "0.0.0.0" in (m.host, gw.host)):
            raise ValueError(f"metrics.port {m.port} is the gateway's; give the metrics listener a port of its own")
        return self


class LiveKitSettings(_Model):
    url: str = Field(pattern=r"^(ws|wss|http|https)://[^\s/]+(/.*)?$")
    api_key: SecretStr
    api_secret: SecretStr

    @field_validator("api_key", "api_secret")
    @classmethod
    def _not_empty(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().strip():
            raise ValueError("must not be empty")
        return v

    @property
    def http_url(self) -> str:
        """The URL the server API speaks on (LiveKit accepts both schemes on one port)."""
        return self.url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)

    @property
    def fingerprint(self) -> str:
        """Which key pair is in use, without revealing it."""
        return fingerprint(self.api_key.get_secret_value() + ":" + self.api_secret.get_secret_value())


class PoolSettings(_Model):
    min_idle: int = Field(default=1, ge=0, le=100)
    max_size: int = Field(default=4, ge=1, le=100)
    cpu: float = Field(default=1.0, gt=0, le=64)
    memory_mb: int = Field(default=1024, ge=64)
    pids: int = Field(default=512, ge=16, le=1_000_000)  # processes and threads per worker
    # swarm backend: Swarm placement constraints for this client's workers, for example
    # "node.labels.tier==voice"; none spreads them over the nodes.
    placement: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+\s*(==|!=)\s*[^\s]+$")]] = Field(
        default_factory=list, max_length=10)

    @model_validator(mode="after")
    def _min_fits_max(self) -> PoolSettings:
        if self.min_idle > self.max_size:
            raise ValueError(f"min_idle ({self.min_idle}) must not exceed max_size ({self.max_size})")
        return self


class ProviderSettings(_Model):
    """One model provider for an agent. ``offline`` needs no key and no network."""

    provider: str = Field(pattern=r"^[a-z0-9_-]{1,32}$")
    model: str | None = Field(default=None, max_length=200)
    api_key: SecretStr | None = None
    voice_id: str | None = Field(default=None, max_length=200)
    # The offline LLM only: seconds before its first word. It answers at once, where a cloud
    # LLM takes ~0.5-2 s to its first token; this gives the demo and the tests that timing
    # (a caller who speaks before the greeting has come).
    first_token_s: float | None = Field(default=None, ge=0, le=30)


LLM_PROVIDERS = {"offline", "openai"}
STT_PROVIDERS = {"offline", "deepgram", "openai"}  # offline: pocketsphinx (agent/offline_voice.py)
TTS_PROVIDERS = {"offline", "cartesia", "elevenlabs", "openai"}  # offline: espeak-ng


class AgentSettings(_Model):
    name: str = Field(pattern=_ID)
    system_prompt: str = Field(min_length=1, max_length=20_000)
    enable_rag: bool = False
    voice_id: str = Field(default="alloy", min_length=1, max_length=100)
    llm: ProviderSettings = ProviderSettings(provider="offline")
    stt: ProviderSettings | None = None  # none: text-only input
    tts: ProviderSettings | None = None  # none: text-only output
    # Offline speech input only: how long a caller stays silent before their turn ends
    # (silero's silence window and livekit-agents' endpointing delay both). Shorter answers
    # sooner but cuts off a caller who pauses mid-sentence. 0.55 s is silero's own default.
    # A cloud STT keeps livekit-agents' own turn detection and ignores it.
    end_of_turn_s: float = Field(default=DEFAULT_END_OF_TURN_S, ge=0.1, le=5.0)

    @model_validator(mode="after")
    def _known_providers(self) -> AgentSettings:
        for kind, known, chosen in (("llm", LLM_PROVIDERS, self.llm), ("stt", STT_PROVIDERS, self.stt),
                                    ("tts", TTS_PROVIDERS, self.tts)):
            if chosen is not None and chosen.provider not in known:
                raise ValueError(f"{kind}.provider must be one of {sorted(known)}, not {chosen.provider!r}")
            if chosen is not None and chosen.provider != "offline" and chosen.api_key is None:
                raise ValueError(f"{kind}.api_key is required for provider {chosen.provider!r}")
            if chosen is not None and chosen.first_token_s is not None and (kind, chosen.provider) != ("llm", "offline"):
                raise ValueError(f"{kind}.first_token_s is for the offline llm only")
        return self

    def for_worker(self) -> CatalogAgent:
        """The agent as its worker receives it: provider keys revealed (this client's only)."""
        data = self.model_dump(mode="json")
        for kind in ("llm", "stt", "tts"):
            chosen = getattr(self, kind)
            if chosen is not None and chosen.api_key is not None:
                data[kind]["api_key"] = chosen.api_key.get_secret_value()
        return CatalogAgent.from_json(data)


class WebhookTarget(_Model):
    """Where a client receives its session events, and the secret they are signed with
    (``Autonomite-Signature``: HMAC-SHA256, see runtime/sessions/webhooks.py)."""

    url: str = Field(min_length=1, max_length=2000)  # checked against runtime.webhooks.allow_private by Settings
    secret: Token


class ClientSettings(_Model):
    id: str = Field(pattern=_ID)
    name: str = Field(min_length=1, max_length=200)
    api_token: Token
    livekit: LiveKitSettings
    pool: PoolSettings = PoolSettings()
    image: str | None = None  # docker backend: this client's worker image
    knowledge_dir: Path | None = None  # documents for RAG; only this client's workers read it
    agents: list[AgentSettings] = Field(min_length=1)
    webhook: WebhookTarget | None = None  # none: no session events are sent to this client

    @field_validator("knowledge_dir")
    @classmethod
    def _knowledge_dir_exists(cls, v: Path | None) -> Path | None:
        if v is None:
            return None
        try:  # is_dir() raises, not returns False, for some paths (e.g. a name too long)
            if not v.is_dir():
                raise ValueError(f"{v} is not a directory")
            return v.resolve()
        except OSError as e:
            raise ValueError(f"cannot be read as a directory ({e.strerror or type(e).__name__})") from None

    @field_validator("agents")
    @classmethod
    def _unique_agent_names(cls, agents: list[AgentSettings]) -> list[AgentSettings]:
        _reject_duplicates([a.name for a in agents], "agent name")
        return agents

    def agent(self, name: str) -> AgentSettings | None:
        return next((a for a in self.agents if a.name == name), None)


class SupabaseSettings(_Model):
    """Where the clients live when they live in Supabase (see config/supabase/schema.sql)."""

    url: str = Field(pattern=r"^https?://[^\s/]+(/.*)?$")
    service_key: SecretStr  # a service_role JWT: it reads every client's secrets
    table: str = Field(default="clients", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    poll_interval_s: float = Field(default=10.0, gt=0, le=3600)
    cache_file: Path | None = None  # the set being served, for a start while Supabase is down
    # Optional: the project's Postgres URL. The watcher then LISTENs for the table's NOTIFY
    # (config/supabase/schema.sql) and reads at once on a change instead of at the next poll.
    database_url: SecretStr | None = None


class ClientSourceSettings(_Model):
    supabase: SupabaseSettings


class Settings(_Model):
    runtime: RuntimeSettings
    clients: list[ClientSettings] = Field(default_factory=list)
    # With a source, the file has no clients: they come from the source (runtime.clients.source).
    clients_source: ClientSourceSettings | None = None

    @field_validator("clients")
    @classmethod
    def _unique_clients(cls, clients: list[ClientSettings]) -> list[ClientSettings]:
        _reject_duplicates([c.id for c in clients], "client id")
        tokens = [c.api_token.get_secret_value() for c in clients]
        if len(set(tokens)) != len(tokens):
            raise ValueError("two clients share one api_token; each client needs its own")
        return clients

    @model_validator(mode="after")
    def _webhooks_reach_public_addresses(self) -> Settings:
        """Here, not on the client: whether a private address is allowed is the runtime's
        setting. A name is resolved (DNS) as the config loads."""
        allow_private = self.runtime.webhooks.allow_private
        for i, client in enumerate(self.clients):
            if client.webhook is not None:
                try:
                    check_url(client.webhook.url, allow_private, unresolved_ok=True)
                except ValueError as e:
                    raise FieldError(("clients", i, "webhook", "url"), str(e)) from None
        return self

    def client(self, client_id: str) -> ClientSettings | None:
        return self._index()[1].get(client_id)

    def _index(self) -> tuple[list[ClientSettings], dict[str, ClientSettings]]:
        """Every client by id, built once per client list: the gateway looks one up per
        request, among up to thousands. Kept beside the fields (pydantic leaves it out of
        equality); a ``model_copy`` with new clients carries the old index, so it is
        checked against the list it was built from."""
        index: tuple[list[ClientSettings], dict[str, ClientSettings]] | None = self.__dict__.get("_client_index")
        if index is None or index[0] is not self.clients:
            index = (self.clients, {c.id: c for c in self.clients})
            self.__dict__["_client_index"] = index
        return index


def _reject_duplicates(values: list[str], what: str) -> None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise ValueError(f"duplicate {what} {v!r}")
        seen.add(v)


# -- loading -------------------------------------------------------------------------------


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None, allow_both: bool = False) -> Settings:
    """Read, expand and validate a config file, or raise ConfigError saying exactly why not.

    ``allow_both``: a file may hold clients *and* a clients_source (``clients push`` reads
    such a file); a runtime serves clients from one or the other."""
    path = Path(path)
    env = os.environ if environ is None else environ
    raw = _read(path)
    if raw.get("clients_source") is not None and raw.get("clients") and not allow_both:
        raise ConfigError(f"{path}: clients: give clients here or in clients_source, not both")
    expanded = _expand(raw, env, path, ())
    try:
        return Settings.model_validate(expanded)
    except ValidationError as e:
        first = e.errors()[0]
        loc, msg, cause = first["loc"], first["msg"], first.get("ctx", {}).get("error")
        if isinstance(cause, FieldError):
            loc, msg = (*loc, *cause.loc), cause.reason
        where = _dotted(loc) or "(top level)"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        # The message never echoes the input value: it may be a secret.
        raise ConfigError(f"{path}: {where}: {msg}{more}") from None


def state_dir_of(path: str | Path, environ: Mapping[str, str] | None = None) -> Path:
    """Only ``runtime.state_dir`` of a config file: what ``autonomite usage`` reads, without
    the secrets a whole load needs from the environment."""
    path = Path(path)
    runtime = _read(path).get("runtime") or {}
    if not isinstance(runtime, dict):
        raise ConfigError(f"{path}: runtime: must be a mapping")
    value = _expand(runtime.get("state_dir", str(RuntimeSettings.model_fields["state_dir"].default)),
                    os.environ if environ is None else environ, path, ("runtime", "state_dir"))
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: runtime.state_dir: must be a path")
    return Path(value)


def _read(path: Path) -> dict[str, Any]:
    """The file's YAML, with each ``${VAR}`` held as a marker until it is expanded."""
    try:
        text = _PLACEHOLDER.sub(lambda m: f"⟪{m.group(1)}⟫", path.read_text(encoding="utf-8"))
        raw = yaml.safe_load(text)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read file: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with 'runtime' and 'clients'")
    return raw


def placeholders(path: str | Path) -> set[str]:
    """The environment variables a config file reads (``${VAR}``): its secrets, mostly."""
    try:
        return set(_PLACEHOLDER.findall(Path(path).read_text(encoding="utf-8")))
    except OSError:
        return set()


def _expand(node: Any, env: Mapping[str, str], path: Path, loc: tuple[Any, ...]) -> Any:
    if isinstance(node, dict):
        return {k: _expand(v, env, path, loc + (k,)) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, env, path, loc + (i,)) for i, v in enumerate(node)]
    if isinstance(node, str):

        def substitute(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in env:
                raise ConfigError(f"{path}: {_dotted(loc)}: environment variable {name} is not set")
            return env[name]

        return _MARKER.sub(substitute, node)
    return node


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass(frozen=True)
class ReloadSummary:
    """Which clients a reload added, removed and changed (by id, sorted)."""

    added: list[str]
    removed: list[str]
    changed: list[str]

    @classmethod
    def between(cls, old: list[ClientSettings], new: list[ClientSettings]) -> ReloadSummary:
        before = {c.id: c for c in old}
        after = {c.id: c for c in new}
        return cls(
            added=sorted(after.keys() - before.keys()),
            removed=sorted(before.keys() - after.keys()),
            changed=sorted(cid for cid in after.keys() & before.keys() if after[cid] != before[cid]),
        )

    def as_json(self) -> dict[str, list[str]]:
        return {"added": self.added, "removed": self.removed, "changed": self.changed}
