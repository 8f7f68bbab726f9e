"""gears.iso8583.codec: built-in and YAML specs; FieldIndex equals pyiso8583 on every spec."""

from __future__ import annotations

import iso8583
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gears.iso8583.codec import (
    BUILTIN_SPECS,
    CodecError,
    FieldIndex,
    decode,
    encode,
    spec_by_name,
    spec_from_mapping,
)

PAN = "4761739001010119"
REQ = {
    "t": "0100", "2": PAN, "3": "000000", "4": "000000010000", "7": "1127153000",
    "11": "000123", "12": "153000", "13": "1127", "14": "2712", "18": "5411", "22": "051",
    "25": "00", "37": "ABC123456789", "41": "TERM0001", "42": "MERCHANT0000001",
    "49": "840",
}
WANTED = ("2", "3", "4", "11", "37", "39", "41", "49")


@pytest.mark.parametrize("name", BUILTIN_SPECS)
def test_every_builtin_spec_round_trips_a_0100_through_pyiso8583(name):
    spec = spec_by_name(name)
    raw = encode(REQ, spec)
    doc = decode(raw, spec)
    for key, value in REQ.items():
        assert doc[key] == value, key


@pytest.mark.parametrize("name", BUILTIN_SPECS)
def test_field_index_reads_what_pyiso8583_decodes(name):
    spec = spec_by_name(name)
    raw = encode(REQ, spec)
    mti, fields = FieldIndex(spec, WANTED).read(raw)
    assert mti == "0100"
    assert fields == {k: REQ[k] for k in WANTED if k in REQ}


def test_bcd_spec_packs_numeric_fields_and_ebcdic_uses_cp500():
    bcd = encode({"t": "0800", "11": "000001", "70": "301"}, spec_by_name("bcd"))
    assert bcd[:2] == b"\x08\x00"  # MTI as 2 BCD bytes
    assert bcd.endswith(b"\x00\x00\x01" + b"\x03\x01")  # DE11 BCD, DE70 "301" left-padded
    ebc = encode({"t": "0800", "11": "000001"}, spec_by_name("ebcdic"))
    assert ebc[:4] == "0800".encode("cp500") and ebc.endswith("000001".encode("cp500"))


# -- property: FieldIndex == pyiso8583 on random documents, every spec ----------------------

_DIGITS = "0123456789"
_TEXT = _DIGITS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ abc-"


@st.composite
def documents(draw, spec):
    doc = {"t": draw(st.sampled_from(["0100", "0110", "0200", "0210", "0400", "0800"]))}
    keys = draw(st.sets(st.sampled_from(
        ["2", "3", "4", "7", "11", "12", "22", "32", "35", "37", "38", "39", "41", "42", "43",
         "48", "49", "52", "55", "70", "90", "102"]), max_size=12))
    for key in keys:
        f = spec[key]
        nibbles = f.get("len_count") == "nibbles"
        max_len = f["max_len"]
        size = max_len if f["len_type"] == 0 else draw(st.integers(0 if not nibbles else 1,
                                                                   min(max_len, 40)))
        if f["data_enc"] == "b" and not nibbles:
            doc[key] = draw(st.binary(min_size=size, max_size=size)).hex().upper()
        elif nibbles:
            doc[key] = draw(st.text(_DIGITS, min_size=size, max_size=size))
        else:
            doc[key] = draw(st.text(_TEXT, min_size=size, max_size=size))
    return doc


@pytest.mark.parametrize("name", BUILTIN_SPECS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_field_index_equals_pyiso8583_on_random_messages(name, data):
    spec = spec_by_name(name)
    doc = data.draw(documents(spec))
    try:
        raw, _ = iso8583.encode(dict(doc), spec)
    except iso8583.EncodeError:
        return  # a document pyiso8583 itself refuses (e.g. binary field length rules)
    want, _ = iso8583.decode(bytes(raw), spec)
    keys = [k for k in want if k not in ("t", "p", "1", "h")]
    mti, got = FieldIndex(spec, keys).read(bytes(raw))
    assert mti == want["t"]
    assert got == {k: want[k] for k in keys}


@pytest.mark.parametrize("name", BUILTIN_SPECS)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_field_index_fails_where_pyiso8583_fails_on_truncation(name, data):
    spec = spec_by_name(name)
    raw = encode(REQ, spec)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(iso8583.DecodeError):
        iso8583.decode(raw[:cut], spec)
    with pytest.raises(CodecError):
        FieldIndex(spec, WANTED).read(raw[:cut])


def test_decode_errors_name_field_and_offset_but_no_data():
    spec = spec_by_name("default")
    raw = encode(REQ, spec)
    bad = raw[:12] + b"X9" + raw[14:]  # DE2's length prefix is at offset 12
    with pytest.raises(CodecError) as exc:
        decode(bad, spec)
    assert exc.value.field == "2" and exc.value.offset == 12
    assert "field=2, offset=12" in str(exc.value)
    with pytest.raises(CodecError) as exc:
        FieldIndex(spec, WANTED).read(bad)
    assert str(exc.value) == "cannot decode: invalid length: field=2, offset=12"
    for text in (str(exc.value),):
        assert PAN not in text and PAN[:6] not in text


def test_yaml_spec_file_overrides_fields(tmp_path):
    path = tmp_path / "acme.yaml"
    path.write_text("base: default\nfields:\n  '48': {data_enc: ascii, len_enc: ascii, "
                    "len_type: 3, max_len: 20, desc: Acme private}\n")
    spec = spec_by_name(str(path))
    assert spec["48"]["max_len"] == 20
    raw = encode({"t": "0100", "48": "X" * 20}, spec)
    with pytest.raises(CodecError):
        encode({"t": "0100", "48": "X" * 21}, spec)
    assert decode(raw, spec)["48"] == "X" * 20


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"base": "nope"}, "<spec>: base: unknown spec 'nope' (built-in: default, default_ascii, bcd, ebcdic)"),
        ({"fields": {"200": {}}}, "<spec>: fields.200: field must be h, t, p or 1..128"),
        ({"fields": {"48": {"bogus": 1}}}, "<spec>: fields.48: expected keys among "
         "['data_enc', 'desc', 'left_pad', 'len_count', 'len_enc', 'len_type', 'max_len', "
         "'right_pad', 'sensitive', 'type']"),
        ({"fields": {"48": {"type": "x"}}}, "<spec>: fields.48.type: expected one of n, an, "
         "ans, z, b"),
        ({"fields": {"48": {"data_enc": "klingon"}}}, "<spec>: fields.48.data_enc: unknown encoding 'klingon'"),
        ({"fields": {"48": {"len_type": 9}}}, "<spec>: fields.48.len_type: expected 0..4"),
    ],
)
def test_bad_spec_files_are_refused_with_the_field(raw, message):
    with pytest.raises(CodecError) as exc:
        spec_from_mapping(raw)
    assert str(exc.value) == message


def test_unknown_spec_name():
    with pytest.raises(CodecError) as exc:
        spec_by_name("cobol")
    assert str(exc.value) == ("unknown spec 'cobol' (built-in: default, default_ascii, bcd, "
                              "ebcdic, or a .yaml spec file)")


@pytest.mark.parametrize("name", BUILTIN_SPECS)
@settings(max_examples=150, deadline=None)
@given(data=st.data(), de39=st.sampled_from(["00", "05", "91"]))
def test_respond_splices_the_same_bytes_pyiso8583_encodes(name, data, de39):
    spec = spec_by_name(name)
    doc = data.draw(documents(spec))
    doc["t"] = data.draw(st.sampled_from(["0100", "0200", "0400", "0800"]))
    try:
        raw, _ = iso8583.encode(dict(doc), spec)
    except iso8583.EncodeError:
        return
    want_doc, _ = iso8583.decode(bytes(raw), spec)
    want_doc = {k: v for k, v in want_doc.items() if k not in ("p", "1")}
    want_doc["t"] = doc["t"][:2] + str(int(doc["t"][2]) + 1) + doc["t"][3:]
    want_doc["39"] = de39
    want, _ = iso8583.encode(want_doc, spec)
    assert FieldIndex(spec, ()).respond(bytes(raw), de39) == bytes(want)
