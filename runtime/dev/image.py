"""Build the worker image without any image registry: ``autonomite image build``.

Three steps, each cached in the git-ignored ``.cache/image/``:

1. **Base.** A Debian bookworm root made by ``mmdebstrap`` (a Debian package) with python3,
   python3-venv, ca-certificates, passwd and espeak-ng (the offline TTS), ``docker
   import``-ed as ``autonomite-base:bookworm-<hash of that package list>``. Only the Debian
   mirror is needed, not Docker Hub. Skipped when ``--base`` names an image the engine already has (``python:3.11-slim`` where a
   registry is reachable).
2. **Wheelhouse.** ``pip wheel`` of this project and all its dependencies on the host, for
   the host's CPython 3.11 (the same ABI as bookworm's python3). The dependencies are kept
   per ``pyproject.toml``; the project's own wheel is rebuilt every time.
3. **Image.** ``docker build --network none`` of ``agent/Dockerfile`` from that base: the
   wheels are installed into a virtualenv with ``--no-index``, so nothing is fetched.

The image is tagged by name and also by a hash of its inputs, so a second build with
nothing changed is a no-op (the tests rely on that).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import docker
    from docker.models.images import Image

PROJECT_DIR = Path(__file__).resolve().parents[2]
CACHE = PROJECT_DIR / ".cache" / "image"
BASE_PACKAGES = "python3,python3-venv,ca-certificates,passwd,espeak-ng"
# Named by its packages: a base made before a package was added is never taken for this one.
BASE_TAG = f"autonomite-base:bookworm-{hashlib.sha256(BASE_PACKAGES.encode()).hexdigest()[:8]}"
SOURCES = ("pyproject.toml", "README.md", "agent", "runtime", "actors")


class ImageError(Exception):
    """A build step failed; the message names the step and carries the tool's last words."""


@dataclass(frozen=True)
class Built:
    tag: str
    image_id: str
    size_mb: float
    seconds: float
    reused: bool


def build(engine: docker.DockerClient, tag: str = "autonomite-agent:latest", base: str | None = None) -> Built:
    """Build (or find, if its inputs are unchanged) the worker image."""
    from docker.errors import ImageNotFound

    started = time.monotonic()
    base = base or ensure_base(engine)
    content_tag = f"{tag.rsplit(':', 1)[0]}:src-{source_hash(base)}"
    try:
        image = engine.images.get(content_tag)
        reused = True
    except ImageNotFound:
        image = _docker_build(engine, base, content_tag)
        reused = False
    image.tag(*tag.rsplit(":", 1))
    return Built(tag, image.id, image.attrs["Size"] / 2**20, time.monotonic() - started, reused)


def ensure_base(engine: docker.DockerClient) -> str:
    """The mmdebstrap base, imported into the engine once (the tarball is cached too)."""
    from docker.errors import ImageNotFound

    try:
        engine.images.get(BASE_TAG)
        return BASE_TAG
    except ImageNotFound:
        pass
    tarball = CACHE / f"{BASE_TAG.split(':')[1]}.tar"
    if not tarball.exists():
        if shutil.which("mmdebstrap") is None:
            raise ImageError("base image: mmdebstrap is not installed (Debian package mmdebstrap), "
                             "or pass --base with an image the engine has")
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial.tar")  # mmdebstrap picks the format by the name
        _run(["mmdebstrap", "--variant=apt", f"--include={BASE_PACKAGES}", "bookworm", str(partial)], "mmdebstrap")
        partial.rename(tarball)
    repository, tag = BASE_TAG.split(":")
    engine.api.import_image_from_file(str(tarball), repository=repository, tag=tag)
    return BASE_TAG


def source_hash(base: str) -> str:
    """Changes when anything that goes into the image changes."""
    h = hashlib.sha256(base.encode())
    for name in SOURCES:
        path = PROJECT_DIR / name
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(PROJECT_DIR)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def wheelhouse(into: Path) -> None:
    """Every wheel the image needs, for this interpreter's ABI, into ``into``."""
    deps = CACHE / f"wheels-{hashlib.sha256((PROJECT_DIR / 'pyproject.toml').read_bytes()).hexdigest()[:12]}"
    if not deps.exists():
        partial = Path(tempfile.mkdtemp(prefix="wheels-", dir=CACHE))
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(partial), str(PROJECT_DIR)], "pip wheel")
        for own in partial.glob("autonomite-*.whl"):
            own.unlink()  # the project's wheel is rebuilt below, every time
        partial.rename(deps)
    into.mkdir(parents=True)
    for wheel in deps.iterdir():
        os.link(wheel, into / wheel.name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(into), str(PROJECT_DIR)],
         "pip wheel (the project)")


def _docker_build(engine: docker.DockerClient, base: str, tag: str) -> Image:
    from docker.errors import BuildError

    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="context-", dir=CACHE) as context:
        shutil.copy(PROJECT_DIR / "agent" / "Dockerfile", Path(context) / "Dockerfile")
        wheelhouse(Path(context) / "wheels")
        try:
            image, _ = engine.images.build(path=context, tag=tag, buildargs={"BASE": base}, network_mode="none",
                                           rm=True, forcerm=True)
        except BuildError as e:
            tail = "".join(chunk.get("stream", "") for chunk in e.build_log)[-800:]
            raise ImageError(f"docker build failed: {e.msg}\n{tail}") from None
    return image


def _run(cmd: list[str], step: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ImageError(f"{step} failed (exit {done.returncode}): {(done.stderr or done.stdout)[-800:]}")
