"""Edge validation of acquirer requests: MTI, field types and lengths, PAN."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gears.iso8583.codec import spec_by_name, spec_from_mapping
from gears.iso8583.validate import (
    Rejection,
    Validator,
    field_type,
    mti_problem,
    pan_problem,
    response_mti,
)

FIELDS = ("2", "3", "4", "7", "11", "12", "13", "32", "35", "37", "41", "42", "49")
GOOD = {"2": "4761739001010119", "3": "000000", "4": "000000001000", "7": "1127153000",
        "11": "000001", "12": "153000", "13": "1127", "37": "112715300001", "41": "TERM 001",
        "42": "MERCHANT-0001  ", "49": "840"}


def _validator(spec="default", luhn=False) -> Validator:
    return Validator(spec_by_name(spec), FIELDS, required_card=("41", "11", "2", "3", "4"),
                     required_other=("41", "11"), pan_luhn=luhn)


@pytest.mark.parametrize(("mti", "problem"), [
    ("0100", None), ("0200", None), ("0120", None), ("0400", None), ("0800", None),
    ("0644", None), ("1100", None),
    ("ABCD", "not 4 digits"), ("010", "not 4 digits"), ("01000", "not 4 digits"),
    ("０１００", "not 4 digits"), ("0900", "unknown message class 9"),
    ("0000", "unknown message class 0"),
    ("0199", "function 9 is not a request, advice or notification"),
    ("0110", "function 1 is not a request, advice or notification"),
    ("0130", "function 3 is not a request, advice or notification"),
])
def test_mti_rules(mti, problem):
    assert mti_problem(mti) == problem


def test_response_mti_is_function_plus_one():
    assert [response_mti(m) for m in ("0100", "0200", "0420", "0800", "0644")] == [
        "0110", "0210", "0430", "0810", "0654"]


@pytest.mark.parametrize(("change", "expected"), [
    ({}, None),
    ({"2": "476173900101011X"}, Rejection("14", "2", "PAN is not digits")),
    ({"2": ""}, Rejection("14", "2", "empty PAN")),
    ({"2": "476173900101"}, Rejection("14", "2", "PAN length 12 outside 13..19")),
    ({"2": "47617390010101191234"}, Rejection("14", "2", "PAN length 20 outside 13..19")),
    ({"3": "00000A"}, Rejection("30", "3", "invalid characters for the field type")),
    ({"4": "+00000001000"}, Rejection("30", "4", "invalid characters for the field type")),
    ({"11": "00 001"}, Rejection("30", "11", "invalid characters for the field type")),
    ({"49": "USD"}, Rejection("30", "49", "invalid characters for the field type")),
    ({"37": "1127-5300001"}, Rejection("30", "37", "invalid characters for the field type")),
    ({"41": "TERM\n001"}, Rejection("30", "41", "invalid characters for the field type")),
    ({"41": "TERM\x1b[31m"}, Rejection("30", "41", "invalid characters for the field type")),
    ({"32": ""}, Rejection("30", "32", "empty variable-length field")),
    ({"32": "12345"}, None),
    ({"35": "4761739001010119=2712101"}, None),
    ({"35": "4761739001010119=27;2101"}, Rejection("30", "35",
                                                   "invalid characters for the field type")),
    ({"11": None}, Rejection("30", "11", "required field missing")),
    ({"41": None}, Rejection("30", "41", "required field missing")),
    ({"2": None}, Rejection("14", "2", "required field missing")),
])
def test_card_request_rules(change, expected):
    fields = {**GOOD, **change}
    fields = {k: v for k, v in fields.items() if v is not None}
    assert _validator().check("0100", fields) == expected


def test_other_classes_need_the_match_key_only_and_network_management_nothing():
    v = _validator()
    assert v.check("0600", {"11": "000001", "41": "T1"}) is None
    assert v.check("0600", {"11": "000001"}) == Rejection("30", "41", "required field missing")
    assert v.check("0800", {"70": "301"}) is None
    assert v.check("0800", {"11": "00000x"}) == Rejection(
        "30", "11", "invalid characters for the field type")
    assert v.check("0199", GOOD) == Rejection(
        None, "t", "invalid MTI: function 9 is not a request, advice or notification")


def test_luhn_is_checked_only_when_asked():
    bad = {**GOOD, "2": "4761739001010118"}
    assert _validator().check("0100", bad) is None
    assert _validator(luhn=True).check("0100", bad) == Rejection(
        "14", "2", "PAN fails the Luhn check")
    assert _validator(luhn=True).check("0100", GOOD) is None


def test_pan_problems():
    assert pan_problem("4761739001010119", True) is None
    assert pan_problem("٤761739001010119", False) == "PAN is not digits"  # Arabic-Indic 4


def test_types_come_from_the_spec_file_first(tmp_path):
    spec = spec_from_mapping({"base": "default", "fields": {
        "48": {"data_enc": "ascii", "len_enc": "ascii", "len_type": 3, "max_len": 99,
               "type": "n"},
        "49": {"type": "an"}}})
    assert field_type(spec, "48") == "n" and field_type(spec, "49") == "an"
    assert field_type(spec, "41") == "ans" and field_type(spec, "52") == "b"
    assert field_type(spec_by_name("bcd"), "4") == "n"
    v = Validator(spec, ("48", "49"), (), ())
    assert v.check("0600", {"48": "12a", "49": "USD"}) == Rejection(
        "30", "48", "invalid characters for the field type")
    assert v.check("0600", {"48": "123", "49": "USD"}) is None


def test_echoable_keeps_only_valid_fields():
    v = _validator()
    fields = {**GOOD, "4": "12X", "2": "12", "32": ""}
    out = v.echoable(fields)
    assert "4" not in out and "2" not in out and "32" not in out
    assert out["11"] == GOOD["11"] and out["41"] == GOOD["41"]


_values = st.one_of(st.text(alphabet="0123456789", max_size=20),
                    st.text(alphabet="0123456789 AZaz=D-\n\x1b\u0663", max_size=20))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), _values),
       st.sampled_from(["0100", "0200", "0400", "0600", "0800", "0110", "ABCD"]),
       st.booleans())
def test_the_compiled_check_agrees_with_the_general_rules(fields, mti, luhn):
    v = _validator(luhn=luhn)
    assert v.check(mti, fields) == v._check(mti, fields)
    assert v.check(mti, fields) == v._check(mti, fields)  # second time: from the cache
