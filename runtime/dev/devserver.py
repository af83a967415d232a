"""A real livekit-server on loopback, for the demo, the tests and the benchmarks.

The binary is built once with ``go install`` at a pinned version and cached in the
git-ignored ``.cache/`` folder (Go's own build cache makes a rebuild on the same machine
quick). Production points the runtime at a LiveKit deployment instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from runtime._proc import die_with_parent
from runtime.backends.ports import free_port

LIVEKIT_VERSION = "v1.13.5"
PROJECT_DIR = Path(__file__).resolve().parents[2]
CACHE_DIR = PROJECT_DIR / ".cache" / "livekit-server" / LIVEKIT_VERSION


def ensure_binary() -> Path:
    """Path to a livekit-server binary, building it with ``go install`` when missing."""
    override = os.environ.get("AUTONOMITE_LIVEKIT_SERVER")
    if override:
        return Path(override)
    binary = CACHE_DIR / "server"
    if binary.exists():
        return binary
    go = shutil.which("go") or "/usr/local/go/bin/go"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [go, "install", f"github.com/livekit/livekit-server/cmd/server@{LIVEKIT_VERSION}"],
        env={**os.environ, "GOBIN": str(CACHE_DIR)},
        check=True,
    )
    return binary


class LiveKitServer:
    """One livekit-server process bound to 127.0.0.1 (or ``host``), with its own ports and keys."""

    def __init__(
        self,
        keys: dict[str, str],
        port: int | None = None,
        log_path: Path | None = None,
        webhook_urls: list[str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.keys = keys
        self.host = host  # also the address its media (ICE) candidates give: clients must reach it
        self.port = port or free_port(3)
        self.log_path = log_path
        self.webhook_urls = webhook_urls or []
        self._proc: subprocess.Popen[bytes] | None = None
        self._config_dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> LiveKitServer:
        config: dict[str, Any] = {
            "port": self.port,
            "bind_addresses": [self.host],
            # tcp_port 0 turns off the ICE TCP listener, which would bind every interface.
            "rtc": {"tcp_port": 0, "udp_port": self.port + 2, "node_ip": self.host, "use_external_ip": False},
            "keys": self.keys,
        }
        if self.host != "127.0.0.1":
            # Media on that address only. Else its one UDP port is bound on every local address,
            # all advertised as ``node_ip``; a reply may leave from another one (a Docker bridge,
            # say) and the caller's ICE drops it: the join then fails at random.
            config["rtc"]["ips"] = {"includes": [f"{self.host}/32"]}
        if self.webhook_urls:
            first_key = next(iter(self.keys))
            config["webhook"] = {"api_key": first_key, "urls": self.webhook_urls}
        self._config_dir = self._config_dir or tempfile.TemporaryDirectory(prefix="livekit-")
        config_path = Path(self._config_dir.name) / "livekit.yaml"
        config_path.write_text(yaml.safe_dump(config))  # keys live in a private temp file, not argv
        config_path.chmod(0o600)
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [str(ensure_binary()), "--dev", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"livekit-server exited with {self._proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://{self.host}:{self.port}/", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"livekit-server on port {self.port} not ready within {timeout} s")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._config_dir is not None:  # a stopped server may start again, on the same ports
            self._config_dir.cleanup()
            self._config_dir = None

    def __enter__(self) -> LiveKitServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
