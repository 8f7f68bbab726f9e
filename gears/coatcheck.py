"""Coat check: card data leaves the message right after decode; a token stays behind.

Theory of operation
-------------------
*Tokens* (``make_token``): same length as the PAN, same first 6 (BIN: routing still works)
and last 4 digits (display still works), random digits between, and a deliberately failing
Luhn check digit, so a token can never pass for a card number anywhere downstream.

*Sealing* (``KeyRing``): the clear values of the sensitive fields (DE2 PAN, DE35 track 2,
DE45 track 1, DE52 PIN block, plus any field a rig adds) are CBOR-encoded and encrypted with
AES-256-GCM (``cryptography``), with the token as associated data (a sealed blob cannot be
swapped onto another token). The blob records its key id::

    {"k": key id, "n": 12-byte nonce, "c": ciphertext + 16-byte tag}

Keys live in a key file (JSON, created 0600 on first use: ``{"current": id, "keys": {id:
base64}}``) or come from ``FLUXRIG_VAULT_KEY`` (base64 of 32 bytes; key id ``env``).
``rotate`` adds a key and makes it current: new entries use it, entries sealed before stay
readable with their old key until they expire.

*The vault* (``Vault``) holds the clear values in the switch process's memory from check-in
until the transaction ends; only the issuer-facing leg and the switch's own answers to the
acquirer claim them. The key ring seals what must survive the process: reversals, in the
in-flight journal and the SAF queue.

Nothing here logs; errors carry key ids and tokens, never clear values.
"""

from __future__ import annotations

import base64
import json
import os
import random
import secrets
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.cbor import dumps, loads
from engine.masking import luhn_valid

SENSITIVE_FIELDS = ("2", "35", "45", "52")
ENV_KEY = "FLUXRIG_VAULT_KEY"


class VaultError(Exception):
    """A sealed value that cannot be opened (unknown key id, tampering, bad key file)."""


# Token digits come from a fast PRNG seeded from the OS (and re-seeded in every forked
# child): a token must not be derived from the PAN, which random digits guarantee; it is
# not a secret itself (its BIN and last 4 are the card's). secrets.randbelow cost 6 us per
# token, a syscall each, on the switch's hot path.
_TOKEN_RNG = random.Random(secrets.randbits(128))
os.register_at_fork(after_in_child=lambda: _TOKEN_RNG.seed(secrets.randbits(128)))


class _Nonces:
    """Unique 96-bit AES-GCM nonces without a system call each (NIST SP 800-38D §8.2.1,
    deterministic construction): a random 64-bit field drawn per process (again in every
    forked child, and whenever the counter wraps) followed by a 32-bit invocation counter.
    Two processes repeat a nonce only if they draw the same 64 random bits (~2^-64 per
    pair); ``secrets.token_bytes`` per seal cost ~1 us, 3% of a switch process at load."""

    __slots__ = ("prefix", "count")

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = secrets.token_bytes(8)
        self.count = 0

    def next(self) -> bytes:
        self.count += 1
        if self.count >= 1 << 32:
            self.reseed()
            self.count = 1
        return self.prefix + self.count.to_bytes(4, "big")


_NONCES = _Nonces()
os.register_at_fork(after_in_child=_NONCES.reseed)


def make_token(pan: str) -> str:
    """A token for ``pan``: same length, BIN (first 6) and last 4 kept, random middle, and
    guaranteed to fail the Luhn check.

    PANs shorter than 13 digits (not valid card numbers) get an all-random token of their
    length that also fails Luhn.
    """
    n = len(pan)
    if n < 13 or not pan.isdigit():
        keep_head, keep_tail = "", ""
    else:
        keep_head, keep_tail = pan[:6], pan[-4:]
    middle_len = n - len(keep_head) - len(keep_tail)
    if middle_len <= 18:  # 64 random bits cover 10**18 with a bias below 1e-1 permille
        middle = (f"{_TOKEN_RNG.getrandbits(64) % 10 ** middle_len:0{middle_len}d}"
                  if middle_len else "")
    else:
        middle = f"{_TOKEN_RNG.randrange(10 ** middle_len):0{middle_len}d}"
    token = keep_head + middle + keep_tail
    if middle_len and luhn_valid(token):
        # change one middle digit by 1: the Luhn sum moves by 1 or 2 mod 10, never by 0
        i = len(keep_head)
        token = token[:i] + str((int(token[i]) + 1) % 10) + token[i + 1:]
    return token


class KeyRing:
    """AES-256-GCM keys by id, one of them current."""

    def __init__(self, keys: Mapping[str, bytes], current: str, path: Path | None = None):
        if current not in keys:
            raise VaultError(f"current key id not in key ring: current={current}")
        for kid, key in keys.items():
            if len(key) != 32:
                raise VaultError(f"vault key must be 32 bytes: key_id={kid}, size={len(key)}")
        self.keys = dict(keys)
        self.current = current
        self.path = path
        self._aead = {kid: AESGCM(k) for kid, k in self.keys.items()}
        self._mtime = path.stat().st_mtime_ns if path is not None and path.exists() else 0

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str],
                       env: Mapping[str, str] | None = None) -> KeyRing:
        """The key from ``FLUXRIG_VAULT_KEY`` if set, else the key file (created if absent).

        Raises:
            VaultError: malformed environment key or key file.
        """
        env = os.environ if env is None else env
        if env.get(ENV_KEY):
            try:
                key = base64.b64decode(env[ENV_KEY], validate=True)
            except ValueError:
                raise VaultError(f"{ENV_KEY} is not base64") from None
            return cls({"env": key}, "env")
        p = Path(path)
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            # Several switch replicas start at once: exactly one key file may win, and all
            # of them must then use it (a second key would make the first one's entries
            # unreadable), so the file appears by link(), which fails if it already exists.
            _write_key_file(p, {"k1": AESGCM.generate_key(bit_length=256)}, "k1",
                            exclusive=True)
        return cls._from_file(p)

    @classmethod
    def _from_file(cls, p: Path) -> KeyRing:
        try:
            doc = json.loads(p.read_text())
            keys = {kid: base64.b64decode(v, validate=True) for kid, v in doc["keys"].items()}
            return cls(keys, doc["current"], p)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VaultError(f"bad vault key file: path={p}, error={type(exc).__name__}") from None

    def reload_if_changed(self) -> KeyRing:
        """This ring, or a fresh one if the key file changed (after ``engine keys rotate``)."""
        if self.path is None:
            return self
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return self
        return self if mtime == self._mtime else KeyRing._from_file(self.path)

    def seal(self, token: str, clear: Mapping[str, str]) -> bytes:
        """Encrypt ``clear`` under the current key, bound to ``token``."""
        nonce = _NONCES.next()
        plain = dumps(clear if type(clear) is dict else dict(clear))
        ct = self._aead[self.current].encrypt(nonce, plain, token.encode())
        return dumps({"k": self.current, "n": nonce, "c": ct})

    def open(self, token: str, sealed: bytes) -> dict[str, str]:
        """Decrypt a blob made by ``seal`` for ``token``.

        Raises:
            VaultError: unknown key id, wrong token, or tampered blob.
        """
        try:
            doc = loads(sealed)
            aead = self._aead[doc["k"]]
        except KeyError:
            raise VaultError(f"unknown vault key id: token={token}") from None
        except ValueError:
            raise VaultError(f"malformed sealed value: token={token}") from None
        try:
            return loads(aead.decrypt(doc["n"], doc["c"], token.encode()))
        except InvalidTag:
            raise VaultError(f"sealed value does not open: token={token}, "
                             f"key_id={doc['k']}") from None


def _write_key_file(path: Path, keys: Mapping[str, bytes], current: str,
                    exclusive: bool = False) -> None:
    doc = {"current": current,
           "keys": {kid: base64.b64encode(k).decode() for kid, k in keys.items()}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)  # first writer wins; the others read its file
            except FileExistsError:
                pass
        else:
            os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def rotate(path: str | os.PathLike[str]) -> str:
    """Add a new key to the key file and make it current; returns the new key id."""
    p = Path(path)
    ring = KeyRing.load_or_create(p, env={})
    n = 1 + max((int(k[1:]) for k in ring.keys if k[1:].isdigit()), default=0)
    kid = f"k{n}"
    _write_key_file(p, {**ring.keys, kid: AESGCM.generate_key(bit_length=256)}, kid)
    return kid


class Vault:
    """The switch process's side of coat check: clear values held in process memory from
    check-in until the transaction ends, under ``<prefix>.<token>`` (the prefix keeps switch
    replicas apart).

    Only the issuer-facing leg and the switch's own answers to the acquirer ``claim`` them.
    Nothing is written anywhere else: a request still in flight when the process dies is
    settled from the in-flight journal, which holds its reversal sealed with the key ring
    (docs/architecture.md, "The vault's KV copy", says why the KV copy was dropped).
    """

    __slots__ = ("prefix", "local")

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.local: dict[str, dict[str, str]] = {}

    def check_in(self, pan: str, clear: Mapping[str, str]) -> tuple[str, str]:
        """Hold ``clear`` under a fresh token for ``pan``; returns (token, vault key)."""
        while True:
            token = make_token(pan or "0" * 16)
            key = f"{self.prefix}.{token}"
            if key not in self.local:  # two cards in flight with the same token: redraw
                break
        self.local[key] = dict(clear)
        return token, key

    def claim(self, key: str) -> dict[str, str] | None:
        """The clear values for ``key`` (issuer-facing leg only), or None if not held here."""
        return self.local.get(key)

    def release(self, key: str) -> None:
        """The transaction is over: forget the clear values."""
        self.local.pop(key, None)
