"""Two runtimes on one address (runtime/http/listeners.py), with real sockets and the kernel's tables."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from runtime.backends.ports import free_port
from runtime.http import listeners


def test_a_second_bind_succeeds_beside_a_listener_and_sees_it():
    port = free_port()
    first = listeners.bind("127.0.0.1", port)
    second = listeners.bind("127.0.0.1", port)  # SO_REUSEPORT on both: no "address in use"
    try:
        assert listeners.others_listening(second) == set()  # bound, nobody listens yet
        first[0].listen()
        seen = listeners.others_listening(second)
        assert seen == {os.fstat(first[0].fileno()).st_ino}
        assert listeners.others_listening(first) == set()  # its own listener is not "another"
        second[0].listen()
        assert listeners.others_listening(first) == {os.fstat(second[0].fileno()).st_ino}
    finally:
        for s in first + second:
            s.close()


def test_a_listener_on_the_wildcard_address_overlaps_loopback():
    port = free_port()
    wild = listeners.bind("0.0.0.0", port)
    mine = listeners.bind("127.0.0.1", port)
    try:
        wild[0].listen()
        assert listeners.others_listening(mine)
    finally:
        for s in wild + mine:
            s.close()


def test_an_address_held_by_a_program_without_reuseport_cannot_be_bound():
    port = free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()
    try:
        with pytest.raises(OSError) as e:
            listeners.bind("127.0.0.1", port)
        assert e.value.errno == 98  # EADDRINUSE
    finally:
        holder.close()


def test_owners_names_only_autonomite_serve_processes():
    """A process holding a listener is an owner only if it is ``autonomite serve``."""
    port = free_port()
    code = ("import socket,sys,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1);"
            f"s.bind(('127.0.0.1',{port})); s.listen(); print('up', flush=True); time.sleep(30)")
    # The same program twice; only the one whose command line says "runtime.server.cli serve" counts.
    serve_like = subprocess.Popen([sys.executable, "-c", code, "runtime.server.cli", "serve"], stdout=subprocess.PIPE)
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    mine = listeners.bind("127.0.0.1", port)
    try:
        assert serve_like.stdout.readline() == b"up\n" and other.stdout.readline() == b"up\n"
        inodes = listeners.others_listening(mine)
        assert len(inodes) == 2
        assert listeners.owners(inodes) == [serve_like.pid]
    finally:
        for p in (serve_like, other):
            p.kill()
            p.wait()
            p.stdout.close()
        for s in mine:
            s.close()


def test_sd_notify_sends_the_state_to_systemds_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        listeners.sd_notify("READY=1")
        assert sock.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    listeners.sd_notify("READY=1")  # no systemd: nothing, and no error


def _accepted(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def test_the_old_listener_steers_every_new_connection_to_the_new_one_and_its_queue_empties():
    port = free_port()
    old, new = listeners.bind("127.0.0.1", port), listeners.bind("127.0.0.1", port)
    third: list[socket.socket] = []
    clients = []
    try:
        old[0].listen()
        new[0].listen()
        clients += [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        assert listeners.queued(old) + listeners.queued(new) == 4  # the kernel's hash: wherever
        _accepted(old[0]), _accepted(new[0])
        assert listeners.queued(old) == 0
        listeners.steer_to_newest(old)
        clients += [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        assert listeners.queued(old) == 0 and listeners.queued(new) == 20  # none for the old one
        old[0].close()
        assert _accepted(new[0]) == 20
        third += listeners.bind("127.0.0.1", port)  # the next restart: the newest gets them all at once
        third[0].listen()
        clients += [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        assert listeners.queued(third) == 5 and listeners.queued(new) == 0
    finally:
        for s in old + new + third + clients:
            s.close()
