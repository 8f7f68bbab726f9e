"""The ``http_client`` sink: frames to an HTTP endpoint, at least once.

```yaml
sinks:
  - name: out
    gear: http_client
    settings:
      url: https://collector.example/ingest
      headers: {Authorization: "Bearer ${TOKEN}"}
      format: jsonl                 # json, cbor
      batch: {count: 100, bytes: 1MiB, time: 100ms}
      timeout: 10s
      retry: {initial: 100ms, max: 30s, multiplier: 2, jitter: full}
```

The decisions — how a batch is cut into requests, bodies, idempotency keys, verdicts on
statuses, the backoff — are in ``gears.io.httpout``; this shell moves bytes with one aiohttp
``ClientSession`` (keep-alive, one request in flight: a lane's frames arrive in order) and
keeps the stats and the logs.

At least once: ``write`` returns only when every frame of the batch was answered 2xx or was
refused (4xx) and dead-lettered (``ctx.dead_letter``, the reason ``http 400: <answer>``); the
worker commits the ring after that. Until then the request is sent again, forever, with
backoff — an outage fills the rings and backpressure reaches the source. A process killed
mid-batch (or a rack stopped during an outage, its drain timeout cut short) leaves the batch
in the ring, and the next start sends it again: duplicates, never a loss; every frame carries
its id (``id`` in the body) for the receiver to remove them. Cancelling ``write`` (the only
await points are the request and the backoff sleep) abandons the batch uncommitted.

Logs never hold a body (it may hold card data) nor the URL's query; retries, refusals and
errors are rate-limited (``engine.logutil.RateLimitedLog``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import ssl
import time
from typing import Any, Final

import aiohttp

from engine.counters import StatDef, Stats
from engine.frame import Frame
from engine.logutil import RateLimitedLog, escape
from engine.schema import At
from engine.units import format_duration, format_size
from gears.base import GearContext, Sink, SinkBatching
from gears.io.httpout import (
    FORMATS,
    SETTINGS,
    Backoff,
    Delivery,
    HttpOutSettings,
    Refuse,
    Send,
    TlsSettings,
    Verdict,
    parse_retry_after,
    parse_settings,
    status_class,
)

STATUS_CLASSES: Final = ("2xx", "3xx", "4xx", "5xx", "error")
STAT_DEFS: Final = (
    *(StatDef("http_out.requests", "counter", "HTTP requests sent, by answer (error: none: "
              "connection error or timeout).", (("status", c),)) for c in STATUS_CLASSES),
    StatDef("http_out.retries", "counter", "Requests sent again after a retryable answer or "
            "no answer."),
    StatDef("http_out.delivered", "counter", "Frames answered 2xx."),
    StatDef("http_out.dead_lettered", "counter", "Frames refused by the receiver (4xx alone) "
            "and dead-lettered."),
    StatDef("http_out.backoff_ms", "counter", "Milliseconds spent waiting before sending a "
            "request again (backoff, Retry-After)."),
    StatDef("http_out.retrying", "gauge", "1 while the sink waits to send a request again "
            "(the receiver is failing or down)."),
)
ANSWER_PREFIX: Final = 1024  # bytes of an answer read (a refusal's reason keeps 200)
_RETRY_ERRORS: Final = (aiohttp.ClientError, TimeoutError, OSError)


def _tls_files(tls: TlsSettings, at: At) -> TlsSettings:
    """``tls`` with its files absolute (relative ones from the rig file's folder, as the
    ``http_server`` source and ``nats.auth.tls`` take them) and present."""
    base = os.path.dirname(os.path.abspath(at.file)) if at.file else os.getcwd()
    files: dict[str, str | None] = {}
    for name in ("ca", "cert", "key"):
        given = getattr(tls, name)
        if given is None:
            files[name] = None
            continue
        path = os.path.join(base, given)
        if not os.path.isfile(path):
            where = at.key("tls").key(name)
            raise where.error(f"no such file: {where.show(given)}")
        files[name] = path
    return TlsSettings(ca=files["ca"], verify=tls.verify, cert=files["cert"], key=files["key"])


def ssl_context(tls: TlsSettings | None) -> ssl.SSLContext | None:
    """The TLS context of an https:// URL (None: aiohttp's default, the system's CAs).

    Raises:
        ValueError: a file that is not PEM or a key that does not match (at start: the
            process fails and the rack reports it, rather than retrying handshakes forever).
    """
    if tls is None:
        return None
    try:
        ctx = ssl.create_default_context(cafile=tls.ca)
        if not tls.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if tls.cert:
            ctx.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"http_client tls: cannot load: ca={tls.ca}, cert={tls.cert}, "
                         f"key={tls.key}, error={exc}") from exc
    return ctx


async def _answer_prefix(resp: aiohttp.ClientResponse) -> bytes:
    """The start of an answer's body: read to its end when short (the connection is then
    reused), at most ``ANSWER_PREFIX`` bytes (a long answer costs the connection, not
    memory); a refusal keeps it as the dead letter's reason."""
    data = b""
    while len(data) < ANSWER_PREFIX and not resp.content.at_eof():
        chunk = await resp.content.read(ANSWER_PREFIX - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _cause(exc: BaseException) -> str:
    """Why a request got no answer, for the log: escaped (a server's bytes may be in it) and
    without the URL (``ClientResponseError`` shows it, query and all)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    text = exc.message if isinstance(exc, aiohttp.ClientResponseError) else str(exc)
    name = type(exc).__name__
    return f"{name}: {escape(text, 160)}" if text else name


class HttpSink(Sink):
    """Batches of frames as HTTP requests (see the module docstring)."""

    settings_table = SETTINGS

    @classmethod
    def parse_settings(cls, raw: Any, at: At) -> HttpOutSettings:
        s = parse_settings(raw, at)
        if s.tls is not None:
            s = dataclasses.replace(s, tls=_tls_files(s.tls, at))
        return s

    @classmethod
    def stat_defs(cls, settings: HttpOutSettings) -> tuple[StatDef, ...]:
        return STAT_DEFS

    @classmethod
    def batching(cls, settings: HttpOutSettings) -> SinkBatching:
        # the rack fills a request up to batch.count (waiting batch.time); batch.bytes is
        # enforced here, by cutting the batch into several requests
        return SinkBatching(count=settings.batch_count, linger=settings.batch_time)

    @classmethod
    def describe(cls, settings: HttpOutSettings) -> tuple[str, ...]:
        s = settings
        r = s.retry
        line = (f"{s.method} {s.shown_url}: {s.format}, <= {s.batch_count} frames and "
                f"{format_size(s.batch_bytes)} per request (linger "
                f"{format_duration(s.batch_time)}), timeout {format_duration(s.timeout)}, "
                f"retry {format_duration(r.initial)}..{format_duration(r.max)} "
                f"x{r.multiplier:g} ({r.jitter} jitter)")
        return (line,)

    def __init__(self, settings: HttpOutSettings, ctx: GearContext):
        super().__init__(settings, ctx)
        s = settings
        self._fmt = FORMATS[s.format]
        self._ssl = ssl_context(s.tls)
        self._backoff = Backoff(s.retry, random.SystemRandom().random)
        self._timeout = aiohttp.ClientTimeout(total=s.timeout)
        headers = dict(s.headers)
        headers.setdefault("Content-Type", self._fmt.content_type)
        self._headers = headers
        self._session: aiohttp.ClientSession | None = None  # made in the loop, at first use
        self._log = RateLimitedLog(ctx.log, interval=10.0)
        self._stats = ctx.stats if ctx.stats is not None else Stats.local(STAT_DEFS)
        st = self._stats
        self._s_requests = {c: st.slot("http_out.requests", status=c) for c in STATUS_CLASSES}
        self._s_retries = st.slot("http_out.retries")
        self._s_delivered = st.slot("http_out.delivered")
        self._s_dead = st.slot("http_out.dead_lettered")
        self._s_backoff = st.slot("http_out.backoff_ms")
        self._s_retrying = st.slot("http_out.retrying")
        st.set(self._s_retrying, 0)  # a killed predecessor may have left it set
        self._failing_since: float | None = None  # monotonic start of the current outage

    def _open(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            # one connection: one request in flight, reused across requests (keep-alive)
            connector = aiohttp.TCPConnector(limit=1, ssl=self._ssl if self._ssl else True)
            session = self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, auto_decompress=True,
                raise_for_status=False)
        return session

    async def write(self, frames: list[Frame]) -> None:
        """Deliver every frame (2xx) or dead-letter it (refused); retries until then.

        Raises:
            asyncio.CancelledError: cancelled; the batch stays uncommitted (sent again).
            OSError: the dead-letter file cannot be written (the worker retries the batch).
        """
        s = self.settings
        d = Delivery(frames, self._fmt, s.batch_count, s.batch_bytes, self._backoff)
        try:
            while (step := d.next()) is not None:
                if isinstance(step, Send):
                    await self._send(d, step)
                elif isinstance(step, Refuse):
                    self._refuse(frames[step.index], step.reason)
                else:
                    self._stats.set(self._s_retrying, 1)
                    self._stats.add(self._s_retries)
                    if self._failing_since is None:
                        self._failing_since = time.monotonic()
                    self._log.warning(
                        "retry", "http request failed, sending again: url=%s, cause=%s, "
                        "attempt=%d, wait=%.3fs, frames=%d", s.shown_url, step.cause,
                        step.request.attempt, step.seconds, len(step.request.indices))
                    await asyncio.sleep(step.seconds)
                    self._stats.add(self._s_backoff, round(step.seconds * 1000))
        finally:
            self._stats.set(self._s_retrying, 0)

    async def _send(self, d: Delivery, req: Send) -> None:
        s = self.settings
        headers = self._headers
        if s.idempotency_header:
            headers = {**headers, s.idempotency_header: req.key}
        try:
            async with self._open().request(s.method, s.url, data=req.body, headers=headers,
                                             allow_redirects=False) as resp:
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
                answer = await _answer_prefix(resp)
        except _RETRY_ERRORS as exc:
            self._stats.add(self._s_requests["error"])
            d.failed(_cause(exc))
            return
        self._stats.add(self._s_requests[status_class(status)])
        before = d.delivered
        v = d.answered(status, retry_after, answer)
        if v is Verdict.DELIVERED:
            self._stats.add(self._s_delivered, d.delivered - before)
            if self._failing_since is not None:
                self._log.log("resumed", logging.INFO, "http delivery resumed: url=%s, "
                              "attempts=%d, outage=%.1fs", s.shown_url, req.attempt + 1,
                              time.monotonic() - self._failing_since)
                self._failing_since = None
        elif v is Verdict.REFUSED:
            self._log.warning("refused", "http request refused: url=%s, status=%d, frames=%d%s",
                              s.shown_url, status, len(req.indices),
                              " (sent again frame by frame)" if len(req.indices) > 1 else "")

    def _refuse(self, frame: Frame, reason: str) -> None:
        self.ctx.dead_letter(frame, reason)
        self._stats.add(self._s_dead)
        self._log.error("dead", "frame refused by the receiver, dead-lettered: url=%s, "
                        "frame_id=%s, reason=%s", self.settings.shown_url, frame.id.hex(),
                        reason.split(":", 1)[0])

    async def aclose(self) -> None:
        """Close the connection (the rack awaits this at a stop)."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

