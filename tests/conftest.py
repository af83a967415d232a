from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import ISSUED_SECRETS, Client, Serve, start_livekit, write_config


@pytest.fixture(scope="session")
def log_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def lk_a(log_root: Path):
    project = start_livekit(log_root, "alpha")
    yield project
    project.server.stop()


@pytest.fixture(scope="session")
def lk_b(log_root: Path):
    project = start_livekit(log_root, "beta")
    yield project
    project.server.stop()


@pytest.fixture
def run_serve(tmp_path_factory: pytest.TempPathFactory, log_root: Path):
    """Start ``autonomite serve`` on a fresh config; every one started is stopped at the end."""
    started: list[Serve] = []

    def start(clients: list[Client], wait_ready: bool = True, workdir: Path | None = None, **runtime) -> Serve:
        """``workdir``: where the config and the worker logs go (default: a fresh tmp dir)."""
        workdir = workdir or tmp_path_factory.mktemp("serve", numbered=True)
        config = workdir / "clients.yaml"
        env = write_config(config, clients, **runtime)
        # The serve log and the worker logs live under log_root, scanned for secrets at the end.
        (log_root / workdir.name).mkdir(exist_ok=True)
        serve = Serve(config, env, log_root / workdir.name / "serve.log")
        started.append(serve)
        return serve.start(wait_ready=wait_ready)

    yield start
    for serve in started:
        serve.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No secret value may appear in any log the suite captured (serve, workers, livekit)."""
    root = getattr(session.config, "_tmp_path_factory", None)
    if root is None or not ISSUED_SECRETS:
        return
    leaks = []
    for path in root.getbasetemp().rglob("*.log"):
        text = path.read_text(errors="replace")
        leaks += [f"{path}: contains {s[:6]}…" for s in ISSUED_SECRETS if s in text]
    if leaks:
        print("\nSECRET LEAK in logs:\n  " + "\n  ".join(leaks))
        session.exitstatus = 1


# -- backends -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def docker_worker_image():
    """The worker image as it is deployed: agent/Dockerfile, built with no image registry
    (``autonomite image build``: an mmdebstrap base, a local wheelhouse, ``--network none``).
    Cached by its inputs' hash, so only a change to the code rebuilds it."""
    import shutil

    import docker as docker_sdk

    from runtime.dev.image import BASE_TAG, build

    try:
        engine = docker_sdk.from_env(version="auto", timeout=600)
        engine.ping()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no Docker engine to test against: {str(e).splitlines()[0]}")
    if shutil.which("mmdebstrap") is None and not engine.images.list(name=BASE_TAG):
        pytest.skip("no mmdebstrap (Debian package) to build the worker image's base with")
    built = build(engine, "autonomite-agent:test")
    yield {"image": built.tag, "volumes": []}
    for c in engine.containers.list(all=True, filters={"label": "autonomite.client"}):
        c.remove(force=True)
    engine.close()


@pytest.fixture(params=["process", "docker"])
def backend(request: pytest.FixtureRequest) -> dict:
    """Runtime settings for each worker backend; the pool tests run on both."""
    if request.param == "process":
        return {"backend": "process"}
    image = request.getfixturevalue("docker_worker_image")
    return {"backend": "docker", "workers": {"image": image["image"]}}
