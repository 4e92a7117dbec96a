"""Opaque secrets: shape, uniqueness, and that the log redactor recognises them."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from wardgate import apikeys
from wardgate.logs import redact


def test_new_secrets_have_their_prefix_shape_and_are_unique() -> None:
    keys = {apikeys.new_api_key() for _ in range(200)}
    cookies = {apikeys.new_cookie_value() for _ in range(200)}
    assert len(keys) == len(cookies) == 200
    assert all(apikeys.well_formed(k, apikeys.API_KEY_PREFIX) for k in keys)
    assert all(apikeys.well_formed(c, apikeys.COOKIE_PREFIX) for c in cookies)
    # One kind never passes as the other.
    assert not any(apikeys.well_formed(k, apikeys.COOKIE_PREFIX) for k in keys)
    assert not any(apikeys.well_formed(c, apikeys.API_KEY_PREFIX) for c in cookies)


def test_ids_are_public_and_distinct_from_secrets() -> None:
    key_id = apikeys.new_id("key_")
    assert key_id.startswith("key_")
    assert len(key_id) == 4 + 16
    assert not apikeys.well_formed(key_id, apikeys.API_KEY_PREFIX)


@given(st.text(alphabet=string.ascii_letters + string.digits + "_-.=+/ ", max_size=60))
def test_only_the_exact_shape_is_well_formed(tail: str) -> None:
    value = "wgk_" + tail
    expected = len(tail) == 43 and all(c in string.ascii_letters + string.digits + "_-" for c in tail)
    assert apikeys.well_formed(value, apikeys.API_KEY_PREFIX) is expected


def test_well_formed_refuses_near_misses() -> None:
    good = apikeys.new_api_key()
    assert not apikeys.well_formed(good + "A", apikeys.API_KEY_PREFIX)
    assert not apikeys.well_formed(good[:-1], apikeys.API_KEY_PREFIX)
    assert not apikeys.well_formed(good + "\n", apikeys.API_KEY_PREFIX)
    assert not apikeys.well_formed(" " + good, apikeys.API_KEY_PREFIX)
    assert not apikeys.well_formed("WGK_" + good[4:], apikeys.API_KEY_PREFIX)


def test_the_redactor_removes_both_kinds() -> None:
    key, cookie = apikeys.new_api_key(), apikeys.new_cookie_value()
    text = f"X-API-Key: {key} Cookie: wardgate_session={cookie} body={{'k': '{key}'}}"
    cleaned = redact(text)
    assert key not in cleaned
    assert cookie not in cleaned
    assert key[4:12] not in cleaned
