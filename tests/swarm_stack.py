"""A private Docker engine in swarm mode, for the swarm backend's tests and benchmark.

Never the shared engine: ``docker swarm init`` creates networks (ingress, docker_gwbridge)
even on an engine started with ``--bridge=none``, and a swarm is not easily undone. This
one has its own data root, exec root, pid file and socket under a temporary directory,
listens only on that socket, joins nothing, and is torn down with everything it made.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import docker

from runtime._proc import die_with_parent
from runtime.devserver import free_port


class PrivateSwarm:
    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        # Short: a unix socket path must fit in 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="asw-", dir="/tmp"))
        self.url = f"unix://{self.root}/docker.sock"
        self._proc: subprocess.Popen | None = None
        self.engine: docker.DockerClient | None = None

    def start(self, timeout: float = 60.0) -> "PrivateSwarm":
        log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [
                "dockerd", "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
                "--pidfile", str(self.root / "docker.pid"), "-H", self.url,
                "--bridge=none", "--iptables=false", "--ip6tables=false",
            ],
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
        self.engine.swarm.init(advertise_addr="127.0.0.1", listen_addr=f"127.0.0.1:{free_port()}")
        return self

    def load(self, source: docker.DockerClient, tag: str) -> str:
        """``docker save | docker load`` from another engine: how an image reaches a node."""
        data = b"".join(source.images.get(tag).save(named=tag))
        self.engine.images.load(data)
        return self.engine.images.get(tag).id

    def containers(self, label: str = "autonomite.client") -> list:
        return self.engine.containers.list(all=True, filters={"label": label})

    def stop(self) -> None:
        if self.engine is not None:
            for service in self.engine.services.list():
                service.remove()
            try:
                self.engine.swarm.leave(force=True)
            except docker.errors.DockerException:
                pass
            self.engine.close()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        # The bridge swarm made on the host, if it is still there once its engine is gone.
        subprocess.run(["ip", "link", "delete", "docker_gwbridge"], capture_output=True)
        # What the engine mounted under its roots and left (its default netns handle, nsfs).
        mounts = [line.split()[1] for line in open("/proc/self/mounts") if line.split()[1].startswith(f"{self.root}/")]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "--lazy", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
