"""Who may use the Mixer console, and the session cookies it hands out — sans I/O but for
the two small files it keeps in the hub data dir.

Theory of operation
-------------------
``console-users.json`` (mode 0600) holds users and API tokens, never a secret in clear:

* a user has a role (``viewer``: read-only; ``admin``: may also deploy and roll back) and a
  password kept as scrypt (n=2**14, r=8, p=1, 16-byte salt): slow to guess offline;
* an API token (``fxc_`` + 32 random bytes, shown once when made) is kept as its SHA-256:
  it is random, so a fast hash is enough, and a lookup costs nothing per request.

A login gives a session cookie: ``<payload>.<mac>``, the payload being the user, the role
and the expiry (base64url JSON), the mac HMAC-SHA256 under ``console.key`` (32 random
bytes, mode 0600, made on first use). Nothing is stored per session; a user removed or
changed is refused at the next request (``Credentials.session`` checks the user still
holds that role), and a new key (delete the file) logs everyone out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import orjson

USERS_FILE: Final = "console-users.json"
KEY_FILE: Final = "console.key"
ROLES: Final = ("viewer", "admin")
TOKEN_PREFIX: Final = "fxc_"
_SCRYPT: Final = {"n": 2**14, "r": 8, "p": 1}

Role = Literal["viewer", "admin"]


class ConsoleAuthError(ValueError):
    """A user or token cannot be added or removed (the message says why)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from."""

    name: str
    role: Role

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def _scrypt(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, dklen=32, maxmem=64 << 20, **_SCRYPT)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically, readable by its owner only."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class Credentials:
    """The console's users and tokens (``console-users.json`` in ``data_dir``)."""

    def __init__(self, data_dir: Path):
        self.path = data_dir / USERS_FILE
        self.key_path = data_dir / KEY_FILE
        self.users: dict[str, dict[str, str]] = {}
        self.tokens: dict[str, dict[str, str]] = {}
        self._mtime = -1.0
        self._key: bytes | None = None
        self.reload()

    # -- the file ---------------------------------------------------------------------------
    def reload(self) -> None:
        """Read the file again if it changed (users added by the CLI while running)."""
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self.users, self.tokens, self._mtime = {}, {}, -1.0
            return
        if mtime == self._mtime:
            return
        doc = orjson.loads(self.path.read_bytes())
        self.users, self.tokens = dict(doc.get("users", {})), dict(doc.get("tokens", {}))
        self._mtime = mtime

    def _save(self) -> None:
        _write_private(self.path, orjson.dumps({"users": self.users, "tokens": self.tokens},
                                               option=orjson.OPT_INDENT_2))
        self._mtime = self.path.stat().st_mtime

    # -- users and tokens -------------------------------------------------------------------
    def set_user(self, name: str, password: str, role: str) -> None:
        """Add or change user ``name``.

        Raises:
            ConsoleAuthError: an empty or odd name, a password under 12 characters, an
                unknown role.
        """
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ConsoleAuthError(f"user name: letters, digits, '-' or '_', got {name!r}")
        if len(password) < 12:
            raise ConsoleAuthError("password: at least 12 characters")
        if role not in ROLES:
            raise ConsoleAuthError(f"role: one of {', '.join(ROLES)}, got {role!r}")
        salt = secrets.token_bytes(16)
        self.reload()
        self.users[name] = {"role": role, "salt": salt.hex(),
                            "scrypt": _scrypt(password, salt).hex()}
        self._save()

    def remove_user(self, name: str) -> bool:
        """Remove user ``name`` and its tokens; False if there was none."""
        self.reload()
        found = self.users.pop(name, None) is not None
        self.tokens = {h: t for h, t in self.tokens.items() if t["name"] != name}
        self._save()
        return found

    def new_token(self, name: str) -> str:
        """A new API token for user ``name`` (with its role); shown once, kept hashed.

        Raises:
            ConsoleAuthError: no such user.
        """
        self.reload()
        if name not in self.users:
            raise ConsoleAuthError(f"no console user {name!r}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self.tokens[hashlib.sha256(token.encode()).hexdigest()] = {
            "name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._save()
        return token

    # -- checks -----------------------------------------------------------------------------
    def login(self, name: str, password: str) -> Principal | None:
        """The user if ``password`` is theirs (constant-time compare), else None."""
        self.reload()
        user = self.users.get(name)
        if user is None:
            _scrypt(password, b"\0" * 16)  # the same time for an unknown name
            return None
        got = _scrypt(password, bytes.fromhex(user["salt"]))
        if not hmac.compare_digest(got, bytes.fromhex(user["scrypt"])):
            return None
        return Principal(name, user["role"])  # type: ignore[arg-type]

    def token(self, token: str) -> Principal | None:
        """The user an API token belongs to, or None."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        self.reload()
        entry = self.tokens.get(hashlib.sha256(token.encode()).hexdigest())
        if entry is None or (user := self.users.get(entry["name"])) is None:
            return None
        return Principal(entry["name"], user["role"])  # type: ignore[arg-type]

    # -- sessions ---------------------------------------------------------------------------
    def _session_key(self) -> bytes:
        if self._key is None:
            try:
                self._key = self.key_path.read_bytes()
            except FileNotFoundError:
                key = secrets.token_bytes(32)
                try:
                    fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:  # another process made it first: use theirs
                    self._key = self.key_path.read_bytes()
                else:
                    os.write(fd, key)
                    os.close(fd)
                    self._key = key
        return self._key

    def issue(self, who: Principal, ttl_s: float, now: float | None = None) -> str:
        """A session cookie value for ``who``, valid ``ttl_s`` seconds."""
        exp = int((time.time() if now is None else now) + ttl_s)
        payload = _b64(orjson.dumps({"u": who.name, "r": who.role, "exp": exp}))
        mac = hmac.new(self._session_key(), payload.encode(), hashlib.sha256).digest()
        return f"{payload}.{_b64(mac)}"

    def session(self, cookie: str, now: float | None = None) -> Principal | None:
        """Who a session cookie value speaks for: None if forged, expired, or its user is
        gone or holds another role now."""
        payload, _, mac = cookie.partition(".")
        try:
            want = hmac.new(self._session_key(), payload.encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(_unb64(mac), want):
                return None
            doc = orjson.loads(_unb64(payload))
        except (ValueError, orjson.JSONDecodeError):
            return None
        if doc.get("exp", 0) < (time.time() if now is None else now):
            return None
        self.reload()
        user = self.users.get(doc.get("u", ""))
        if user is None or user["role"] != doc.get("r"):
            return None
        return Principal(doc["u"], doc["r"])


__all__ = ["Credentials", "ConsoleAuthError", "KEY_FILE", "Principal", "ROLES", "Role",
           "TOKEN_PREFIX", "USERS_FILE"]
