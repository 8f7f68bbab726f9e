"""engine.frame: envelope encoding is a pure function of content; UUIDv7 ids."""

from __future__ import annotations

import time

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FORK
from engine.cbor import dumps, loads
from engine.frame import Frame, FrameError, decode, encode, new_frame, uuid7, uuid7_ms

FIXED_ID = bytes(range(16))


def _frame(**over) -> Frame:
    fields = dict(
        id=FIXED_ID, ts=1_700_000_000_000_000_000, src="acq:1", kind="iso8583.0100",
        headers={"lane": 3, "trace": "abc"}, body={"2": "476173******0119", "4": "000000010000"},
    )
    fields.update(over)
    return Frame(**fields)


def test_frame_bytes_are_pinned():
    frame = Frame(id=FIXED_ID, ts=1, src="s", kind="k", headers={}, body=None)
    expected = (
        "a6"  # map(6), keys in bytewise order of their encodings:
        "626964" "50" + FIXED_ID.hex() +  # "id": h'00..0f'
        "627473" "01"  # "ts": 1
        "63737263" "6173"  # "src": "s"
        "64626f6479" "f6"  # "body": null
        "646b696e64" "616b"  # "kind": "k"
        "67686561646572" "73" "a0"  # "headers": {}
    )
    assert encode(frame).hex() == expected


def test_same_content_gives_same_bytes_whatever_the_insertion_order():
    a = _frame(headers={"x": 1, "lane": 2, "trace": "t"}, body={"b": [1, 2.5], "a": {"z": 0, "y": 1}})
    b = _frame(headers={"trace": "t", "x": 1, "lane": 2}, body={"a": {"y": 1, "z": 0}, "b": [1, 2.5]})
    assert encode(a) == encode(b)


def test_round_trip_and_strict_decode():
    frame = _frame()
    data = encode(frame)
    assert decode(data) == frame
    assert decode(memoryview(data), strict=True) == frame


@given(
    headers=st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=5),
    body=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary(),
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=4),
        max_leaves=20,
    ),
)
@settings(max_examples=200, deadline=None)
def test_encode_decode_round_trip_property(headers, body):
    frame = _frame(headers=headers, body=body)
    data = encode(frame)
    back = decode(data, strict=True)
    assert encode(back) == data
    assert back.id == frame.id and back.ts == frame.ts and back.headers == headers


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (cbor2.dumps([1, 2]), "frame is not a map: got=list"),
        (dumps({"id": FIXED_ID, "ts": 1, "src": "s", "kind": "k", "headers": {}}),
         "frame keys wrong: missing=['body'], extra=[]"),
        (dumps({"id": FIXED_ID, "ts": 1, "src": "s", "kind": "k", "headers": {}, "body": 0, 7: 1}),
         "frame keys wrong: missing=[], extra=['7']"),
        (dumps({"id": b"short", "ts": 1, "src": "s", "kind": "k", "headers": {}, "body": 0}),
         "invalid frame field: field=id, rule=16 bytes, got=b'short'"),
        (dumps({"id": FIXED_ID, "ts": -1, "src": "s", "kind": "k", "headers": {}, "body": 0}),
         "invalid frame field: field=ts, rule=int >= 0, got=-1"),
        (dumps({"id": FIXED_ID, "ts": 1, "src": 5, "kind": "k", "headers": {}, "body": 0}),
         "invalid frame field: field=src, rule=str, got=int"),
        (dumps({"id": FIXED_ID, "ts": 1, "src": "s", "kind": "k", "headers": [], "body": 0}),
         "invalid frame field: field=headers, rule=map, got=list"),
    ],
)
def test_decode_errors_name_the_field(data, message):
    with pytest.raises(FrameError) as exc:
        decode(data)
    assert str(exc.value) == message


def test_decode_of_garbage_is_a_frame_error_chained_from_cbor():
    with pytest.raises(FrameError) as exc:
        decode(b"\xa6\x62")
    assert str(exc.value).startswith("frame is not valid CBOR: ")
    assert exc.value.__cause__ is not None


def test_strict_decode_rejects_a_non_deterministic_frame():
    frame = _frame()
    # Same content, keys in insertion (not deterministic) order via plain cbor2.
    loose = cbor2.dumps({"kind": frame.kind, "id": frame.id, "ts": frame.ts, "src": frame.src,
                         "headers": dict(frame.headers), "body": dict(frame.body)})
    assert decode(loose) == frame
    with pytest.raises(FrameError):
        decode(loose, strict=True)


def test_uuid7_layout_and_timestamp():
    now = time.time_ns()
    fid = uuid7(now)
    assert len(fid) == 16
    assert fid[6] >> 4 == 7  # version
    assert fid[8] >> 6 == 0b10  # RFC 9562 variant
    assert uuid7_ms(fid) == now // 1_000_000


def test_uuid7_strictly_increases_within_a_process_even_in_one_millisecond():
    ids = [uuid7(5_000_000) for _ in range(10_000)]  # same ms every time: the counter works
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def _ids(n, conn):
    conn.send([uuid7() for _ in range(n)])


def test_uuid7_unique_across_forked_processes():
    pipes = [FORK.Pipe(duplex=False) for _ in range(3)]
    procs = [FORK.Process(target=_ids, args=(5000, tx)) for _, tx in pipes]
    for p in procs:
        p.start()
    ids = [i for rx, _ in pipes for i in rx.recv()]
    for p in procs:
        p.join(10)
    ids += [uuid7() for _ in range(5000)]
    assert len(set(ids)) == len(ids) == 20_000


def test_new_frame_stamps_time_and_id():
    t0 = time.time_ns()
    frame = new_frame("gen", "demo.tick", body={"n": 1})
    assert t0 <= frame.ts <= time.time_ns()
    assert uuid7_ms(frame.id) == frame.ts // 1_000_000
    assert loads(encode(frame))["body"] == {"n": 1}
