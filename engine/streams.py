"""JetStream streams the rack owns: their configuration and the one way to create them."""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
)
from nats.js.api import StreamConfig as JsStreamConfig
from nats.js.errors import NotFoundError


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamConfig:
    """A JetStream stream the egress creates or checks at start."""

    name: str
    subjects: tuple[str, ...]
    storage: str = "file"
    max_age: float = 0.0  # seconds, 0 = unlimited
    duplicate_window: float = 120.0  # seconds
    retention: str = "limits"  # or "work_queue": a message leaves when a consumer acks it
    hub: bool = False  # a Mixer hub sources it (through the durable consumer ``hub``)


def js_stream_config(s: StreamConfig) -> JsStreamConfig:
    """nats-py StreamConfig for one configured stream."""
    return JsStreamConfig(
        name=s.name,
        subjects=list(s.subjects),
        storage=StorageType.FILE if s.storage == "file" else StorageType.MEMORY,
        max_age=s.max_age or None,
        duplicate_window=s.duplicate_window,
        retention=(RetentionPolicy.WORK_QUEUE if s.retention == "work_queue"
                   else RetentionPolicy.LIMITS),
    )


async def ensure_stream(js: JetStreamContext, s: StreamConfig) -> int:
    """Create stream ``s`` if missing (its subjects updated if they changed); returns its
    last sequence. Errors are nats-py's typed ones (``NotFoundError`` is handled here)."""
    cfg = js_stream_config(s)
    try:
        info = await js.stream_info(s.name)
        if sorted(info.config.subjects or []) != sorted(s.subjects):
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


async def ensure_streams(js: JetStreamContext, streams: list[StreamConfig]) -> dict[str, int]:
    """``ensure_stream`` for each; their last sequences by name."""
    return {s.name: await ensure_stream(js, s) for s in streams}


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` one or more trailing tokens."""
    pt, st = pattern.split("."), subject.split(".")
    for i, token in enumerate(pt):
        if token == ">":
            return len(st) > i
        if i >= len(st) or (token != "*" and token != st[i]):
            return False
    return len(pt) == len(st)
