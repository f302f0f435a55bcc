"""Shared-memory segments that ingest's decode processes write usage rows into.

A decoded batch's usage events (binary COPY rows, about 1.6 times the bytes of the messages
that carry them) would otherwise travel back from a decode process pickled through a pipe,
copied five times on the way; written once into a segment the ingest process owns, they go
from there to Postgres as they are (`memoryview` slices handed to the COPY).

The ingest process owns the segments (`Segments`): it creates them (POSIX shared memory,
`multiprocessing.shared_memory`, so the resource tracker removes them even if the ingest
process is killed), hands one to each decode task by name and takes it back once the batch
that holds its rows has committed or been dropped; a task's segment is never written again
before then. A decode process attaches by name (`attach`) without registering the segment
with the tracker (it does not own it) and keeps the few it has seen mapped.

Everything degrades to the pipe: where shared memory cannot be had (no /dev/shm, or no room
in it for a new segment's pages, which are allocated when it is made so that a full one
cannot fault a write later), or a segment is too small for a task's rows, the values and
rows travel pickled. A container's /dev/shm is 64 MB unless set (ops/compose.yaml gives
ingest more); a segment is at least SEGMENT_BYTES_MIN.
"""

from __future__ import annotations

import logging
import mmap
import os
from contextlib import suppress
from multiprocessing.shared_memory import SharedMemory

log = logging.getLogger(__name__)

SEGMENT_BYTES_MIN = 8 << 20
"""Smallest segment made (a batch of 8,192 events needs about 4.6 MB of rows)."""
SEGMENTS_FREE_MAX = 4
"""Most idle segments kept for reuse; beyond, a returned one is removed (in use at once:
about DECODE_AHEAD + 2 per decode process)."""
ATTACHED_MAX = 16
"""Most segments a decode process keeps mapped (the ingest process makes few: they are
reused)."""

SegmentRef = tuple[str, int]
"""A segment as a decode task gets it: (name, size in bytes)."""


class Segments:
    """The ingest process's segments: `acquire` one for a decode task, `release` it once
    nothing reads its rows any more, `close` them all at the end."""

    def __init__(self) -> None:
        self._free: list[SharedMemory] = []
        self._used: dict[str, SharedMemory] = {}
        self._broken = False

    def acquire(self, size: int) -> SharedMemory | None:
        """A segment of at least `size` bytes, not in use (None where shared memory cannot
        be had: the rows then travel through the pipe)."""
        if self._broken:
            return None
        for i, segment in enumerate(self._free):
            if segment.size >= size:
                del self._free[i]
                self._used[segment.name] = segment
                return segment
        capacity = SEGMENT_BYTES_MIN
        while capacity < size:
            capacity *= 2
        try:
            segment = SharedMemory(create=True, size=capacity)
        except OSError as e:
            self._broken = True
            log.warning("no shared memory for decoded rows (%s): they travel through the pipe", e)
            return None
        try:
            _reserve(segment)
        except OSError as e:
            # A full /dev/shm (a container's is 64 MB by default): the segment's pages
            # would fault (SIGBUS) when written. Not used; the pipe instead.
            _remove(segment)
            self._broken = True
            log.warning(
                "no room in shared memory for %d bytes of decoded rows (%s): they travel "
                "through the pipe",
                capacity,
                e,
            )
            return None
        self._used[segment.name] = segment
        return segment

    def release(self, segment: SharedMemory) -> None:
        """Take back a segment whose rows nothing reads any more (no view of it is kept)."""
        if self._used.pop(segment.name, None) is None:
            return
        if len(self._free) < SEGMENTS_FREE_MAX:
            self._free.append(segment)
        else:
            _remove(segment)

    def close(self) -> None:
        """Remove every segment (the decode processes are stopped first)."""
        for segment in [*self._free, *self._used.values()]:
            _remove(segment)
        self._free.clear()
        self._used.clear()

    @property
    def in_use(self) -> int:
        return len(self._used)


def _reserve(segment: SharedMemory) -> None:
    """Allocate the segment's pages now (OSError when shared memory has no room for them),
    so that writing it later cannot fault."""
    import _posixshmem

    fd = _posixshmem.shm_open("/" + segment.name, os.O_RDWR, mode=0o600)
    try:
        os.posix_fallocate(fd, 0, segment.size)
    finally:
        os.close(fd)


def _remove(segment: SharedMemory) -> None:
    with suppress(BufferError):  # a view of it is still alive: it goes with the last one
        segment.close()
    with suppress(FileNotFoundError):
        segment.unlink()


_attached: dict[str, mmap.mmap] = {}


def attach(ref: SegmentRef) -> mmap.mmap | None:
    """A decode process's mapping of the ingest process's segment `ref` (kept: segments are
    reused); None where it cannot be mapped (the rows then travel through the pipe)."""
    name, size = ref
    mapped = _attached.get(name)
    if mapped is not None:
        return mapped
    try:
        import _posixshmem

        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    except (ImportError, OSError):
        return None
    try:
        mapped = mmap.mmap(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(_attached) >= ATTACHED_MAX:
        oldest = next(iter(_attached))
        _attached.pop(oldest).close()
    _attached[name] = mapped
    return mapped
