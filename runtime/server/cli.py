"""``autonomite``: serve the runtime, or check a config file.

    autonomite serve --config FILE [--with-livekit]
    autonomite check-config FILE
    autonomite chat --token T --client C --agent A [--room R] [--context JSON] [--voice [--words DIR]]
    autonomite usage [--config FILE | --state-dir DIR] [--client X] [--from T] [--to T] [--csv]

``--with-livekit`` is for the demo and local development: it starts a real livekit-server
on loopback for each LiveKit URL in the config, with the keys of the clients that use it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import SecretStr

from runtime.settings import ClientSettings, ConfigError, Settings, SupabaseSettings, load_settings

logger = logging.getLogger("autonomite")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autonomite", description="Warm-pool runtime for LiveKit voice agents")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the runtime and its gateway")
    serve_p.add_argument("--config", required=True, type=Path)
    serve_p.add_argument("--with-livekit", action="store_true", help="start a local livekit-server per LiveKit URL")
    serve_p.add_argument("--replace", action="store_true",
                         help="a rolling restart: once warm, send SIGTERM to the runtime listening on the gateway's "
                              "address (it drains) and take its place")
    check_p = sub.add_parser("check-config", help="validate a config file and print its clients")
    check_p.add_argument("file", type=Path)
    clients_p = sub.add_parser("clients", help="the clients kept in Supabase (clients_source)")
    clients_sub = clients_p.add_subparsers(dest="clients_command", required=True)
    push_p = clients_sub.add_parser("push", help="upsert a YAML file's clients into Supabase")
    push_p.add_argument("file", type=Path, help="a config file with a clients: list")
    push_p.add_argument("--source", type=Path, help="the config naming clients_source (default: FILE itself)")
    list_p = clients_sub.add_parser("list", help="print the clients in Supabase, secrets as fingerprints")
    list_p.add_argument("--source", type=Path, required=True, help="the config naming clients_source")
    chat_p = sub.add_parser("chat", help="start a session and talk to its agent as the end user")
    chat_p.add_argument("--gateway", default="http://127.0.0.1:8080")
    chat_p.add_argument("--token", required=True, help="the client's api_token")
    chat_p.add_argument("--client", required=True)
    chat_p.add_argument("--agent", required=True)
    # A room of its own by default: a chat started while the last one's agent is still in
    # its room (the rejoin grace) would otherwise get both agents answering.
    chat_p.add_argument("--room", default=None, help="the room to start (default: a new chat-<random>)")
    chat_p.add_argument("--context", type=json.loads, default=None, help='JSON, e.g. {"name": "Dana"}')
    chat_p.add_argument("--voice", action="store_true",
                        help="speak each line into the room (espeak-ng) and print the agent's audio, transcribed")
    chat_p.add_argument("--words", type=Path, default=None,
                        help="with --voice: a folder or file of the client's texts (its knowledge_dir), for "
                             "the offline recognizer's vocabulary")
    usage_p = sub.add_parser("usage", help="what each client used, from the session records (month to date)")
    usage_p.add_argument("--config", type=Path, help="the config whose runtime.state_dir holds the records")
    usage_p.add_argument("--state-dir", type=Path, help="that directory itself (default: ./state)")
    usage_p.add_argument("--client", help="this client only")
    usage_p.add_argument("--from", dest="since", help="Unix seconds or ISO 8601 (default: the 1st of this month, UTC)")
    usage_p.add_argument("--to", dest="until", help="Unix seconds or ISO 8601 (default: now)")
    usage_p.add_argument("--csv", action="store_true", help="CSV, one row per client")
    image_p = sub.add_parser("image", help="the worker image for the docker backend")
    image_sub = image_p.add_subparsers(dest="image_command", required=True)
    build_p = image_sub.add_parser("build", help="build it with no image registry (mmdebstrap base, local wheels)")
    build_p.add_argument("--tag", default="autonomite-agent:latest")
    build_p.add_argument("--base", default=None, help="an image the engine has (default: a Debian base made here)")
    args = parser.parse_args(argv)
    if args.command == "image":
        return image_build(args.tag, args.base)
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "clients":
        return clients_command(args)
    if args.command == "usage":
        return usage_command(args)
    if args.command == "chat":
        from runtime.dev.chat import chat

        if args.words is not None and not args.voice:
            parser.error("--words is for --voice")

        room = args.room or f"chat-{secrets.token_hex(4)}"
        return chat(args.gateway, args.token, args.client, args.agent, room, args.context,
                    voice_words=args.words if args.voice else None, voice=args.voice)
    return serve(args.config, args.with_livekit, args.replace)


def image_build(tag: str, base: str | None) -> int:
    import docker

    from runtime.dev.image import ImageError, build

    try:
        built = build(docker.from_env(version="auto", timeout=600), tag, base)
    except (ImageError, docker.errors.DockerException) as e:
        print(f"image build failed: {e}", file=sys.stderr)
        return 1
    how = "unchanged, reused" if built.reused else "built"
    print(f"{built.tag}: {built.image_id[:19]} ({how} in {built.seconds:.0f} s, {built.size_mb:.0f} MB)")
    return 0


def check_config(path: Path) -> int:
    try:
        settings = load_settings(path)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 1
    rt = settings.runtime
    print(f"{path}: ok")
    metrics = f"{rt.metrics.host}:{rt.metrics.port}" if rt.metrics else "on the gateway"
    print(f"runtime: backend={rt.backend} gateway={rt.gateway.host}:{rt.gateway.port} metrics={metrics} "
          f"admin_token=sha256:{_fp(rt.admin_token)}")
    for c in settings.clients:
        _print_client(c)
    return 0


def usage_command(args: argparse.Namespace) -> int:
    """Usage read straight from the records (serve need not run); the same numbers as
    ``GET /api/v1/usage``."""
    import time

    from runtime.http.models import parse_usage_query
    from runtime.sessions import report
    from runtime.sessions.store import FILE_NAME, SqliteStore
    from runtime.settings import ConfigError, state_dir_of

    state_dir = args.state_dir or Path("state")
    if args.config is not None:
        try:
            state_dir = state_dir_of(args.config)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 1
    path = state_dir / FILE_NAME
    if not path.is_file():
        print(f"no session records at {path}", file=sys.stderr)
        return 1
    given = {k: v for k, v in (("client", args.client), ("from", args.since), ("to", args.until)) if v is not None}
    try:
        query = parse_usage_query(given, time.time())
    except ValueError as e:
        print(f"usage: {e}", file=sys.stderr)
        return 2
    usage = SqliteStore(path).usage(query.client, query.since, query.until)
    print(report.as_csv(usage) if args.csv else report.as_table(usage), end="")
    return 0


def clients_command(args: argparse.Namespace) -> int:
    """``clients push FILE``: a file-defined fleet moves to Supabase in one command;
    ``clients list``: what Supabase holds, each row validated, secrets as fingerprints."""
    from runtime.clients.store import SupabaseStore, parse_rows

    try:
        source_settings = _source_of(args.source or args.file)
        store = SupabaseStore(source_settings)
        if args.clients_command == "push":
            clients = load_settings(args.file, allow_both=True).clients
            store.upsert(clients)
            print(f"pushed {len(clients)} clients to {source_settings.url} ({source_settings.table}): "
                  f"{', '.join(c.id for c in clients)}")
            return 0
        snapshot = parse_rows(store.rows())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - Supabase unreachable or refusing: say so, exit 1
        from runtime.errors import describe

        print(f"Supabase error: {describe(e)}", file=sys.stderr)
        return 1
    for c in snapshot.clients.values():
        _print_client(c)
    for row_id in sorted(snapshot.inactive):
        print(f"client {row_id}: inactive")
    for error in snapshot.errors.values():
        print(f"invalid: {error}")
    return 0


def _source_of(path: Path) -> SupabaseSettings:
    settings = load_settings(path, allow_both=True)
    if settings.clients_source is None:
        raise ConfigError(f"{path}: clients_source: not set (name a config with clients_source.supabase)")
    return settings.clients_source.supabase


def _print_client(c: ClientSettings) -> None:
    print(
        f"client {c.id} ({c.name}): livekit={c.livekit.url} key=sha256:{_fp(c.livekit.api_key)} "
        f"secret=sha256:{_fp(c.livekit.api_secret)} token=sha256:{_fp(c.api_token)} "
        f"pool=min_idle {c.pool.min_idle}, max_size {c.pool.max_size} agents={','.join(a.name for a in c.agents)}"
        + (f" webhook={urlparse(c.webhook.url).netloc} webhook_secret=sha256:{_fp(c.webhook.secret)}" if c.webhook else "")
    )


def _fp(secret: SecretStr) -> str:
    from runtime.secrets import fingerprint

    return fingerprint(secret.get_secret_value())


def serve(config_path: Path, with_livekit: bool, replace: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        settings = load_settings(config_path)
    except ConfigError as e:
        logger.error("config error: %s", e)
        return 1
    from runtime.http import listeners
    from runtime.preflight import unwritable
    from runtime.server.serve import CannotListen, bind_all, serve_http

    # Before any worker, zygote or container exists: what cannot work stops serve here.
    problem = unwritable(settings)
    if problem:
        logger.error("cannot start: %s", problem)
        return 1
    try:
        bound = bind_all(settings)
    except CannotListen as e:
        logger.error("%s", e)
        return 1
    # Another runtime on this address: this one is the new half of a rolling restart. Its
    # docker and swarm workers are told apart from the old one's by instance labels
    # (runtime/instance.py), so neither adopts, removes or stops the other's.
    beside = bool(listeners.others_listening(bound[0].socks))
    from runtime.backends import BackendError
    from runtime.clients.source import SourceUnavailable
    from runtime.isolation import IsolationUnavailable
    from runtime.server.app import Runtime
    from runtime.server.signals import Signals

    environ = _harden(settings, config_path) if settings.runtime.isolation.enabled else None
    # From here no signal kills serve (runtime/server/signals.py): one while it starts its
    # children (the zygote, a local livekit-server) is acted on once the loop runs, so no
    # child is left behind.
    signals = Signals()
    try:
        try:
            runtime = Runtime(settings, config_path, environ=environ)
        except (BackendError, SourceUnavailable, IsolationUnavailable) as e:
            logger.error("cannot start: %s", e)
            return 1
        servers = start_local_livekit(settings) if with_livekit else []
        try:
            runtime.start()
            asyncio.run(serve_http(runtime, bound, signals, beside, replace))
        finally:
            signals.way_down()  # as serve_http's way down does, if it never ran
            for listener in bound:
                listener.close()
            runtime.stop()
            for s in servers:
                s.stop()
    finally:
        signals.close()
    if runtime.failure:
        logger.critical("exiting: %s", runtime.failure)
        return 1
    return 0


def _harden(settings: Settings, config_path: Path) -> dict[str, str]:
    """Before any child starts: serve not dumpable, the config's ``${VAR}`` secrets out of
    os.environ (kept for reloads in the returned mapping), its files closed to workers."""
    from runtime.isolation import close_to_others, harden_runtime, take_secrets_from_environ
    from runtime.settings import placeholders

    harden_runtime()
    environ = take_secrets_from_environ(placeholders(config_path))
    source = settings.clients_source
    for path in (config_path, source.supabase.cache_file if source else None):
        if path is None:
            continue
        try:
            if close_to_others(Path(path)):
                logger.warning("%s was readable by other users (so by workers); it no longer is", path)
        except OSError as e:
            logger.warning("cannot close %s to other users: %s", path, e.strerror)
    return environ


def start_local_livekit(settings: Settings) -> list[Any]:
    from runtime.dev.devserver import LiveKitServer

    by_url: dict[str, dict[str, str]] = {}
    for c in settings.clients:
        keys = by_url.setdefault(c.livekit.url, {})
        keys[c.livekit.api_key.get_secret_value()] = c.livekit.api_secret.get_secret_value()
    servers = []
    for url, keys in by_url.items():
        parsed = urlparse(url)
        if parsed.hostname not in ("127.0.0.1", "localhost") or not parsed.port:
            logger.warning("--with-livekit: %s is not a loopback URL with a port; not starting a server for it", url)
            continue
        servers.append(LiveKitServer(keys, port=parsed.port).start())
        logger.info("started livekit-server on %s", url)
    return servers


if __name__ == "__main__":
    sys.exit(main())
