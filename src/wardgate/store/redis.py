"""The shared store: Redis, for several wardgate instances behind one load balancer.

Same contract as :class:`~wardgate.store.sqlite.SqliteStore` (the reference
behaviour), so the rest of wardgate cannot tell the backends apart; the
contract tests in ``tests/store/test_contract.py`` run against both.

Atomicity. Every check-then-write step (redeeming a pairing nonce, rotating a
refresh token with reuse detection, revoking a device with its families or an
API key with its cookie sessions, upserting an agent run) is one Lua script,
which Redis runs without interleaving any other client's command: two instances
can never both redeem one pairing token or both rotate one refresh token. No
WATCH loops, no client-side locks. Scripts build the keys they touch from the
prefix, so this needs a standalone Redis (or a Sentinel-managed primary), not
Redis Cluster.

Layout, every key under ``prefix`` (default ``wardgate:``)::

    revision                    INCR counter; each bump is also PUBLISHed on <prefix>revocations
    pairing_generation, not_before
    nonce:<jti>                 consumed pairing nonce (value: its expiry); index zset nonce_expiry
    device:<id>                 hash; set devices; set revoked_devices; set device_families:<id>
    family:<id>                 hash; sets families, live_families; zset revoked_families (-> expires_at)
    refresh:<sha256>            hash (family_id, expires_at, used_at); index zset refresh_expiry
    revoked_tokens              zset jti -> expires_at
    api_key:<id>                hash (+ key_hash); api_key_hash:<sha256> -> id; zset api_keys
                                (-> created_at); set revoked_api_keys; zset api_key_expiry
                                (-> expires_at); set api_key_cookies:<id>
    cookie:<id>                 hash (+ session_hash); cookie_hash:<sha256> -> id; zset cookie_expiry
                                (-> max_expires_at); zset revoked_cookies (-> max_expires_at)
    agent:<id>                  hash; zset agent_sessions (-> -started_at, so ZRANGE is newest
                                first, ties by id); zset agent_output:<id> (seq -> JSON line)
    rate:<key>                  zset of hits (sliding-window rate limits)
    lease:<key>                 zset lease_id -> expiry (ms, server clock); hash lease_holder:<instance>

Time. Expiry decisions follow the ``now`` the caller passes, exactly as in
SQLite (so a test clock works the same on both). On top of that, data that
dies by itself carries a Redis TTL so that it is collected even if ``prune``
never runs: consumed nonces, refresh tokens, cookie sessions and the revoked
token index live until their own expiry plus :data:`EXPIRY_GRACE` (counted
from no earlier than the Redis server's clock), which covers clock skew
between instances. ``prune`` removes the same records by the caller's clock.
Leases use the Redis server's clock only, so instances with skewed clocks
still agree on which lease is alive.

Failure. Any connection failure, timeout, refused password or server error is
raised as :class:`~wardgate.errors.StoreUnavailable` with a fixed hint (never
the URL or the password): callers fail closed. Commands are never retried
automatically: a retried script that had already run (say a refresh-token
rotation whose reply was lost) would look like token reuse and revoke the
device. A connection broken by a Redis restart is replaced when it is next
taken from the pool, so the store recovers by itself once Redis is back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import fields
from typing import Any, Final, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import ConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from wardgate.errors import ConfigError, StoreUnavailable
from wardgate.store.base import (
    AgentOutputLine,
    AgentSessionRecord,
    ApiKey,
    CookieSession,
    Device,
    Family,
    NewRefresh,
    RedeemOutcome,
    Revocations,
    RotateOutcome,
    RotateResult,
    Store,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_PREFIX",
    "DEFAULT_SOCKET_TIMEOUT",
    "EXPIRY_GRACE",
    "UNAVAILABLE_LOG_INTERVAL",
    "RedisStore",
    "RevisionFeed",
    "StoreScript",
]

log = logging.getLogger(__name__)

DEFAULT_PREFIX: Final = "wardgate:"
DEFAULT_SOCKET_TIMEOUT: Final = 2.0
"""Seconds to wait for a reply before the store counts as unavailable."""
DEFAULT_CONNECT_TIMEOUT: Final = 2.0
"""Seconds to wait for a TCP (and TLS) connection to Redis."""
UNAVAILABLE_LOG_INTERVAL: Final = 10.0
"""Seconds between two "store unavailable" warnings while Redis stays away (no log flood)."""
EXPIRY_GRACE: Final = 3600
"""Seconds that expiring records outlive their expiry in Redis (clock skew between instances)."""

# --- Lua ---------------------------------------------------------------------------------
#
# Every script receives the key prefix as ARGV[1]. Numbers that are stored are passed as the
# strings Python formatted (repr of a float round-trips exactly) and stored as given: Lua's
# own number-to-string conversion keeps only 14 significant digits, so Lua compares numbers
# but never formats one that is kept.

_PRELUDE: Final = (
    "local GRACE = "
    + str(EXPIRY_GRACE)
    + "\n"
    + """
local P = ARGV[1]

local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Let `key` live at least until the absolute time `at_ms` (server clock); never shortens.
local function extend_to_ms(key, at_ms)
  if at_ms ~= at_ms or at_ms > 9e15 then return end
  local pttl = redis.call('PTTL', key)
  if pttl == -2 then return end
  local target = math.ceil(at_ms)
  if pttl >= 0 and server_ms() + pttl >= target then return end
  redis.call('PEXPIREAT', key, string.format('%d', target))
end

-- Let `key` live until `at` (unix seconds, the caller's clock) plus GRACE, counted from no
-- earlier than the server's own clock.
local function keep_until(key, at)
  local now_ms = server_ms()
  extend_to_ms(key, math.max(tonumber(at) * 1000, now_ms) + GRACE * 1000)
end

local function bump()
  local revision = redis.call('INCR', P .. 'revision')
  redis.call('PUBLISH', P .. 'revocations', revision)
  return revision
end

local function hset_from(key, first, count)
  if count > 0 then
    redis.call('HSET', key, unpack(ARGV, first, first + 2 * count - 1))
  end
  return first + 2 * count
end

local function revoke_family(family_id, now)
  local family = P .. 'family:' .. family_id
  if redis.call('EXISTS', family) == 0 or redis.call('HEXISTS', family, 'revoked_at') == 1 then
    return 0
  end
  redis.call('HSET', family, 'revoked_at', now)
  redis.call('SREM', P .. 'live_families', family_id)
  redis.call('ZADD', P .. 'revoked_families', redis.call('HGET', family, 'expires_at'), family_id)
  return 1
end

-- Revoke a device and all its families; bumps the revision even if nothing changed (as SQLite).
local function revoke_device(device_id, now)
  local device = P .. 'device:' .. device_id
  local changed = 0
  if redis.call('EXISTS', device) == 1 and redis.call('HEXISTS', device, 'revoked_at') == 0 then
    redis.call('HSET', device, 'revoked_at', now)
    redis.call('SADD', P .. 'revoked_devices', device_id)
    changed = 1
  end
  for _, family_id in ipairs(redis.call('SMEMBERS', P .. 'device_families:' .. device_id)) do
    revoke_family(family_id, now)
  end
  bump()
  return changed
end

local function revoke_cookie(cookie_id, now)
  local cookie = P .. 'cookie:' .. cookie_id
  if redis.call('EXISTS', cookie) == 0 or redis.call('HEXISTS', cookie, 'revoked_at') == 1 then
    return 0
  end
  redis.call('HSET', cookie, 'revoked_at', now)
  local max_expires_at = redis.call('HGET', cookie, 'max_expires_at')
  redis.call('ZADD', P .. 'revoked_cookies', max_expires_at, cookie_id)
  keep_until(P .. 'revoked_cookies', max_expires_at)
  return 1
end

local function insert_refresh(hash, family_id, expires_at)
  local key = P .. 'refresh:' .. hash
  redis.call('HSET', key, 'family_id', family_id, 'expires_at', expires_at)
  keep_until(key, expires_at)
  redis.call('ZADD', P .. 'refresh_expiry', expires_at, hash)
  keep_until(P .. 'refresh_expiry', expires_at)
end
"""
)

# ARGV: prefix, jti, generation, nonce_expires_at, device_id, family_id, refresh_hash,
# refresh_expires_at, n device pairs, pairs..., n family pairs, pairs...
_REDEEM_PAIRING: Final = """
local jti, device_id, family_id, hash = ARGV[2], ARGV[5], ARGV[6], ARGV[7]
if tonumber(ARGV[3]) ~= tonumber(redis.call('GET', P .. 'pairing_generation') or '0') then
  return 'stale_generation'
end
local nonce = P .. 'nonce:' .. jti
if redis.call('EXISTS', nonce) == 1 then return 'already_used' end
local device, family = P .. 'device:' .. device_id, P .. 'family:' .. family_id
if redis.call('EXISTS', device) == 1 or redis.call('EXISTS', family) == 1
    or redis.call('EXISTS', P .. 'refresh:' .. hash) == 1 then
  return redis.error_reply('wardgate: duplicate device, family or refresh token')
end
redis.call('SET', nonce, ARGV[4])
keep_until(nonce, ARGV[4])
redis.call('ZADD', P .. 'nonce_expiry', ARGV[4], jti)
keep_until(P .. 'nonce_expiry', ARGV[4])
local i = hset_from(device, 10, tonumber(ARGV[9]))
redis.call('HSET', device, 'seq', redis.call('INCR', P .. 'seq'))
redis.call('SADD', P .. 'devices', device_id)
if redis.call('HEXISTS', device, 'revoked_at') == 1 then
  redis.call('SADD', P .. 'revoked_devices', device_id)
end
hset_from(family, i + 1, tonumber(ARGV[i]))
redis.call('HSET', family, 'seq', redis.call('INCR', P .. 'seq'))
redis.call('SADD', P .. 'families', family_id)
redis.call('SADD', P .. 'device_families:' .. redis.call('HGET', family, 'device_id'), family_id)
if redis.call('HEXISTS', family, 'revoked_at') == 1 then
  redis.call('ZADD', P .. 'revoked_families', redis.call('HGET', family, 'expires_at'), family_id)
else
  redis.call('SADD', P .. 'live_families', family_id)
end
insert_refresh(hash, family_id, ARGV[8])
return 'redeemed'
"""

# ARGV: prefix, old_hash, new_hash, new_expires_at, now
_ROTATE_REFRESH: Final = """
local old, new, new_expires_at, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local token = P .. 'refresh:' .. old
local family_id = redis.call('HGET', token, 'family_id')
if not family_id then return {'unknown'} end
local family = P .. 'family:' .. family_id
local device_id, family_revoked = unpack(redis.call('HMGET', family, 'device_id', 'revoked_at'))
if not device_id or redis.call('EXISTS', P .. 'device:' .. device_id) == 0 then return {'unknown'} end
local device_revoked = redis.call('HGET', P .. 'device:' .. device_id, 'revoked_at')
if family_revoked or device_revoked then return {'revoked', device_id, family_id} end
local used_at, expires_at = unpack(redis.call('HMGET', token, 'used_at', 'expires_at'))
if used_at then
  -- Reuse of a rotated refresh token: someone holds a stolen copy. Revoke the device.
  revoke_device(device_id, now)
  return {'reused', device_id, family_id}
end
if tonumber(expires_at) <= tonumber(now) then return {'unknown', device_id, family_id} end
if redis.call('EXISTS', P .. 'refresh:' .. new) == 1 then
  return redis.error_reply('wardgate: duplicate refresh token')
end
redis.call('HSET', token, 'used_at', now)
insert_refresh(new, family_id, new_expires_at)
redis.call('HSET', family, 'last_used_at', now, 'expires_at', new_expires_at)
return {'rotated', device_id, family_id}
"""

# ARGV: prefix, now
_REVOCATIONS: Final = """
local after = '(' .. ARGV[2]
return {
  redis.call('GET', P .. 'revision') or '0',
  redis.call('GET', P .. 'not_before') or '0',
  redis.call('SMEMBERS', P .. 'revoked_devices'),
  redis.call('ZRANGEBYSCORE', P .. 'revoked_families', after, '+inf'),
  redis.call('ZRANGEBYSCORE', P .. 'revoked_tokens', after, '+inf'),
  redis.call('SMEMBERS', P .. 'revoked_api_keys'),
  redis.call('ZRANGEBYSCORE', P .. 'api_key_expiry', '-inf', ARGV[2]),
  redis.call('ZRANGEBYSCORE', P .. 'revoked_cookies', after, '+inf'),
}
"""

# ARGV: prefix, device_id, now
_REVOKE_DEVICE: Final = "return revoke_device(ARGV[2], ARGV[3])"

# ARGV: prefix, family_id, now
_REVOKE_FAMILY: Final = """
local changed = revoke_family(ARGV[2], ARGV[3])
bump()
return changed
"""

# ARGV: prefix, now, int(now)
_REVOKE_ALL: Final = """
local count = 0
for _, family_id in ipairs(redis.call('SMEMBERS', P .. 'live_families')) do
  count = count + revoke_family(family_id, ARGV[2])
end
redis.call('SET', P .. 'not_before', ARGV[3])
redis.call('INCR', P .. 'pairing_generation')
bump()
return count
"""

# ARGV: prefix, jti, expires_at
_REVOKE_JTI: Final = """
redis.call('ZADD', P .. 'revoked_tokens', ARGV[3], ARGV[2])
keep_until(P .. 'revoked_tokens', ARGV[3])
bump()
"""

# ARGV: prefix, key (without prefix), n pairs to set, pairs..., fields to delete...
# Updates an existing hash; does nothing if it does not exist (an UPDATE ... WHERE id = ?).
_UPDATE_IF_EXISTS: Final = """
local key = P .. ARGV[2]
if redis.call('EXISTS', key) == 0 then return 0 end
local i = hset_from(key, 4, tonumber(ARGV[3]))
if i <= #ARGV then redis.call('HDEL', key, unpack(ARGV, i, #ARGV)) end
return 1
"""

# ARGV: prefix, id, key_hash, created_at, expires_at or '', n pairs, pairs...
_CREATE_API_KEY: Final = """
local id, hash = ARGV[2], ARGV[3]
local key = P .. 'api_key:' .. id
if redis.call('EXISTS', key) == 1 or redis.call('EXISTS', P .. 'api_key_hash:' .. hash) == 1 then
  return redis.error_reply('wardgate: duplicate API key')
end
hset_from(key, 7, tonumber(ARGV[6]))
redis.call('HSET', key, 'key_hash', hash)
redis.call('SET', P .. 'api_key_hash:' .. hash, id)
redis.call('ZADD', P .. 'api_keys', ARGV[4], id)
if ARGV[5] ~= '' then redis.call('ZADD', P .. 'api_key_expiry', ARGV[5], id) end
if redis.call('HEXISTS', key, 'revoked_at') == 1 then redis.call('SADD', P .. 'revoked_api_keys', id) end
"""

# ARGV: prefix, key_id, now
_REVOKE_API_KEY: Final = """
local id, now = ARGV[2], ARGV[3]
local key = P .. 'api_key:' .. id
local changed = 0
if redis.call('EXISTS', key) == 1 and redis.call('HEXISTS', key, 'revoked_at') == 0 then
  redis.call('HSET', key, 'revoked_at', now)
  redis.call('SADD', P .. 'revoked_api_keys', id)
  changed = 1
end
for _, cookie_id in ipairs(redis.call('SMEMBERS', P .. 'api_key_cookies:' .. id)) do
  revoke_cookie(cookie_id, now)
end
bump()
return changed
"""

# ARGV: prefix, id, session_hash, max_expires_at, api_key_id or '', n pairs, pairs...
_CREATE_COOKIE: Final = """
local id, hash, max_expires_at, api_key_id = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key = P .. 'cookie:' .. id
local by_hash = P .. 'cookie_hash:' .. hash
if redis.call('EXISTS', key) == 1 or redis.call('EXISTS', by_hash) == 1 then
  return redis.error_reply('wardgate: duplicate cookie session')
end
hset_from(key, 7, tonumber(ARGV[6]))
redis.call('HSET', key, 'session_hash', hash)
keep_until(key, max_expires_at)
redis.call('SET', by_hash, id)
keep_until(by_hash, max_expires_at)
redis.call('ZADD', P .. 'cookie_expiry', max_expires_at, id)
keep_until(P .. 'cookie_expiry', max_expires_at)
if api_key_id ~= '' then
  redis.call('SADD', P .. 'api_key_cookies:' .. api_key_id, id)
  keep_until(P .. 'api_key_cookies:' .. api_key_id, max_expires_at)
end
if redis.call('HEXISTS', key, 'revoked_at') == 1 then
  redis.call('ZADD', P .. 'revoked_cookies', max_expires_at, id)
  keep_until(P .. 'revoked_cookies', max_expires_at)
end
"""

# ARGV: prefix, id, expires_at
_EXTEND_COOKIE: Final = """
local key = P .. 'cookie:' .. ARGV[2]
local current, max_expires_at, revoked =
  unpack(redis.call('HMGET', key, 'expires_at', 'max_expires_at', 'revoked_at'))
if not current or revoked then return 0 end
local wanted = ARGV[3]
if tonumber(max_expires_at) < tonumber(wanted) then wanted = max_expires_at end
if tonumber(wanted) > tonumber(current) then redis.call('HSET', key, 'expires_at', wanted) end
return 1
"""

# ARGV: prefix, id, now
_REVOKE_COOKIE: Final = """
local changed = revoke_cookie(ARGV[2], ARGV[3])
bump()
return changed
"""

# ARGV: prefix, now
_PRUNE: Final = """
local now = ARGV[2]
for _, jti in ipairs(redis.call('ZRANGEBYSCORE', P .. 'nonce_expiry', '-inf', now)) do
  redis.call('DEL', P .. 'nonce:' .. jti)
end
redis.call('ZREMRANGEBYSCORE', P .. 'nonce_expiry', '-inf', now)
redis.call('ZREMRANGEBYSCORE', P .. 'revoked_tokens', '-inf', now)
for _, hash in ipairs(redis.call('ZRANGEBYSCORE', P .. 'refresh_expiry', '-inf', now)) do
  redis.call('DEL', P .. 'refresh:' .. hash)
end
redis.call('ZREMRANGEBYSCORE', P .. 'refresh_expiry', '-inf', now)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'cookie_expiry', '-inf', now)) do
  local key = P .. 'cookie:' .. id
  local hash, api_key_id = unpack(redis.call('HMGET', key, 'session_hash', 'api_key_id'))
  if hash then redis.call('DEL', P .. 'cookie_hash:' .. hash) end
  if api_key_id then redis.call('SREM', P .. 'api_key_cookies:' .. api_key_id, id) end
  redis.call('DEL', key)
end
redis.call('ZREMRANGEBYSCORE', P .. 'cookie_expiry', '-inf', now)
redis.call('ZREMRANGEBYSCORE', P .. 'revoked_cookies', '-inf', now)
"""

# ARGV: prefix, id, score (-started_at), last_seq, n insert-only pairs, pairs...,
# n update pairs, pairs..., fields to delete on update...
_SAVE_AGENT_SESSION: Final = """
local id, last_seq = ARGV[2], ARGV[4]
local key = P .. 'agent:' .. id
local new = redis.call('EXISTS', key) == 0
local i = 5
if new then
  i = hset_from(key, i + 1, tonumber(ARGV[i]))
else
  i = i + 1 + 2 * tonumber(ARGV[i])
end
i = hset_from(key, i + 1, tonumber(ARGV[i]))
if new then
  redis.call('ZADD', P .. 'agent_sessions', ARGV[3], id)
  redis.call('HSET', key, 'last_seq', last_seq)
else
  if i <= #ARGV then redis.call('HDEL', key, unpack(ARGV, i, #ARGV)) end
  if tonumber(last_seq) > tonumber(redis.call('HGET', key, 'last_seq') or '0') then
    redis.call('HSET', key, 'last_seq', last_seq)
  end
end
"""

# ARGV: prefix, id, last seq of the batch, cutoff ('' for none), then (seq, member) pairs
_APPEND_AGENT_OUTPUT: Final = """
local id, last, cutoff = ARGV[2], ARGV[3], ARGV[4]
local output = P .. 'agent_output:' .. id
for i = 5, #ARGV, 2 do
  redis.call('ZREMRANGEBYSCORE', output, ARGV[i], ARGV[i])
  redis.call('ZADD', output, ARGV[i], ARGV[i + 1])
end
local key = P .. 'agent:' .. id
if redis.call('EXISTS', key) == 1
    and tonumber(last) > tonumber(redis.call('HGET', key, 'last_seq') or '0') then
  redis.call('HSET', key, 'last_seq', last)
end
if cutoff ~= '' then redis.call('ZREMRANGEBYSCORE', output, '-inf', cutoff) end
"""

# ARGV: prefix, keep
_PRUNE_AGENT_SESSIONS: Final = """
local old = redis.call('ZRANGE', P .. 'agent_sessions', tonumber(ARGV[2]), -1)
for _, id in ipairs(old) do
  redis.call('DEL', P .. 'agent:' .. id, P .. 'agent_output:' .. id)
  redis.call('ZREM', P .. 'agent_sessions', id)
end
return #old
"""

# ARGV: prefix, index key, 'set' or 'zset', item key prefix, start, stop
# The hashes of an index's members, in one consistent read.
_READ_INDEX: Final = """
local index, kind, item = P .. ARGV[2], ARGV[3], P .. ARGV[4]
local ids
if kind == 'set' then
  ids = redis.call('SMEMBERS', index)
else
  ids = redis.call('ZRANGE', index, tonumber(ARGV[5]), tonumber(ARGV[6]))
end
local out = {}
for _, id in ipairs(ids) do
  local row = redis.call('HGETALL', item .. id)
  if #row > 0 then out[#out + 1] = row end
end
return out
"""

# ARGV: prefix, hash key (without prefix, e.g. 'api_key_hash:<h>'), item key prefix
_READ_BY_HASH: Final = """
local id = redis.call('GET', P .. ARGV[2])
if not id then return {} end
return redis.call('HGETALL', P .. ARGV[3] .. id)
"""

# ARGV: prefix, key, limit, cutoff (now - window), now, member, window in ms
_HIT_WINDOW: Final = """
local key = P .. 'rate:' .. ARGV[2]
local limit = tonumber(ARGV[3])
if ARGV[8] ~= '' then
  local locked = redis.call('PTTL', ARGV[8])
  if locked > 0 then return {2, locked} end
end
redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[4])
local count = redis.call('ZCARD', key)
if count < limit then
  redis.call('ZADD', key, ARGV[5], ARGV[6])
  redis.call('PEXPIRE', key, ARGV[7])
  return {1}
end
if count == 0 then return {0} end
local oldest = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
return {0, oldest[2]}
"""

# ARGV: prefix, lease_id, instance, ttl_ms, keys as JSON, then (key, limit) pairs
_ACQUIRE_LEASE: Final = """
local lease_id, holder = ARGV[2], P .. 'lease_holder:' .. ARGV[3]
local now = server_ms()
local expiry = now + tonumber(ARGV[4])
for i = 6, #ARGV, 2 do
  local key = P .. 'lease:' .. ARGV[i]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now))
  if not redis.call('ZSCORE', key, lease_id) and redis.call('ZCARD', key) >= tonumber(ARGV[i + 1]) then
    return ARGV[i]
  end
end
for i = 6, #ARGV, 2 do
  local key = P .. 'lease:' .. ARGV[i]
  redis.call('ZADD', key, string.format('%d', expiry), lease_id)
  extend_to_ms(key, expiry)
end
redis.call('HSET', holder, lease_id, ARGV[5])
extend_to_ms(holder, expiry + GRACE * 1000)
return false
"""

# ARGV: prefix, lease_id, instance, keys...
_RELEASE_LEASE: Final = """
for i = 4, #ARGV do redis.call('ZREM', P .. 'lease:' .. ARGV[i], ARGV[2]) end
redis.call('HDEL', P .. 'lease_holder:' .. ARGV[3], ARGV[2])
"""

# ARGV: prefix, instance, ttl_ms
_RENEW_LEASES: Final = """
local holder = P .. 'lease_holder:' .. ARGV[2]
local now = server_ms()
local expiry = now + tonumber(ARGV[3])
local lost = {}
local held = redis.call('HGETALL', holder)
for i = 1, #held, 2 do
  local lease_id, keys = held[i], cjson.decode(held[i + 1])
  local alive = true
  for _, name in ipairs(keys) do
    local score = redis.call('ZSCORE', P .. 'lease:' .. name, lease_id)
    if not score or tonumber(score) <= now then alive = false end
  end
  for _, name in ipairs(keys) do
    local key = P .. 'lease:' .. name
    if alive then
      redis.call('ZADD', key, 'XX', string.format('%d', expiry), lease_id)
      extend_to_ms(key, expiry)
    else
      redis.call('ZREM', key, lease_id)
    end
  end
  if not alive then
    redis.call('HDEL', holder, lease_id)
    lost[#lost + 1] = lease_id
  end
end
extend_to_ms(holder, expiry + GRACE * 1000)
return lost
"""

# ARGV: prefix, key
_LEASE_COUNT: Final = """
return redis.call('ZCOUNT', P .. 'lease:' .. ARGV[2], string.format('(%d', server_ms()), '+inf')
"""

_SCRIPTS: Final = {
    "redeem_pairing": _REDEEM_PAIRING,
    "rotate_refresh": _ROTATE_REFRESH,
    "revocations": _REVOCATIONS,
    "revoke_device": _REVOKE_DEVICE,
    "revoke_family": _REVOKE_FAMILY,
    "revoke_all": _REVOKE_ALL,
    "revoke_token": _REVOKE_JTI,
    "update_if_exists": _UPDATE_IF_EXISTS,
    "create_api_key": _CREATE_API_KEY,
    "revoke_api_key": _REVOKE_API_KEY,
    "create_cookie": _CREATE_COOKIE,
    "extend_cookie": _EXTEND_COOKIE,
    "revoke_cookie": _REVOKE_COOKIE,
    "prune": _PRUNE,
    "save_agent_session": _SAVE_AGENT_SESSION,
    "append_agent_output": _APPEND_AGENT_OUTPUT,
    "prune_agent_sessions": _PRUNE_AGENT_SESSIONS,
    "read_index": _READ_INDEX,
    "read_by_hash": _READ_BY_HASH,
    "hit_window": _HIT_WINDOW,
    "acquire_lease": _ACQUIRE_LEASE,
    "release_lease": _RELEASE_LEASE,
    "renew_leases": _RENEW_LEASES,
    "lease_count": _LEASE_COUNT,
}

# --- encoding ----------------------------------------------------------------------------


def _encode(value: object) -> str:
    """A stored field: floats as their exact repr, ints and strings as they are."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, bool):  # pragma: no cover - no stored field is a bool
        raise TypeError("booleans are not stored")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"cannot store a {type(value).__name__}")


def _pairs(record: object, *, only: Sequence[str] | None = None) -> list[str]:
    """Field/value pairs of a dataclass for HSET: its fields (or ``only``) that are not None."""
    out: list[str] = []
    for f in fields(record):  # type: ignore[arg-type]
        if only is not None and f.name not in only:
            continue
        value = getattr(record, f.name)
        if value is not None:
            out += [f.name, _encode(value)]
    return out


def _counted(pairs: list[str]) -> list[str]:
    return [str(len(pairs) // 2), *pairs]


def _num(value: float) -> str:
    return repr(float(value))


def _opt_float(value: str | None) -> float | None:
    return None if value is None else float(value)


def _opt_int(value: str | None) -> int | None:
    return None if value is None else int(value)


def _row(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _device(row: dict[str, str]) -> Device:
    return Device(
        id=row["id"],
        name=row["name"],
        role=row["role"],
        created_at=float(row["created_at"]),
        client_info=row.get("client_info", ""),
        last_seen=_opt_float(row.get("last_seen")),
        last_ip=row.get("last_ip"),
        revoked_at=_opt_float(row.get("revoked_at")),
    )


def _family(row: dict[str, str]) -> Family:
    return Family(
        id=row["id"],
        device_id=row["device_id"],
        created_at=float(row["created_at"]),
        expires_at=float(row["expires_at"]),
        last_used_at=_opt_float(row.get("last_used_at")),
        revoked_at=_opt_float(row.get("revoked_at")),
    )


def _api_key(row: dict[str, str]) -> ApiKey:
    return ApiKey(
        id=row["id"],
        name=row["name"],
        role=row["role"],
        created_at=float(row["created_at"]),
        expires_at=_opt_float(row.get("expires_at")),
        last_used_at=_opt_float(row.get("last_used_at")),
        revoked_at=_opt_float(row.get("revoked_at")),
    )


def _cookie(row: dict[str, str]) -> CookieSession:
    return CookieSession(
        id=row["id"],
        role=row["role"],
        created_at=float(row["created_at"]),
        expires_at=float(row["expires_at"]),
        max_expires_at=float(row["max_expires_at"]),
        device_id=row.get("device_id"),
        family_id=row.get("family_id"),
        api_key_id=row.get("api_key_id"),
        revoked_at=_opt_float(row.get("revoked_at")),
    )


def _agent_session(row: dict[str, str]) -> AgentSessionRecord:
    return AgentSessionRecord(
        id=row["id"],
        agent_type=row["agent_type"],
        status=row["status"],
        started_at=float(row["started_at"]),
        device_id=row.get("device_id"),
        ended_at=_opt_float(row.get("ended_at")),
        exit_code=_opt_int(row.get("exit_code")),
        last_seq=int(row.get("last_seq", "0")),
        command=row.get("command", ""),
        prompt=row.get("prompt"),
    )


def _seq_order(row: dict[str, str]) -> tuple[float, int]:
    # SQLite lists devices and families by created_at, ties in insertion order.
    return float(row["created_at"]), int(row.get("seq", "0"))


_AGENT_INSERT_ONLY: Final = ("id", "agent_type", "started_at")
_AGENT_UPDATABLE: Final = ("status", "device_id", "ended_at", "exit_code", "command", "prompt")


def redacted_location(url: str) -> str:
    """``scheme://host:port/db`` of a Redis URL, without user name or password (for logs)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "redis://?"
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisStore(Store):
    """The :class:`Store` contract on a Redis server, shared by every instance that uses ``prefix``.

    ``password`` (for example read from a file or an env var by the config) takes precedence
    over one in ``url``. Neither is ever logged or shown: ``repr`` and errors name only the
    host. ``rediss://`` URLs use TLS (query options such as ``ssl_ca_certs`` pass through).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        password: str | None = None,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        if urlsplit(url).scheme not in ("redis", "rediss"):
            raise ConfigError("store.url must be a redis:// or rediss:// URL")
        try:
            options: dict[str, Any] = dict(parse_url(url))
        except ValueError:
            raise ConfigError("store.url is not a valid redis:// or rediss:// URL") from None
        if password is not None:
            options["password"] = password
        # Timeouts given in the URL's query (``?socket_timeout=5``) win over the arguments.
        options.setdefault("socket_timeout", socket_timeout)
        options.setdefault("socket_connect_timeout", connect_timeout)
        # No automatic retries: see the module docstring.
        options.update(retry=Retry(NoBackoff(), 0), decode_responses=True)
        self._options = options
        self.socket_timeout = float(options["socket_timeout"] or DEFAULT_SOCKET_TIMEOUT)
        self.prefix = prefix
        self.location = redacted_location(url)
        self.channel = prefix + "revocations"
        """The pub/sub channel on which every revision bump is published (its new value)."""
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._failures = 0
        """Calls failed since the last one that succeeded (for the log, not for decisions)."""
        self._warned_at = -math.inf

    def __repr__(self) -> str:
        return f"RedisStore({self.location!r}, prefix={self.prefix!r})"

    # --- plumbing ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and check that Redis answers.

        If it does not, this raises StoreUnavailable but the store stays open: every call
        fails the same way until Redis answers, then works. A daemon may therefore start
        while Redis is down (and refuse authentications until it is back) or treat the
        error as fatal. Either way, :meth:`close` releases the connections.
        """
        if self._client is not None:
            return
        client = aioredis.Redis.from_pool(ConnectionPool(**self._options))
        self._scripts = {name: client.register_script(_PRELUDE + src) for name, src in _SCRIPTS.items()}
        self._client = client
        with self.errors_as_unavailable():
            await client.ping()
        await self._check_server_settings(client)

    async def _check_server_settings(self, client: aioredis.Redis) -> None:
        """Warn about server settings under which Redis can forget what must not be forgotten."""
        try:
            with self.errors_as_unavailable():
                info = await client.info("memory")
                info.update(await client.info("persistence"))
        except StoreUnavailable:  # INFO may be forbidden by an ACL: nothing to check then
            return
        policy = info.get("maxmemory_policy")
        if policy is not None and policy != "noeviction":
            log.warning(
                "Redis maxmemory-policy is %s: under memory pressure Redis may evict revocations "
                "and consumed pairing nonces; set it to noeviction (%s)",
                policy,
                self.location,
            )
        if info.get("aof_enabled") == 0:
            log.warning(
                "Redis runs without append-only persistence: a Redis restart forgets revocations "
                "and consumed pairing nonces; set appendonly yes (%s)",
                self.location,
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await client.aclose()

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise StoreUnavailable(hint="the store is not open")
        return self._client

    def _key(self, suffix: str) -> str:
        return self.prefix + suffix

    @contextlib.contextmanager
    def errors_as_unavailable(self) -> Iterator[None]:
        """Turn every Redis failure inside into StoreUnavailable with a fixed hint (fail closed).

        For callers that use :attr:`client` directly::

            with store.errors_as_unavailable():
                ms = await store.client.pttl(key)
        """
        try:
            yield
            if self._failures:
                log.warning("store available again after %d failed calls (%s)", self._failures, self.location)
                self._failures = 0
                self._warned_at = -math.inf
        except redis.exceptions.ResponseError as exc:
            if str(exc).startswith("wardgate: "):
                raise ValueError(str(exc).removeprefix("wardgate: ")) from None
            hint = "the Redis store refused a command"
            if isinstance(exc, redis.exceptions.ReadOnlyError):
                hint = "the Redis store is a read-only replica"
            self._unavailable(exc, hint)
        except redis.exceptions.AuthenticationError as exc:
            self._unavailable(exc, "the Redis store refused wardgate's credentials")
        except redis.exceptions.TimeoutError as exc:
            self._unavailable(exc, "the Redis store did not answer in time")
        except (redis.exceptions.RedisError, OSError) as exc:
            self._unavailable(exc, "cannot reach the Redis store")

    def _unavailable(self, exc: BaseException, hint: str) -> None:
        self._failures += 1
        now = time.monotonic()
        if now - self._warned_at >= UNAVAILABLE_LOG_INTERVAL:
            self._warned_at = now
            # The exception's class only: its text could name more than wardgate chooses to say.
            log.warning(
                "store unavailable: %s (%s, %s; %d failed calls so far)",
                hint,
                type(exc).__name__,
                self.location,
                self._failures,
            )
        raise StoreUnavailable(hint=hint) from None

    async def _script(self, name: str, *args: str | int | float) -> Any:
        if self._client is None:
            raise StoreUnavailable(hint="the store is not open")
        with self.errors_as_unavailable():
            return await self._scripts[name](args=[self.prefix, *args])

    def client_script(self, source: str) -> StoreScript:
        """A Lua script of the caller's (say, the limits module's counters), run with this store's
        failure handling: a Redis failure raises StoreUnavailable. KEYS and ARGV are passed as
        given: build keys under :attr:`prefix`. Can be made before :meth:`open`."""
        return StoreScript(self, source)

    async def _read_index(
        self, index: str, kind: str, item: str, start: int = 0, stop: int = -1
    ) -> list[Any]:
        rows = await self._script("read_index", index, kind, item, start, stop)
        return [_row(flat) for flat in rows]

    async def _get_hash(self, key: str) -> dict[str, str]:
        with self.errors_as_unavailable():
            row = await self.client.hgetall(self._key(key))
        return cast(dict[str, str], row)

    async def ping(self) -> bool:
        """Whether the Redis server answers now (for health checks); never raises."""
        if self._client is None:
            return False
        try:
            return bool(await self._client.ping())
        except (redis.exceptions.RedisError, OSError):
            return False

    # --- revocation state ------------------------------------------------------------------

    async def revision(self) -> int:
        with self.errors_as_unavailable():
            value = await self.client.get(self._key("revision"))
        return int(value or 0)

    async def revocations(self, now: float) -> Revocations:
        revision, not_before, devices, families, tokens, keys, expired_keys, cookies = await self._script(
            "revocations", _num(now)
        )
        return Revocations(
            revision=int(revision),
            devices=frozenset(devices),
            families=frozenset(families),
            tokens=frozenset(tokens),
            not_before=float(not_before),
            api_keys=frozenset(keys) | frozenset(expired_keys),
            cookies=frozenset(cookies),
        )

    async def shared_key_ring(self, candidate: str) -> str:
        """The signing key ring every instance on this prefix shares: ``candidate`` if none
        existed (the first instance to ask creates it, atomically), else the existing one."""
        with self.errors_as_unavailable():
            await self.client.set(self._key("keyring"), candidate, nx=True)
            ring = await self.client.get(self._key("keyring"))
        if ring is None:
            raise StoreUnavailable(hint="the key ring in Redis vanished")
        return str(ring)

    def watch_revisions(self) -> RevisionFeed:
        """Subscribe to revision bumps made by any instance::

        async with store.watch_revisions() as feed:
            revision = await feed.next()
        """
        return RevisionFeed(self)

    # --- pairing ---------------------------------------------------------------------------------

    async def pairing_generation(self) -> int:
        with self.errors_as_unavailable():
            value = await self.client.get(self._key("pairing_generation"))
        return int(value or 0)

    async def bump_pairing_generation(self) -> int:
        with self.errors_as_unavailable():
            value = await self.client.incr(self._key("pairing_generation"))
        return int(value)

    async def nonce_consumed(self, jti: str) -> bool:
        with self.errors_as_unavailable():
            count = await self.client.exists(self._key("nonce:" + jti))
        return bool(count)

    async def redeem_pairing(
        self,
        *,
        jti: str,
        generation: int,
        nonce_expires_at: float,
        device: Device,
        family: Family,
        refresh: NewRefresh,
    ) -> RedeemOutcome:
        outcome = await self._script(
            "redeem_pairing",
            jti,
            generation,
            _num(nonce_expires_at),
            device.id,
            family.id,
            refresh.token_hash,
            _num(refresh.expires_at),
            *_counted(_pairs(device)),
            *_counted(_pairs(family)),
        )
        return RedeemOutcome(outcome)

    # --- devices ---------------------------------------------------------------------------------

    async def get_device(self, device_id: str) -> Device | None:
        row = await self._get_hash("device:" + device_id)
        return _device(row) if row else None

    async def list_devices(self) -> list[Device]:
        rows = await self._read_index("devices", "set", "device:")
        return [_device(row) for row in sorted(rows, key=_seq_order)]

    async def touch_device(self, device_id: str, *, ip: str | None, now: float) -> None:
        pairs = ["last_seen", _num(now)] + (["last_ip", ip] if ip is not None else [])
        await self._script(
            "update_if_exists",
            "device:" + device_id,
            *_counted(pairs),
            *([] if ip is not None else ["last_ip"]),
        )

    async def revoke_device(self, device_id: str, *, now: float) -> bool:
        return bool(await self._script("revoke_device", device_id, _num(now)))

    # --- refresh tokens ----------------------------------------------------------------------------

    async def rotate_refresh(self, old_hash: str, new: NewRefresh, *, now: float) -> RotateResult:
        outcome, *ids = await self._script(
            "rotate_refresh", old_hash, new.token_hash, _num(new.expires_at), _num(now)
        )
        device_id, family_id = (ids[0], ids[1]) if ids else (None, None)
        return RotateResult(RotateOutcome(outcome), device_id, family_id)

    async def list_families(self, *, include_revoked: bool = False) -> list[Family]:
        index = "families" if include_revoked else "live_families"
        rows = await self._read_index(index, "set", "family:")
        families = [_family(row) for row in sorted(rows, key=_seq_order)]
        return [f for f in families if include_revoked or f.revoked_at is None]

    async def revoke_family(self, family_id: str, *, now: float) -> bool:
        return bool(await self._script("revoke_family", family_id, _num(now)))

    async def revoke_all(self, *, now: float) -> int:
        return int(await self._script("revoke_all", _num(now), str(int(now))))

    # --- single tokens -------------------------------------------------------------------------------

    async def revoke_token(self, jti: str, *, expires_at: float) -> None:
        await self._script("revoke_token", jti, _num(expires_at))

    # --- API keys ----------------------------------------------------------------------------------

    async def create_api_key(self, key: ApiKey, *, key_hash: str) -> None:
        expires_at = "" if key.expires_at is None else _num(key.expires_at)
        await self._script(
            "create_api_key", key.id, key_hash, _num(key.created_at), expires_at, *_counted(_pairs(key))
        )

    async def api_key_by_hash(self, key_hash: str) -> ApiKey | None:
        flat = await self._script("read_by_hash", "api_key_hash:" + key_hash, "api_key:")
        return _api_key(_row(flat)) if flat else None

    async def list_api_keys(self, *, include_revoked: bool = False) -> list[ApiKey]:
        keys = [_api_key(row) for row in await self._read_index("api_keys", "zset", "api_key:")]
        return [k for k in keys if include_revoked or k.revoked_at is None]

    async def touch_api_key(self, key_id: str, *, now: float) -> None:
        await self._script("update_if_exists", "api_key:" + key_id, *_counted(["last_used_at", _num(now)]))

    async def revoke_api_key(self, key_id: str, *, now: float) -> bool:
        return bool(await self._script("revoke_api_key", key_id, _num(now)))

    # --- browser cookie sessions ---------------------------------------------------------------------

    async def create_cookie_session(self, session: CookieSession, *, session_hash: str) -> None:
        await self._script(
            "create_cookie",
            session.id,
            session_hash,
            _num(session.max_expires_at),
            session.api_key_id or "",
            *_counted(_pairs(session)),
        )

    async def cookie_session_by_hash(self, session_hash: str) -> CookieSession | None:
        flat = await self._script("read_by_hash", "cookie_hash:" + session_hash, "cookie:")
        return _cookie(_row(flat)) if flat else None

    async def extend_cookie_session(self, session_id: str, *, expires_at: float) -> None:
        await self._script("extend_cookie", session_id, _num(expires_at))

    async def revoke_cookie_session(self, session_id: str, *, now: float) -> bool:
        return bool(await self._script("revoke_cookie", session_id, _num(now)))

    async def prune(self, *, now: float) -> None:
        await self._script("prune", _num(now))

    # --- agent sessions ------------------------------------------------------------------------------

    async def save_agent_session(self, session: AgentSessionRecord) -> None:
        updates = _pairs(session, only=_AGENT_UPDATABLE)
        cleared = [name for name in _AGENT_UPDATABLE if getattr(session, name) is None]
        await self._script(
            "save_agent_session",
            session.id,
            _num(-session.started_at),
            str(session.last_seq),
            *_counted(_pairs(session, only=_AGENT_INSERT_ONLY)),
            *_counted(updates),
            *cleared,
        )

    async def get_agent_session(self, session_id: str) -> AgentSessionRecord | None:
        row = await self._get_hash("agent:" + session_id)
        return _agent_session(row) if row else None

    async def list_agent_sessions(self, *, limit: int) -> list[AgentSessionRecord]:
        if limit == 0:
            return []
        rows = await self._read_index("agent_sessions", "zset", "agent:", 0, limit - 1 if limit > 0 else -1)
        return [_agent_session(row) for row in rows]

    async def append_agent_output(
        self, session_id: str, lines: Sequence[AgentOutputLine], *, keep_last: int | None = None
    ) -> None:
        if not lines:
            return
        last = max(line.seq for line in lines)
        cutoff = str(last - keep_last) if keep_last is not None and last > keep_last else ""
        members: list[str] = []
        for line in lines:
            members += [str(line.seq), json.dumps([line.seq, line.stream, line.line])]
        await self._script("append_agent_output", session_id, str(last), cutoff, *members)

    async def agent_output(self, session_id: str, *, after_seq: int, limit: int) -> list[AgentOutputLine]:
        if limit == 0:
            return []
        with self.errors_as_unavailable():
            members = await self.client.zrangebyscore(
                self._key("agent_output:" + session_id),
                f"({after_seq}",
                "+inf",
                start=0,
                num=limit if limit > 0 else -1,
            )
        return [AgentOutputLine(*json.loads(cast(str, member))) for member in members]

    async def prune_agent_sessions(self, *, keep: int) -> int:
        return int(await self._script("prune_agent_sessions", max(keep, 0)))

    # --- distributed limits (not part of Store: used when several instances share limits) ---------

    async def hit_window(self, key: str, limit: int, window: float, now: float) -> tuple[bool, float]:
        """Record one hit on ``key`` if fewer than ``limit`` hits fall in the last ``window`` seconds.

        A sliding window log (a sorted set of hit times), checked and updated in one script, so
        the limit holds for the sum over every instance. Returns ``(allowed, retry_after)``:
        ``retry_after`` is 0 when allowed, else the seconds until the oldest counted hit leaves
        the window (refused hits are not counted). ``now`` is the caller's clock (wall time,
        the same on every instance); memory is at most ``limit`` entries per key, and a key
        disappears ``window`` seconds after its last allowed hit.
        """
        locked, allowed, retry_after = await self.hit_window_unless_locked("", key, limit, window, now)
        assert locked == 0.0
        return allowed, retry_after

    async def hit_window_unless_locked(
        self, lock: str, key: str, limit: int, window: float, now: float
    ) -> tuple[float, bool, float]:
        """:meth:`hit_window` in the same round trip as a look at the key ``lock`` (a full key,
        ``""`` for none): while ``lock`` exists, nothing is counted and the result is
        ``(seconds it still lives, False, 0)``; else ``(0, allowed, retry_after)``."""
        if isinstance(limit, bool) or limit < 1:
            raise ValueError("limit must be a positive integer")
        if not math.isfinite(window) or window <= 0:
            raise ValueError("window must be a positive number of seconds")
        member = f"{_num(now)}:{secrets.token_hex(6)}"
        result = await self._script(
            "hit_window",
            key,
            limit,
            _num(now - window),
            _num(now),
            member,
            math.ceil(window * 1000),
            lock,
        )
        verdict = int(result[0])
        if verdict == 2:
            return int(result[1]) / 1000, False, 0.0
        if verdict == 1:
            return 0.0, True, 0.0
        oldest = float(result[1]) if len(result) > 1 else now
        return 0.0, False, max(oldest + window - now, 1e-3)

    async def acquire_lease(
        self, scope_keys: list[tuple[str, int]], lease_id: str, instance: str, ttl: float
    ) -> str | None:
        """Take one slot under every ``(key, limit)`` at once, or none: a connection counted
        against several caps (global, per IP, per principal) in one atomic step.

        Each key holds the live leases (lease id -> expiry, Redis server clock; expired ones are
        dropped first). The lease is added to every key if each has fewer than its limit (a
        lease already present counts as its own slot, so acquiring twice is harmless);
        otherwise nothing changes and the first full key is returned. Leases expire after
        ``ttl`` seconds unless :meth:`renew_leases` extends them, so the slots of an instance
        that dies free themselves; ``instance`` names the holder for that renewal.
        """
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        args: list[str | int] = []
        for key, limit in scope_keys:
            args += [key, int(limit)]
        names = json.dumps([key for key, _ in scope_keys])
        full = await self._script("acquire_lease", lease_id, instance, math.ceil(ttl * 1000), names, *args)
        return None if full is None else str(full)

    async def release_lease(self, keys: list[str], lease_id: str, *, instance: str) -> None:
        """Give back the slots of a lease (the connection closed). Harmless if already gone."""
        await self._script("release_lease", lease_id, instance, *keys)

    async def renew_leases(self, instance: str, ttl: float) -> list[str]:
        """Extend every lease ``instance`` holds to ``ttl`` seconds from now (call it every
        ``ttl / 3`` or so). Returns the ids of leases that had already expired or were removed
        from one of their keys: their slots may have been taken, so the caller should treat
        those connections as uncounted (re-acquire or close them)."""
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        lost = await self._script("renew_leases", instance, math.ceil(ttl * 1000))
        return [str(lease_id) for lease_id in lost]

    async def lease_count(self, key: str) -> int:
        """Live leases under ``key`` now (for metrics and tests)."""
        return int(await self._script("lease_count", key))


class StoreScript:
    """A caller's Lua script bound to a :class:`RedisStore` (see :meth:`RedisStore.client_script`)."""

    def __init__(self, store: RedisStore, source: str) -> None:
        self._store = store
        self._source = source
        self._client: aioredis.Redis | None = None
        self._script: AsyncScript | None = None

    async def __call__(self, *, keys: Sequence[str] = (), args: Sequence[str | int | float] = ()) -> Any:
        client = self._store.client
        if self._script is None or self._client is not client:
            self._script, self._client = client.register_script(self._source), client
        with self._store.errors_as_unavailable():
            return await self._script(keys=list(keys), args=list(args))


class RevisionFeed:
    """A subscription to the store's revision bumps (``<prefix>revocations``), from any instance.

    Messages can be lost (a reconnect, a slow reader), so this only makes revocations reach
    live sockets sooner: keep polling :meth:`RedisStore.revision` as the reconciliation.
    """

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._pubsub: Any = None

    async def __aenter__(self) -> RevisionFeed:
        store = self._store
        pubsub = store.client.pubsub()
        self._pubsub = pubsub
        try:
            with store.errors_as_unavailable():
                await pubsub.subscribe(store.channel)
                # Wait for the confirmation: from here on no bump is missed.
                deadline = time.monotonic() + store.socket_timeout
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise redis.exceptions.TimeoutError
                    message = await pubsub.get_message(timeout=left)
                    if message is not None and message["type"] == "subscribe":
                        break
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close()

    async def _close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await pubsub.aclose()

    async def next(self) -> int:
        """Wait for the next bump and return the revision it published."""
        if self._pubsub is None:
            raise StoreUnavailable(hint="the revision feed is closed")
        with self._store.errors_as_unavailable():
            while True:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                if message is not None and message["type"] == "message":
                    return int(message["data"])

    def __aiter__(self) -> AsyncIterator[int]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[int]:
        while True:
            yield await self.next()
