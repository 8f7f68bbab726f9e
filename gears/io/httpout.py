"""The ``http_client`` sink's core, without I/O: its settings, how a batch is cut into
requests, the request bodies, idempotency keys, the verdict on a status, and when to retry.

Theory of operation
-------------------
The sink process hands each batch it reads from its rings to ``Delivery`` and then only
moves bytes: it asks ``next()`` for a step and carries it out.

* ``Send``: POST (or PUT) ``body`` with ``Idempotency-Key: key``, then report the outcome
  with ``answered(status, ...)`` or, for a connection error or a timeout, ``failed(cause)``.
  Exactly one of them must follow each ``Send`` (anything else is a ``DeliveryError``).
* ``Wait``: sleep ``seconds`` (the backoff before the same request is sent again).
* ``Refuse``: the receiver refused frame ``index`` of the batch for good: dead-letter it
  with ``reason``.
* ``None``: every frame of the batch was delivered (2xx) or refused; the shell returns and
  the worker commits the ring.

Requests are cut greedily in ring order: a request takes frames until one more would pass
``batch.count`` or ``batch.bytes`` (a frame bigger than ``batch.bytes`` goes alone: there is
nothing left to cut, and the receiver may answer 413, which refuses it). One request is in
flight at a time, so the receiver sees the frames of a lane in order. A frame the format
cannot hold (a body value JSON has no form for) is refused before anything is sent.

Verdicts (``verdict``): 2xx delivered; 408, 429, 5xx, 3xx, anything unknown, connection
errors and timeouts: the *same* request (same body, same key) is sent again after a wait,
forever; other 4xx refused. Redirects are retried, not followed and not refused: a redirect
says the configured URL is out of date, which an operator fixes; following it would send the
frames (perhaps card data) to a host nobody configured, and refusing would dead-letter every
frame because of one configuration slip. A refused request of several frames is cut into
one request per frame, in order, so that only the frames the receiver refuses alone are
dead-lettered.

The wait before re-send ``n`` (1, 2, ...) is ``b = min(retry.max, retry.initial *
retry.multiplier ** (n - 1))`` with jitter: ``full`` (uniform in [0, b]: the default; what
spreads a fleet of racks best after a shared outage), ``equal`` (uniform in [b/2, b]: never
much less than the schedule) or ``none``. A ``Retry-After`` (seconds or an HTTP date) makes
the wait at least that long; ``retry.max`` caps every wait, ``Retry-After`` included.

Idempotency keys: a request of one frame carries the frame's id (UUID text); a request of
several carries the SHA-256 (hex) of their 16-byte ids in order. Both are stable across
re-sends of the request. A batch replayed after a crash may be cut differently (the ring then
holds more frames), so the key of a replayed request can differ: every frame also carries its
own id in the body (``id``), which is how a receiver removes duplicates for sure.

The random source and the wall clock (for ``Retry-After`` dates) are passed in.
"""

from __future__ import annotations

import email.utils
import enum
import hashlib
import math
import re
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Final

from engine.frame import Frame, encode
from engine.keytable import (
    BOOLEAN,
    DURATION,
    INTEGER,
    MAP,
    NUMBER,
    REQUIRED,
    SECTION,
    SIZE,
    STRING,
    Key,
    Table,
)
from engine.logutil import escape
from engine.schema import At, get_http_header
from gears.io.jsonl import frame_json

REASON_TEXT: Final = 200  # characters of a refusal's response body kept in the dead letter
# headers the gear writes itself: a static one would contradict the body or the key
_OWN_HEADERS: Final = frozenset({"content-length", "transfer-encoding", "host"})

# --- settings -------------------------------------------------------------------------------

_TOKEN_OR_EMPTY = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]*$")  # RFC 9110 token, or ""

BATCH = Table("batch", "How frames are grouped into requests.", (
    Key("count", INTEGER, "Most frames in one request.", 100, minimum=1, maximum=100_000),
    Key("bytes", SIZE, "Most body bytes in one request (a frame bigger than this is sent "
        "alone).", 1 << 20, minimum=256, maximum=256 << 20),
    Key("time", DURATION, "How long the sink waits for more frames when fewer than "
        "``count`` are ready (linger); 0: send what is there.", 0.1, minimum=0.0,
        exclusive=False, maximum=60),
))

RETRY = Table("retry", "The wait before a request is sent again (5xx, 408, 429, 3xx, "
              "connection errors, timeouts: retried forever).", (
    Key("initial", DURATION, "Wait before the first re-send.", 0.1, minimum=0.001,
        maximum=3600),
    Key("max", DURATION, "Longest wait (``Retry-After`` included).", 30.0, minimum=0.001,
        maximum=86400),
    Key("multiplier", NUMBER, "Growth of the wait per attempt.", 2.0, minimum=1.0,
        exclusive=False, maximum=100),
    Key("jitter", STRING, "``full``: uniform in [0, wait]; ``equal``: in [wait/2, wait]; "
        "``none``.", "full", choices=("full", "equal", "none")),
))

TLS = Table("tls", "TLS for an https:// URL (absent: verify against the system's CAs).", (
    Key("ca", STRING, "PEM file of the CAs to trust (relative: to the rig file's folder); "
        "absent: the system's."),
    Key("verify", BOOLEAN, "Verify the server's certificate and name (false: encrypt only; "
        "for tests).", True),
    Key("cert", STRING, "PEM file of a client certificate (mutual TLS; relative: to the "
        "rig file's folder)."),
    Key("key", STRING, "PEM file of the client certificate's private key (relative: to the "
        "rig file's folder); absent: in ``cert``."),
))

SETTINGS = Table("http_client", "Sends frames to an HTTP endpoint in batches, at least "
                 "once: a batch leaves the ring only when every frame was answered 2xx or "
                 "refused (4xx: dead-lettered).", (
    Key("url", STRING, "The endpoint: http(s)://HOST[:PORT][/PATH][?QUERY]; credentials go "
        "in ``headers``, not in the URL.", REQUIRED),
    Key("method", STRING, "HTTP method.", "POST", choices=("POST", "PUT")),
    Key("headers", MAP, "Static headers of every request (e.g. Authorization: \"Bearer "
        "${TOKEN}\").", None, items="header name -> text"),
    Key("format", STRING, "Body: ``jsonl`` (one JSON frame per line, "
        "application/x-ndjson), ``json`` (a JSON array of frames) or ``cbor`` (a CBOR "
        "sequence of the frames as the rack holds them, application/cbor-seq).", "jsonl",
        choices=("jsonl", "json", "cbor")),
    Key("batch", SECTION, "Request size.", table=BATCH),
    Key("timeout", DURATION, "Timeout of one request (connect, send, answer).", 10.0,
        minimum=0.001, maximum=3600),
    Key("retry", SECTION, "Backoff between re-sends.", table=RETRY),
    Key("idempotency_header", STRING, "Header carrying the request's idempotency key "
        "(stable across re-sends); \"\": none.", "Idempotency-Key", pattern=_TOKEN_OR_EMPTY,
        rule="a header name, or \"\""),
    Key("tls", SECTION, "TLS settings (https:// URLs only).", table=TLS),
))


@dataclass(frozen=True, slots=True, kw_only=True)
class RetrySettings:
    """``retry``: seconds, and the jitter's name (``full``, ``equal``, ``none``)."""

    initial: float = 0.1
    max: float = 30.0
    multiplier: float = 2.0
    jitter: str = "full"


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsSettings:
    """``tls``: PEM file paths (as written; the shell's ``parse_settings`` makes them
    absolute, from the rig file's folder, and checks they exist)."""

    ca: str | None = None
    verify: bool = True
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpOutSettings:
    """The checked settings of an ``http_client`` sink.

    Attributes:
        url: the endpoint as given (may hold a query, never credentials).
        shown_url: the URL for logs: scheme, host, port and path (no query: it may hold a
            key).
        headers: static headers, in the order written.
    """

    url: str
    shown_url: str
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = ()
    format: str = "jsonl"
    batch_count: int = 100
    batch_bytes: int = 1 << 20
    batch_time: float = 0.1
    timeout: float = 10.0
    retry: RetrySettings = RetrySettings()
    idempotency_header: str = "Idempotency-Key"
    tls: TlsSettings | None = None


def check_url(text: str, at: At) -> tuple[str, str]:
    """``(url, shown)`` of an endpoint: http(s), a host, a port in range, no credentials (an
    ``Authorization`` header keeps a secret out of logs and messages; a URL shows it), no
    fragment. ``shown`` drops the query.

    Raises:
        ConfigError: anything else (the value shown, or its ``${VAR}`` when from the
            environment).
    """
    url = text.strip()
    expected = "expected http(s)://HOST[:PORT][/PATH][?QUERY]"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:  # urllib's words for a bad port or a broken [IPv6] host
        raise at.error(f"invalid URL {at.show(text)} ({expected}, port 1-65535)") from None
    if port is not None and not 0 < port < 65536:
        raise at.error(f"invalid URL {at.show(text)}: port out of range (expected 1-65535)")
    if parts.username is not None or parts.password is not None:
        raise at.error(f"invalid URL {at.show(text)}: credentials in the URL (put them in "
                       f"headers, e.g. Authorization)")
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment
            or "#" in url or any(ch.isspace() or ord(ch) < 0x20 for ch in url)):
        raise at.error(f"invalid URL {at.show(text)} ({expected})")
    shown = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return url, shown


def parse_settings(raw: object, at: At) -> HttpOutSettings:
    """The settings mapping of an ``http_client`` sink, checked (``SETTINGS``).

    Raises:
        ConfigError: located at the offending key.
    """
    r = SETTINGS.read(raw, at)
    url, shown = check_url(r.string("url"), r.where("url"))
    idem = r.string("idempotency_header")
    raw_headers = r.mapping("headers")
    hat = r.where("headers")
    headers: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name in raw_headers:
        value = get_http_header(raw_headers, name, hat)
        low = name.lower()
        if low in _OWN_HEADERS or (idem and low == idem.lower()):
            raise hat.key(name).error("header set by the gear (the body and the "
                                      "idempotency key decide it)")
        if low in seen:
            raise hat.key(name).error("header given twice (names are case-insensitive)")
        seen.add(low)
        headers.append((name, value))
    b = r.section("batch")
    q = r.section("retry")
    retry = RetrySettings(initial=q.seconds("initial"), max=q.seconds("max"),
                          multiplier=q.number("multiplier"), jitter=q.string("jitter"))
    if retry.max < retry.initial:
        raise q.where("max").error(f"must be >= retry.initial: initial={retry.initial:g}s, "
                                   f"max={retry.max:g}s")
    tls = None
    if r.given("tls"):
        t = r.section("tls")
        tls = TlsSettings(ca=t.optional_string("ca"), verify=t.boolean("verify"),
                          cert=t.optional_string("cert"), key=t.optional_string("key"))
        if tls.key is not None and tls.cert is None:
            raise t.where("key").error("a key without cert (set tls.cert too)")
        if not url.lower().startswith("https:"):
            raise r.where("tls").error(f"tls set for a plain http:// URL: "
                                       f"url={r.where('url').show(url)}")
    return HttpOutSettings(
        url=url, shown_url=shown, method=r.string("method"), headers=tuple(headers),
        format=r.string("format"), batch_count=b.integer("count"), batch_bytes=b.size("bytes"),
        batch_time=b.seconds("time"), timeout=r.seconds("timeout"), retry=retry,
        idempotency_header=idem, tls=tls)


# --- bodies ---------------------------------------------------------------------------------


def _json_item(frame: Frame) -> bytes:
    return frame_json(frame)[:-1]  # the line without its newline


@dataclass(frozen=True, slots=True)
class BodyFormat:
    """How frames become a request body: ``head + sep.join(pieces) + tail``."""

    name: str
    content_type: str
    piece: Callable[[Frame], bytes]
    head: bytes = b""
    sep: bytes = b""
    tail: bytes = b""

    def body(self, pieces: Sequence[bytes]) -> bytes:
        """The body holding ``pieces`` in order."""
        return self.head + self.sep.join(pieces) + self.tail

    def size(self, piece_sizes: Sequence[int]) -> int:
        """``len(self.body(pieces))`` from the pieces' sizes alone."""
        n = len(piece_sizes)
        return len(self.head) + len(self.tail) + sum(piece_sizes) + len(self.sep) * max(0, n - 1)


FORMATS: Final[dict[str, BodyFormat]] = {
    # the file sink's lines: a receiver can take them one by one as they arrive
    "jsonl": BodyFormat("jsonl", "application/x-ndjson", frame_json),
    "json": BodyFormat("json", "application/json", _json_item, b"[", b",", b"]"),
    # RFC 8742: the frames' own deterministic CBOR (``engine.frame.encode``), id as 16 bytes
    "cbor": BodyFormat("cbor", "application/cbor-seq", encode),
}


def cut(piece_sizes: Sequence[int], fmt: BodyFormat, count: int,
        max_bytes: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each request, in order, covering every piece: each holds at
    most ``count`` pieces and a body of at most ``max_bytes`` (a single piece may pass it),
    and each takes pieces until the next one would break a limit."""
    out: list[tuple[int, int]] = []
    start = 0
    total = len(fmt.head) + len(fmt.tail)
    for i, size in enumerate(piece_sizes):
        if i > start and (i - start >= count or total + len(fmt.sep) + size > max_bytes):
            out.append((start, i))
            start = i
            total = len(fmt.head) + len(fmt.tail)
        total += size + (len(fmt.sep) if i > start else 0)
    if start < len(piece_sizes):
        out.append((start, len(piece_sizes)))
    return out


def idempotency_key(ids: Sequence[bytes]) -> str:
    """A request's key: the frame's UUID for one frame, else SHA-256 (hex) of the ids."""
    if len(ids) == 1:
        return str(uuid.UUID(bytes=ids[0]))
    return hashlib.sha256(b"".join(ids)).hexdigest()


# --- verdicts and the retry schedule -------------------------------------------------------


class Verdict(enum.Enum):
    """What a status means for the request."""

    DELIVERED = "delivered"
    RETRY = "retry"
    REFUSED = "refused"


def verdict(status: int) -> Verdict:
    """2xx delivered; 408, 429 retried; other 4xx refused; everything else (5xx, 3xx, 1xx,
    statuses no RFC defines) retried: nothing is given up on an answer we cannot read."""
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if 400 <= status < 500 and status not in (408, 429):
        return Verdict.REFUSED
    return Verdict.RETRY


def status_class(status: int | None) -> str:
    """The ``status`` label of ``http_out.requests``: ``2xx`` .. ``5xx``, ``error`` for no
    answer (and for statuses outside 200-599)."""
    if status is None or not 200 <= status < 600:
        return "error"
    return f"{status // 100}xx"


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` asks for (RFC 9110 §10.2.3: delta-seconds or an HTTP date,
    read against the wall clock ``now``); None when absent or unreadable; never negative."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(min(int(text), 10**9))  # an absurd number is capped by retry.max anyway
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:  # RFC 9110 dates are GMT; a naive one is garbage
        return None
    return max(0.0, when.timestamp() - now)


class Backoff:
    """The waits before re-sends (see the module docstring for the formula)."""

    def __init__(self, retry: RetrySettings, random: Callable[[], float]):
        """``random``: uniform in [0, 1) (``random.random``; fixed in tests)."""
        self.retry = retry
        self._random = random
        # attempts past this one are at retry.max already (and would overflow a float)
        ratio = retry.max / retry.initial
        self._cap_at = (math.inf if retry.multiplier == 1.0
                        else 1 + math.log(ratio) / math.log(retry.multiplier))

    def base(self, attempt: int) -> float:
        """The wait before re-send ``attempt`` (1-based), without jitter."""
        r = self.retry
        if attempt - 1 >= self._cap_at:
            return r.max
        return min(r.max, r.initial * r.multiplier ** (attempt - 1))

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """The wait before re-send ``attempt`` (1-based): jittered, at least ``retry_after``,
        at most ``retry.max``."""
        b = self.base(attempt)
        jitter = self.retry.jitter
        if jitter == "full":
            wait = self._random() * b
        elif jitter == "equal":
            wait = b / 2 + self._random() * b / 2
        else:
            wait = b
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(self.retry.max, wait)


# --- one batch's delivery -------------------------------------------------------------------


class DeliveryError(RuntimeError):
    """The shell broke the protocol of ``Delivery`` (a bug, never the receiver's doing)."""


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``body`` with ``key`` (re-sends of a request are equal but for ``attempt``).

    Attributes:
        indices: positions in the batch of the frames in the body, in order.
        attempt: 0 for the first send, n for the n-th re-send.
    """

    indices: tuple[int, ...]
    body: bytes
    key: str
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep before sending ``request`` again (re-send number ``request.attempt``)."""

    seconds: float
    request: Send
    cause: str  # "http 503", "timeout", ... (for the log)


@dataclass(frozen=True, slots=True)
class Refuse:
    """Frame ``index`` of the batch was refused for good: dead-letter it."""

    index: int
    reason: str


Step = Send | Wait | Refuse | None


class Delivery:
    """One batch on its way: the requests it needs, in order, and their retries.

    Counters for the shell's stats: ``delivered`` and ``refused`` frames, ``retries``
    (re-sends scheduled), ``splits`` (refused requests cut into single frames).
    """

    def __init__(self, frames: Sequence[Frame], fmt: BodyFormat, count: int, max_bytes: int,
                 backoff: Backoff):
        self._fmt = fmt
        self._backoff = backoff
        self._refusals: deque[Refuse] = deque()
        self._ids: list[bytes] = []
        self._pieces: list[bytes] = []
        self._index: list[int] = []  # batch position of each piece
        for i, frame in enumerate(frames):
            try:
                piece = fmt.piece(frame)
            except (TypeError, ValueError) as exc:  # e.g. a map key JSON cannot hold
                self._refusals.append(Refuse(i, f"not encodable as {fmt.name}: "
                                                f"{escape(str(exc), REASON_TEXT)}"))
                continue
            self._ids.append(frame.id)
            self._pieces.append(piece)
            self._index.append(i)
        self._queue: deque[tuple[int, int]] = deque(
            cut([len(p) for p in self._pieces], fmt, count, max_bytes))
        self._current: Send | None = None
        self._span = (0, 0)  # piece positions of the current request
        self._awaiting = False  # a Send was handed out and not yet answered
        self._wait: Wait | None = None
        self.delivered = 0
        self.refused = 0
        self.retries = 0
        self.splits = 0

    def next(self) -> Step:
        """The next thing to do; None once the batch is settled.

        Raises:
            DeliveryError: the last ``Send`` has not been answered or failed yet.
        """
        if self._awaiting:
            raise DeliveryError("delivery: the last request was neither answered nor failed")
        if self._refusals:
            self.refused += 1
            return self._refusals.popleft()
        if self._wait is not None:
            wait, self._wait = self._wait, None
            return wait
        if self._current is None:
            if not self._queue:
                return None
            start, stop = self._queue.popleft()
            self._current = Send(
                tuple(self._index[start:stop]), self._fmt.body(self._pieces[start:stop]),
                idempotency_key(self._ids[start:stop]))
            self._span = (start, stop)
        self._awaiting = True
        return self._current

    def answered(self, status: int, retry_after: float | None = None,
                 text: bytes | str = b"") -> Verdict:
        """The receiver answered the last ``Send`` with ``status`` (``retry_after``: seconds,
        ``parse_retry_after``; ``text``: the start of the answer's body, for a refusal's
        reason). Returns the verdict.

        Raises:
            DeliveryError: no ``Send`` is waiting for an answer.
        """
        req = self._answer()
        v = verdict(status)
        if v is Verdict.DELIVERED:
            self.delivered += len(req.indices)
            self._current = None
        elif v is Verdict.RETRY:
            self._retry(req, f"http {status}", retry_after)
        else:
            self._current = None
            start, stop = self._span
            if stop - start > 1:  # find the frames the receiver refuses alone
                self.splits += 1
                self._queue.extendleft((i, i + 1) for i in reversed(range(start, stop)))
            else:
                self._refusals.append(Refuse(req.indices[0],
                                             f"http {status}: {escape(text, REASON_TEXT)}"))
        return v

    def failed(self, cause: str) -> None:
        """The last ``Send`` got no answer (connection error, timeout: ``cause`` says which,
        for the log); it will be sent again.

        Raises:
            DeliveryError: no ``Send`` is waiting for an answer.
        """
        self._retry(self._answer(), cause, None)

    def _answer(self) -> Send:
        if not self._awaiting or self._current is None:
            raise DeliveryError("delivery: no request is waiting for an answer")
        self._awaiting = False
        return self._current

    def _retry(self, req: Send, cause: str, retry_after: float | None) -> None:
        again = replace(req, attempt=req.attempt + 1)
        self._current = again
        self._wait = Wait(self._backoff.delay(again.attempt, retry_after), again, cause)
        self.retries += 1


__all__ = ["BATCH", "FORMATS", "RETRY", "SETTINGS", "TLS", "Backoff", "BodyFormat", "Delivery",
           "DeliveryError", "HttpOutSettings", "Refuse", "RetrySettings", "Send", "Step",
           "TlsSettings", "Verdict", "Wait", "check_url", "cut", "idempotency_key",
           "parse_retry_after", "parse_settings", "status_class", "verdict"]
