"""A private Docker engine in swarm mode, for the swarm backend's tests and benchmark.

Never the shared engine: ``docker swarm init`` creates networks (ingress, docker_gwbridge)
even on an engine started with ``--bridge=none``, and a swarm is not easily undone. This
one has its own data root, exec root, pid file and socket under a temporary directory,
listens only on that socket, joins nothing, and is torn down with everything it made.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import docker

from runtime._proc import die_with_parent
from runtime.backends.ports import free_port
from tests.netns import NetNs

SWARM_PORT = 2377


class PrivateSwarm:
    """One private engine; in ``netns`` (a test's namespace with an address) it is a node
    of its own, reached by the others at that address."""

    def __init__(self, log_path: Path, netns: NetNs | None = None) -> None:
        self.log_path = log_path
        self.netns = netns
        # Short: a unix socket path must fit in 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="asw-", dir="/tmp"))
        self.url = f"unix://{self.root}/docker.sock"
        self._proc: subprocess.Popen | None = None
        self.engine: docker.DockerClient | None = None

    def start(self, timeout: float = 60.0, init: bool = True) -> PrivateSwarm:
        """Start the engine; ``init``: make it a one-node swarm (its manager), else call :meth:`join`."""
        log = open(self.log_path, "ab")
        argv = [
            "dockerd", "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
            "--pidfile", str(self.root / "docker.pid"), "-H", self.url,
            "--bridge=none", "--iptables=false", "--ip6tables=false",
        ]
        if self.netns is not None:  # its own mount namespace too, so its mounts die with it
            argv = self.netns.exec_argv(argv, remount_cgroups=True)
        self._proc = subprocess.Popen(
            argv,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.engine = docker.DockerClient(base_url=self.url, version="auto", timeout=120)
                self.engine.ping()
                break
            except docker.errors.DockerException:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the private dockerd did not start; see {self.log_path}") from None
                time.sleep(0.2)
        if init and self.netns is None:
            self.engine.swarm.init(advertise_addr="127.0.0.1", listen_addr=f"127.0.0.1:{free_port()}")
        elif init:
            self.engine.swarm.init(advertise_addr=self.address, listen_addr=f"{self.address}:{SWARM_PORT}")
        if init:
            assert self.node_id
        return self

    @property
    def pid(self) -> int:
        """The engine's dockerd (what a benchmark reads the manager's CPU from)."""
        assert self._proc is not None
        return self._proc.pid

    @property
    def address(self) -> str:
        return self.netns.address if self.netns else "127.0.0.1"

    @functools.cached_property
    def node_id(self) -> str:  # kept: asked again once the engine is stopped
        return self.engine.info()["Swarm"]["NodeID"]

    def join(self, manager: PrivateSwarm) -> PrivateSwarm:
        """Join ``manager``'s swarm as a worker node, over the namespaces' link."""
        token = manager.engine.swarm.attrs["JoinTokens"]["Worker"]
        self.engine.swarm.join([f"{manager.address}:{SWARM_PORT}"], token,
                               listen_addr=f"{self.address}:{SWARM_PORT}", advertise_addr=self.address)
        assert self.node_id
        return self

    def load(self, source: docker.DockerClient | Path, tag: str) -> str:
        """``docker save | docker load`` from another engine (or its saved archive): how an
        image reaches a node. Through a file, not memory: the image is ~800 MB."""
        if isinstance(source, Path):
            with source.open("rb") as archive:
                self.engine.images.load(archive)
        else:
            with tempfile.TemporaryDirectory(prefix="asw-image-") as folder:
                self.load(save_image(source, tag, Path(folder) / "image.tar"), tag)
        return self.engine.images.get(tag).id

    def containers(self, label: str = "autonomite.client") -> list:
        """The labelled containers. The SDK inspects each one it lists, so a container removed
        in between raises NotFound: that listing is simply taken again (bounded)."""
        for _ in range(20):
            try:
                return self.engine.containers.list(all=True, filters={"label": label})
            except docker.errors.NotFound:
                continue
        return self.engine.containers.list(all=True, filters={"label": label})

    def stop_engine(self) -> None:
        """Stop dockerd as an operator would (it stops its containers); the swarm is not told."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def stop(self) -> None:
        if self.engine is not None:
            with contextlib.suppress(docker.errors.DockerException, OSError):  # only a manager has services
                for service in self.engine.services.list():
                    service.remove()
            with contextlib.suppress(docker.errors.DockerException, OSError):  # its engine may be gone already
                self.engine.swarm.leave(force=True)
            self.engine.close()
        self.stop_engine()
        if self.netns is not None:  # its containerd and shims, if dockerd had to be killed
            self.netns.kill_all()
        if self.netns is None:  # the bridge swarm made on the host, if still there once its engine is gone
            subprocess.run(["ip", "link", "delete", "docker_gwbridge"], capture_output=True)
        # What the engine mounted under its roots and left (its default netns handle, nsfs).
        mounts = [line.split()[1] for line in open("/proc/self/mounts") if line.split()[1].startswith(f"{self.root}/")]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "--lazy", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def save_image(source: docker.DockerClient, tag: str, path: Path) -> Path:
    """``docker save`` of ``tag`` into ``path``, streamed."""
    with path.open("wb") as archive:
        for chunk in source.images.get(tag).save(named=tag):
            archive.write(chunk)
    return path
