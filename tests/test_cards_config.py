"""Card hashing and configuration loading: the two places secrets and
operator mistakes enter the engine."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authcore.cards import NO_PAN_HASH, PanHasher, load_or_create_key, luhn_valid, mask_pan
from authcore.config import Config, ConfigError


def luhn_complete(prefix: str) -> str:
    for d in "0123456789":
        if luhn_valid(prefix + d):
            return prefix + d
    raise AssertionError("unreachable")


@given(st.text(alphabet="0123456789", min_size=11, max_size=18))
def test_luhn_completion_is_valid_and_one_digit_change_is_not(prefix):
    pan = luhn_complete(prefix)
    assert luhn_valid(pan)
    wrong = pan[:-1] + str((int(pan[-1]) + 1) % 10)
    assert not luhn_valid(wrong)


@pytest.mark.parametrize("pan", ["", "4111", "411111111111111111111", "4111-1111-1111-1111", "٤١١١١١١١١١١١١١١١"])
def test_luhn_rejects_wrong_lengths_and_non_ascii_digits(pan):
    assert not luhn_valid(pan)


@given(st.binary(min_size=16, max_size=64), st.text(alphabet="0123456789", min_size=11, max_size=18))
def test_pan_hash_is_hmac_sha256_of_the_pan(key, prefix):
    pan = luhn_complete(prefix)
    assert PanHasher(key).digest(pan) == hmac.new(key, pan.encode(), hashlib.sha256).digest()


def test_invalid_pan_hashes_to_the_no_pan_marker_and_key_is_not_shown():
    h = PanHasher(b"s" * 32)
    assert h.digest("4111111111111112") == NO_PAN_HASH
    assert "s" * 8 not in repr(h)


def test_mask_keeps_six_and_four():
    assert mask_pan("4111111111111111") == "411111******1111"
    assert mask_pan("12345") == "*****"


def test_key_file_is_generated_private_and_stable(tmp_path):
    p = tmp_path / "d" / "pan.key"
    k1 = load_or_create_key(p)
    assert len(k1) == 32
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert load_or_create_key(p) == k1


def test_short_key_file_is_refused(tmp_path):
    p = tmp_path / "pan.key"
    p.write_bytes(b"short")
    with pytest.raises(ValueError, match="need at least 16"):
        load_or_create_key(p)


def test_config_defaults_match_spec():
    c = Config.default()
    assert c.hold_ttl_seconds == 604800
    assert c.durability.sync == "always"
    f = c.fraud
    assert (f.enabled, f.decline_score, f.review_score) == (True, 80, 50)
    assert (f.velocity.window_seconds, f.velocity.attempts, f.velocity.points) == (60, 10, 40)
    assert (f.card_testing.window_seconds, f.card_testing.attempts, f.card_testing.max_amount,
            f.card_testing.points) == (600, 5, 200, 60)
    assert (f.amount_spike.min_approved, f.amount_spike.min_amount, f.amount_spike.factor,
            f.amount_spike.points) == (5, 50_000, 10, 50)
    assert (f.impossible_travel.window_seconds, f.impossible_travel.points) == (3600, 50)
    assert (f.new_account.age_seconds, f.new_account.min_amount, f.new_account.points) == (86_400, 100_000, 30)
    assert set(f.risky_mcc.mccs) == {7995, 4829, 6051, 6211} and f.risky_mcc.points == 20
    assert (f.merchant_burst.window_seconds, f.merchant_burst.last_attempts, f.merchant_burst.declines,
            f.merchant_burst.points) == (600, 20, 10, 30)


def test_config_toml_round_trip(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(
        'hold_ttl_seconds = 60\n[durability]\nsync = "none"\n[fraud]\nenabled = false\n'
        "[fraud.velocity]\nattempts = 3\n[fraud.risky_mcc]\nmccs = [1234]\npoints = 5\n"
    )
    c = Config.from_toml(p)
    assert c.hold_ttl_seconds == 60 and c.durability.sync == "none" and not c.fraud.enabled
    assert c.fraud.velocity.attempts == 3 and c.fraud.velocity.window_seconds == 60
    assert c.fraud.risky_mcc.mccs == (1234,)


@pytest.mark.parametrize(
    "text, named",
    [
        ("holdttl = 5\n", "unknown configuration key: holdttl"),
        ("[fraud.velocity]\nwindow = 5\n", "unknown configuration key: fraud.velocity.window"),
        ("[fraud]\nenabled = 1\n", "fraud.enabled"),
        ('[durability]\nsync = "sometimes"\n', "durability.sync"),
        ("[fraud.velocity]\nattempts = 0\n", "fraud.velocity.attempts"),
        ('[fraud.risky_mcc]\nmccs = ["x"]\n', "fraud.risky_mcc.mccs"),
        ("hold_ttl_seconds = -1\n", "hold_ttl_seconds"),
        ("[durability]\nsnapshot_interval_records = 10\n", "renamed: use durability.snapshot_interval_requests"),
        ("[durability]\nsnapshot_interval_requests = -1\n", "durability.snapshot_interval_requests"),
        ("this is = not toml = \n", "c.toml"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, named):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        Config.from_toml(p)


def test_decision_dict_round_trip():
    c = Config.from_dict({"hold_ttl_seconds": 99, "fraud": {"decline_score": 70}})
    back = Config.from_decision_dict(Config.default(), c.decision_dict())
    assert back.decision_dict() == c.decision_dict()


def test_missing_key_is_refused_when_creation_is_not_allowed(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        load_or_create_key(tmp_path / "pan.key", may_create=False)
    assert not (tmp_path / "pan.key").exists()
