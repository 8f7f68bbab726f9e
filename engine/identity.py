"""Rack identities: NATS nkeys made with ``cryptography`` (no ``nkeys`` package), and the
passport file a rack carries to its hub.

An nkey (https://docs.nats.io/running-a-nats-service/configuration/securing_nats/auth_intro/nkey_auth)
is an Ed25519 key pair, written in base32 (RFC 4648, no padding)::

    public key:  prefix byte (U = user: 20 << 3) | 32-byte public key | CRC-16 (LE)
    seed:        2 prefix bytes (S + U, packed) | 32-byte private seed | CRC-16 (LE)

The CRC is CRC-16/XMODEM (``binascii.crc_hqx`` with 0), over the bytes before it, stored
little-endian. The hub's nats-server holds only public keys; the seed lives in the rack's
passport (0600) and in the rack's own ``nats-server.conf`` (0600), which signs the hub's
nonce when the leaf link connects. A fixed vector checked against ``nkeys`` 0.2.1 is in the
tests (``docs/mixer-design.md`` section 1).

Passport (``mixer rack add``), JSON, mode 0600::

    {"format": "fluxrig-passport/1", "rack": "rack-a", "hub": ["tls://hub:7422"],
     "nkey_seed": "SU...", "ca": "-----BEGIN CERTIFICATE-----...", "issued": "...Z",
     "labels": {...}}
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from engine.bus import write_new

PREFIX_USER = 20 << 3  # 'U' in base32
PREFIX_SEED = 18 << 3  # 'S'
PASSPORT_FORMAT = "fluxrig-passport/1"


class IdentityError(ValueError):
    """A seed, public key or passport is not what it must be; the message says where."""


def _crc16(data: bytes) -> bytes:
    return binascii.crc_hqx(data, 0).to_bytes(2, "little")


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=")


def _unb32(text: str, what: str) -> bytes:
    try:
        return base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        raise IdentityError(f"{what}: not base32") from None


def encode_seed(raw: bytes) -> str:
    """The user seed (``SU...``) of a 32-byte Ed25519 private seed."""
    if len(raw) != 32:
        raise IdentityError(f"seed: expected 32 bytes, got {len(raw)}")
    head = bytes([PREFIX_SEED | (PREFIX_USER >> 5), (PREFIX_USER & 31) << 3])
    body = head + raw
    return _b32(body + _crc16(body))


def decode_seed(seed: str) -> bytes:
    """The 32-byte private seed of a user seed ``SU...``.

    Raises:
        IdentityError: not base32, wrong length, not a user seed, or a bad checksum.
    """
    data = _unb32(seed, "seed")
    if len(data) != 36:
        raise IdentityError(f"seed: expected 36 bytes decoded, got {len(data)}")
    body, crc = data[:-2], data[-2:]
    if _crc16(body) != crc:
        raise IdentityError("seed: bad checksum")
    if body[0] & 0xF8 != PREFIX_SEED or ((body[0] & 7) << 5 | body[1] >> 3) != PREFIX_USER:
        raise IdentityError("seed: not a user seed (expected SU...)")
    return body[2:]


def public_key(seed: str) -> str:
    """The user public key (``U...``) of a user seed."""
    key = Ed25519PrivateKey.from_private_bytes(decode_seed(seed))
    pub = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    body = bytes([PREFIX_USER]) + pub
    return _b32(body + _crc16(body))


def new_seed() -> str:
    """A fresh random user seed."""
    return encode_seed(os.urandom(32))


@dataclass(frozen=True, slots=True, kw_only=True)
class Passport:
    """What a rack needs to link to its hub (see the module docstring for the file)."""

    rack: str
    hub: tuple[str, ...]
    nkey_seed: str
    ca: str
    issued: str
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def public_key(self) -> str:
        """The rack's public nkey (what the hub lists as its user)."""
        return public_key(self.nkey_seed)

    def to_json(self) -> str:
        """The passport file's text."""
        return json.dumps({"format": PASSPORT_FORMAT, "rack": self.rack, "hub": list(self.hub),
                           "nkey_seed": self.nkey_seed, "ca": self.ca, "issued": self.issued,
                           "labels": dict(self.labels)}, indent=1) + "\n"


def write_passport(path: Path, passport: Passport) -> None:
    """Write ``passport`` to ``path``, created exclusively with mode 0600.

    Raises:
        IdentityError: ``path`` exists (a passport is never overwritten).
    """
    try:
        write_new(path, passport.to_json().encode(), 0o600)
    except FileExistsError:
        raise IdentityError(f"{path}: exists, refusing to overwrite a passport") from None


def _field(doc: Mapping[str, object], key: str, path: Path) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise IdentityError(f"{path}: {key}: expected a non-empty string")
    return value


def read_passport(path: Path) -> Passport:
    """Read and check a passport file.

    Raises:
        IdentityError: unreadable, readable by others (mode beyond 0600), not a passport,
            a missing or wrong key (named), or a seed that does not decode.
    """
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read passport: {exc.strerror}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise IdentityError(f"{path}: passport readable by others "
                            f"(mode {stat.S_IMODE(st.st_mode):#o}; chmod 600 it)")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise IdentityError(f"{path}: not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != PASSPORT_FORMAT:
        raise IdentityError(f"{path}: format: expected {PASSPORT_FORMAT!r}")
    hub = doc.get("hub")
    if not isinstance(hub, list) or not hub or not all(isinstance(u, str) for u in hub):
        raise IdentityError(f"{path}: hub: expected a list of URLs")
    labels = doc.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise IdentityError(f"{path}: labels: expected a mapping of strings")
    seed = _field(doc, "nkey_seed", path)
    try:
        decode_seed(seed)
    except IdentityError as exc:
        raise IdentityError(f"{path}: nkey_seed: {str(exc).removeprefix('seed: ')}") from None
    return Passport(rack=_field(doc, "rack", path), hub=tuple(hub), nkey_seed=seed,
                    ca=_field(doc, "ca", path), issued=_field(doc, "issued", path),
                    labels=labels)


def hub_urls(hosts: Sequence[str], port: int) -> tuple[str, ...]:
    """``tls://host:port`` for each host racks dial (an IPv6 address in brackets)."""
    return tuple(f"tls://{url_host(h)}:{port}" for h in hosts)


def url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host
