"""Named shared-memory segments with an ownership header and stale-segment recovery.

Theory of operation
-------------------
A segment is a POSIX shared-memory object (``/dev/shm/<name>``) created by one *owner*
process (the supervisor, or a test) and used by processes forked from it. The first 128 bytes
hold a header written once by the owner before anyone else can see the segment:

```
 0       8      12       16            24                 32            40        128
 +-------+------+--------+-------------+------------------+-------------+---- ... --+
 | magic | kind | version| owner pid   | owner start time | payload size|  (zero)    |
 | 8 B   | u32  | u32    | i64         | i64 (clock ticks)| i64         |            |
 +-------+------+--------+-------------+------------------+-------------+---- ... --+
```

* ``magic`` is ``b"FLXRIG\\x00\\x01"``; ``kind`` says which layout follows (ring, counters).
* The owner's pid *and* its start time (field 22 of ``/proc/<pid>/stat``) identify it, so a
  recycled pid is not mistaken for a live owner.

Ownership and cleanup: the owner unlinks the segment when it is done (``unlink()``). If the
owner was killed, the segment outlives it; the next ``create`` of the same name finds it,
sees the owner is gone and replaces it (``stale segment replaced`` in the log). A segment whose
owner is still alive is refused with ``SegmentInUseError``.

We unregister every segment from ``multiprocessing.resource_tracker``: on Python < 3.13 the
tracker unlinks segments when *any* process that attached them exits (CPython gh-82300), which
would pull a ring from under a restarting worker. Cleanup is ours.
"""

from __future__ import annotations

import _posixshmem  # CPython's own shm_open/shm_unlink binding, used by shared_memory
import logging
import os
import struct
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

log = logging.getLogger(__name__)

MAGIC = b"FLXRIG\x00\x01"
VERSION = 1
HEADER_SIZE = 128  # one cache-line pair, so the payload starts 128-byte aligned

KIND_RING = 1
KIND_COUNTERS = 2
KIND_JOURNAL = 3

_HEADER = struct.Struct("<8sIIqqq")  # magic, kind, version, owner pid, owner start, payload size


class ShmError(Exception):
    """Base class of shared-memory segment errors."""


class SegmentInUseError(ShmError):
    """The segment name is held by a live owner process."""


class SegmentFormatError(ShmError):
    """The segment exists but its header is not the one expected."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SegmentHeader:
    """Decoded segment header.

    Attributes:
        kind: layout kind (``KIND_RING``, ``KIND_COUNTERS``, ``KIND_JOURNAL``).
        version: header version.
        owner_pid: pid of the creating process.
        owner_start: start time of that process in clock ticks since boot.
        payload_size: bytes after the header.
    """

    kind: int
    version: int
    owner_pid: int
    owner_start: int
    payload_size: int


def process_start_ticks(pid: int) -> int | None:
    """Return the start time of ``pid`` in clock ticks since boot, or None if it is gone.

    Field 22 of /proc/<pid>/stat; the command name (field 2) may hold spaces and parentheses,
    so we split after the last ``)``.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); field 22 is fields[19]. A zombie still has /proc entries.
    if fields[0] == b"Z":
        return None
    return int(fields[19])


def owner_alive(pid: int, start: int) -> bool:
    """True when the process ``pid`` exists and started at ``start`` (not a recycled pid)."""
    return process_start_ticks(pid) == start


class Segment:
    """A named shared-memory segment with a fluxrig header.

    Use ``Segment.create`` in the owner and ``Segment.attach`` elsewhere (or just inherit the
    object through ``fork``). ``payload`` is a memoryview of the bytes after the header.
    """

    __slots__ = ("name", "header", "payload", "_shm", "_owner")

    def __init__(self, shm: shared_memory.SharedMemory, header: SegmentHeader, owner: bool):
        # SharedMemory.__del__ closes the mmap, which fails (and prints) while our views of it
        # live, e.g. at the exit of a process that never called close(). Closing is ours.
        shm.close = _leave_open  # type: ignore[method-assign]
        self._shm = shm
        self._owner = owner
        self.name: str = shm.name.lstrip("/")
        self.header = header
        self.payload: memoryview = shm.buf[HEADER_SIZE : HEADER_SIZE + header.payload_size]

    @classmethod
    def create(cls, name: str, kind: int, payload_size: int) -> Segment:
        """Create segment ``name``, replacing a stale one left by a dead owner.

        Args:
            name: segment name (no slashes), e.g. ``fx-rack1-ring-3``.
            kind: layout kind stored in the header.
            payload_size: bytes after the header.

        Raises:
            SegmentInUseError: a live process owns a segment of that name.
            ValueError: bad name or size.
        """
        if not name or "/" in name:
            raise ValueError(f"invalid segment name: name={name!r}, rule=non-empty without '/'")
        if payload_size <= 0:
            raise ValueError(f"invalid payload size: payload_size={payload_size}")
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=HEADER_SIZE + payload_size)
        except FileExistsError:
            cls._replace_stale(name)
            shm = shared_memory.SharedMemory(name=name, create=True, size=HEADER_SIZE + payload_size)
        _untrack(shm)
        pid = os.getpid()
        start = process_start_ticks(pid) or 0
        # The magic goes last: a reader that sees it sees a complete header.
        _HEADER.pack_into(shm.buf, 0, b"\x00" * 8, kind, VERSION, pid, start, payload_size)
        shm.buf[0:8] = MAGIC
        header = SegmentHeader(
            kind=kind, version=VERSION, owner_pid=pid, owner_start=start, payload_size=payload_size
        )
        return cls(shm, header, owner=True)

    @classmethod
    def attach(cls, name: str, kind: int) -> Segment:
        """Attach to an existing segment ``name`` of the given kind.

        Raises:
            FileNotFoundError: no such segment.
            SegmentFormatError: the header is not a fluxrig header of ``kind``.
        """
        shm = shared_memory.SharedMemory(name=name, create=False)
        _untrack(shm)
        try:
            header = _read_header(shm, name)
            if header.kind != kind:
                raise SegmentFormatError(
                    f"wrong segment kind: name={name}, kind={header.kind}, expected={kind}"
                )
        except BaseException:
            shm.close()
            raise
        return cls(shm, header, owner=False)

    @staticmethod
    def _replace_stale(name: str) -> None:
        shm = shared_memory.SharedMemory(name=name, create=False)
        _untrack(shm)
        try:
            try:
                header = _read_header(shm, name)
            except SegmentFormatError as exc:
                # Not ours or half-written by an owner killed during create: both unusable.
                log.warning("stale segment replaced: name=%s, reason=%s", name, exc)
            else:
                if owner_alive(header.owner_pid, header.owner_start):
                    raise SegmentInUseError(
                        f"segment in use: name={name}, owner_pid={header.owner_pid}"
                    )
                log.warning(
                    "stale segment replaced: name=%s, dead_owner_pid=%d", name, header.owner_pid
                )
        finally:
            shm.close()
        _shm_unlink(name)

    @property
    def is_owner(self) -> bool:
        """True in the process that created the segment (and its forks, which share the object)."""
        return self._owner

    def close(self) -> None:
        """Unmap the segment in this process; views into ``payload`` must be released first.

        Raises:
            BufferError: memoryviews derived from ``payload`` are still alive.
        """
        self.payload.release()
        shared_memory.SharedMemory.close(self._shm)

    def unlink(self) -> None:
        """Remove the segment name; existing mappings stay valid until closed."""
        _shm_unlink(self.name)


def _leave_open() -> None:
    pass


def _read_header(shm: shared_memory.SharedMemory, name: str) -> SegmentHeader:
    if shm.size < HEADER_SIZE:
        raise SegmentFormatError(f"segment too small: name={name}, size={shm.size}")
    magic, kind, version, pid, start, payload_size = _HEADER.unpack_from(shm.buf, 0)
    if magic != MAGIC:
        raise SegmentFormatError(f"bad segment magic: name={name}, magic={magic.hex()}")
    if version != VERSION:
        raise SegmentFormatError(f"unsupported segment version: name={name}, version={version}")
    if HEADER_SIZE + payload_size > shm.size:
        raise SegmentFormatError(
            f"segment shorter than its header says: name={name}, size={shm.size}, "
            f"payload_size={payload_size}"
        )
    return SegmentHeader(
        kind=kind, version=version, owner_pid=pid, owner_start=start, payload_size=payload_size
    )


def _shm_unlink(name: str) -> None:
    # Straight to shm_unlink(3): going through SharedMemory would map the segment and talk to
    # the resource tracker just to remove a name.
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass  # already gone (another creator, or a second unlink): the outcome we wanted


def _untrack(shm: shared_memory.SharedMemory) -> None:
    # See module docstring: the tracker would unlink segments behind our back.
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - tracker not running is fine
        pass
