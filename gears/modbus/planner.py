"""The Modbus request planner: which reads fetch the tags of one device (sans-I/O).

Input: the device's tags (``PlanTag``: register type, 0-based wire address, span in registers
or bits, poll group, ``isolate``) and its ``PlanOptions``. Output: a ``Plan`` holding, per
(register type, poll group), the reads to issue once per poll cycle of that group; each
``Read`` lists its tags with their offset inside the response, so the poller slices the
answer without searching.

Merging, per (register type, poll group)::

    tags sorted by address
    |<-- tag a -->|  gap <= max_gap  |<-- tag b -->|<- c ->|       |<-- tag d -->|
    |<------------------ one read (<= limit) ------------->|  gap > max_gap: new read

* A read grows greedily: the next tag joins while it starts at most ``max_gap`` units after
  the read's current end (overlapping tags have a negative gap, so they join) and the read
  stays within the limit of its function (125 registers, 2,000 bits). Otherwise it starts a
  new read. The result uses the fewest reads possible (the tests check it against an
  exhaustive search over small tag sets, overlaps included).
* ``isolate`` tags are read alone, and a merged read never carries an isolated tag's
  registers as slack: a gap that contains one is never bridged.
* ``one_request_per_tag`` (for devices that fail on multi-register reads) gives every tag a
  read of its own, overlapping tags included.
* Overlapping tags (a bit-in-register and an int16 on one address, an int16 on the high word
  of a uint32) share a read as long as the limit allows; past the limit the later tag starts
  the next read and the overlapped registers are read twice.

Units: ``max_gap`` counts registers for holding/input and bits for coil/discrete, like every
address and count here. Limits come from the Modbus Application Protocol Specification
v1.1b3, sections 6.1-6.4: the response byte count is one byte, so a read returns at most
250 bytes = 125 registers (functions 3, 4) or 2,000 bits (functions 1, 2).

The plan depends only on the set of tags and the options, never on their order: groups are
listed by name, register types by function code, reads by address. Errors are ``PlanError``
and name the tag or option at fault.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

# Function code per register type (spec sections 6.1 read coils, 6.2 read discrete inputs,
# 6.3 read holding registers, 6.4 read input registers).
FUNCTIONS: Mapping[str, int] = MappingProxyType(
    {"coil": 1, "discrete": 2, "holding": 3, "input": 4})
REGISTER_TYPES = tuple(FUNCTIONS)  # in function-code order
BIT_TYPES = frozenset({"coil", "discrete"})

MAX_REGISTERS = 125  # functions 3/4: byte count <= 250 (one byte, 2 bytes per register)
MAX_BITS = 2000  # functions 1/2: 250 bytes of 8 bits
ADDRESS_SPACE = 65536  # addresses are 16-bit on the wire: 0..65535

# Ten spare registers cost 20 bytes in a response, far less than the round trip of a second
# request; a wider gap more often bridges unmapped registers, which many devices answer with
# exception 2 (illegal data address) for the whole read. Telegraf's "max_insert"
# optimisation defaults to 50; we prefer the smaller failure surface.
DEFAULT_MAX_GAP = 10


class PlanError(ValueError):
    """The tags or options of a device cannot be planned; the message names the culprit."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanTag:
    """One tag as the planner sees it; validated when built.

    Attributes:
        name: the tag's name, unique within its device.
        register: ``holding``, ``input``, ``coil`` or ``discrete``.
        address: first register (or bit), 0-based as on the wire.
        count: registers (or bits) spanned: 1 for int16/bool/bit-in-register, 2 for
            float32/int32, 4 for 64-bit types, ceil(n/2) for string(n).
        group: the poll group it is read in.
        isolate: read by a request of its own, never merged with other tags.

    Raises:
        PlanError: unknown register type, empty name, count below 1, or a span outside
            0..65535.
    """

    name: str
    register: str
    address: int
    count: int
    group: str
    isolate: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise PlanError(f"invalid tag name: tag={self.name!r}, rule=non-empty")
        if self.register not in FUNCTIONS:
            raise PlanError(f"unknown register type: tag={self.name}, register={self.register!r}, "
                            f"allowed={','.join(REGISTER_TYPES)}")
        if self.count < 1:
            raise PlanError(f"invalid count: tag={self.name}, count={self.count}, rule=count>=1")
        if self.address < 0 or self.address + self.count > ADDRESS_SPACE:
            raise PlanError(f"tag beyond the address space: tag={self.name}, "
                            f"address={self.address}, count={self.count}, "
                            f"rule=0<=address, address+count<={ADDRESS_SPACE}")

    @property
    def end(self) -> int:
        """One past the last register (or bit) of the tag."""
        return self.address + self.count


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanOptions:
    """Request options of one device; validated when built.

    Attributes:
        max_gap: unread registers (bits, for coils and discretes) a merged read may bridge
            between two tags; 0 merges only adjacent or overlapping tags.
        max_registers: largest read of holding/input registers, 1..125.
        max_bits: largest read of coils/discrete inputs, 1..2000.
        one_request_per_tag: every tag its own read (devices that fail on longer reads).

    Raises:
        PlanError: an option outside its range, naming the option.
    """

    max_gap: int = DEFAULT_MAX_GAP
    max_registers: int = MAX_REGISTERS
    max_bits: int = MAX_BITS
    one_request_per_tag: bool = False

    def __post_init__(self) -> None:
        if self.max_gap < 0:
            raise PlanError(f"invalid max_gap: max_gap={self.max_gap}, rule=max_gap>=0")
        if not 1 <= self.max_registers <= MAX_REGISTERS:
            raise PlanError(f"invalid max_registers: max_registers={self.max_registers}, "
                            f"rule=1..{MAX_REGISTERS}")
        if not 1 <= self.max_bits <= MAX_BITS:
            raise PlanError(f"invalid max_bits: max_bits={self.max_bits}, rule=1..{MAX_BITS}")

    def limit(self, register: str) -> int:
        """The largest read for a register type, in its units (bits or registers)."""
        return self.max_bits if register in BIT_TYPES else self.max_registers


@dataclass(frozen=True, slots=True, kw_only=True)
class TagSlot:
    """Where a tag sits in a read's response: ``response[offset:stop]`` is its data."""

    tag: PlanTag
    offset: int

    @property
    def stop(self) -> int:
        """One past the tag's last register (or bit) in the response."""
        return self.offset + self.tag.count


@dataclass(frozen=True, slots=True, kw_only=True)
class Read:
    """One request: ``count`` registers (or bits) from ``address`` with ``function``.

    ``tags`` are ordered by offset (then count, then name); overlapping tags may share
    registers.
    """

    register: str
    function: int
    address: int
    count: int
    tags: tuple[TagSlot, ...]

    @property
    def end(self) -> int:
        """One past the last register (or bit) read."""
        return self.address + self.count


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """The reads of one device.

    Attributes:
        reads: (register type, poll group) -> reads issued once per cycle of that group, in
            address order; keys ordered by group name, then function code.
        tag_count: tags planned (each sits in exactly one read).
    """

    reads: Mapping[tuple[str, str], tuple[Read, ...]]
    tag_count: int

    @property
    def read_count(self) -> int:
        """Requests when every poll group runs one cycle."""
        return sum(len(reads) for reads in self.reads.values())

    @property
    def groups(self) -> tuple[str, ...]:
        """The poll groups that have reads, by name."""
        return tuple(sorted({group for _, group in self.reads}))

    def group_reads(self, group: str) -> tuple[Read, ...]:
        """Every read of one poll group (register types in function-code order)."""
        return tuple(read for (_, g), reads in self.reads.items() if g == group for read in reads)


def _sort_key(tag: PlanTag) -> tuple[int, int, str]:
    return (tag.address, tag.count, tag.name)


def _read(register: str, tags: list[PlanTag]) -> Read:
    start = min(t.address for t in tags)
    end = max(t.end for t in tags)
    slots = tuple(TagSlot(tag=t, offset=t.address - start) for t in sorted(tags, key=_sort_key))
    return Read(register=register, function=FUNCTIONS[register], address=start,
                count=end - start, tags=slots)


def _merge(register: str, tags: list[PlanTag], options: PlanOptions) -> list[Read]:
    """The reads of one (register type, poll group), tags already checked against the limit."""
    if options.one_request_per_tag:
        return [_read(register, [t]) for t in sorted(tags, key=_sort_key)]
    limit = options.limit(register)
    isolated = sorted(((t.address, t.end) for t in tags if t.isolate))

    def bridges_isolated(lo: int, hi: int) -> bool:
        # Does the slack [lo, hi) contain a register of an isolated tag? (empty if hi <= lo)
        return lo < hi and any(a < hi and lo < e for a, e in isolated)

    reads = [_read(register, [t]) for t in tags if t.isolate]
    current: list[PlanTag] = []
    start = end = 0
    for tag in sorted((t for t in tags if not t.isolate), key=_sort_key):
        if (current and tag.address - end <= options.max_gap
                and max(end, tag.end) - start <= limit
                and not bridges_isolated(end, tag.address)):
            current.append(tag)
            end = max(end, tag.end)
            continue
        if current:
            reads.append(_read(register, current))
        current, start, end = [tag], tag.address, tag.end
    if current:
        reads.append(_read(register, current))
    reads.sort(key=lambda r: (r.address, r.count, r.tags[0].tag.name))
    return reads


def plan(tags: Iterable[PlanTag], options: PlanOptions | None = None) -> Plan:
    """Plan the reads of one device.

    Args:
        tags: every tag of the device, in any order.
        options: the device's request options (defaults: ``PlanOptions()``).

    Returns:
        The plan; the same for any order of ``tags``.

    Raises:
        PlanError: two tags share a name, or a tag alone spans more than one read may
            (``max_registers`` / ``max_bits``).
    """
    options = options or PlanOptions()
    buckets: dict[tuple[str, str], list[PlanTag]] = {}
    names: set[str] = set()
    for tag in tags:
        if tag.name in names:
            raise PlanError(f"duplicate tag name: tag={tag.name}")
        names.add(tag.name)
        limit = options.limit(tag.register)
        if tag.count > limit:
            key = "max_bits" if tag.register in BIT_TYPES else "max_registers"
            raise PlanError(f"tag longer than one read: tag={tag.name}, register={tag.register}, "
                            f"count={tag.count}, {key}={limit}")
        buckets.setdefault((tag.register, tag.group), []).append(tag)
    reads = {key: tuple(_merge(key[0], buckets[key], options))
             for key in sorted(buckets, key=lambda k: (k[1], FUNCTIONS[k[0]]))}
    return Plan(reads=MappingProxyType(reads), tag_count=len(names))


def plan_text(p: Plan) -> str:
    """The plan as ``engine check`` prints it: one line per read, then a summary.

    Addresses are 0-based wire addresses, the range inclusive; each tag shows as
    ``name[offset:stop]``, its slice of the response. Columns are aligned; the text ends
    with a newline and depends only on the plan.
    """
    header = ("group", "register", "fc", "addresses", "count", "tags")
    rows = [header]
    for (register, group), reads in p.reads.items():
        for r in reads:
            rows.append((group, register, str(r.function), f"{r.address}-{r.end - 1}",
                         str(r.count), " ".join(f"{s.tag.name}[{s.offset}:{s.stop}]"
                                                for s in r.tags)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    right = {2, 4}  # numbers right-aligned
    lines = []
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    per_group = ", ".join(f"{g}={len(p.group_reads(g))}" for g in p.groups)
    summary = f"{p.read_count} reads per cycle for {p.tag_count} tags"
    if per_group:
        summary += f" ({per_group})"
    lines.append(summary)
    return "\n".join(lines) + "\n"
