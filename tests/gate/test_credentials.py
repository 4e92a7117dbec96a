"""Credential extraction for cookies and API keys, and the CSRF token that goes with a cookie."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from wardgate import apikeys
from wardgate.errors import AuthenticationRequired, CsrfFailed
from wardgate.gate.credentials import (
    CSRF_HEADER,
    Credential,
    CredentialSource,
    check_csrf,
    csrf_token,
    extract_credential,
)


def extract(
    allow_query: bool = False, query: dict[str, str] | None = None, **headers: str
) -> Credential | None:
    return extract_credential(
        CIMultiDict({k.replace("_", "-"): v for k, v in headers.items()}),
        query or {},
        allow_query=allow_query,
    )


def test_cookie_and_api_key_sources() -> None:
    cookie = apikeys.new_cookie_value()
    key = apikeys.new_api_key()
    found = extract(Cookie=f"theme=dark; wardgate_session={cookie}; other=1")
    assert found == Credential(cookie, CredentialSource.COOKIE)
    assert extract(X_API_Key=f" {key} ") == Credential(key, CredentialSource.API_KEY_HEADER)
    # Order: the cookie comes before X-API-Key; Authorization before both.
    assert extract(Cookie=f"wardgate_session={cookie}", X_API_Key=key) == Credential(
        cookie, CredentialSource.COOKIE
    )
    both = extract(Authorization=f"Bearer {key}", Cookie=f"wardgate_session={cookie}")
    assert both == Credential(key, CredentialSource.AUTHORIZATION)
    assert extract(Cookie="wardgate_session_x=1; xwardgate_session=2") is None


def test_query_api_key_only_when_enabled() -> None:
    key = apikeys.new_api_key()
    with pytest.raises(AuthenticationRequired):
        extract(query={"apiKey": key})
    assert extract(True, {"apiKey": key}) == Credential(key, CredentialSource.QUERY)


def test_csrf_token_is_bound_to_the_cookie() -> None:
    a, b = apikeys.new_cookie_value(), apikeys.new_cookie_value()
    assert csrf_token(a) == csrf_token(a)
    assert csrf_token(a) != csrf_token(b)
    assert a not in csrf_token(a)
    assert len(csrf_token(a)) == 43


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_state_changing_cookie_requests_need_the_token(method: str) -> None:
    cookie = apikeys.new_cookie_value()
    credential = Credential(cookie, CredentialSource.COOKIE)
    with pytest.raises(CsrfFailed):
        check_csrf(method, CIMultiDict(), credential)
    with pytest.raises(CsrfFailed):
        check_csrf(method, CIMultiDict({CSRF_HEADER: csrf_token(apikeys.new_cookie_value())}), credential)
    check_csrf(method, CIMultiDict({CSRF_HEADER.lower(): csrf_token(cookie)}), credential)


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_safe_methods_and_header_credentials_need_no_token(method: str) -> None:
    check_csrf(method, CIMultiDict(), Credential(apikeys.new_cookie_value(), CredentialSource.COOKIE))
    check_csrf("POST", CIMultiDict(), Credential(apikeys.new_api_key(), CredentialSource.API_KEY_HEADER))
    check_csrf("POST", CIMultiDict(), None)


@given(st.text(max_size=60))
def test_no_guessed_header_passes(guess: str) -> None:
    cookie = apikeys.new_cookie_value()
    if guess == csrf_token(cookie):
        return
    with pytest.raises(CsrfFailed):
        check_csrf("POST", CIMultiDict({CSRF_HEADER: guess}), Credential(cookie, CredentialSource.COOKIE))
