"""Dead-letter files: what a gear could not handle, kept for diagnosis without card numbers."""

from __future__ import annotations

from types import SimpleNamespace

import cbor2

from engine.frame import Frame, decode, encode, uuid7
from engine.worker import DeadLetters

PAN = "4761739001010119"


def _letters(tmp_path) -> tuple[DeadLetters, list]:
    rt = SimpleNamespace(data_dir=str(tmp_path))
    spec = SimpleNamespace(gear=SimpleNamespace(name="map"), pipeline="p", role="stage")
    return DeadLetters(rt, spec), []  # type: ignore[arg-type]


def _read(tmp_path) -> tuple[bytes, list[dict]]:
    raw = (tmp_path / "deadletter" / "p.map.cbor").read_bytes()
    out, rest = [], raw
    import io

    fh = io.BytesIO(raw)
    while fh.tell() < len(rest):
        out.append(cbor2.load(fh))
    return raw, out


def test_card_numbers_are_masked_in_every_part_of_a_dead_letter(tmp_path):
    dead, _ = _letters(tmp_path)
    frame = Frame(id=uuid7(), ts=5, src=f"http:{PAN}", kind="k",
                  headers={"card": PAN, PAN: "key"},
                  body={"pan": PAN, "spaced": "4761 7390 0101 0119", "num": int(PAN),
                        "raw": f"DE2=16{PAN}".encode(), "list": [PAN], "amount": 125})
    dead.put(encode(frame), ValueError(f"bad field: {PAN}"))
    dead.put(f"garbage {PAN} garbage".encode(), "not a frame")
    raw, letters = _read(tmp_path)
    assert PAN.encode() not in raw and b"4761 7390 0101 0119" not in raw
    assert letters[0]["error"] == "ValueError: bad field: 476173******0119"
    kept = decode(letters[0]["frame"])
    assert kept.id == frame.id and kept.ts == 5
    assert kept.body["pan"] == "476173******0119"
    assert kept.body["amount"] == 125 and kept.body["num"] == "476173******0119"
    assert kept.body["raw"] == b"DE2=16476173******0119"
    assert kept.headers == {"card": "476173******0119", "476173******0119": "key"}
    assert letters[1]["frame"] == b"garbage 476173******0119 garbage"


def test_a_frame_without_card_numbers_is_kept_as_it_was(tmp_path):
    dead, _ = _letters(tmp_path)
    frame = Frame(id=uuid7(), ts=1, src="s", kind="k", headers={"a": 1},
                  body={"b": b"\x00\x01", "n": 12345678901, "t": "x"})
    dead.put(encode(frame), "why")
    _, letters = _read(tmp_path)
    assert letters[0]["frame"] == encode(frame)


def test_numbers_that_could_be_card_numbers_are_masked_in_any_form(tmp_path):
    dead, _ = _letters(tmp_path)
    frame = Frame(id=uuid7(), ts=1, src="s", kind="k", headers={},
                  body={"f": float(PAN), "neg": -int(PAN), "big": 10**4000, "t": (PAN, 1)})
    dead.put(encode(frame), "why")
    raw, letters = _read(tmp_path)
    kept = decode(letters[0]["frame"])
    assert kept.body["f"] == "476173******0119" and kept.body["neg"] == "-476173******0119"
    assert kept.body["big"] == 10**4000 and kept.body["t"] == ["476173******0119", 1]


def test_a_frame_that_cannot_be_walked_or_encoded_is_kept_by_id_and_reason(tmp_path):
    dead, _ = _letters(tmp_path)
    cycle: list = []
    cycle.append(cycle)  # a CBOR shared reference decodes to this
    looped = Frame(id=uuid7(), ts=1, src="s", kind="k", headers={}, body={"c": cycle})
    odd = Frame(id=uuid7(), ts=1, src="s", kind="k", headers={}, body={"o": object()})
    dead.put(looped, ValueError(f"bad {PAN}"))  # neither may raise: the lane goes on
    dead.put(odd, "why")
    _, letters = _read(tmp_path)
    kept = decode(letters[0]["frame"])  # the cycle cut where the walk stops
    assert kept.id == looped.id and "<nested too deep>" in repr(kept.body)
    assert letters[0]["error"] == "ValueError: bad 476173******0119"
    assert letters[1]["frame_id"] == odd.id and letters[1]["frame"] is None
    assert letters[1]["error"].startswith("why; not kept: ")
