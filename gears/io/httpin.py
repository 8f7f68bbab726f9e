"""The ``http_server`` source's decisions, without I/O: settings, which requests are taken,
how a body becomes frames, and the bytes of every answer.

Theory of operation
-------------------
The asyncio shell (``gears.io.http_source``) parses HTTP/1.1 with httptools and asks this
core at three points of a request; the core never sees a socket, a ring or a clock of its
own (times are passed in, so tests drive the rate limiter with any clock they like):

1. ``HttpIn.route(method, path)`` once the request line is read: a data path, ``/live``,
   ``/ready``, or an answer (404 unknown path, 405 wrong method, with ``Allow``);
2. ``HttpIn.admit(head, now, inflight)`` once the headers are read, in this order:
   authentication (401 with ``WWW-Authenticate``), declared size (413, before a byte of the
   body is read), media type (415), concurrency (503 + ``Retry-After``), rate (429 +
   ``Retry-After``; only a request that would otherwise be taken spends a token);
3. ``HttpIn.frames(head, body, now_ns)`` once the body is read: decode (JSON, CBOR, JSON
   lines, raw bytes) and encode the frames, or a 400 naming the byte offset (and the line
   for JSON lines) — all or nothing: one bad line refuses the whole request.

Writing the frames into the ring, waiting for space (``queue_wait``, then 503) and for
JetStream (``ack: durable``, then 504) are the shell's; the answers it sends are built
here (``ok``, ``render``). Every answer has ``Content-Length`` and a small JSON body; a
refusal never echoes the request's bytes, and nothing here logs (bodies may hold card
numbers).

Status codes (see also ``docs`` in ``HttpSource``): 200 ``{"ids": [...]}`` once the frames
are in the ring (``ack: ring``) or in JetStream (``ack: durable``) — what a Benthos/Bento
``http_server`` client expects from a successful POST; 400 malformed body or request; 401;
404; 405; 408 request not read within ``request_timeout``; 413; 415; 429; 431 headers too
large; 503 busy or ring full for ``queue_wait``; 504 ``ack: durable`` not confirmed within
``durable_timeout`` (the frames are in the ring and will most likely be stored: the body
lists their ids so a client that retries can be de-duplicated downstream).
"""

from __future__ import annotations

import base64
import hmac
import io
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import cbor2
import orjson

from engine.cbor import CBORDecodeError, CBOREncodeError, NotDeterministicError, loads
from engine.frame import FrameError, decode, encode_parts, uuid7
from engine.keytable import (
    BOOLEAN,
    DURATION,
    INTEGER,
    LIST,
    NUMBER,
    SECTION,
    SIZE,
    STRING,
    Key,
    Table,
)
from engine.schema import At

# --- settings ----------------------------------------------------------------------------

LIVE = b"/live"
READY = b"/ready"
HEALTH_PATHS = frozenset((LIVE, READY))
ACKS = ("ring", "durable")
JSON = "application/json"
CBOR = "application/cbor"
NDJSON = ("application/x-ndjson", "application/jsonl", "application/json-lines")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9a-zA-Z]+$")  # RFC 9110 token (a header name)
_PATH = re.compile(r"^/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*$")  # an origin-form path, no query
_MEDIA = re.compile(r"^[a-z0-9!#$&^_.+\-]+/[a-z0-9!#$&^_.+\-]+$")


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthSettings:
    """How a request proves who sent it.

    Attributes:
        scheme: ``bearer``, ``basic``, ``bearer+basic`` (either is accepted: a migration
            between the two) or ``none`` (written explicitly: tests, trusted hosts).
        bearer: the token expected after ``Bearer``, or b"".
        basic: base64 of ``user:password`` expected after ``Basic``, or b"".
        challenge: the ``WWW-Authenticate`` value of a 401.
    """

    scheme: str
    bearer: bytes = b""
    basic: bytes = b""
    challenge: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsSettings:
    """Server certificate and key files (PEM)."""

    cert: str
    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpSettings:
    """Validated settings of the ``http_server`` source (keys: ``SETTINGS``)."""

    host: str = "127.0.0.1"
    port: int = 8080
    paths: frozenset[bytes] = frozenset((b"/",))
    kind: str = "http"
    copy_headers: tuple[str, ...] = ()
    idempotency_header: str = "idempotency-key"
    raw_types: frozenset[str] = frozenset(("application/octet-stream",))
    auth: AuthSettings = AuthSettings(scheme="none")
    tls: TlsSettings | None = None
    ack: str = "ring"
    durable_timeout: float = 5.0
    queue_wait: float = 0.2
    max_body: int = 1 << 20
    max_connections: int = 1000
    max_per_address: int = 500
    concurrency: int = 1024
    rate: float = 0.0
    burst: int = 0
    max_header_size: int = 16 << 10
    max_headers: int = 100
    idle_timeout: float = 60.0
    request_timeout: float = 10.0


BASIC = Table("auth.basic", "HTTP Basic credentials (RFC 7617).", (
    Key("user", STRING, "User name (no ``:``).", None),
    Key("password", STRING, "Password; write ``${VAR}`` to keep it out of the rig file.", None),
))

AUTH = Table("auth", "Authentication of data requests: ``bearer`` and/or ``basic`` (either "
             "is accepted), or ``none: true``. Required: a rig without ``auth`` is refused. "
             "``/live`` and ``/ready`` are the only routes answered without it.", (
    Key("bearer", STRING, "Token expected in ``Authorization: Bearer <token>``; write "
        "``${VAR}``.", None),
    Key("basic", SECTION, "User and password expected in ``Authorization: Basic``.",
        table=BASIC),
    Key("none", BOOLEAN, "true: no authentication (tests, trusted hosts only); refused "
        "with credentials.", False),
))

TLS = Table("tls", "Serve HTTPS (TLS 1.2 or later); absent: plain HTTP.", (
    Key("cert", STRING, "Certificate chain file (PEM).", None),
    Key("key", STRING, "Private key file (PEM).", None),
))

_MONTH = 86_400.0 * 30

SETTINGS = Table("http_server", "An HTTP/1.1 server taking POSTed JSON, CBOR, JSON lines or "
                 "raw bytes as frames; one process per lane sharing the listening socket.", (
    Key("host", STRING, "Address to listen on.", "127.0.0.1"),
    Key("port", INTEGER, "Port to listen on.", 8080, minimum=0, maximum=65535),
    Key("paths", LIST, "Paths taking POSTs (exact match, query ignored); others get 404. "
        "``/live`` and ``/ready`` are the health endpoints.", ("/",), items="path"),
    Key("kind", STRING, "Kind of the frames made.", "http"),
    Key("headers", LIST, "Request headers copied into frame headers (names lower-cased; "
        "absent ones are left out).", (), items="header name"),
    Key("idempotency_header", STRING, "Request header copied into frame headers (lower-cased "
        "name) so downstream can drop client retries; empty: none.", "idempotency-key"),
    Key("raw_types", LIST, "Media types taken as raw bytes (the body is the frame's body).",
        ("application/octet-stream",), items="media type"),
    Key("auth", SECTION, "Authentication (required).", table=AUTH),
    Key("tls", SECTION, "TLS (optional).", table=TLS),
    Key("ack", STRING, "When the 200 is sent: ``ring`` once the frames are in the lane's "
        "ring (durable against a crash of this process), ``durable`` once JetStream stored "
        "them (needs an egress sink).", "ring", choices=ACKS),
    Key("durable_timeout", DURATION, "``ack: durable``: longest wait for JetStream; then 504 "
        "with the frame ids (they stay in the ring and are most likely stored).", 5.0,
        minimum=0, exclusive=True, maximum=3600),
    Key("queue_wait", DURATION, "Longest wait for ring space before a 503.", 0.2, minimum=0,
        maximum=60),
    Key("max_body", SIZE, "Largest body; a larger ``Content-Length`` is refused (413) before "
        "a byte of it is read, a chunked body as soon as it grows past it.", 1 << 20,
        minimum=1, maximum=1 << 30),
    Key("max_connections", INTEGER, "Open connections per process; more are closed as soon "
        "as accepted (clamped below the open-file limit).", 1000, minimum=1,
        maximum=1_000_000),
    Key("max_per_address", INTEGER, "Open connections per client address and process.", 500,
        minimum=1, maximum=1_000_000),
    Key("concurrency", INTEGER, "Requests in flight per process (read, not yet answered); "
        "more get 503 with Retry-After.", 1024, minimum=1, maximum=1_000_000),
    Key("rate", NUMBER, "Requests per second per process (token bucket); 0: no limit; over "
        "it: 429 with Retry-After.", 0.0, minimum=0, exclusive=False),
    Key("burst", INTEGER, "Token bucket depth; 0: one second's worth of ``rate``.", 0,
        minimum=0, maximum=1_000_000_000),
    Key("max_header_size", SIZE, "Bytes of request line and headers; more: 431.", 16 << 10,
        minimum=256, maximum=1 << 20),
    Key("max_headers", INTEGER, "Header fields per request; more: 431.", 100, minimum=1,
        maximum=10_000),
    Key("idle_timeout", DURATION, "A keep-alive connection without a request for this long "
        "is closed; 0: never.", 60.0, minimum=0, maximum=_MONTH),
    Key("request_timeout", DURATION, "A started request whose headers and body do not all "
        "arrive within this gets 408 and its connection closed (slow senders).", 10.0,
        minimum=0, exclusive=True, maximum=3600),
))


def _auth(r: Any, at: At) -> AuthSettings:
    a = r.section("auth")
    none = a.boolean("none")
    bearer = a.string("bearer") if a.given("bearer") else None
    basic = None
    if a.given("basic"):
        b = a.section("basic")
        user, password = b.string("user"), b.string("password")
        if not user or ":" in user:
            raise b.where("user").error("must be non-empty and hold no ':'")
        if not password:
            raise b.where("password").error("must be non-empty")
        basic = base64.b64encode(f"{user}:{password}".encode())
    if bearer is not None and (not bearer or any(
            c.isspace() or ord(c) < 0x21 or ord(c) > 0x7E for c in bearer)):
        raise a.where("bearer").error("must be non-empty printable ASCII without spaces")
    if none:
        if bearer is not None or basic is not None:
            raise a.where("none").error("none: true contradicts bearer/basic credentials")
        return AuthSettings(scheme="none")
    if bearer is None and basic is None:
        raise at.key("auth").error("required: bearer, basic, or none: true (tests and "
                                   "trusted hosts only)")
    challenges = []
    if bearer is not None:
        challenges.append(b'Bearer realm="fluxrig"')
    if basic is not None:
        challenges.append(b'Basic realm="fluxrig", charset="UTF-8"')
    return AuthSettings(scheme="+".join(k for k, v in (("bearer", bearer), ("basic", basic))
                                        if v is not None),
                        bearer=bearer.encode() if bearer is not None else b"",
                        basic=basic or b"", challenge=b", ".join(challenges))


def parse_settings(raw: Any, at: At) -> HttpSettings:
    """Validate the ``settings`` of an ``http_server`` source.

    Raises:
        ConfigError: naming the file and key path.
    """
    r = SETTINGS.read(raw, at)
    paths = []
    for i, p in enumerate(r.sequence("paths")):
        pat = r.where("paths").index(i)
        if not isinstance(p, str) or not _PATH.match(p):
            raise pat.error(f"expected a path starting with '/', no query, got {pat.show(p)}")
        if p.encode() in HEALTH_PATHS:
            raise pat.error(f"{p} is the health endpoint's")
        paths.append(p.encode())
    if not paths:
        raise r.where("paths").error("at least one path")
    headers = []
    for name, where in ((h, r.where("headers").index(i))
                        for i, h in enumerate(r.sequence("headers"))):
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise where.error(f"expected a header name, got {where.show(name)}")
        if name.lower() in ("authorization", "cookie", "proxy-authorization"):
            raise where.error(f"{name.lower()} holds credentials and is never copied")
        headers.append(name.lower())
    idem = r.string("idempotency_header")
    if idem and not _TOKEN.match(idem):
        raise r.where("idempotency_header").error(f"expected a header name, got {idem!r}")
    raw_types = []
    for i, t in enumerate(r.sequence("raw_types")):
        where = r.where("raw_types").index(i)
        if not isinstance(t, str) or not _MEDIA.match(t.lower()):
            raise where.error(f"expected a media type like application/octet-stream, got "
                              f"{where.show(t)}")
        if t.lower() in (JSON, CBOR, *NDJSON):
            raise where.error(f"{t.lower()} is decoded, not taken raw")
        raw_types.append(t.lower())
    tls = None
    if r.given("tls"):
        t = r.section("tls")
        tls = TlsSettings(cert=t.string("cert"), key=t.string("key"))
    rate = r.number("rate")
    burst = r.integer("burst") or max(1, math.ceil(rate))
    return HttpSettings(
        host=r.string("host"), port=r.integer("port"), paths=frozenset(paths),
        kind=r.string("kind"), copy_headers=tuple(dict.fromkeys(headers)),
        idempotency_header=idem.lower(), raw_types=frozenset(raw_types), auth=_auth(r, at),
        tls=tls, ack=r.string("ack"), durable_timeout=r.seconds("durable_timeout"),
        queue_wait=r.seconds("queue_wait"), max_body=r.size("max_body"),
        max_connections=r.integer("max_connections"),
        max_per_address=r.integer("max_per_address"), concurrency=r.integer("concurrency"),
        rate=rate, burst=burst, max_header_size=r.size("max_header_size"),
        max_headers=r.integer("max_headers"), idle_timeout=r.seconds("idle_timeout"),
        request_timeout=r.seconds("request_timeout"))


# --- rate limiter ------------------------------------------------------------------------


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; the clock is the caller's."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: int, now: float):
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = now

    def take(self, now: float) -> float:
        """Spend a token: 0.0 if there was one, else the seconds until there is."""
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


# --- requests and answers ----------------------------------------------------------------

REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
    415: "Unsupported Media Type", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 504: "Gateway Timeout",
}
STATUSES = (200, 400, 401, 404, 405, 408, 413, 415, 429, 431, 500, 501, 503, 504)
# why a request was refused (the ``http.refused{reason=}`` stat)
REFUSALS = ("unauthorized", "not_found", "method", "too_large", "media_type", "malformed",
            "protocol", "headers_too_large", "timeout", "busy", "rate", "ring_full",
            "durable_timeout", "internal")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """An answer that takes nothing.

    Attributes:
        status: the HTTP status.
        reason: the ``http.refused`` label (``REFUSALS``).
        error: the ``error`` text of the JSON body (never the client's bytes).
        offset: the byte offset in the body of what broke it, or -1.
        line: JSON lines: the 1-based line, or 0.
        retry_after: seconds for ``Retry-After``, or 0 (not sent).
        allow: the ``Allow`` value of a 405.
        challenge: the ``WWW-Authenticate`` value of a 401.
        close: the connection must close after this answer.
        ids: frame ids (text) of a 504 (in the ring, not confirmed stored).
    """

    status: int
    reason: str
    error: str
    offset: int = -1
    line: int = 0
    retry_after: int = 0
    allow: bytes = b""
    challenge: bytes = b""
    close: bool = False
    ids: tuple[str, ...] = ()


@dataclass(slots=True)
class Head:
    """What the shell collected of a request up to the end of its headers.

    Attributes:
        method, path: from the request line (path without the query).
        content_type: the ``Content-Type`` value as sent (b"" if none).
        authorization: the ``Authorization`` value, or None.
        content_length: the declared length, or -1 (chunked or none).
        copied: configured headers found (lower-cased name -> value text).
        media: ``type/subtype`` of the content type (``HttpIn.admit`` sets it).
    """

    method: bytes
    path: bytes
    content_type: bytes = b""
    authorization: bytes | None = None
    content_length: int = -1
    copied: dict[str, str] | None = None
    media: str = ""  # the media type, set by ``HttpIn.admit``


@dataclass(frozen=True, slots=True)
class Accepted:
    """Frames ready for the ring: encoded payloads and their ids (UUID text)."""

    payloads: list[bytes]
    ids: list[str]


# routes
DATA, HEALTH_LIVE, HEALTH_READY = 1, 2, 3


def uuid_text(frame_id: bytes) -> str:
    """The UUID text form of a 16-byte id (what the file sink writes as ``id``)."""
    h = frame_id.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def media_type(content_type: bytes) -> str:
    """``type/subtype`` of a ``Content-Type`` value, lower-cased, parameters dropped."""
    return content_type.split(b";", 1)[0].strip().lower().decode("latin-1")


_OFFSET = re.compile(r"offset=(\d+)")


def decode_cbor(body: bytes) -> Any:
    """One CBOR data item, refusing malformed input with the offset where it broke.

    Deterministic encoding is not required of clients: well-formed CBOR that the strict
    parser refuses only for being non-deterministic (key order, lengths) is decoded
    leniently; the frame re-encodes it deterministically anyway.

    Raises:
        ValueError: ``(message, offset)``.
    """
    try:
        return loads(body, strict=True)
    except NotDeterministicError as exc:
        text = str(exc)
        if text.startswith("trailing bytes"):  # a CBOR sequence: one item per request
            raise ValueError("trailing bytes after the CBOR item", _offset(text)) from None
        first = _offset(text)
    except CBORDecodeError as exc:
        raise ValueError(f"malformed cbor: {_rule(str(exc))}", _offset(str(exc))) from None
    # well-formed up to `first` but not deterministic: let cbor2 read the rest
    fp = io.BytesIO(body)
    try:
        value = cbor2.CBORDecoder(fp).decode()
    except (cbor2.CBORError, RecursionError, ValueError):
        raise ValueError("malformed cbor", max(first, fp.tell())) from None
    if fp.tell() != len(body):
        raise ValueError("trailing bytes after the CBOR item", fp.tell())
    return value


def byte_offset(data: bytes, pos: int) -> int:
    """orjson reports a character position; the client's byte offset (the bytes before it
    are valid UTF-8, or the parser would have stopped there)."""
    if data.isascii():
        return pos
    return len(data.decode("utf-8", "replace")[:pos].encode("utf-8", "replace"))


def _offset(text: str) -> int:
    m = _OFFSET.search(text)
    return int(m.group(1)) if m else -1


def _rule(text: str) -> str:
    """The rule part of an engine.cbor message (``truncated input``), facts dropped."""
    return text.split(":", 1)[0]


class HttpIn:
    """The decisions of one server process (one instance per process, not thread-safe).

    Args:
        s: validated settings.
        src: the ``src`` of the frames (``<pipeline>.<gear>``).
        max_payload: largest encoded frame the lane's ring takes (its ``max_payload``).
        now: the caller's clock (seconds, monotonic) for the rate limiter's start.
    """

    def __init__(self, s: HttpSettings, src: str, max_payload: int, now: float):
        self.s = s
        self.src = src
        self.max_payload = max_payload
        self.bucket = TokenBucket(s.rate, s.burst, now) if s.rate > 0 else None
        self.open = s.auth.scheme == "none"
        self.bearer = s.auth.bearer
        self.basic = s.auth.basic
        self.raw_types = s.raw_types
        self.date = b""
        self._headers: dict[tuple[bytes, str], dict[str, Any]] = {}
        self.tick(time.time())
        # headers the shell collects: lower-cased name -> key in Head.copied
        self.copied_names = {n.encode(): n for n in s.copy_headers}
        if s.idempotency_header:
            self.copied_names[s.idempotency_header.encode()] = s.idempotency_header
        self._bad_auth = Refusal(status=401, reason="unauthorized",
                                 error="authentication required",
                                 challenge=s.auth.challenge)

    def tick(self, wall: float) -> None:
        """Refresh the ``Date`` header (the shell calls this about once a second)."""
        self.date = b"Date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                                                time.gmtime(wall)).encode() + b"\r\n"
        # the 200's head up to its length: built once a second, not per request
        self._ok_head = (b"HTTP/1.1 200 OK\r\n" + self.date
                         + b"Content-Type: application/json\r\nContent-Length: ")

    # -- decisions --------------------------------------------------------------------------

    def route(self, method: bytes, path: bytes) -> int | Refusal:
        """``DATA``, ``HEALTH_LIVE``, ``HEALTH_READY`` or the refusal of an unknown path or
        a wrong method."""
        if path in self.s.paths:
            if method == b"POST":
                return DATA
            return Refusal(status=405, reason="method", error="method not allowed",
                           allow=b"POST")
        if path in HEALTH_PATHS:
            if method == b"GET" or method == b"HEAD":
                return HEALTH_LIVE if path == LIVE else HEALTH_READY
            return Refusal(status=405, reason="method", error="method not allowed",
                           allow=b"GET, HEAD")
        return Refusal(status=404, reason="not_found", error="no such path")

    def authorized(self, authorization: bytes | None) -> bool:
        """Whether an ``Authorization`` value carries configured credentials (compared in
        constant time; the scheme name is case-insensitive, RFC 9110 §11.1)."""
        if self.open:
            return True
        if authorization is None:
            return False
        scheme, _, creds = authorization.strip().partition(b" ")
        scheme = scheme.lower()
        if scheme == b"bearer" and self.bearer:
            return hmac.compare_digest(creds.strip(), self.bearer)
        if scheme == b"basic" and self.basic:
            return hmac.compare_digest(creds.strip(), self.basic)
        return False

    def admit(self, head: Head, now: float, inflight: int) -> Refusal | None:
        """Whether to read this data request's body; None: go on. ``now``: the caller's
        clock; ``inflight``: requests this process holds (this one not counted)."""
        if not self.authorized(head.authorization):
            return self._bad_auth
        if head.content_length > self.s.max_body:
            return Refusal(status=413, reason="too_large",
                           error=f"body larger than max_body={self.s.max_body}")
        mt = head.media = media_type(head.content_type)
        if mt not in (JSON, CBOR) and mt not in NDJSON and mt not in self.raw_types:
            return Refusal(status=415, reason="media_type", error="unsupported content type")
        if inflight >= self.s.concurrency:
            return Refusal(status=503, reason="busy", error="too many requests in flight",
                           retry_after=1)
        if self.bucket is not None:
            wait = self.bucket.take(now)
            if wait:
                return Refusal(status=429, reason="rate", error="rate limit",
                               retry_after=max(1, math.ceil(wait)))
        return None

    def too_large(self) -> Refusal:
        """The body grew past ``max_body`` while being read (chunked, or a lying length)."""
        return Refusal(status=413, reason="too_large",
                       error=f"body larger than max_body={self.s.max_body}", close=True)

    def frames(self, head: Head, body: bytes, now_ns: int) -> Accepted | Refusal:
        """The frames of a complete data request, or the refusal of all of it."""
        mt = head.media or media_type(head.content_type)
        values: list[Any]
        try:
            if mt == JSON:
                values = [orjson.loads(body)]
            elif mt == CBOR:
                values = [decode_cbor(body)]
            elif mt in NDJSON:
                lines = _json_lines(body)
                if isinstance(lines, Refusal):
                    return lines
                values = lines
                if not values:
                    return Refusal(status=400, reason="malformed", error="no JSON lines",
                                   offset=0)
            else:
                values = [body]
        except orjson.JSONDecodeError as exc:
            try:  # orjson says "surrogates not allowed" at offset 0 for a bad UTF-8 byte
                body.decode("utf-8")
            except UnicodeDecodeError as bad:
                return Refusal(status=400, reason="malformed",
                               error="malformed json: invalid UTF-8", offset=bad.start)
            return Refusal(status=400, reason="malformed", error=f"malformed json: {exc.msg}",
                           offset=byte_offset(body, exc.pos))
        except ValueError as exc:  # decode_cbor
            return Refusal(status=400, reason="malformed", error=str(exc.args[0]),
                           offset=exc.args[1] if len(exc.args) > 1 else -1)
        headers: dict[str, Any] | None
        if head.copied:
            headers = {"path": head.path.decode("latin-1"), "content_type": mt, **head.copied}
        else:  # one dict per (configured path, media type), shared by frames: never mutated
            headers = self._headers.get((head.path, mt))
            if headers is None:
                headers = {"path": head.path.decode("latin-1"), "content_type": mt}
                self._headers[(head.path, mt)] = headers
        src, kind = self.src, self.s.kind
        payloads, ids = [], []
        for value in values:
            fid = uuid7(now_ns)
            try:
                payload = encode_parts(fid, now_ns, src, kind, headers, value)
                if mt == CBOR:  # tags the encoder writes back but the stages cannot read
                    decode(payload)  # (a bigfloat of a huge exponent, a bad date)
            except (CBOREncodeError, FrameError, ValueError, RecursionError):
                return Refusal(status=400, reason="malformed",
                               error="body holds a value a frame cannot carry")
            if len(payload) > self.max_payload:
                return Refusal(status=413, reason="too_large",
                               error=f"frame larger than the ring takes: size={len(payload)}, "
                                     f"max={self.max_payload} (rings.capacity / 8)")
            payloads.append(payload)
            ids.append(uuid_text(fid))
        return Accepted(payloads, ids)

    # -- answers ----------------------------------------------------------------------------

    def ok(self, ids: list[str], keep_alive: bool) -> bytes:
        """The 200 of a request whose frames are in (``ack``) place."""
        body = b'{"ids":["' + '","'.join(ids).encode() + b'"]}'
        if keep_alive:
            return b"%s%d\r\n\r\n%s" % (self._ok_head, len(body), body)
        return self._response(200, body, b"", keep_alive)

    def health(self, up: bool, keep_alive: bool, head_only: bool = False) -> bytes:
        """The answer of ``/live`` or ``/ready``."""
        body = b'{"status":"ok"}' if up else b'{"status":"unavailable"}'
        return self._response(200 if up else 503, body,
                              b"" if up else b"Retry-After: 1\r\n", keep_alive, head_only)

    def render(self, r: Refusal, keep_alive: bool) -> bytes:
        """The bytes of a refusal (``keep_alive`` False or ``r.close``: ``Connection:
        close``)."""
        doc: dict[str, Any] = {"error": r.error}
        if r.offset >= 0:
            doc["offset"] = r.offset
        if r.line:
            doc["line"] = r.line
        if r.ids:
            doc["ids"] = list(r.ids)
        extra = b""
        if r.retry_after:
            extra += b"Retry-After: %d\r\n" % r.retry_after
        if r.allow:
            extra += b"Allow: " + r.allow + b"\r\n"
        if r.challenge:
            extra += b"WWW-Authenticate: " + r.challenge + b"\r\n"
        return self._response(r.status, orjson.dumps(doc), extra, keep_alive and not r.close)

    def _response(self, status: int, body: bytes, extra: bytes, keep_alive: bool,
                  head_only: bool = False) -> bytes:
        return b"".join((
            b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status].encode()), self.date,
            b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body), extra,
            b"" if keep_alive else b"Connection: close\r\n", b"\r\n",
            b"" if head_only else body))


def _json_lines(body: bytes) -> list[Any] | Refusal:
    """Every non-blank line of ``body`` decoded, or the refusal naming the first bad one."""
    values = []
    loads_ = orjson.loads
    start = 0
    n = len(body)
    line = 0
    while start < n:
        end = body.find(b"\n", start)
        if end < 0:
            end = n
        line += 1
        text = body[start:end]
        if text.strip():
            try:
                values.append(loads_(text))
            except orjson.JSONDecodeError as exc:
                return Refusal(status=400, reason="malformed",
                               error=f"malformed json line: {exc.msg}",
                               offset=start + byte_offset(text, exc.pos),
                               line=line)
        start = end + 1
    return values
