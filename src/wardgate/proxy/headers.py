"""Which headers cross the relay, in each direction (pure functions over header pairs).

Client to upstream (``upstream_request_headers``):

* hop-by-hop headers (RFC 9110 section 7.6.1: ``Connection``, ``Keep-Alive``, ``Proxy-*``,
  ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``, and every header ``Connection``
  names) are dropped;
* the client's wardgate credentials (``Authorization``, ``Cookie``, ``X-API-Key``,
  ``X-CSRF-Token``) are never forwarded;
* ``Host``, ``Content-Length``, ``Origin`` and ``Referer`` (which name wardgate's pages, and
  may carry its URLs) are dropped; the client library sets ``Host`` and the length;
* forwarding headers the client sent (``Forwarded``, ``X-Forwarded-*``, ``X-Real-IP``) are
  replaced by wardgate's own ``X-Forwarded-For``/``-Proto``/``-Host``;
* the upstream's configured headers are added last and win over anything the client sent.

Upstream to client (``client_response_headers``): hop-by-hop headers and ``Set-Cookie`` are
dropped, every value is scrubbed of the upstream's secrets (a header whose name holds one is
dropped), and the length and encoding are dropped when the relay changes the body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

from multidict import CIMultiDict

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
CLIENT_CREDENTIALS: Final = frozenset({"authorization", "cookie", "x-api-key", "x-csrf-token"})
FORWARDING: Final = frozenset(
    {"forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port", "x-real-ip"}
)
NOT_FORWARDED: Final = (
    HOP_BY_HOP | CLIENT_CREDENTIALS | FORWARDING | {"host", "content-length", "origin", "referer"}
)
RESPONSE_DROPPED: Final = HOP_BY_HOP | {"set-cookie", "set-cookie2"}
BODY_FRAMING: Final = frozenset({"content-length", "content-encoding"})

Headers = Iterable[tuple[str, str]]


def connection_listed(headers: Headers) -> frozenset[str]:
    """Header names (lower case) that ``Connection`` declares hop-by-hop."""
    names: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            names.update(part.strip().lower() for part in value.split(",") if part.strip())
    return frozenset(names)


def upstream_request_headers(
    client: Headers,
    *,
    injected: Iterable[tuple[str, str]],
    client_ip: str | None,
    proto: str,
    host: str | None,
    extra_dropped: Iterable[str] = (),
) -> CIMultiDict[str]:
    """The headers to send upstream for a client request (see the module docstring)."""
    pairs = list(client)
    dropped = NOT_FORWARDED | connection_listed(pairs) | {name.lower() for name in extra_dropped}
    injected = list(injected)
    overridden = {name.lower() for name, _ in injected}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in pairs:
        lower = name.lower()
        if lower in dropped or lower in overridden or lower.startswith("sec-websocket-"):
            continue
        out.add(name, value)
    if client_ip:
        out["X-Forwarded-For"] = client_ip
    out["X-Forwarded-Proto"] = proto
    if host:
        out["X-Forwarded-Host"] = host
    for name, value in injected:
        out[name] = value
    return out


def client_response_headers(
    upstream: Headers, *, scrub: Callable[[str], str], body_rewritten: bool
) -> CIMultiDict[str]:
    """The upstream's response headers as the client may see them."""
    pairs = list(upstream)
    dropped = RESPONSE_DROPPED | connection_listed(pairs)
    if body_rewritten:
        dropped = dropped | BODY_FRAMING
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in pairs:
        if name.lower() in dropped or scrub(name) != name:
            continue
        out.add(name, scrub(value))
    return out


def rewrite_location(location: str, *, upstream_base: str, relay_base: str) -> str:
    """A redirect to somewhere under the upstream's base, pointed back through the relay.

    ``upstream_base`` is the upstream URL without a trailing slash (``http://h:1/prefix``);
    ``relay_base`` is ``/proxy/<name>/http``. Other locations are returned unchanged.
    """
    if location == upstream_base:
        return relay_base + "/"
    for separator in ("/", "?"):
        if location.startswith(upstream_base + separator):
            rest = location[len(upstream_base) :]
            return relay_base + (rest if separator == "/" else "/" + rest)
    return location
