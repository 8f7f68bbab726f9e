"""Every key of a rig file, as key tables (``engine.keytable``): what ``engine.config``
reads and what ``docs/reference.md`` lists (gear settings are in each gear's own table).

Defaults, bounds and meanings live here once; the parser takes them from these entries.
"""

from __future__ import annotations

import re

from engine.keytable import (
    BOOLEAN,
    CUSTOM,
    DURATION,
    INTEGER,
    LIST,
    MAP,
    NUMBER,
    REQUIRED,
    SECTION,
    SECTIONS,
    SIZE,
    STRING,
    Computed,
    Key,
    Table,
)
from engine.schema import NAME_RE, SUBJECT_RE

NAME_RULE = "lowercase letters, digits, '-' or '_', at most 32 characters"
STREAM_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

RACK = Table("rack", "The rack itself.", (
    Key("id", STRING, "The rack's name; its shared-memory segments, NATS users and stats "
        "subject carry it.", REQUIRED, pattern=NAME_RE, rule=NAME_RULE),
    Key("labels", MAP, "Free labels (site, role, ...) reported with the rack's stats and on "
        "every metric series; names as Prometheus label names (letters, digits, _).",
        items="string"),
    Key("data_dir", STRING, "Lock, state, logs, bus credentials and the JetStream store; a "
        "relative path is taken from the rig file's folder.", Computed("var/<rack.id>")),
))

NATS_TLS = Table("nats.auth.tls", "TLS to an external NATS (files must exist).", (
    Key("ca", STRING, "CA bundle (PEM) that signed the server's certificate.", ""),
    Key("cert", STRING, "Client certificate (PEM).", ""),
    Key("key", STRING, "Client private key (PEM).", ""),
))

NATS_AUTH = Table("nats.auth", "Credentials for an external ``nats.url``.", (
    Key("user", STRING, "User name (with ``password_env``).", ""),
    Key("password_env", STRING, "Environment variable holding the password.", ""),
    Key("token_env", STRING, "Environment variable holding a token.", ""),
    Key("creds_file", STRING, "NATS credentials file (JWT + seed).", ""),
    Key("nkey_seed_file", STRING, "NKey seed file.", ""),
    Key("tls", SECTION, "TLS settings.", table=NATS_TLS),
))

NATS_USER = Table("nats.users[]", "An operator's read-only user of the embedded server.", (
    Key("name", STRING, "User name (not one of the rack's own: admin, egress, telemetry).",
        REQUIRED, pattern=NAME_RE, rule=NAME_RULE),
    Key("password_env", STRING, "Environment variable holding the user's password.",
        REQUIRED),
    Key("streams", LIST, "Streams the user may read.", REQUIRED, items="stream name"),
))

NATS = Table("nats", "The rack's NATS: an external server (``url``) or an embedded one.", (
    Key("url", STRING, "External server, ``nats://`` or ``tls://``; absent: the rack runs "
        "its own nats-server."),
    Key("host", STRING, "Embedded server: listen address.", "127.0.0.1"),
    Key("port", INTEGER, "Embedded server: port; 0 picks a free port at the first start "
        "and keeps it.", 0, minimum=0, maximum=65535),
    Key("auth", SECTION, "Credentials for ``url`` (the embedded server makes its own "
        "users).", table=NATS_AUTH),
    Key("users", SECTIONS, "Read-only users of the embedded server.", table=NATS_USER),
))

RINGS = Table("rings", "Shared-memory rings between processes.", (
    Key("capacity", SIZE, "Bytes of each ring's data region: a power of two, at least "
        "1024, at most 1 GiB and what /dev/shm holds.", 4 << 20),
    Key("batch", INTEGER, "Frames read from a ring per batch.", 256, minimum=1,
        maximum=65536),
))

CPU = Table("cpu", "Pinning processes to CPUs.", (
    Key("placement", CUSTOM, "``auto`` pins each process to a CPU of its own where it can, "
        "``none`` leaves placement to the kernel, a mapping names the CPU of each process.",
        "auto", type_text="'auto', 'none' or a mapping: process name -> CPU number"),
))

PROMETHEUS = Table("telemetry.prometheus", "The Prometheus endpoint (absent or null: off).", (
    Key("host", STRING, "Listen address.", "127.0.0.1"),
    Key("port", INTEGER, "Port; 0 picks a free one (see rack.log).", 9464, minimum=0,
        maximum=65535),
))

TRACES = Table("telemetry.traces", "Transaction traces: sampling and the signal tap "
               "(docs/traces.md).", (
    Key("enabled", BOOLEAN, "Record traces of sampled and kept transactions.", True),
    Key("sample", NUMBER, "Head-based share of transactions traced, 0 to 1.", 0.01,
        minimum=0, maximum=1),
    Key("keep_errors", BOOLEAN, "Always keep requests refused as malformed (30, 14, no "
        "answer).", True),
    Key("keep_declines", BOOLEAN, "Always keep answers other than approval (DE39 not 00).",
        True),
    Key("keep_timeouts", BOOLEAN, "Always keep issuer timeouts (91 by the switch).", True),
    Key("slower_than", DURATION, "Always keep transactions slower than this; 0: off.", 0.5,
        minimum=0, maximum=3600),
    Key("max_kept", INTEGER, "Transactions kept by a rule per second and process, at most "
        "(more are counted as dropped).", 200, minimum=0, maximum=1_000_000),
    Key("tap", SIZE, "Bytes of each process's tap ring (a power of two); a full tap drops "
        "and counts.", 1 << 20, minimum=1 << 16, maximum=1 << 30),
))

LOGS = Table("telemetry.logs", "Log records shipped to fluxrig.logs.<rack.id> (JSON lines, "
             "masked).", (
    Key("enabled", BOOLEAN, "Ship log records.", True),
    Key("level", STRING, "Lowest level shipped.", "info",
        choices=("debug", "info", "warning", "error", "critical")),
    Key("rate", NUMBER, "Records per second shipped for the whole rack, at most (more are "
        "dropped and counted in a notice record).", 100.0, minimum=0.1, maximum=1_000_000),
    Key("burst", INTEGER, "Records shipped at once after a quiet spell.", 1000, minimum=1,
        maximum=1_000_000),
))

OTLP = Table("telemetry.otlp", "An OTLP/HTTP endpoint that gets the rack's spans directly "
             "(absent or null: none; the Mixer gets them over NATS either way).", (
    Key("endpoint", STRING, "Collector base URL; spans are POSTed to <endpoint>/v1/traces.",
        REQUIRED, pattern=re.compile(r"^https?://[^\s]+$"), rule="an http:// or https:// URL"),
    Key("headers", MAP, "HTTP headers sent with each export (e.g. authorization: "
        "${OTLP_TOKEN}).", None, items="header name -> text"),
    Key("timeout", DURATION, "Timeout of one export.", 10.0, minimum=0.1, maximum=300),
))

TELEMETRY = Table("telemetry", "Stats sampling and export.", (
    Key("interval", DURATION, "Sampling interval (the rate window).", 1.0, minimum=0.05,
        maximum=3600),
    Key("prometheus", SECTION, "Prometheus endpoint; absent or null: none.",
        table=PROMETHEUS),
    Key("subject", STRING, "NATS subject of the stats snapshots.",
        Computed("fluxrig.stats.<rack.id>"), pattern=SUBJECT_RE,
        rule="a NATS subject without wildcards"),
    Key("traces", SECTION, "Transaction traces.", table=TRACES),
    Key("logs", SECTION, "Log shipping.", table=LOGS),
    Key("otlp", SECTION, "Direct OTLP export of spans; absent or null: none.", table=OTLP),
))

STREAM = Table("egress.streams[]", "A JetStream stream that egress creates and owns.", (
    Key("name", STRING, "Stream name.", REQUIRED, pattern=STREAM_NAME_RE,
        rule="letters, digits, '-' or '_'"),
    Key("subjects", LIST, "Subjects it captures (wildcards allowed); every egress sink's "
        "subject must be captured by exactly one stream.", REQUIRED, items="subject pattern"),
    Key("storage", STRING, "Where JetStream keeps it.", "file", choices=("file", "memory")),
    Key("max_age", DURATION, "Age at which messages are removed; 0: kept until removed "
        "otherwise.", 0.0, minimum=0),
    Key("max_msgs_per_subject", INTEGER, "Messages kept per subject (the oldest of a subject "
        "is removed first): a per-subject history depth, e.g. the UNS history of every tag; "
        "0: no per-subject limit. With `max_age` (every message's age) it bounds each "
        "subject's share.", 0, minimum=0, maximum=1_000_000_000),
    Key("duplicate_window", DURATION, "How long JetStream remembers message ids to drop "
        "duplicates (a replayed batch).", 120.0, minimum=0, exclusive=True, maximum=86_400),
    Key("max_bytes", SIZE, "Disk budget: at this size the stream refuses new events "
        "(egress keeps them in the rings and raises the alarm) instead of dropping old ones "
        "when the rack is linked to a Mixer; 0: JetStream's own limits. A linked rack's hub "
        "streams keep an event only until the hub has it.", 0, minimum=0),
    Key("hub", BOOLEAN, "With a Mixer passport (`mixer.passport`): the hub keeps a copy "
        "(egress makes the durable consumer `hub` the hub sources it through, and the rack's "
        "hello lists the stream).", True),
    Key("last_values", STRING, "A KV bucket holding the newest message of every subject "
        "under the stream's first subject pattern ending in `.>` (keyed by the rest of the "
        "subject; `uns` for the UNS): the bucket sources the stream, so it is filled by "
        "JetStream itself, durably, with nothing published twice.", None,
        pattern=STREAM_NAME_RE, rule="letters, digits, '-' or '_'"),
))

EGRESS = Table("egress", "Rings -> JetStream.", (
    Key("streams", SECTIONS, "Streams egress creates and owns.", table=STREAM),
    Key("batch", INTEGER, "Frames per publish batch.", 1000, minimum=1, maximum=100_000),
    Key("max_inflight", INTEGER, "Batches published and not yet acknowledged.", 8,
        minimum=1, maximum=1024),
    Key("ack_timeout", DURATION, "How long to wait for JetStream's acknowledgement.", 5.0,
        minimum=0.1, maximum=600),
))

GEAR = Table("gear", "One gear of a pipeline.", (
    Key("name", STRING, "Name in the pipeline (unique there).",
        Computed("source, stage<i> or sink<i>"), pattern=NAME_RE, rule=NAME_RULE),
    Key("gear", STRING, "The registered gear (see Gears below).", REQUIRED),
    Key("settings", CUSTOM, "The gear's settings (see Gears below).",
        type_text="mapping: the gear's settings"),
))

PIPELINE = Table("pipelines[]", "A chain: one source, stages in order, one sink.", (
    Key("name", STRING, "Pipeline name.", REQUIRED, pattern=NAME_RE, rule=NAME_RULE),
    Key("key", STRING, "Frame path choosing the lane of a frame (``headers.device``); "
        "absent: round robin by source batch."),
    Key("source", SECTION, "The source gear (required).", table=GEAR),
    Key("stages", SECTIONS, "Stage gears, in order.", table=GEAR),
    Key("sinks", SECTIONS, "Sink gears (one for now).", REQUIRED, table=GEAR),
))

MIXER = Table("mixer", "The link to a Mixer hub (``docs/mixer-design.md``).", (
    Key("passport", STRING, "The rack's passport file from ``mixer rack add`` (0600; a "
        "relative path is taken from the rig file's folder): the embedded nats-server then "
        "links to the hub as a leaf node over TLS.", REQUIRED),
))

RIG = Table("rig file", "The top level of a rig file.", (
    Key("rack", SECTION, "The rack (``rack.id`` is required).", table=RACK),
    Key("nats", SECTION, "NATS.", table=NATS),
    Key("rings", SECTION, "Rings.", table=RINGS),
    Key("cpu", SECTION, "CPU placement.", table=CPU),
    Key("telemetry", SECTION, "Telemetry.", table=TELEMETRY),
    Key("egress", SECTION, "Egress.", table=EGRESS),
    Key("mixer", SECTION, "Mixer hub link; absent: the rack stands alone.", table=MIXER),
    Key("pipelines", SECTIONS, "The pipelines (at least one).", REQUIRED, table=PIPELINE),
))
