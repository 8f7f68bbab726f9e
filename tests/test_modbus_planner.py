"""gears.modbus.planner: merges and splits (tables), error texts, the printed plan, and
properties over random tag sets (coverage, limits, gaps, isolate, fewest reads)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gears.modbus.planner import (
    ADDRESS_SPACE,
    BIT_TYPES,
    FUNCTIONS,
    Plan,
    PlanError,
    PlanOptions,
    PlanTag,
    Read,
    plan,
    plan_text,
)


def tag(name: str, address: int, count: int = 1, register: str = "holding", group: str = "g",
        isolate: bool = False) -> PlanTag:
    return PlanTag(name=name, register=register, address=address, count=count, group=group,
                   isolate=isolate)


def iso(name: str, address: int, count: int = 1, register: str = "holding") -> PlanTag:
    return tag(name, address, count, register, isolate=True)


Shape = list[tuple[str, str, int, int, list[tuple[str, int]]]]


def shape(p: Plan) -> Shape:
    """(register, group, address, count, [(tag, offset)]) per read, in plan order."""
    return [(reg, group, r.address, r.count, [(s.tag.name, s.offset) for s in r.tags])
            for (reg, group), reads in p.reads.items() for r in reads]


H, C = "holding", "coil"

# (id, tags, options, expected shape)
MERGE_CASES: list[tuple[str, list[PlanTag], PlanOptions, Shape]] = [
    ("adjacent merge", [tag("a", 0, 2), tag("b", 2), tag("c", 3, 2)], PlanOptions(),
     [(H, "g", 0, 5, [("a", 0), ("b", 2), ("c", 3)])]),
    ("gapped merge within default max_gap", [tag("a", 0), tag("b", 11)], PlanOptions(),
     [(H, "g", 0, 12, [("a", 0), ("b", 11)])]),
    ("gap beyond default max_gap splits", [tag("a", 0), tag("b", 12)], PlanOptions(),
     [(H, "g", 0, 1, [("a", 0)]), (H, "g", 12, 1, [("b", 0)])]),
    ("gap == max_gap merges", [tag("a", 0, 2), tag("b", 5)], PlanOptions(max_gap=3),
     [(H, "g", 0, 6, [("a", 0), ("b", 5)])]),
    ("gap == max_gap+1 splits", [tag("a", 0, 2), tag("b", 6)], PlanOptions(max_gap=3),
     [(H, "g", 0, 2, [("a", 0)]), (H, "g", 6, 1, [("b", 0)])]),
    ("max_gap 0 merges adjacent", [tag("a", 0), tag("b", 1)], PlanOptions(max_gap=0),
     [(H, "g", 0, 2, [("a", 0), ("b", 1)])]),
    ("max_gap 0 splits a gap of 1", [tag("a", 0), tag("b", 2)], PlanOptions(max_gap=0),
     [(H, "g", 0, 1, [("a", 0)]), (H, "g", 2, 1, [("b", 0)])]),
    ("125 registers: one read", [tag("a", 0, 123), tag("b", 123, 2)], PlanOptions(),
     [(H, "g", 0, 125, [("a", 0), ("b", 123)])]),
    ("124+2 registers: split", [tag("a", 0, 124), tag("b", 124, 2)], PlanOptions(),
     [(H, "g", 0, 124, [("a", 0)]), (H, "g", 124, 2, [("b", 0)])]),
    ("125 registers through a gap: one read", [tag("a", 1000), tag("b", 1124)],
     PlanOptions(max_gap=200), [(H, "g", 1000, 125, [("a", 0), ("b", 124)])]),
    ("126 registers through a gap: split", [tag("a", 1000), tag("b", 1125)],
     PlanOptions(max_gap=200), [(H, "g", 1000, 1, [("a", 0)]), (H, "g", 1125, 1, [("b", 0)])]),
    ("one tag of exactly 125", [tag("a", 65536 - 125, 125)], PlanOptions(),
     [(H, "g", 65411, 125, [("a", 0)])]),
    ("input registers split at 125 too", [tag("a", 0, 124, "input"), tag("b", 124, 2, "input")],
     PlanOptions(), [("input", "g", 0, 124, [("a", 0)]), ("input", "g", 124, 2, [("b", 0)])]),
    ("2000 bits: one read", [tag("a", 0, 1998, C), tag("b", 1998, 2, C)], PlanOptions(),
     [(C, "g", 0, 2000, [("a", 0), ("b", 1998)])]),
    ("1999+2 bits: split", [tag("a", 0, 1999, C), tag("b", 1999, 2, C)], PlanOptions(),
     [(C, "g", 0, 1999, [("a", 0)]), (C, "g", 1999, 2, [("b", 0)])]),
    ("2000 single coils through a gap: one read", [tag("a", 0, 1, C), tag("b", 1999, 1, C)],
     PlanOptions(max_gap=2000), [(C, "g", 0, 2000, [("a", 0), ("b", 1999)])]),
    ("2001 single coils through a gap: split", [tag("a", 0, 1, C), tag("b", 2000, 1, C)],
     PlanOptions(max_gap=2000), [(C, "g", 0, 1, [("a", 0)]), (C, "g", 2000, 1, [("b", 0)])]),
    ("bit gap counts bits", [tag("a", 0, 1, "discrete"), tag("b", 4, 1, "discrete")],
     PlanOptions(max_gap=3), [("discrete", "g", 0, 5, [("a", 0), ("b", 4)])]),
    ("lower max_registers", [tag("a", 0), tag("b", 9), tag("c", 10)], PlanOptions(max_registers=10),
     [(H, "g", 0, 10, [("a", 0), ("b", 9)]), (H, "g", 10, 1, [("c", 0)])]),
    ("lower max_bits", [tag("a", 0, 1, C), tag("b", 7, 1, C), tag("c", 8, 1, C)],
     PlanOptions(max_bits=8), [(C, "g", 0, 8, [("a", 0), ("b", 7)]), (C, "g", 8, 1, [("c", 0)])]),
    ("greedy fills the first read", [tag(f"t{i}", 2 * i, 2) for i in range(70)], PlanOptions(),
     [(H, "g", 0, 124, [(f"t{i}", 2 * i) for i in range(62)]),
      (H, "g", 124, 16, [(f"t{i}", 2 * i - 124) for i in range(62, 70)])]),
    # isolate
    ("isolate never merges, adjacent either side", [tag("a", 0), iso("i", 1), tag("b", 2)],
     PlanOptions(), [(H, "g", 0, 1, [("a", 0)]), (H, "g", 1, 1, [("i", 0)]),
                     (H, "g", 2, 1, [("b", 0)])]),
    ("no merge across an isolate in the gap", [tag("a", 0), iso("i", 5, 2), tag("b", 10)],
     PlanOptions(), [(H, "g", 0, 1, [("a", 0)]), (H, "g", 5, 2, [("i", 0)]),
                     (H, "g", 10, 1, [("b", 0)])]),
    ("isolate outside the gap does not split", [tag("a", 0), tag("b", 3), iso("i", 10)],
     PlanOptions(), [(H, "g", 0, 4, [("a", 0), ("b", 3)]), (H, "g", 10, 1, [("i", 0)])]),
    ("two isolates at one address: two reads", [iso("i", 7), iso("j", 7)], PlanOptions(),
     [(H, "g", 7, 1, [("i", 0)]), (H, "g", 7, 1, [("j", 0)])]),
    # a tag that itself spans the isolated register bridges no slack: b inside a still merges
    ("isolate under a wider tag", [tag("a", 0, 4), iso("i", 1), tag("b", 3)], PlanOptions(),
     [(H, "g", 0, 4, [("a", 0), ("b", 3)]), (H, "g", 1, 1, [("i", 0)])]),
    ("isolate past a wider tag's end", [tag("a", 0, 10), iso("i", 2, 10), tag("b", 5)],
     PlanOptions(), [(H, "g", 0, 10, [("a", 0), ("b", 5)]), (H, "g", 2, 10, [("i", 0)])]),
    # one_request_per_tag
    ("one_request_per_tag", [tag("a", 0, 2), tag("b", 2), tag("c", 2), tag("d", 3, 2)],
     PlanOptions(one_request_per_tag=True),
     [(H, "g", 0, 2, [("a", 0)]), (H, "g", 2, 1, [("b", 0)]), (H, "g", 2, 1, [("c", 0)]),
      (H, "g", 3, 2, [("d", 0)])]),
    ("one_request_per_tag for bits", [tag("a", 0, 1, C), tag("b", 1, 1, C)],
     PlanOptions(one_request_per_tag=True),
     [(C, "g", 0, 1, [("a", 0)]), (C, "g", 1, 1, [("b", 0)])]),
    # overlaps
    ("bit-in-register and int16 share", [tag("bit", 10), tag("word", 10)], PlanOptions(max_gap=0),
     [(H, "g", 10, 1, [("bit", 0), ("word", 0)])]),
    ("uint32 and int16 on its high word share", [tag("u32", 20, 2), tag("hi", 21)],
     PlanOptions(max_gap=0), [(H, "g", 20, 2, [("u32", 0), ("hi", 1)])]),
    ("partial overlap shares", [tag("a", 0, 4), tag("b", 2, 4)], PlanOptions(max_gap=0),
     [(H, "g", 0, 6, [("a", 0), ("b", 2)])]),
    ("overlap past the limit is read twice", [tag("a", 0, 4), tag("b", 2, 4)],
     PlanOptions(max_registers=5), [(H, "g", 0, 4, [("a", 0)]), (H, "g", 2, 4, [("b", 0)])]),
    ("tag inside a long tag costs nothing", [tag("a", 0, 100), tag("b", 50), tag("c", 99)],
     PlanOptions(max_gap=0), [(H, "g", 0, 100, [("a", 0), ("b", 50), ("c", 99)])]),
    # keys
    ("groups never merge", [tag("a", 0, group="slow"), tag("b", 1, group="fast")], PlanOptions(),
     [(H, "fast", 1, 1, [("b", 0)]), (H, "slow", 0, 1, [("a", 0)])]),
    ("register types never merge",
     [tag("h", 0, register="holding"), tag("i", 1, register="input"),
      tag("c", 2, register="coil"), tag("d", 3, register="discrete")], PlanOptions(),
     [("coil", "g", 2, 1, [("c", 0)]), ("discrete", "g", 3, 1, [("d", 0)]),
      ("holding", "g", 0, 1, [("h", 0)]), ("input", "g", 1, 1, [("i", 0)])]),
    ("no tags, no reads", [], PlanOptions(), []),
]


@pytest.mark.parametrize(("tags", "options", "expected"), [c[1:] for c in MERGE_CASES],
                         ids=[c[0] for c in MERGE_CASES])
def test_plan_merges_and_splits(tags: list[PlanTag], options: PlanOptions,
                                expected: Shape) -> None:
    p = plan(tags, options)
    assert shape(p) == expected
    assert p.tag_count == len(tags)
    # the order tags come in never matters
    assert shape(plan(reversed(tags), options)) == expected


def test_read_carries_function_code_and_end() -> None:
    p = plan([tag(r[0], 4, 2, r) for r in FUNCTIONS])
    got = {(r.register, r.function, r.address, r.count, r.end) for reads in p.reads.values()
           for r in reads}
    assert got == {("coil", 1, 4, 2, 6), ("discrete", 2, 4, 2, 6), ("holding", 3, 4, 2, 6),
                   ("input", 4, 4, 2, 6)}


def test_group_reads_and_counts() -> None:
    p = plan([tag("a", 0, group="fast"), tag("b", 0, register="coil", group="fast"),
              tag("c", 5, group="slow"), tag("d", 100, group="slow")])
    assert p.groups == ("fast", "slow")
    assert [(r.register, r.address) for r in p.group_reads("fast")] == [("coil", 0), ("holding", 0)]
    assert [r.address for r in p.group_reads("slow")] == [5, 100]
    assert p.group_reads("none") == ()
    assert (p.read_count, p.tag_count) == (4, 4)


# (id, build, exact message)
ERROR_CASES = [
    ("tag longer than 125", lambda: plan([tag("big", 0, 126)]),
     "tag longer than one read: tag=big, register=holding, count=126, max_registers=125"),
    ("tag longer than max_registers",
     lambda: plan([tag("big", 0, 4)], PlanOptions(max_registers=3)),
     "tag longer than one read: tag=big, register=holding, count=4, max_registers=3"),
    ("tag longer than 2000 bits", lambda: plan([tag("bits", 0, 2001, "discrete")]),
     "tag longer than one read: tag=bits, register=discrete, count=2001, max_bits=2000"),
    ("too long even one request per tag",
     lambda: plan([tag("big", 0, 126)], PlanOptions(one_request_per_tag=True)),
     "tag longer than one read: tag=big, register=holding, count=126, max_registers=125"),
    ("address overflow", lambda: tag("top", 65535, 2),
     "tag beyond the address space: tag=top, address=65535, count=2, "
     "rule=0<=address, address+count<=65536"),
    ("address past the end", lambda: tag("far", 65536, 1, "coil"),
     "tag beyond the address space: tag=far, address=65536, count=1, "
     "rule=0<=address, address+count<=65536"),
    ("negative address", lambda: tag("neg", -1),
     "tag beyond the address space: tag=neg, address=-1, count=1, "
     "rule=0<=address, address+count<=65536"),
    ("count zero", lambda: tag("z", 0, 0), "invalid count: tag=z, count=0, rule=count>=1"),
    ("unknown register", lambda: tag("x", 0, 1, "holdings"),
     "unknown register type: tag=x, register='holdings', allowed=coil,discrete,holding,input"),
    ("empty name", lambda: tag("", 0), "invalid tag name: tag='', rule=non-empty"),
    ("duplicate name", lambda: plan([tag("a", 0), tag("a", 7, group="other")]),
     "duplicate tag name: tag=a"),
    ("max_registers above 125", lambda: PlanOptions(max_registers=126),
     "invalid max_registers: max_registers=126, rule=1..125"),
    ("max_registers zero", lambda: PlanOptions(max_registers=0),
     "invalid max_registers: max_registers=0, rule=1..125"),
    ("max_bits above 2000", lambda: PlanOptions(max_bits=2001),
     "invalid max_bits: max_bits=2001, rule=1..2000"),
    ("max_gap negative", lambda: PlanOptions(max_gap=-1),
     "invalid max_gap: max_gap=-1, rule=max_gap>=0"),
]


@pytest.mark.parametrize(("build", "message"), [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_plan_errors_name_the_culprit(build, message: str) -> None:
    with pytest.raises(PlanError) as info:
        build()
    assert str(info.value) == message


def test_edges_of_address_space_and_limits_are_accepted() -> None:
    assert shape(plan([tag("last", 65535), tag("pair", 65534, 2)])) == [
        (H, "g", 65534, 2, [("pair", 0), ("last", 1)])]
    PlanOptions(max_registers=125, max_bits=2000, max_gap=0)
    PlanOptions(max_registers=1, max_bits=1)


def test_plan_error_is_a_value_error() -> None:
    # the settings layer catches ValueError for every config mistake
    assert issubclass(PlanError, ValueError)


PLAN_TEXT = """\
group  register  fc  addresses  count  tags
fast   coil       1  0-9           10  run[0:1] fault[9:10]
fast   holding    3  100-102        3  speed[0:2] temp[2:3] temp_hi[2:3]
fast   holding    3  200-200        1  watchdog[0:1]
fast   holding    3  250-250        1  setpoint[0:1]
slow   input      4  0-1            2  energy[0:2]
5 reads per cycle for 8 tags (fast=4, slow=1)
"""


def test_plan_text_is_the_table_engine_check_prints() -> None:
    tags = [tag("run", 0, 1, "coil", "fast"), tag("fault", 9, 1, "coil", "fast"),
            tag("temp_hi", 102, 1, group="fast"), tag("speed", 100, 2, group="fast"),
            tag("temp", 102, 1, group="fast"),
            PlanTag(name="watchdog", register="holding", address=200, count=1, group="fast",
                    isolate=True),
            tag("setpoint", 250, group="fast"), tag("energy", 0, 2, "input", "slow")]
    assert plan_text(plan(tags)) == PLAN_TEXT
    assert plan_text(plan(reversed(tags))) == PLAN_TEXT


def test_plan_text_of_no_tags() -> None:
    assert plan_text(plan([])) == (
        "group  register  fc  addresses  count  tags\n0 reads per cycle for 0 tags\n")


# --- properties -----------------------------------------------------------------------------

GROUPS = ("fast", "slow")


@st.composite
def device(draw: st.DrawFn, max_tags: int = 40, span: int = 300,
           registers: Sequence[str] = tuple(FUNCTIONS)) -> tuple[list[PlanTag], PlanOptions]:
    """Random options, then tags that fit them (no tag longer than its limit)."""
    options = PlanOptions(max_gap=draw(st.integers(0, 12)),
                          max_registers=draw(st.sampled_from([1, 4, 10, 125])),
                          max_bits=draw(st.sampled_from([1, 8, 30, 2000])),
                          one_request_per_tag=draw(st.integers(0, 5)) == 0)
    base = draw(st.sampled_from([0, ADDRESS_SPACE - span]))
    n = draw(st.integers(0, max_tags))
    tags = []
    for i in range(n):
        register = draw(st.sampled_from(registers))
        limit = options.limit(register)
        count = draw(st.integers(1, min(limit, 8 if register not in BIT_TYPES else 40)))
        address = base + draw(st.integers(0, span - count))
        tags.append(PlanTag(name=f"t{i}", register=register, address=address, count=count,
                            group=draw(st.sampled_from(GROUPS)),
                            isolate=draw(st.integers(0, 9)) == 0))
    return tags, options


def holes(ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The unread stretches [lo, hi) between the covered ranges of one read."""
    ranges = sorted(ranges)
    end = ranges[0][1]
    for a, e in ranges[1:]:
        if a > end:
            yield end, a
        end = max(end, e)


def maximal_runs(tags: list[PlanTag], options: PlanOptions) -> list[list[PlanTag]]:
    """Reference: the runs the reads would be if reads had no size limit. An isolated tag is
    a run of its own; a run ends where the stretch to the next tag (by address) is longer
    than max_gap or holds an isolated register."""
    isolated = [(t.address, t.end) for t in tags if t.isolate]
    runs: list[list[PlanTag]] = [[t] for t in tags if t.isolate]
    current: list[PlanTag] = []
    end = 0
    for t in sorted((t for t in tags if not t.isolate), key=lambda t: t.address):
        lo, hi = end, t.address
        bridged = hi <= lo or (hi - lo <= options.max_gap
                               and not any(a < hi and lo < e for a, e in isolated))
        if current and bridged:
            current.append(t)
            end = max(end, t.end)
        else:
            current = [t]
            runs.append(current)
            end = t.end
    return runs


def keyed(tags: list[PlanTag]) -> dict[tuple[str, str], list[PlanTag]]:
    out: dict[tuple[str, str], list[PlanTag]] = {}
    for t in tags:
        out.setdefault((t.register, t.group), []).append(t)
    return out


@settings(max_examples=400, deadline=None)
@given(device(), st.data())
def test_every_tag_in_exactly_one_read_within_limits(dev: tuple[list[PlanTag], PlanOptions],
                                                      data: st.DataObject) -> None:
    tags, options = dev
    p = plan(tags, options)
    seen: dict[str, Read] = {}
    # a device memory of distinct words: every slot must slice its own tag's registers out
    memory = list(range(ADDRESS_SPACE))
    for (register, group), reads in p.reads.items():
        isolated = [(t.address, t.end) for t in tags
                    if t.isolate and (t.register, t.group) == (register, group)]
        for r in reads:
            assert r.register == register and r.function == FUNCTIONS[register]
            assert 1 <= r.count <= options.limit(register)
            assert r.address + r.count <= ADDRESS_SPACE
            assert r.tags
            assert r.address == min(s.tag.address for s in r.tags)  # no wasted edges
            assert r.end == max(s.tag.end for s in r.tags)
            response = memory[r.address:r.end]
            for s in r.tags:
                assert (s.tag.register, s.tag.group) == (register, group)
                assert s.tag.name not in seen
                seen[s.tag.name] = r
                assert response[s.offset:s.stop] == memory[s.tag.address:s.tag.end]
            if len(r.tags) > 1:
                assert not options.one_request_per_tag
                assert not any(s.tag.isolate for s in r.tags)
                for lo, hi in holes([(s.tag.address, s.tag.end) for s in r.tags]):
                    assert hi - lo <= options.max_gap
                    assert not any(a < hi and lo < e for a, e in isolated)
    assert set(seen) == {t.name for t in tags}
    assert p.tag_count == len(tags) and p.read_count == sum(map(len, p.reads.values()))
    # any order of the same tags gives the same plan, and the same text
    shuffled = plan(data.draw(st.permutations(tags)), options)
    assert shape(shuffled) == shape(p) and plan_text(shuffled) == plan_text(p)


@settings(max_examples=400, deadline=None)
@given(device())
def test_greedy_needs_no_more_reads_than_maximal_runs(
        dev: tuple[list[PlanTag], PlanOptions]) -> None:
    tags, options = dev
    p = plan(tags, options)
    for key, group_tags in keyed(tags).items():
        reads = len(p.reads[key])
        if options.one_request_per_tag:
            assert reads == len(group_tags)
            continue
        runs = maximal_runs(group_tags, options)
        limit = options.limit(key[0])
        # no read bridges two runs, so a run is the most one read can take
        assert reads >= len(runs)
        if all(max(t.end for t in run) - min(t.address for t in run) <= limit for run in runs):
            assert reads == len(runs)  # one read per maximal run when each fits
        assert reads <= len(group_tags)


def feasible(group: list[PlanTag], isolated: list[tuple[int, int]], options: PlanOptions,
             limit: int) -> bool:
    """Could these tags be one read? (the planner's rules, stated without its algorithm)"""
    if len(group) == 1:
        return True
    if options.one_request_per_tag or any(t.isolate for t in group):
        return False
    if max(t.end for t in group) - min(t.address for t in group) > limit:
        return False
    return all(hi - lo <= options.max_gap and not any(a < hi and lo < e for a, e in isolated)
               for lo, hi in holes([(t.address, t.end) for t in group]))


def partitions(items: list[PlanTag]) -> Iterator[list[list[PlanTag]]]:
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in partitions(rest):
        for i in range(len(p)):
            yield p[:i] + [[first, *p[i]]] + p[i + 1:]
        yield [[first], *p]


@settings(max_examples=300, deadline=None)
@given(device(max_tags=6, span=24, registers=("holding",)))
def test_greedy_reads_are_the_fewest_possible(dev: tuple[list[PlanTag], PlanOptions]) -> None:
    """Exhaustive search over every way to split a small tag set into reads, overlaps
    included: the planner never uses more reads than the best split."""
    tags, options = dev
    p = plan(tags, options)
    for key, group_tags in keyed(tags).items():
        isolated = [(t.address, t.end) for t in group_tags if t.isolate]
        limit = options.limit(key[0])
        best = min(len(split) for split in partitions(group_tags)
                   if all(feasible(g, isolated, options, limit) for g in split))
        assert len(p.reads[key]) == best
