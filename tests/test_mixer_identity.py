"""nkeys made with cryptography (fixed vector checked against nkeys 0.2.1) and passports:
round trip, and refusals that name the file and key."""

from __future__ import annotations

import json
import os

import pytest

from engine.identity import (
    IdentityError,
    Passport,
    decode_seed,
    encode_seed,
    new_seed,
    public_key,
    read_passport,
    write_passport,
)

# docs/mixer-design.md section 1: seed bytes 00..1f, cross-checked against nkeys 0.2.1
VECTOR_SEED = "SUAAAAICAMCAKBQHBAEQUCYMBUHA6EARCIJRIFIWC4MBSGQ3DQOR4H776Y"
VECTOR_PUBLIC = "UAB2CB576PHBBPQ5ODORRZ2LYCMWPZGWGCN2KDK7DXOIMZASKUY3RLKK"


def test_the_fixed_vector():
    assert encode_seed(bytes(range(32))) == VECTOR_SEED
    assert decode_seed(VECTOR_SEED) == bytes(range(32))
    assert public_key(VECTOR_SEED) == VECTOR_PUBLIC


def test_new_seeds_round_trip_and_differ():
    a, b = new_seed(), new_seed()
    assert a != b and a.startswith("SU") and public_key(a).startswith("U")
    assert encode_seed(decode_seed(a)) == a


@pytest.mark.parametrize(("seed", "message"), [
    (VECTOR_SEED[:-1] + ("A" if VECTOR_SEED[-1] != "A" else "B"), "bad checksum"),
    ("SA" + VECTOR_SEED[2:], "bad checksum|not a user seed"),
    (encode_seed(bytes(32))[:-8], "expected 36 bytes"),
    ("not*base32", "not base32"),
])
def test_bad_seeds_are_refused(seed, message):
    with pytest.raises(IdentityError, match=message):
        decode_seed(seed)


def _passport(**kw) -> Passport:
    base = {"rack": "rack-a", "hub": ("tls://127.0.0.1:7422",), "nkey_seed": VECTOR_SEED,
            "ca": "-----BEGIN CERTIFICATE-----\n...", "issued": "2026-11-28T04:00:00Z",
            "labels": {"site": "lab"}}
    base.update(kw)
    return Passport(**base)


def test_a_passport_round_trips_with_mode_0600_and_is_never_overwritten(tmp_path):
    path = tmp_path / "rack-a.passport"
    write_passport(path, _passport())
    assert os.stat(path).st_mode & 0o777 == 0o600
    got = read_passport(path)
    assert got == _passport() and got.public_key == VECTOR_PUBLIC
    with pytest.raises(IdentityError, match="refusing to overwrite a passport"):
        write_passport(path, _passport(rack="other"))


def test_a_passport_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "p"
    write_passport(path, _passport())
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match=r"passport readable by others \(mode 0o644"):
        read_passport(path)


@pytest.mark.parametrize(("change", "message"), [
    ({"format": "other"}, "format: expected 'fluxrig-passport/1'"),
    ({"hub": []}, "hub: expected a list of URLs"),
    ({"rack": ""}, "rack: expected a non-empty string"),
    ({"nkey_seed": VECTOR_SEED[:-2] + "AA"}, "nkey_seed: bad checksum"),
    ({"labels": {"a": 1}}, "labels: expected a mapping of strings"),
])
def test_a_broken_passport_names_its_file_and_key(tmp_path, change, message):
    path = tmp_path / "p"
    doc = json.loads(_passport().to_json())
    doc.update(change)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps(doc).encode())
    os.close(fd)
    with pytest.raises(IdentityError, match=f"{path}: {message}"):
        read_passport(path)
