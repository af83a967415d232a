"""Before anything starts: can ``serve`` write where it must?

A log directory that cannot be written used to leave ``serve`` up but never ready: the
zygote failed to boot over and over, each worker start failed, and nothing said why in one
line. Every place the runtime writes is tried once at start, by really writing there (a
permission bit says nothing about a read-only mount, a full disk, or root), and the first
that fails stops ``serve`` with exit 1 and one line naming the setting, the path and the
reason, before any worker or zygote exists.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from runtime.settings import Settings


def unwritable(settings: Settings) -> str | None:
    """The first place that cannot be written, as one line; None when all can."""
    places: list[tuple[str, Path]] = [("runtime.workers.log_dir", settings.runtime.workers.log_dir)]
    source = settings.clients_source
    if source is not None and source.supabase.cache_file is not None:
        places.append(("clients_source.supabase.cache_file's directory", source.supabase.cache_file.parent))
    for field, directory in places:
        reason = _cannot_write(directory)
        if reason:
            return f"{field} {directory.absolute()}: {reason}"
    return None


def _cannot_write(directory: Path) -> str | None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return "exists and is not a directory"
    except OSError as e:
        return f"cannot create it ({e.strerror})"
    if not directory.is_dir():
        return "exists and is not a directory"
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".autonomite-write-check-") as probe:
            probe.write(b"x")
            probe.flush()
            os.fsync(probe.fileno())  # a full disk may accept the write and refuse the flush
    except OSError as e:
        return f"cannot write there ({e.strerror})"
    return None
