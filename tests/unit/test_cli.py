from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.unit.test_settings import ENV, EXAMPLE


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.server.cli", *args], env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True)


def test_check_config_prints_fingerprints_not_secrets():
    r = run("check-config", str(EXAMPLE), env=ENV)
    assert r.returncode == 0, r.stderr
    assert "client acme (Acme Corp)" in r.stdout and "secret=sha256:" in r.stdout
    for value in ENV.values():
        if len(value) > 8:
            assert value not in r.stdout + r.stderr


def test_check_config_fails_with_file_field_and_reason(tmp_path: Path):
    r = run("check-config", str(EXAMPLE), env={k: v for k, v in ENV.items() if k != "ACME_LK_KEY"})
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"config error: {EXAMPLE}: clients[0].livekit.api_key: environment variable ACME_LK_KEY is not set"
    )
