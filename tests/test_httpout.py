"""gears.io.httpout: the http_client sink's core — settings, cutting, bodies, keys, verdicts,
the backoff and one batch's delivery against scripted receivers (no sockets, no clock)."""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.frame import Frame, decode, encode, new_frame
from engine.schema import At, ConfigError
from gears.io.httpout import (
    FORMATS,
    Backoff,
    Delivery,
    DeliveryError,
    Refuse,
    RetrySettings,
    Send,
    TlsSettings,
    Verdict,
    Wait,
    cut,
    idempotency_key,
    parse_retry_after,
    parse_settings,
    status_class,
    verdict,
)

AT = At("rig.yaml", "s")
NOW = 1_800_000_000.0  # a wall-clock "now" for Retry-After dates


def frames(n: int, **body: object) -> list[Frame]:
    return [new_frame("gen:p.src", "demo", body={"seq": i, **body}) for i in range(n)]


# --- settings -------------------------------------------------------------------------------


def test_defaults():
    s = parse_settings({"url": "http://127.0.0.1:8080/in"}, AT)
    assert (s.method, s.format, s.batch_count, s.batch_bytes, s.batch_time, s.timeout) == (
        "POST", "jsonl", 100, 1 << 20, 0.1, 10.0)
    assert s.retry == RetrySettings(initial=0.1, max=30.0, multiplier=2.0, jitter="full")
    assert (s.idempotency_header, s.headers, s.tls) == ("Idempotency-Key", (), None)


def test_every_key_is_read():
    s = parse_settings({
        "url": "https://h.example:8443/in?code=abc", "method": "PUT",
        "headers": {"Authorization": "Bearer t", "X-Tenant": "a"}, "format": "cbor",
        "batch": {"count": 7, "bytes": "64KiB", "time": "5ms"}, "timeout": "2s",
        "retry": {"initial": "50ms", "max": "1m", "multiplier": 3, "jitter": "equal"},
        "idempotency_header": "X-Request-Key",
        "tls": {"ca": "ca.pem", "verify": True, "cert": "c.pem", "key": "k.pem"}}, AT)
    assert (s.url, s.shown_url) == ("https://h.example:8443/in?code=abc",
                                    "https://h.example:8443/in")  # a query may hold a key
    assert (s.method, s.format, s.batch_count, s.batch_bytes, s.batch_time, s.timeout) == (
        "PUT", "cbor", 7, 65536, 0.005, 2.0)
    assert s.headers == (("Authorization", "Bearer t"), ("X-Tenant", "a"))
    assert s.retry == RetrySettings(initial=0.05, max=60.0, multiplier=3.0, jitter="equal")
    assert s.idempotency_header == "X-Request-Key"
    assert s.tls == TlsSettings(ca="ca.pem", verify=True, cert="c.pem", key="k.pem")
    assert parse_settings({"url": "http://h", "idempotency_header": ""}, AT).idempotency_header \
        == ""


@pytest.mark.parametrize(("raw", "message"), [
    ({}, "s.url: required key missing"),
    ({"url": "ftp://h/x"},
     "s.url: invalid URL 'ftp://h/x' (expected http(s)://HOST[:PORT][/PATH][?QUERY])"),
    ({"url": "http:///x"},
     "s.url: invalid URL 'http:///x' (expected http(s)://HOST[:PORT][/PATH][?QUERY])"),
    ({"url": "http://h/x#frag"},
     "s.url: invalid URL 'http://h/x#frag' (expected http(s)://HOST[:PORT][/PATH][?QUERY])"),
    ({"url": "http://h/a b"},
     "s.url: invalid URL 'http://h/a b' (expected http(s)://HOST[:PORT][/PATH][?QUERY])"),
    ({"url": "http://h:0/"}, "s.url: invalid URL 'http://h:0/': port out of range "
                             "(expected 1-65535)"),
    ({"url": "http://h:99999/"}, "s.url: invalid URL 'http://h:99999/' (expected "
                                 "http(s)://HOST[:PORT][/PATH][?QUERY], port 1-65535)"),
    ({"url": "http://user:pw@h/"}, "s.url: invalid URL 'http://user:pw@h/': credentials in "
                                   "the URL (put them in headers, e.g. Authorization)"),
    ({"url": "http://h", "method": "GET"}, "s.method: expected 'POST' or 'PUT', got 'GET'"),
    ({"url": "http://h", "format": "xml"},
     "s.format: expected one of 'jsonl', 'json', 'cbor', got 'xml'"),
    ({"url": "http://h", "headers": {"X-A": "a\r\nX-B: b"}},
     "s.headers.X-A: invalid header value 'a\\r\\nX-B: b' (expected one line of text: no CR, "
     "LF or other control character)"),
    ({"url": "http://h", "headers": {"X A": "a"}},
     "s.headers.X A: invalid header name 'X A' (expected a token: letters, digits, and "
     "!#$%&'*+-.^_`|~)"),
    ({"url": "http://h", "headers": {"content-length": "9"}},
     "s.headers.content-length: header set by the gear (the body and the idempotency key "
     "decide it)"),
    ({"url": "http://h", "headers": {"idempotency-key": "k"}},
     "s.headers.idempotency-key: header set by the gear (the body and the idempotency key "
     "decide it)"),
    ({"url": "http://h", "headers": {"X-A": "1", "x-a": "2"}},
     "s.headers.x-a: header given twice (names are case-insensitive)"),
    ({"url": "http://h", "idempotency_header": "Idem Key"},
     "s.idempotency_header: invalid value 'Idem Key' (expected a header name, or \"\")"),
    ({"url": "http://h", "batch": {"count": 0}}, "s.batch.count: must be >= 1, got 0"),
    ({"url": "http://h", "batch": {"bytes": "1GiB"}},
     "s.batch.bytes: must be <= 268435456 bytes, got '1GiB'"),
    ({"url": "http://h", "batch": {"bytes": 100}}, "s.batch.bytes: must be >= 256 bytes, "
                                                   "got 100"),
    ({"url": "http://h", "timeout": 0}, "s.timeout: must be >= 0.001, got 0"),
    ({"url": "http://h", "retry": {"initial": "2s", "max": "1s"}},
     "s.retry.max: must be >= retry.initial: initial=2s, max=1s"),
    ({"url": "http://h", "retry": {"multiplier": 0.5}},
     "s.retry.multiplier: must be >= 1.0, got 0.5"),
    ({"url": "http://h", "retry": {"jitter": "half"}},
     "s.retry.jitter: expected one of 'full', 'equal', 'none', got 'half'"),
    ({"url": "http://h", "tls": {"verify": False}},
     "s.tls: tls set for a plain http:// URL: url='http://h'"),
    ({"url": "https://h", "tls": {"key": "k.pem"}},
     "s.tls.key: a key without cert (set tls.cert too)"),
    ({"url": "http://h", "colour": "red"}, "s.colour: unknown key (allowed: batch, format, "
     "headers, idempotency_header, method, retry, timeout, tls, url)"),
])
def test_bad_settings_are_refused_at_their_key(raw, message):
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, AT)
    assert str(info.value) == f"rig.yaml: {message}"


def test_a_secret_from_the_environment_is_never_shown():
    at = At("rig.yaml", "s", origins={"s.headers.Authorization": "${TOKEN}",
                                      "s.url": "${URL}"})
    with pytest.raises(ConfigError) as info:
        parse_settings({"url": "http://h", "headers": {"Authorization": "Bearer s3cr3t\n"}}, at)
    assert "s3cr3t" not in str(info.value)
    assert "'${TOKEN}' (from the environment, not shown)" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_settings({"url": "http://u:s3cr3t@h/"}, at)
    assert "s3cr3t" not in str(info.value)


# --- verdicts -------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "expected", "label"), [
    (200, Verdict.DELIVERED, "2xx"), (201, Verdict.DELIVERED, "2xx"),
    (204, Verdict.DELIVERED, "2xx"), (299, Verdict.DELIVERED, "2xx"),
    (100, Verdict.RETRY, "error"),  # no final answer: unknown, retried
    (301, Verdict.RETRY, "3xx"), (302, Verdict.RETRY, "3xx"), (308, Verdict.RETRY, "3xx"),
    (400, Verdict.REFUSED, "4xx"), (401, Verdict.REFUSED, "4xx"),
    (403, Verdict.REFUSED, "4xx"), (404, Verdict.REFUSED, "4xx"),
    (408, Verdict.RETRY, "4xx"), (413, Verdict.REFUSED, "4xx"),
    (422, Verdict.REFUSED, "4xx"), (429, Verdict.RETRY, "4xx"),
    (499, Verdict.REFUSED, "4xx"),
    (500, Verdict.RETRY, "5xx"), (502, Verdict.RETRY, "5xx"), (503, Verdict.RETRY, "5xx"),
    (504, Verdict.RETRY, "5xx"), (599, Verdict.RETRY, "5xx"),
    (600, Verdict.RETRY, "error"), (999, Verdict.RETRY, "error"),
])
def test_verdict_and_stat_label_of_each_status(status, expected, label):
    assert verdict(status) is expected
    assert status_class(status) == label


def test_no_answer_is_labelled_error():
    assert status_class(None) == "error"


# --- Retry-After ----------------------------------------------------------------------------


def _http_date(t: float) -> str:
    return format_datetime(datetime.fromtimestamp(t, UTC), usegmt=True)


@pytest.mark.parametrize(("value", "seconds"), [
    (None, None), ("", None), ("120", 120.0), (" 5 ", 5.0), ("0", 0.0),
    ("-1", None), ("1.5", None), ("soon", None), ("9" * 30, 1e9),
    (_http_date(NOW + 30), 30.0), (_http_date(NOW - 30), 0.0),
    ("Sun, 06 Nov 1994 08:49:37", None),  # no zone: not an RFC 9110 date
    ("Sun, 99 Nov 1994 08:49:37 GMT", None),
])
def test_retry_after_delta_seconds_and_http_dates(value, seconds):
    assert parse_retry_after(value, NOW) == seconds


# --- backoff --------------------------------------------------------------------------------


def test_the_schedule_grows_by_the_multiplier_up_to_max():
    b = Backoff(RetrySettings(initial=0.1, max=2.0, multiplier=2.0, jitter="none"), lambda: 0.0)
    assert [b.delay(n) for n in range(1, 8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert b.delay(10**9) == 2.0  # no overflow however long the outage
    flat = Backoff(RetrySettings(initial=0.5, max=9.0, multiplier=1.0, jitter="none"), lambda: 0)
    assert [flat.delay(n) for n in (1, 5, 10**9)] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(("jitter", "r", "expected"), [
    ("full", 0.0, 0.0), ("full", 0.5, 0.4), ("full", 0.999, 0.7992),
    ("equal", 0.0, 0.4), ("equal", 0.5, 0.6), ("equal", 0.999, 0.7996),
    ("none", 0.3, 0.8),
])
def test_jitter(jitter, r, expected):
    b = Backoff(RetrySettings(initial=0.1, max=30.0, multiplier=2.0, jitter=jitter), lambda: r)
    assert b.delay(4) == pytest.approx(expected)  # base 0.8


def test_retry_after_lengthens_the_wait_and_max_caps_it():
    b = Backoff(RetrySettings(initial=0.1, max=30.0, multiplier=2.0, jitter="none"), lambda: 0)
    assert b.delay(1, retry_after=5.0) == 5.0
    assert b.delay(1, retry_after=0.0) == 0.1  # a 0 never makes us hammer
    assert b.delay(1, retry_after=3600.0) == 30.0


@given(initial=st.floats(0.001, 10), ratio=st.floats(1, 1000), mult=st.floats(1, 100),
       jitter=st.sampled_from(["full", "equal", "none"]), r=st.floats(0, 0.9999),
       attempt=st.integers(1, 10**6),
       retry_after=st.none() | st.floats(0, 10**6))
def test_every_wait_is_within_its_bounds(initial, ratio, mult, jitter, r, attempt, retry_after):
    retry = RetrySettings(initial=initial, max=initial * ratio, multiplier=mult, jitter=jitter)
    b = Backoff(retry, lambda: r)
    base = b.base(attempt)
    assert initial * (1 - 1e-9) <= base <= retry.max
    if attempt > 1:
        assert base >= b.base(attempt - 1)  # never shrinks
    wait = b.delay(attempt, retry_after)
    assert 0 <= wait <= retry.max
    low = {"full": 0.0, "equal": base / 2, "none": base}[jitter]
    if retry_after is not None:
        low = max(low, min(retry_after, retry.max))
    assert wait >= low * (1 - 1e-9)
    if retry_after is None:
        assert wait <= base


# --- cutting and bodies ---------------------------------------------------------------------


@pytest.mark.parametrize(("sizes", "fmt", "count", "max_bytes", "expected"), [
    ([], "jsonl", 10, 1000, []),
    ([10] * 5, "jsonl", 2, 1000, [(0, 2), (2, 4), (4, 5)]),
    ([10] * 5, "jsonl", 10, 30, [(0, 3), (3, 5)]),
    ([10] * 5, "jsonl", 10, 29, [(0, 2), (2, 4), (4, 5)]),
    ([10] * 3, "json", 10, 34, [(0, 3)]),  # [a,b,c]: 2 brackets + 30 + 2 commas
    ([10] * 3, "json", 10, 33, [(0, 2), (2, 3)]),
    ([10] * 3, "json", 10, 22, [(0, 1), (1, 2), (2, 3)]),  # [a,b] is 23 bytes
    ([50, 5, 5], "jsonl", 10, 20, [(0, 1), (1, 3)]),  # too big alone: alone
    ([5, 50, 5], "jsonl", 10, 20, [(0, 1), (1, 2), (2, 3)]),
])
def test_cut(sizes, fmt, count, max_bytes, expected):
    assert cut(sizes, FORMATS[fmt], count, max_bytes) == expected


@given(sizes=st.lists(st.integers(1, 300), max_size=200), fmt=st.sampled_from(list(FORMATS)),
       count=st.integers(1, 50), max_bytes=st.integers(1, 3000))
def test_cut_covers_every_piece_in_order_within_the_limits(sizes, fmt, count, max_bytes):
    f = FORMATS[fmt]
    spans = cut(sizes, f, count, max_bytes)
    assert [i for a, b in spans for i in range(a, b)] == list(range(len(sizes)))
    for k, (a, b) in enumerate(spans):
        assert 0 < b - a <= count
        assert b - a == 1 or f.size(sizes[a:b]) <= max_bytes
        if k + 1 < len(spans):  # greedy: one more piece would have broken a limit
            assert b - a == count or f.size(sizes[a:b + 1]) > max_bytes


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_bodies_hold_every_frame_with_its_id(fmt):
    batch = frames(3, data=b"\x00\xff", big=2**70)
    f = FORMATS[fmt]
    pieces = [f.piece(x) for x in batch]
    body = f.body(pieces)
    assert len(body) == f.size([len(p) for p in pieces])
    if fmt == "jsonl":
        docs = [json.loads(line) for line in body.decode().splitlines()]
        assert body.endswith(b"\n")
    elif fmt == "json":
        docs = json.loads(body)
    else:
        import io

        stream = io.BytesIO(body)
        decoded = []
        while stream.tell() < len(body):
            decoded.append(cbor2.load(stream))
        assert [decode(encode(x)) for x in batch] == [decode(cbor2.dumps(d)) for d in decoded]
        assert body == b"".join(encode(x) for x in batch)  # the rack's own bytes
        docs = [{"id": str(uuid.UUID(bytes=d["id"])), "body": d["body"]} for d in decoded]
    assert [d["id"] for d in docs] == [str(uuid.UUID(bytes=x.id)) for x in batch]
    assert [d["body"]["seq"] for d in docs] == [0, 1, 2]
    if fmt != "cbor":
        assert docs[0]["body"]["data"] == {"$hex": "00ff"}
        assert docs[0]["body"]["big"] == 2**70  # beyond 64 bits: the stdlib path


def test_content_types():
    assert {k: f.content_type for k, f in FORMATS.items()} == {
        "jsonl": "application/x-ndjson", "json": "application/json",
        "cbor": "application/cbor-seq"}


def test_idempotency_keys():
    a, b = (x.id for x in frames(2))
    assert idempotency_key([a]) == str(uuid.UUID(bytes=a))
    assert idempotency_key([a, b]) == hashlib.sha256(a + b).hexdigest()
    assert idempotency_key([b, a]) != idempotency_key([a, b])


# --- one batch's delivery -------------------------------------------------------------------

FIXED = Backoff(RetrySettings(initial=0.1, max=1.0, multiplier=2.0, jitter="none"), lambda: 0)


def drive(d: Delivery, answer) -> list[object]:
    """Run ``d`` to the end; ``answer(send)`` -> status, (status, retry_after, text) or an
    exception name (no answer). Returns every step."""
    steps: list[object] = []
    while (step := d.next()) is not None:
        steps.append(step)
        if isinstance(step, Send):
            a = answer(step)
            if isinstance(a, str):
                d.failed(a)
            elif isinstance(a, tuple):
                d.answered(*a)
            else:
                d.answered(a)
    return steps


def sends(steps):
    return [s for s in steps if isinstance(s, Send)]


def test_a_good_receiver_gets_every_frame_once_in_requests_of_count():
    batch = frames(250)
    d = Delivery(batch, FORMATS["jsonl"], 100, 1 << 20, FIXED)
    steps = drive(d, lambda s: 200)
    assert [len(s.indices) for s in steps] == [100, 100, 50]
    assert [i for s in steps for i in s.indices] == list(range(250))
    assert (d.delivered, d.refused, d.retries, d.splits) == (250, 0, 0, 0)


def test_a_retried_request_is_the_same_request_after_the_scheduled_wait():
    batch = frames(3)
    script = iter([503, "timeout", (429, 5.0), (500, None), 200])
    d = Delivery(batch, FORMATS["json"], 10, 1 << 20, FIXED)
    steps = drive(d, lambda s: next(script))
    out = sends(steps)
    assert len(out) == 5
    assert {(s.body, s.key, s.indices) for s in out} == {(out[0].body, out[0].key, (0, 1, 2))}
    assert [s.attempt for s in out] == [0, 1, 2, 3, 4]
    waits = [s for s in steps if isinstance(s, Wait)]
    assert [(w.seconds, w.cause) for w in waits] == [
        (0.1, "http 503"), (0.2, "timeout"), (1.0, "http 429"), (0.8, "http 500")]
    assert (d.delivered, d.retries) == (3, 4)


def test_a_refused_batch_is_sent_again_frame_by_frame_and_only_the_bad_one_dead_lettered():
    batch = frames(5)
    bad = {batch[3].id}

    def receiver(s: Send):
        if any(batch[i].id in bad for i in s.indices):
            return (400, None, b'{"error": "bad \x1b[31mframe\n' + b"x" * 300)
        return 200

    d = Delivery(batch, FORMATS["jsonl"], 10, 1 << 20, FIXED)
    steps = drive(d, receiver)
    assert [s.indices for s in sends(steps)] == [(0, 1, 2, 3, 4), (0,), (1,), (2,), (3,), (4,)]
    assert [s.key for s in sends(steps)[1:]] == [str(uuid.UUID(bytes=f.id)) for f in batch]
    refusals = [s for s in steps if isinstance(s, Refuse)]
    assert len(refusals) == 1 and refusals[0].index == 3
    reason = refusals[0].reason
    assert reason.startswith('http 400: {"error": "bad \\x1b[31mframe\\x0axxx')
    head = '{"error": "bad \x1b[31mframe\n'  # 27 characters of the answer's first 200
    assert reason.endswith('frame\\x0a' + "x" * (200 - len(head)) + "...")
    assert (d.delivered, d.refused, d.splits) == (4, 1, 1)


def test_a_refused_single_frame_is_dead_lettered_without_a_split():
    d = Delivery(frames(1), FORMATS["jsonl"], 10, 1 << 20, FIXED)
    steps = drive(d, lambda s: (404, None, "no such path"))
    assert steps[1:] == [Refuse(0, "http 404: no such path")]
    assert d.splits == 0


def test_a_frame_that_cannot_be_encoded_is_refused_first_and_the_others_sent():
    batch = frames(3)
    batch[1] = Frame(id=batch[1].id, ts=batch[1].ts, src="s", kind="k", body={1, 2})
    d = Delivery(batch, FORMATS["jsonl"], 10, 1 << 20, FIXED)
    steps = drive(d, lambda s: 200)
    assert isinstance(steps[0], Refuse) and steps[0].index == 1
    assert steps[0].reason.startswith("not encodable as jsonl: ")
    assert sends(steps)[0].indices == (0, 2)


def test_the_protocol_is_enforced():
    d = Delivery(frames(2), FORMATS["jsonl"], 1, 1 << 20, FIXED)
    with pytest.raises(DeliveryError, match="no request is waiting for an answer"):
        d.answered(200)
    d.next()
    with pytest.raises(DeliveryError, match="neither answered nor failed"):
        d.next()
    d.answered(200)
    with pytest.raises(DeliveryError):
        d.failed("timeout")


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 60), count=st.integers(1, 20), max_bytes=st.integers(256, 4000),
       fmt=st.sampled_from(list(FORMATS)), bad=st.sets(st.integers(0, 59), max_size=8),
       trouble=st.lists(st.sampled_from([0, 0, 0, 500, 503, 429, 408, 302, "timeout"]),
                        max_size=40))
def test_every_frame_is_delivered_or_refused_exactly_as_the_receiver_decides(
        n, count, max_bytes, fmt, bad, trouble):
    batch = frames(n)
    bad_ids = {batch[i].id for i in bad if i < n}
    troubles = iter(trouble)
    delivered: list[int] = []
    seen: dict[str, tuple[bytes, tuple[int, ...]]] = {}

    def receiver(s: Send):
        ids = [batch[i].id for i in s.indices]
        assert s.key == idempotency_key(ids)
        assert seen.setdefault(s.key, (s.body, s.indices)) == (s.body, s.indices)
        t = next(troubles, 0)
        if t:
            return t
        if bad_ids & set(ids):
            return 400
        delivered.extend(s.indices)
        return 200

    d = Delivery(batch, FORMATS[fmt], count, max_bytes, FIXED)
    steps = drive(d, receiver)
    refused = sorted(s.index for s in steps if isinstance(s, Refuse))
    assert refused == sorted(i for i in bad if i < n)
    assert delivered == [i for i in range(n) if i not in bad]  # once each, in order
    assert (d.delivered, d.refused) == (len(delivered), len(refused))
    for s in sends(steps):
        assert len(s.indices) == 1 or (len(s.indices) <= count and len(s.body) <= max_bytes)
    assert all(0 < w.seconds <= 1.0 for w in steps if isinstance(w, Wait))
    assert not math.isnan(sum(w.seconds for w in steps if isinstance(w, Wait)))
