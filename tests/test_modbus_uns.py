"""gears.modbus.uns: the names a UNS path may have, its subject and KV key."""

from __future__ import annotations

import pytest

from gears.modbus.uns import (
    LEVELS,
    UnsNameError,
    check_name,
    path_from_subject,
    path_of,
    subject_of,
)

GOOD = {"enterprise": "Acme", "site": "Lyon", "area": "Press-Shop", "line": "L7",
        "cell": "cell_2", "device": "PLC1", "tag": "MotorTemp"}


def test_a_path_keeps_case_and_order() -> None:
    p = path_of(GOOD)
    assert p == "Acme.Lyon.Press-Shop.L7.cell_2.PLC1.MotorTemp"
    assert subject_of(p) == "uns.v1." + p and path_from_subject(subject_of(p)) == p


@pytest.mark.parametrize("name, why", [
    ("a.b", "a dot separates levels"), ("a b", "spaces are not allowed"),
    ("a*", "wildcards are not allowed"), ("a>", "wildcards are not allowed"),
    ("", "letters, digits, _ and - only"), ("x" * 65, "letters, digits, _ and - only"),
    ("température", "letters, digits, _ and - only"), (7, "letters, digits"),
])
def test_bad_names_say_why(name: object, why: str) -> None:
    with pytest.raises(UnsNameError, match=why):
        check_name(name, "tag")


def test_every_level_is_required() -> None:
    for level in LEVELS:
        levels = {k: v for k, v in GOOD.items() if k != level}
        with pytest.raises(UnsNameError, match=f"UNS {level} missing"):
            path_of(levels)
