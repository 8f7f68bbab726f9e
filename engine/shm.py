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
owner was killed, the segment outlives it, *with its contents*: a restarted supervisor
``adopt``s it (rings keep their unconsumed records, journals their open slots) or, when it
is verifiably empty, removes it (``engine.supervisor``). Before anything is mapped, the file
is ``inspect``ed without mapping: our uid, mode 0600, a whole fluxrig header — anything else
is a ``ForeignSegmentError`` naming the segment. ``create`` is exclusive (``O_EXCL``, mode
0600); over a dead owner's leftover it replaces it (tests, tools); a live owner's is refused
with ``SegmentInUseError``.

We unregister every segment from ``multiprocessing.resource_tracker``: on Python < 3.13 the
tracker unlinks segments when *any* process that attached them exits (CPython gh-82300), which
would pull a ring from under a restarting worker. Cleanup is ours.
"""

from __future__ import annotations

import _posixshmem  # CPython's own shm_open/shm_unlink binding, used by shared_memory
import logging
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

log = logging.getLogger(__name__)

MAGIC = b"FLXRIG\x00\x01"
VERSION = 1
HEADER_SIZE = 128  # one cache-line pair, so the payload starts 128-byte aligned

KIND_RING = 1
KIND_COUNTERS = 2
KIND_JOURNAL = 3
KIND_TAP = 4  # a ring's layout, for the signal tap (engine.tap): lossy, never adopted

_HEADER = struct.Struct("<8sIIqqq")  # magic, kind, version, owner pid, owner start, payload size
# the rack that made the segment, NUL-padded, in the header's spare bytes (zero in segments
# made before it was written there: "unknown", and the version stays, so those are still
# adopted): segment names ``fx-<rack>-<tag>`` are ambiguous when rack ids contain '-'
_RACK_AT, _RACK_LEN = _HEADER.size, 64


class ShmError(Exception):
    """Base class of shared-memory segment errors."""


class SegmentInUseError(ShmError):
    """The segment name is held by a live owner process."""


class SegmentFormatError(ShmError):
    """The segment exists but its header is not the one expected."""


class ForeignSegmentError(SegmentFormatError):
    """A segment under one of our names that we must not use: another user's, open to other
    users, or not a fluxrig segment at all. The message names it; it is never mapped."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SegmentHeader:
    """Decoded segment header.

    Attributes:
        kind: layout kind (``KIND_RING``, ``KIND_COUNTERS``, ``KIND_JOURNAL``, ``KIND_TAP``).
        version: header version.
        owner_pid: pid of the creating process.
        owner_start: start time of that process in clock ticks since boot.
        payload_size: bytes after the header.
        rack: the rack that made it (``Segment.stamp``); "" when unknown.
    """

    kind: int
    version: int
    owner_pid: int
    owner_start: int
    payload_size: int
    rack: str = ""


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
        try:
            header = inspect(name)
        except FileNotFoundError:
            return
        if header is not None and owner_alive(header.owner_pid, header.owner_start):
            raise SegmentInUseError(f"segment in use: name={name}, owner_pid={header.owner_pid}")
        if header is None:
            log.warning("stale segment replaced: name=%s, reason=empty", name)
        else:
            log.warning("stale segment replaced: name=%s, dead_owner_pid=%d", name,
                        header.owner_pid)
        unlink(name)

    @classmethod
    def adopt(cls, name: str, kind: int, payload_size: int) -> Segment:
        """Take over segment ``name`` left by a dead owner, contents kept (a restarted
        supervisor adopting the rings and journals of the one that was killed).

        Raises:
            ForeignSegmentError: see ``inspect``.
            SegmentFormatError: another kind or size than asked for.
            SegmentInUseError: its owner is alive.
        """
        header = inspect(name)
        if header is None or header.kind != kind or header.payload_size != payload_size:
            raise SegmentFormatError(
                f"segment does not fit: name={name}, kind={header and header.kind}, "
                f"payload_size={header and header.payload_size}, expected_kind={kind}, "
                f"expected_payload_size={payload_size}")
        if owner_alive(header.owner_pid, header.owner_start):
            raise SegmentInUseError(f"segment in use: name={name}, owner_pid={header.owner_pid}")
        shm = shared_memory.SharedMemory(name=name, create=False)
        _untrack(shm)
        pid = os.getpid()
        start = process_start_ticks(pid) or 0
        _HEADER.pack_into(shm.buf, 0, MAGIC, kind, VERSION, pid, start, payload_size)
        return cls(shm, SegmentHeader(kind=kind, version=VERSION, owner_pid=pid,
                                      owner_start=start, payload_size=payload_size),
                   owner=True)

    def stamp(self, rack: str) -> None:
        """Write the rack that owns this segment into its header (``SegmentHeader.rack``):
        a rack's start tells its own leftovers from another rack's whose id shares its
        prefix (``plant`` and ``plant-2``)."""
        raw = rack.encode()[:_RACK_LEN]
        self._shm.buf[_RACK_AT:_RACK_AT + _RACK_LEN] = raw + b"\0" * (_RACK_LEN - len(raw))

    def release(self) -> None:
        """Give up ownership of a segment kept for the next start (its header then names no
        owner): a supervisor that drains and starts again in place (``execv``, keeping its
        pid, to run a deployed config) would otherwise find its own rings "in use"."""
        _HEADER.pack_into(self._shm.buf, 0, MAGIC, self.header.kind, VERSION, 0, 0,
                          self.header.payload_size)

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
        unlink(self.name)


def _leave_open() -> None:
    pass


SHM_DIR = "/dev/shm"


def inspect(name: str) -> SegmentHeader | None:
    """The header of segment ``name`` read from its file, without mapping it; None for an
    empty file of ours (a creator killed before it sized the segment).

    Raises:
        FileNotFoundError: no such segment.
        ForeignSegmentError: not a regular file (a symlink, a FIFO), owned by another user,
            open to group/others, shorter than a header, or not a fluxrig header
            (``/dev/shm`` is world-writable: a stranger may plant a file under our name; it
            is reported, never mapped).
    """
    try:  # O_NONBLOCK: a planted FIFO must not hang the start
        fd = os.open(os.path.join(SHM_DIR, name),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as exc:  # a symlink (ELOOP) or anything else we may not open
        raise ForeignSegmentError(f"segment cannot be opened as a file: name={name}, "
                                  f"error={exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ForeignSegmentError(f"segment is not a regular file: name={name}, "
                                      f"mode={oct(st.st_mode)}")
        if st.st_uid != os.getuid():
            raise ForeignSegmentError(f"segment not ours: name={name}, uid={st.st_uid}, "
                                      f"our_uid={os.getuid()}")
        if st.st_mode & 0o077:
            raise ForeignSegmentError(f"segment open to other users: name={name}, "
                                      f"mode={oct(st.st_mode & 0o777)}")
        if st.st_size == 0:
            return None
        if st.st_size < HEADER_SIZE:
            raise ForeignSegmentError(f"segment too small: name={name}, size={st.st_size}")
        head = os.pread(fd, _RACK_AT + _RACK_LEN, 0)
        magic, kind, version, pid, start, payload_size = _HEADER.unpack(head[:_HEADER.size])
        rack = head[_RACK_AT:].split(b"\0", 1)[0].decode(errors="replace")
    finally:
        os.close(fd)
    if magic != MAGIC:
        raise ForeignSegmentError(f"not a fluxrig segment: name={name}, magic={magic.hex()}")
    if version != VERSION or HEADER_SIZE + payload_size > st.st_size:
        raise ForeignSegmentError(f"segment of another version or cut short: name={name}, "
                                  f"version={version}, size={st.st_size}, "
                                  f"payload_size={payload_size}")
    return SegmentHeader(kind=kind, version=version, owner_pid=pid, owner_start=start,
                         payload_size=payload_size, rack=rack)


def segment_names(prefix: str) -> list[str]:
    """Names of the segments in ``/dev/shm`` starting with ``prefix``, sorted."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def mapping_pids(names: Iterable[str]) -> list[int]:
    """Processes (other than this one) that have one of the segments ``names`` mapped: the
    survivors of a killed supervisor still using a rack's rings."""
    wanted = {f"{SHM_DIR}/{n}" for n in names}
    if not wanted:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/maps", encoding="utf-8", errors="replace") as f:
                if any(_mapped_path(line) in wanted for line in f):
                    out.append(int(entry))
        except OSError:
            continue  # gone, or not ours to read
    return out


def _mapped_path(maps_line: str) -> str:
    """The file of one ``/proc/<pid>/maps`` line ("" for an anonymous mapping)."""
    fields = maps_line.rstrip("\n").split(maxsplit=5)
    return fields[5].removesuffix(" (deleted)") if len(fields) == 6 else ""


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


def unlink(name: str) -> None:
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
