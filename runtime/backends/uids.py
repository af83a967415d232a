"""A uid of its own for each client's containers (docker and swarm backends).

Why per client, not one shared uid: a uid is what the kernel checks between processes it
cannot otherwise tell apart (signals, ptrace, ``/proc/PID`` files, files on shared mounts)
and what it counts per-user limits by (``RLIMIT_NPROC``, inotify instances and watches,
the user keyring). With one uid for every tenant, one client's worker that escaped its pid
namespace could read another's memory, and one that exhausted its per-user limits would
exhaust everyone's. Per client, not per worker: a client's workers share its credentials
anyway, and a stable uid needs no bookkeeping across restarts (an adopted container keeps
the uid it started with, and it is still its client's).

Why not user-namespace remapping (``dockerd --userns-remap``): it is one mapping for the
whole engine, so every container's uid 10001 would still be one host uid shared by all
tenants; it protects the host from a container's root, which these containers do not have
(they run as non-root with every capability dropped). It also needs a daemon restart and
re-pulls every image into a remapped store. The two compose: an operator can still turn it
on, and each client's uid is then remapped too.

The uid is derived, not allocated: ``first + sha256(client id) % count``. Two clients may
hash to one uid (with the default 16.7 million ids, about 3 in 10,000 for 100 clients);
the backend then refuses to start the second one's workers, with an error naming both,
rather than let two tenants share a uid. Moving the range (``runtime.workers.client_uids``)
separates them.
"""

from __future__ import annotations

import hashlib
import threading

from runtime.backends.base import BackendError
from runtime.settings import UidRange


def client_uid(client_id: str, uids: UidRange) -> int:
    digest = int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:8], "big")
    return uids.first + digest % uids.count


class UidBook:
    """The uids this runtime has given out, so that no two of its clients ever share one."""

    def __init__(self, uids: UidRange) -> None:
        self._uids = uids
        self._holders: dict[int, str] = {}
        self._lock = threading.Lock()  # starts run on many helper threads

    def uid(self, client_id: str) -> int:
        """``client_id``'s uid; BackendError if another client already has it."""
        uid = client_uid(client_id, self._uids)
        with self._lock:
            holder = self._holders.setdefault(uid, client_id)
        if holder != client_id:
            raise BackendError(
                f"client {client_id!r} would run as uid {uid}, the uid of client {holder!r}: its workers are not "
                f"started (move runtime.workers.client_uids.first or .count to separate them)")
        return uid

    def note(self, client_id: str, uid: int) -> None:
        """A container found running (adopted) holds ``uid`` for ``client_id``."""
        with self._lock:
            self._holders.setdefault(uid, client_id)
