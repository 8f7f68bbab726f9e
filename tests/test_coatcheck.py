"""gears.coatcheck: tokens, Luhn, sealing, key files and rotation."""

from __future__ import annotations

import base64
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gears.coatcheck import ENV_KEY, KeyRing, VaultError, luhn_valid, make_token, rotate


@pytest.mark.parametrize(("digits", "valid"), [
    ("4761739001010119", True), ("4761739001010118", False), ("5500000000000004", True),
    ("6011000990139424", True), ("79927398713", True), ("79927398710", False), ("0", True),
])
def test_luhn_table(digits, valid):
    assert luhn_valid(digits) is valid


@settings(max_examples=500)
@given(st.text("0123456789", min_size=13, max_size=19))
def test_token_keeps_length_bin_and_last4_and_always_fails_luhn(pan):
    token = make_token(pan)
    assert len(token) == len(pan) and token.isdigit()
    assert token[:6] == pan[:6] and token[-4:] == pan[-4:]
    assert not luhn_valid(token)


def test_tokens_of_one_pan_differ():
    pan = "4761739001010119"
    assert len({make_token(pan) for _ in range(50)}) > 40


def test_short_values_get_an_all_random_token_failing_luhn():
    for value in ("1234", "123456789012"):
        token = make_token(value)
        assert len(token) == len(value) and not luhn_valid(token)


def test_key_file_is_created_0600_and_seal_open_round_trip(tmp_path):
    path = tmp_path / "keys" / "vault.keys"
    ring = KeyRing.load_or_create(path, env={})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    clear = {"2": "4761739001010119", "35": "4761739001010119=2712101"}
    sealed = ring.seal("476173123456780119", clear)
    assert b"4761739001010119" not in sealed and b"476173" not in sealed
    assert ring.open("476173123456780119", sealed) == clear
    assert KeyRing.load_or_create(path, env={}).open("476173123456780119", sealed) == clear


def test_a_blob_does_not_open_under_another_token_or_when_tampered(tmp_path):
    ring = KeyRing.load_or_create(tmp_path / "k", env={})
    sealed = ring.seal("tokenA", {"2": "4761739001010119"})
    with pytest.raises(VaultError) as exc:
        ring.open("tokenB", sealed)
    assert str(exc.value) == "sealed value does not open: token=tokenB, key_id=k1"
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(VaultError):
        ring.open("tokenA", bytes(tampered))


def test_rotation_new_entries_use_the_new_key_old_ones_stay_readable(tmp_path):
    path = tmp_path / "vault.keys"
    ring = KeyRing.load_or_create(path, env={})
    old = ring.seal("t1", {"2": "4761739001010119"})
    assert rotate(path) == "k2"
    ring2 = ring.reload_if_changed()
    assert ring2 is not ring and ring2.current == "k2"
    assert ring2.open("t1", old) == {"2": "4761739001010119"}
    new = ring2.seal("t2", {"2": "5500000000000004"})
    with pytest.raises(VaultError) as exc:
        ring.open("t2", new)  # the old ring never heard of k2
    assert str(exc.value) == "unknown vault key id: token=t2"
    assert ring2.reload_if_changed() is ring2


def test_key_from_environment(tmp_path):
    key = base64.b64encode(b"\x01" * 32).decode()
    ring = KeyRing.load_or_create(tmp_path / "unused", env={ENV_KEY: key})
    assert ring.current == "env" and not (tmp_path / "unused").exists()
    with pytest.raises(VaultError) as exc:
        KeyRing.load_or_create(tmp_path / "unused", env={ENV_KEY: "%%%"})
    assert str(exc.value) == f"{ENV_KEY} is not base64"


def test_bad_key_file(tmp_path):
    path = tmp_path / "vault.keys"
    path.write_text("{not json")
    with pytest.raises(VaultError) as exc:
        KeyRing.load_or_create(path, env={})
    assert str(exc.value) == f"bad vault key file: path={path}, error=JSONDecodeError"


def _make_ring(path, conn):
    conn.send(KeyRing.load_or_create(path, env={}).keys)


def test_replicas_starting_together_agree_on_one_key_file(tmp_path):
    from conftest import FORK

    path = tmp_path / "vault.keys"
    pipes = [FORK.Pipe(duplex=False) for _ in range(6)]
    procs = [FORK.Process(target=_make_ring, args=(path, tx)) for _, tx in pipes]
    for p in procs:
        p.start()
    keys = [rx.recv() for rx, _ in pipes]
    for p in procs:
        p.join(10)
    assert all(p.exitcode == 0 for p in procs)
    assert all(k == keys[0] for k in keys)  # nobody generated a key of its own
    assert sorted(x.name for x in tmp_path.iterdir()) == ["vault.keys"]  # no temp files left


def _luhn_textbook(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return total % 10 == 0


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="0123456789", min_size=1, max_size=24))
def test_luhn_agrees_with_the_textbook_loop(digits):
    assert luhn_valid(digits) == _luhn_textbook(digits)


def test_nonces_never_repeat_within_a_process_or_across_forks(tmp_path):
    from conftest import FORK
    from engine.cbor import loads

    ring = KeyRing.load_or_create(tmp_path / "keys")
    mine = {loads(ring.seal("t", {"2": "1"}))["n"] for _ in range(1000)}
    assert len(mine) == 1000
    reader, writer = os.pipe()

    def child():
        os.write(writer, loads(ring.seal("t", {"2": "1"}))["n"])
        os._exit(0)

    procs = [FORK.Process(target=child) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    theirs = {os.read(reader, 12) for _ in procs}
    assert len(theirs) == 4 and not theirs & mine  # each child drew its own nonce field
