"""JetStream streams the rack owns: their configuration and the one way to create them."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamSource,
    SubjectTransform,
)
from nats.js.api import StreamConfig as JsStreamConfig
from nats.js.errors import NotFoundError

log = logging.getLogger("fluxrig.egress")


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamConfig:
    """A JetStream stream the egress creates or checks at start."""

    name: str
    subjects: tuple[str, ...]
    storage: str = "file"
    max_age: float = 0.0  # seconds, 0 = unlimited
    max_msgs_per_subject: int = 0  # 0 = unlimited
    duplicate_window: float = 120.0  # seconds
    retention: str = "limits"  # or "work_queue": a message leaves when a consumer acks it
    hub: bool = False  # a Mixer hub sources it (through the durable consumer ``hub``)
    max_bytes: int = 0  # 0: no budget of its own
    linked: bool = False  # hub and the rack is linked: interest retention, discard new
    last_values: str = ""  # a KV bucket that sources it (the newest message per subject)


def js_stream_config(s: StreamConfig) -> JsStreamConfig:
    """nats-py StreamConfig for one configured stream. A stream a Mixer hub keeps a copy of
    (``linked``) keeps an event until the hub has it (interest retention: the ``hub``
    consumer's ack) and refuses new events at its ``max_bytes`` instead of dropping old ones
    (discard new): nothing leaves the rack unstored, and a full budget is backpressure."""
    retention = (RetentionPolicy.INTEREST if s.linked else
                 RetentionPolicy.WORK_QUEUE if s.retention == "work_queue"
                 else RetentionPolicy.LIMITS)
    return JsStreamConfig(
        name=s.name,
        subjects=list(s.subjects),
        storage=StorageType.FILE if s.storage == "file" else StorageType.MEMORY,
        max_age=None if s.linked else (s.max_age or None),
        max_bytes=s.max_bytes or None,
        max_msgs_per_subject=s.max_msgs_per_subject or -1,
        discard=DiscardPolicy.NEW if s.linked else DiscardPolicy.OLD,
        duplicate_window=s.duplicate_window,
        retention=retention,
    )


async def ensure_stream(js: JetStreamContext, s: StreamConfig) -> int:
    """Create stream ``s`` if missing (its subjects and limits updated if they changed); returns its
    last sequence. Errors are nats-py's typed ones (``NotFoundError`` is handled here)."""
    cfg = js_stream_config(s)
    try:
        info = await js.stream_info(s.name)
        if info.config.retention != cfg.retention:
            # JetStream cannot change a stream's retention: keep the stream as it is
            log.warning("stream keeps its retention (made before the rack was linked or "
                        "unlinked; recreate it to change): stream=%s, retention=%s, wanted=%s",
                        s.name, info.config.retention, cfg.retention)
            cfg.retention = info.config.retention
        if (sorted(info.config.subjects or []) != sorted(s.subjects)
                or (info.config.max_bytes or -1) != (cfg.max_bytes or -1)
                or (info.config.max_age or 0) != (cfg.max_age or 0)
                or (info.config.max_msgs_per_subject or -1) != cfg.max_msgs_per_subject
                or info.config.discard != cfg.discard):
            info = await js.update_stream(cfg)
    except NotFoundError:
        info = await js.add_stream(cfg)
    return info.state.last_seq


HUB_CONSUMER = "hub"


def hub_deliver_subject(rack_id: str, stream: str) -> str:
    """Where the ``hub`` consumer of ``stream`` delivers: the rack's own ``src`` subject,
    which its hub permissions let cross the leaf link."""
    return f"fluxrig.src.{rack_id}.{stream}"


async def ensure_hub_consumer(js: JetStreamContext, rack_id: str, stream: str) -> None:
    """The durable push consumer a Mixer hub sources ``stream`` through: flow-control acks
    (its ack floor is what the hub stored), heartbeats so a hub that lost the race with its
    leaf link probes again within a second (``docs/mixer-design.md`` section 1)."""
    await js.add_consumer(stream, ConsumerConfig(
        durable_name=HUB_CONSUMER, name=HUB_CONSUMER,
        deliver_subject=hub_deliver_subject(rack_id, stream),
        ack_policy=AckPolicy.FLOW_CONTROL, flow_control=True, idle_heartbeat=1.0,
        deliver_policy=DeliverPolicy.ALL))


async def drop_hub_consumer(js: JetStreamContext, stream: str) -> bool:
    """Remove ``stream``'s ``hub`` consumer left from when the rack was linked (with interest
    retention it would keep every event until the budget is full); True if there was one."""
    try:
        await js.consumer_info(stream, HUB_CONSUMER)
    except NotFoundError:
        return False
    await js.delete_consumer(stream, HUB_CONSUMER)
    log.warning("hub consumer removed, the rack is no longer linked for it: stream=%s", stream)
    return True


def last_values_config(s: StreamConfig) -> JsStreamConfig:
    """The KV bucket ``s.last_values``: a stream ``KV_<bucket>`` keeping one message per key,
    that *sources* ``s`` with the subject transform ``<prefix>.>`` -> ``$KV.<bucket>.>`` — the
    key of a message is the rest of its subject. Sourcing is JetStream's own reliable copy
    (a server-side republish would be at most once), and the bucket is an ordinary KV bucket
    for every client (``kv.get``, ``kv.keys``, ``kv.watch``)."""
    pattern = next(x for x in s.subjects if x.endswith(".>"))
    bucket = s.last_values
    return JsStreamConfig(
        name=f"KV_{bucket}", subjects=[f"$KV.{bucket}.>"],
        storage=StorageType.FILE if s.storage == "file" else StorageType.MEMORY,
        max_msgs_per_subject=1, discard=DiscardPolicy.NEW, allow_rollup_hdrs=True,
        deny_delete=True, allow_direct=True,
        sources=[StreamSource(name=s.name, subject_transforms=[
            SubjectTransform(src=pattern, dest=f"$KV.{bucket}.>")])])


async def ensure_last_values(js: JetStreamContext, s: StreamConfig) -> None:
    """Create ``s``'s last-values bucket if missing (``last_values_config``)."""
    cfg = last_values_config(s)
    try:
        await js.stream_info(cfg.name)
    except NotFoundError:
        await js.add_stream(cfg)


async def ensure_streams(js: JetStreamContext, streams: list[StreamConfig]) -> dict[str, int]:
    """``ensure_stream`` for each (and its last-values bucket); their last sequences."""
    out = {}
    for s in streams:
        out[s.name] = await ensure_stream(js, s)
        if s.last_values:
            await ensure_last_values(js, s)
    return out


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` one or more trailing tokens."""
    pt, st = pattern.split("."), subject.split(".")
    for i, token in enumerate(pt):
        if token == ">":
            return len(st) > i
        if i >= len(st) or (token != "*" and token != st[i]):
            return False
    return len(pt) == len(st)
