"""The http_server source's sans-I/O core (``gears.io.httpin``): settings, routes,
admission, rate limiting with an injected clock, bodies -> frames, answer bytes."""

from __future__ import annotations

import base64

import cbor2
import orjson
import pytest

from engine.cbor import dumps
from engine.frame import decode
from engine.schema import At, ConfigError
from gears.io.httpin import (
    DATA,
    HEALTH_LIVE,
    HEALTH_READY,
    Accepted,
    Head,
    HttpIn,
    Refusal,
    TokenBucket,
    parse_settings,
    uuid_text,
)

AT = At("rig.yaml", "pipelines[0].source.settings")
TOKEN = "t0ken-abc"


def core(**raw) -> HttpIn:
    raw.setdefault("auth", {"bearer": TOKEN})
    return HttpIn(parse_settings(raw, AT), "web.in", max_payload=1 << 16, now=0.0)


def head(ct: bytes = b"application/json", auth: bytes | None = b"Bearer " + TOKEN.encode(),
         length: int = 10, copied: dict | None = None, path: bytes = b"/") -> Head:
    return Head(method=b"POST", path=path, content_type=ct, authorization=auth,
                content_length=length, copied=copied)


# -- settings ---------------------------------------------------------------------------------

def test_settings_defaults():
    s = parse_settings({"auth": {"none": True}}, AT)
    assert (s.host, s.port, s.paths, s.kind, s.ack) == ("127.0.0.1", 8080, {b"/"}, "http",
                                                        "ring")
    assert (s.max_body, s.queue_wait, s.durable_timeout, s.request_timeout) == (
        1 << 20, 0.2, 5.0, 10.0)
    assert s.rate == 0 and s.burst == 1 and s.auth.scheme == "none"
    assert s.idempotency_header == "idempotency-key"


@pytest.mark.parametrize("raw, path, message", [
    ({}, "auth", "required: bearer, basic, or none: true"),
    ({"auth": {}}, "auth", "required: bearer, basic"),
    ({"auth": {"none": False}}, "auth", "required: bearer, basic"),
    ({"auth": {"bearer": "x", "none": True}}, "auth.none", "contradicts bearer/basic"),
    ({"auth": {"bearer": "has space"}}, "auth.bearer", "non-empty printable ASCII"),
    ({"auth": {"bearer": ""}}, "auth.bearer", "non-empty"),
    ({"auth": {"basic": {"user": "a:b", "password": "p"}}}, "auth.basic.user", "no ':'"),
    ({"auth": {"basic": {"user": "a"}}}, "auth.basic.password", "required key missing"),
    ({"auth": {"token": "x"}}, "auth.token", "unknown key"),
    ({"auth": {"none": True}, "paths": ["nope"]}, "paths[0]", "starting with '/'"),
    ({"auth": {"none": True}, "paths": ["/ready"]}, "paths[0]", "health endpoint"),
    ({"auth": {"none": True}, "paths": []}, "paths", "at least one path"),
    ({"auth": {"none": True}, "headers": ["Authorization"]}, "headers[0]", "never copied"),
    ({"auth": {"none": True}, "headers": ["bad name"]}, "headers[0]", "header name"),
    ({"auth": {"none": True}, "raw_types": ["application/json"]}, "raw_types[0]",
     "decoded, not taken raw"),
    ({"auth": {"none": True}, "ack": "maybe"}, "ack", "expected 'ring' or 'durable'"),
    ({"auth": {"none": True}, "rate": -1}, "rate", "must be >= 0"),
    ({"auth": {"none": True}, "max_body": "lots"}, "max_body", "expected a size"),
    ({"auth": {"none": True}, "request_timeout": 0}, "request_timeout", "must be >"),
    ({"auth": {"none": True}, "listen": 1}, "listen", "unknown key"),
])
def test_settings_refused_with_key_path(raw, path, message):
    with pytest.raises(ConfigError) as err:
        parse_settings(raw, AT)
    assert err.value.path == f"{AT.path}.{path}"
    assert message in err.value.problem
    assert str(err.value).startswith("rig.yaml: pipelines[0].source.settings.")


def test_secret_from_the_environment_is_not_shown():
    at = At("rig.yaml", "s", {"s.auth.bearer": "${TOKEN}"})
    with pytest.raises(ConfigError) as err:
        parse_settings({"auth": {"bearer": "oops secret"}}, at)
    assert "oops secret" not in str(err.value)


# -- routes and admission ------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, want", [
    (b"POST", b"/", DATA),
    (b"POST", b"/in", DATA),
    (b"GET", b"/live", HEALTH_LIVE),
    (b"HEAD", b"/ready", HEALTH_READY),
    (b"GET", b"/", (405, b"POST")),
    (b"HEAD", b"/", (405, b"POST")),
    (b"POST", b"/live", (405, b"GET, HEAD")),
    (b"POST", b"/other", (404, b"")),
])
def test_route(method, path, want):
    got = core(paths=["/", "/in"]).route(method, path)
    if isinstance(want, int):
        assert got == want
    else:
        assert isinstance(got, Refusal) and (got.status, got.allow) == want


BASIC = base64.b64encode(b"ann:pw").decode()


@pytest.mark.parametrize("auth, header, ok", [
    ({"bearer": TOKEN}, b"Bearer " + TOKEN.encode(), True),
    ({"bearer": TOKEN}, b"bearer " + TOKEN.encode(), True),  # scheme is case-insensitive
    ({"bearer": TOKEN}, b"Bearer " + TOKEN.encode() + b"x", False),
    ({"bearer": TOKEN}, b"Basic " + TOKEN.encode(), False),
    ({"bearer": TOKEN}, None, False),
    ({"bearer": TOKEN}, b"", False),
    ({"basic": {"user": "ann", "password": "pw"}}, f"Basic {BASIC}".encode(), True),
    ({"basic": {"user": "ann", "password": "pw"}},
     b"Basic " + base64.b64encode(b"ann:px"), False),
    ({"none": True}, None, True),
    ({"bearer": TOKEN, "basic": {"user": "ann", "password": "pw"}}, f"Basic {BASIC}".encode(),
     True),
    ({"bearer": TOKEN, "basic": {"user": "ann", "password": "pw"}},
     b"Bearer " + TOKEN.encode(), True),
])
def test_authorized(auth, header, ok):
    assert core(auth=auth).authorized(header) is ok


@pytest.mark.parametrize("h, inflight, status, reason", [
    (head(auth=None), 0, 401, "unauthorized"),
    (head(length=(1 << 20) + 1), 0, 413, "too_large"),
    (head(ct=b"text/plain"), 0, 415, "media_type"),
    (head(), 1024, 503, "busy"),
    (head(ct=b"Application/JSON; charset=utf-8"), 0, None, None),
    (head(ct=b"application/octet-stream", length=-1), 0, None, None),
    (head(ct=b"application/x-ndjson"), 0, None, None),
])
def test_admit(h, inflight, status, reason):
    r = core().admit(h, 0.0, inflight)
    if status is None:
        assert r is None
    else:
        assert (r.status, r.reason) == (status, reason)


def test_401_carries_the_challenge():
    r = core().admit(head(auth=None), 0.0, 0)
    assert r.challenge == b'Bearer realm="fluxrig"'
    r = core(auth={"basic": {"user": "a", "password": "b"}}).admit(head(auth=None), 0.0, 0)
    assert r.challenge.startswith(b'Basic realm="fluxrig"')
    r = core(auth={"basic": {"user": "a", "password": "b"}, "bearer": "t"}).admit(
        head(auth=None), 0.0, 0)
    assert r.challenge == b'Bearer realm="fluxrig", Basic realm="fluxrig", charset="UTF-8"'


def test_token_bucket_with_injected_clock():
    b = TokenBucket(rate=2.0, burst=2, now=100.0)
    assert [b.take(100.0), b.take(100.0)] == [0.0, 0.0]
    assert b.take(100.0) == pytest.approx(0.5)
    assert b.take(100.25) == pytest.approx(0.25)  # half a token saved
    assert b.take(100.5) == 0.0
    assert b.take(200.0) == 0.0 and b.take(200.0) == 0.0  # never more than burst
    assert b.take(200.0) > 0


def test_rate_limit_refuses_with_retry_after_and_spends_tokens_only_when_admitted():
    c = core(rate=1, burst=1)
    assert c.admit(head(), 0.0, 0) is None
    assert c.admit(head(auth=None), 0.0, 0).status == 401  # refused earlier: no token spent
    r = c.admit(head(), 0.1, 0)
    assert (r.status, r.reason, r.retry_after) == (429, "rate", 1)
    assert c.admit(head(), 1.0, 0) is None


# -- bodies -> frames --------------------------------------------------------------------------

def frames_of(c: HttpIn, h: Head, body: bytes):
    res = c.frames(h, body, 1_700_000_000_000_000_000)
    assert isinstance(res, Accepted), res
    out = [decode(p, strict=True) for p in res.payloads]
    assert [uuid_text(f.id) for f in out] == res.ids
    return out


def test_json_body_becomes_one_frame():
    c = core(headers=["X-Device"], kind="telemetry")
    h = head(copied={"x-device": "d7", "idempotency-key": "k-1"})
    (f,) = frames_of(c, h, b'{"temp": 21.5, "tags": ["a"]}')
    assert f.body == {"temp": 21.5, "tags": ["a"]}
    assert (f.src, f.kind, f.ts) == ("web.in", "telemetry", 1_700_000_000_000_000_000)
    assert f.headers == {"path": "/", "content_type": "application/json", "x-device": "d7",
                         "idempotency-key": "k-1"}


def test_cbor_body_deterministic_or_not():
    c = core()
    h = head(ct=b"application/cbor")
    assert frames_of(c, h, dumps({"a": 1, "bb": [1, 2]}))[0].body == {"a": 1, "bb": [1, 2]}
    # a client's encoder need not be deterministic: keys out of order, indefinite list
    assert frames_of(c, h, cbor2.dumps({"bb": 1, "a": 2}))[0].body == {"bb": 1, "a": 2}
    assert frames_of(c, h, b"\x9f\x01\x02\xff")[0].body == [1, 2]


def test_invalid_utf8_in_json_names_its_byte():
    got = core().frames(head(), b'{"a": "' + b"x" * 93 + b'\xff"}', 1)
    assert isinstance(got, Refusal) and got.status == 400
    assert (got.error, got.offset) == ("malformed json: invalid UTF-8", 100)


def test_cbor_a_frame_could_not_be_read_back_from_is_refused():
    # the encoder writes these tags back, the decoder behind the ring refuses them: a 200
    # for an event no stage can read (a hostile probe sent 2,100 and got 2,100 200s)
    c = core()
    h = head(ct=b"application/cbor")
    for body in (bytes.fromhex("c5821a7fffffff01"),):  # a bigfloat of a huge exponent
        got = c.frames(h, body, 1)
        assert isinstance(got, Refusal) and got.status == 400, got
        assert got.error == "body holds a value a frame cannot carry"


def test_json_lines_one_frame_per_line_blank_lines_skipped():
    c = core()
    fs = frames_of(c, head(ct=b"application/x-ndjson"), b'{"n":1}\n\n{"n":2}\r\n{"n":3}')
    assert [f.body for f in fs] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert len({f.id for f in fs}) == 3
    assert frames_of(c, head(ct=b"application/jsonl"), b'[1]\n')[0].body == [1]


def test_raw_bytes():
    (f,) = frames_of(core(), head(ct=b"application/octet-stream"), b"\x00\xffraw")
    assert f.body == b"\x00\xffraw"
    assert f.headers["content_type"] == "application/octet-stream"
    (f,) = frames_of(core(raw_types=["text/csv"]), head(ct=b"text/csv"), b"a,b\n")
    assert f.body == b"a,b\n"


SECRET = b"4111111111111111"


@pytest.mark.parametrize("ct, body, error, offset, line", [
    (b"application/json", b'{"pan": ' + SECRET + b',,}', "malformed json", 25, 0),
    (b"application/json", '{"é": 1,, }'.encode(), "malformed json", 9, 0),  # bytes, not chars
    (b"application/json", b"", "malformed json", 0, 0),
    (b"application/cbor", b"\xa1\x61", "malformed cbor: truncated input", 2, 0),
    (b"application/cbor", b"\x01\x02", "trailing bytes after the CBOR item", 1, 0),
    (b"application/cbor", b"\xff", "malformed cbor: unexpected break", 0, 0),
    (b"application/x-ndjson", b'{"a":1}\n{"a":' + SECRET + b'\n{"a":3}\n',
     "malformed json line", 29, 2),  # line 2 starts at 8; it ends at 29
    (b"application/x-ndjson", b"\n \n", "no JSON lines", 0, 0),
])
def test_malformed_bodies_refused_whole_with_offset(ct, body, error, offset, line):
    r = core().frames(head(ct=ct), body, 1)
    assert isinstance(r, Refusal)
    assert (r.status, r.reason, r.offset, r.line) == (400, "malformed", offset, line)
    assert r.error.startswith(error)
    answer = core().render(r, True)
    assert SECRET not in answer  # never the client's bytes
    doc = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert doc["offset"] == offset and doc.get("line", 0) == line


def test_frame_larger_than_the_ring_takes_is_413():
    c = HttpIn(parse_settings({"auth": {"none": True}}, AT), "w.i", max_payload=200, now=0)
    r = c.frames(head(ct=b"application/octet-stream"), b"x" * 300, 1)
    assert (r.status, r.reason) == (413, "too_large")
    assert "max=200" in r.error


# -- answers ------------------------------------------------------------------------------------

def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head_, body = answer.split(b"\r\n\r\n", 1)
    lines = head_.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert int(headers["Content-Length"]) == len(body)
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("r, keep, status, want", [
    (Refusal(status=429, reason="rate", error="rate limit", retry_after=3), True, 429,
     {"Retry-After": "3"}),
    (Refusal(status=405, reason="method", error="m", allow=b"POST"), True, 405,
     {"Allow": "POST"}),
    (Refusal(status=401, reason="unauthorized", error="a", challenge=b'Bearer realm="x"'), True,
     401, {"WWW-Authenticate": 'Bearer realm="x"'}),
    (Refusal(status=408, reason="timeout", error="t", close=True), True, 408,
     {"Connection": "close"}),
    (Refusal(status=400, reason="malformed", error="m"), False, 400, {"Connection": "close"}),
    (Refusal(status=504, reason="durable_timeout", error="d", ids=("i1",)), True, 504, {}),
])
def test_render(r, keep, status, want):
    got_status, headers, body = parse(core().render(r, keep))
    assert got_status == status
    for k, v in want.items():
        assert headers[k] == v
    assert "Connection" not in headers or not keep or r.close
    assert headers["Content-Type"] == "application/json" and "Date" in headers
    doc = orjson.loads(body)
    assert doc["error"] == r.error
    assert doc.get("ids") == (list(r.ids) or None)


def test_ok_and_health_answers():
    status, headers, body = parse(core().ok(["a", "b"], True))
    assert (status, orjson.loads(body)) == (200, {"ids": ["a", "b"]})
    status, headers, body = parse(core().health(False, False))
    assert (status, headers["Retry-After"], headers["Connection"]) == (503, "1", "close")
    answer = core().health(True, True, head_only=True)
    assert answer.endswith(b"\r\n\r\n") and b"Content-Length: 15" in answer
