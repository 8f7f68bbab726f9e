"""Ask a running Mixer's registry, with as little as possible loaded: ``mixer racks`` and
``mixer top`` are typed by people and polled by scripts, and importing the whole Mixer
(DuckDB, Arrow, the rig checker) cost 0.6 s before the 20 ms question was even asked.

The hub's address comes from the Mixer's ``state.json``, the ``admin`` password from
``nats-users.json``; a Mixer is running when its lock is held (``engine.procset``).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from pathlib import Path

ASK_TIMEOUT = 2.0


class AskError(RuntimeError):
    """No Mixer to ask, or no answer; the message says which."""


def running(data_dir: Path) -> bool:
    """True while a Mixer supervisor holds ``data_dir``'s lock."""
    try:
        fd = os.open(data_dir / "mixer.lock", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def ask(data_dir: Path, subject: str, query: dict[str, object]) -> bytes:
    """The registry's answer to ``query`` on ``subject``.

    Raises:
        AskError: no Mixer running there, the hub unreachable, or no answer in time.
    """
    if not running(data_dir):
        raise AskError(f"no mixer running: data_dir={data_dir}")
    try:
        url = json.loads((data_dir / "state.json").read_text())["hub_url"]
        password = json.loads((data_dir / "nats-users.json").read_text())["admin"]
    except (OSError, ValueError, KeyError) as exc:
        raise AskError(f"cannot read the running Mixer's files in {data_dir}: {exc}") from None
    return asyncio.run(_request(url, password, subject, json.dumps(query).encode()))


async def _request(url: str, password: str, subject: str, data: bytes) -> bytes:
    import nats

    try:
        nc = await nats.connect(url, user="admin", password=password, connect_timeout=2,
                                max_reconnect_attempts=0)
    except Exception as exc:
        raise AskError(f"cannot reach the hub at {url}: {exc}") from None
    try:
        reply = await nc.request(subject, data, timeout=ASK_TIMEOUT)
    except Exception as exc:
        raise AskError(f"the registry did not answer {subject} within {ASK_TIMEOUT} s: "
                       f"{type(exc).__name__}") from None
    finally:
        await nc.close()
    return reply.data
