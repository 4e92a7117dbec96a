"""The authority's API keys and browser sessions against a real SQLite store, on a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from wardgate.authority import TOUCH_INTERVAL, Authority, Principal
from wardgate.errors import InvalidRequest, InvalidToken, TokenExpired, TokenRevoked
from wardgate.keys import KeyRing, generate_key, key_id
from wardgate.roles import Scope
from wardgate.store.base import Revocations
from wardgate.store.sqlite import SqliteStore

IDLE, MAX = 3600, 4 * 3600


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def authority(tmp_path: Path, clock: Clock) -> AsyncIterator[Authority]:
    store = SqliteStore(tmp_path / "wardgate.db")
    await store.open()
    key = generate_key()
    ring = KeyRing(server_id="srv", active_kid=key_id(key), keys={key_id(key): key})
    authority = Authority(
        keys=ring,
        store=store,
        pairing_ttl=600,
        session_ttl=300,
        refresh_ttl=86400,
        cookie_idle_ttl=IDLE,
        cookie_max_ttl=MAX,
        clock=clock,
    )
    await authority.reload_revocations()
    yield authority
    await store.close()


async def test_api_key_authenticates_with_its_role_and_records_use_sparingly(
    authority: Authority, clock: Clock
) -> None:
    secret, key = await authority.create_api_key("ci", "viewer")
    principal = await authority.authenticate(secret)
    assert principal == Principal(kind="api_key", role="viewer", scopes=principal.scopes, key_id=key.id)
    assert Scope.PROXY_USE not in principal.scopes
    assert principal.key == f"key:{key.id}"
    first = (await authority.store.list_api_keys())[0].last_used_at
    assert first == clock.now
    clock.now += TOUCH_INTERVAL / 2
    await authority.authenticate(secret)
    assert (await authority.store.list_api_keys())[0].last_used_at == first
    clock.now += TOUCH_INTERVAL
    await authority.authenticate(secret)
    assert (await authority.store.list_api_keys())[0].last_used_at == clock.now


async def test_api_key_expiry_revocation_and_bad_input(authority: Authority, clock: Clock) -> None:
    secret, key = await authority.create_api_key("  short  ", "operator", ttl=60)
    assert key.name == "short"
    assert key.expires_at == clock.now + 60
    clock.now += 61
    with pytest.raises(TokenExpired):
        await authority.authenticate(secret)
    other, other_key = await authority.create_api_key("long", "admin")
    principal = await authority.authenticate(other)
    assert await authority.revoke_api_key(other_key.id)
    assert authority.principal_revoked(principal)
    assert not await authority.revoke_api_key(other_key.id)
    with pytest.raises(TokenRevoked):
        await authority.authenticate(other)
    with pytest.raises(InvalidToken):
        await authority.authenticate("wgk_" + "x" * 43)
    with pytest.raises(InvalidRequest):
        await authority.create_api_key(" ", "viewer")
    with pytest.raises(InvalidRequest):
        await authority.create_api_key("x", "viewer", ttl=0)
    with pytest.raises(InvalidRequest):
        await authority.create_api_key("x", "root")


async def test_cookie_session_slides_and_stops_at_its_maximum(authority: Authority, clock: Clock) -> None:
    token, _ = await authority.issue_pairing()
    login = await authority.login(token, device_name=None, ip="127.0.0.1")
    started = clock.now
    assert login.session.expires_at == started + IDLE
    assert login.session.max_expires_at == started + MAX
    principal = await authority.authenticate(login.cookie)
    assert principal.kind == "cookie"
    assert principal.device_id is not None
    assert principal.key == f"device:{principal.device_id}"
    # Used within the idle window, again and again: it lives until the maximum, not beyond.
    for _ in range(5):
        clock.now += IDLE - 10
        if clock.now >= started + MAX:
            break
        await authority.authenticate(login.cookie)
    clock.now = started + MAX + 1
    with pytest.raises(TokenExpired):
        await authority.authenticate(login.cookie)


async def test_idle_cookie_expires(authority: Authority, clock: Clock) -> None:
    token, _ = await authority.issue_pairing()
    login = await authority.login(token, device_name="laptop", ip=None)
    clock.now += IDLE + 1
    with pytest.raises(TokenExpired):
        await authority.authenticate(login.cookie)


async def test_cookie_dies_with_its_device_family_key_or_revoke_all(
    authority: Authority, clock: Clock
) -> None:
    token, _ = await authority.issue_pairing()
    by_device = await authority.login(token, device_name=None, ip=None)
    principal = await authority.authenticate(by_device.cookie)
    assert principal.device_id is not None
    await authority.store.revoke_device(principal.device_id, now=clock.now)
    with pytest.raises(TokenRevoked):
        await authority.authenticate(by_device.cookie)

    secret, key = await authority.create_api_key("svc", "operator", ttl=600)
    by_key = await authority.login(secret, device_name=None, ip=None)
    # A key that ends sooner than the cookie maximum ends the browser session with it.
    assert by_key.session.max_expires_at == clock.now + 600
    assert by_key.session.expires_at == clock.now + 600
    keyed = await authority.authenticate(by_key.cookie)
    assert (keyed.key_id, keyed.device_id) == (key.id, None)
    await authority.store.revoke_api_key(key.id, now=clock.now)
    with pytest.raises(TokenRevoked):
        await authority.authenticate(by_key.cookie)

    token, _ = await authority.issue_pairing()
    survivor = await authority.login(token, device_name=None, ip=None)
    live = await authority.authenticate(survivor.cookie)
    clock.now += 5
    await authority.store.revoke_all(now=clock.now)
    await authority.reload_revocations()
    assert authority.principal_revoked(live)
    with pytest.raises(TokenRevoked):
        await authority.authenticate(survivor.cookie)


async def test_logout_revokes_only_that_session(authority: Authority) -> None:
    secret, _ = await authority.create_api_key("svc", "operator")
    one = await authority.login(secret, device_name=None, ip=None)
    two = await authority.login(secret, device_name=None, ip=None)
    principal = await authority.authenticate(one.cookie)
    assert await authority.logout(principal)
    assert authority.principal_revoked(principal)
    with pytest.raises(TokenRevoked):
        await authority.authenticate(one.cookie)
    assert (await authority.authenticate(two.cookie)).kind == "cookie"
    assert not await authority.logout(await authority.authenticate(secret))


async def test_login_refuses_what_is_not_a_pairing_token_or_key(authority: Authority) -> None:
    session, _ = authority.issue_session("dev_x", "operator", None)
    for token in (session, "garbage", "wgc_" + "a" * 43):
        with pytest.raises(InvalidToken):
            await authority.login(token, device_name=None, ip=None)
    pairing, _ = await authority.issue_pairing()
    await authority.login(pairing, device_name=None, ip=None)
    with pytest.raises(InvalidToken):
        await authority.login(pairing, device_name=None, ip=None)


async def test_a_store_that_lost_its_data_forgets_no_revocation_and_no_used_code(
    authority: Authority, tmp_path: Path
) -> None:
    """Simulates a Redis restarted without persistence: the revision and everything else go back."""
    used, _ = await authority.issue_pairing()
    unused, _ = await authority.issue_pairing()
    await authority.login(used, device_name=None, ip=None)
    secret, key = await authority.create_api_key("svc", "operator")
    principal = await authority.authenticate(secret)
    await authority.revoke_api_key(key.id)
    assert authority.principal_revoked(principal)
    before = authority.revoked.revision
    # The data is gone: a fresh, empty store file behind the same authority.
    await authority.store.close()
    authority.store = SqliteStore(tmp_path / "fresh.db")
    await authority.store.open()
    await authority.reload_revocations()
    assert authority.revoked.revision < before
    assert authority.principal_revoked(principal)  # still revoked
    for token in (used, unused):  # no code from before the loss works again
        with pytest.raises(InvalidToken):
            await authority.verify_pairing(token)
    fresh, _ = await authority.issue_pairing()
    assert (await authority.verify_pairing(fresh)).gen == 1


async def test_revoke_all_in_the_second_of_a_login_ends_that_session(
    authority: Authority, clock: Clock
) -> None:
    clock.now = 1_900_000_100.7
    secret, _ = await authority.create_api_key("svc", "operator")
    login = await authority.login(secret, device_name=None, ip=None)
    principal = await authority.authenticate(login.cookie)
    clock.now = 1_900_000_100.9
    await authority.store.revoke_all(now=clock.now)
    await authority.reload_revocations()
    assert authority.principal_revoked(principal)
    with pytest.raises(TokenRevoked):
        await authority.authenticate(login.cookie)


async def test_cookie_and_key_principals_carry_their_end(authority: Authority, clock: Clock) -> None:
    secret, key = await authority.create_api_key("svc", "operator", ttl=120)
    assert (await authority.authenticate(secret)).expires_at == key.expires_at
    login = await authority.login(secret, device_name=None, ip=None)
    assert (
        (await authority.authenticate(login.cookie)).expires_at
        == login.session.max_expires_at
        == key.expires_at
    )
    forever, _ = await authority.create_api_key("svc2", "operator")
    assert (await authority.authenticate(forever)).expires_at is None


class LateReader(SqliteStore):
    """A real store whose next revocations read answers only once ``release`` is set."""

    release: asyncio.Event | None = None

    async def revocations(self, now: float) -> Revocations:
        fresh = await super().revocations(now)
        release, self.release = self.release, None
        if release is not None:
            await release.wait()
        return fresh


async def test_a_reload_answered_after_a_later_one_does_not_look_like_the_store_going_back(
    tmp_path: Path, clock: Clock
) -> None:
    store = LateReader(tmp_path / "wardgate.db")
    await store.open()
    key = generate_key()
    ring = KeyRing(server_id="srv", active_kid=key_id(key), keys={key_id(key): key})
    authority = Authority(
        keys=ring, store=store, pairing_ttl=600, session_ttl=300, refresh_ttl=86400, clock=clock
    )
    try:
        await authority.reload_revocations()
        pairing, _ = await authority.issue_pairing()
        _, session = authority.issue_session("dev_a", "operator", None)
        store.release = release = asyncio.Event()
        stale = asyncio.create_task(authority.reload_revocations())  # reads now, answers late
        await asyncio.sleep(0.05)
        revoking = asyncio.create_task(authority.revoke_session(session))  # a newer revision
        await asyncio.wait({revoking}, timeout=0.5)
        release.set()
        await asyncio.gather(stale, revoking)
        # Taking the late answer for a store that went back in time would have invalidated
        # every pairing code issued so far.
        assert (await authority.verify_pairing(pairing)).jti
        assert authority.session_revoked(session)
    finally:
        await store.close()
