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
