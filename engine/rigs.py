"""The rig files shipped with fluxrig (``configs/*.yaml``), wherever fluxrig is installed.

In a checkout (or an editable install) they are the repository's ``configs/``, used in place.
A wheel carries them as ``engine/configs`` (``setup.py`` copies them there), inside
site-packages, which may be read-only and is no place for a rack's data dir (the rigs say
``data_dir: ../var/<rack>``, relative to the rig file). So an installed rig is copied to
``$XDG_STATE_HOME/fluxrig/configs`` (``~/.local/state/fluxrig/configs`` by default) and used
from there: its rack keeps its data under ``.../fluxrig/var/<rack>``, the same layout as the
repository's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT_CONFIGS = _PACKAGE.parent / "configs"
_PACKAGED_CONFIGS = _PACKAGE / "configs"


def state_dir() -> Path:
    """Where an installed fluxrig keeps its copies of the shipped rigs and their data."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fluxrig"


def shipped_rig(name: str) -> Path:
    """The path to run the shipped rig file ``name`` (``iso8583-switch.yaml``) from.

    The checkout's ``configs/<name>`` when fluxrig runs from a checkout; otherwise the
    packaged copy, refreshed into ``state_dir()/configs`` when it differs, so a demo runs the
    rig that was shipped with this version.

    Raises:
        FileNotFoundError: no rig of that name is shipped (the message lists where it looked).
    """
    checkout = _CHECKOUT_CONFIGS / name
    if checkout.is_file() and (_PACKAGE.parent / "pyproject.toml").is_file():
        return checkout
    packaged = _PACKAGED_CONFIGS / name
    if not packaged.is_file():
        raise FileNotFoundError(f"shipped rig not found: name={name}, looked in "
                                f"{_CHECKOUT_CONFIGS} and {_PACKAGED_CONFIGS}")
    copy = state_dir() / "configs" / name
    if not copy.is_file() or copy.read_bytes() != packaged.read_bytes():
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(packaged, copy)
    return copy
