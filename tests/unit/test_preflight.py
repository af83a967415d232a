"""serve's start-up checks (runtime/preflight.py): every place it writes, really written once."""

from __future__ import annotations

from pathlib import Path

from runtime.preflight import unwritable
from runtime.settings import load_settings
from tests.support import write_config


def settings_with(tmp_path: Path, log_dir: Path):
    env = write_config(tmp_path / "clients.yaml", [], workers={"log_dir": str(log_dir)})
    return load_settings(tmp_path / "clients.yaml", env)


def test_a_writable_or_creatable_log_directory_passes_and_leaves_no_trace(tmp_path):
    log_dir = tmp_path / "a" / "b" / "logs"
    assert unwritable(settings_with(tmp_path, log_dir)) is None
    assert log_dir.is_dir() and list(log_dir.iterdir()) == []


def test_a_log_directory_that_is_a_file_is_named_with_the_reason(tmp_path):
    log_dir = tmp_path / "logs"
    log_dir.write_text("not a directory")
    problem = unwritable(settings_with(tmp_path, log_dir))
    assert problem == f"runtime.workers.log_dir {log_dir}: exists and is not a directory"


def test_a_log_directory_under_a_file_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    problem = unwritable(settings_with(tmp_path, tmp_path / "file" / "logs"))
    assert problem.startswith("runtime.workers.log_dir ") and "cannot create it (Not a directory)" in problem


def test_the_client_sources_cache_directory_is_checked_too(tmp_path):
    (tmp_path / "file").write_text("x")
    config = tmp_path / "clients.yaml"
    config.write_text(
        "runtime: {admin_token: admin-token-0123456789, workers: {log_dir: %s}}\n"  # noqa: UP031 - YAML's braces
        "clients_source:\n  supabase: {url: 'http://127.0.0.1:1', service_key: k, cache_file: %s}\n"
        % (tmp_path / "logs", tmp_path / "file" / "cache.json"))
    problem = unwritable(load_settings(config, {}))
    assert problem.startswith(f"clients_source.supabase.cache_file's directory {tmp_path / 'file'}: ")
    assert "exists and is not a directory" in problem
