"""The gate's pre-authentication decisions, in order, as pure functions.

client address (forwarded headers only from trusted proxies) -> IP allow/deny
-> Host (DNS rebinding) -> credential extraction -> Origin (CSWSH; a cookie
credential always needs an allowed Origin). Rate limits, token verification,
revocation and connection caps follow in the server, which has the state.

``precheck`` returns every verdict it reached, so ``wardgate doctor`` can
print why a request would be refused and the server can reject with the first
failure's reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from wardgate.config import Config, allowed_host_names
from wardgate.errors import HostForbidden, IpForbidden, OriginForbidden, WardgateError
from wardgate.gate.credentials import Credential, CredentialSource, extract_credential
from wardgate.gate.host import HostPolicy
from wardgate.gate.network import AddressPolicy, client_address, parse_networks, peer_is_trusted
from wardgate.gate.origin import OriginPolicy, OriginVerdict, parse_origin


@dataclass(frozen=True, slots=True)
class HandshakeFacts:
    """What the gate looks at in an upgrade request."""

    peer: str | None
    host: str | None
    origin: str | None
    forwarded_for: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    scheme: str = "http"
    """The scheme the request reached wardgate with, to recognise same-origin requests from
    wardgate's own pages."""
    forwarded_proto: str | None = None
    """``X-Forwarded-Proto`` (its last value): the scheme the client used, believed only from a
    trusted proxy (one that terminates TLS in front of wardgate)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    check: str
    allowed: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Precheck:
    verdicts: tuple[Verdict, ...]
    client_ip: IPv4Address | IPv6Address | None
    credential: Credential | None
    failure: WardgateError | None


@dataclass(frozen=True, slots=True)
class GatePolicy:
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...]
    addresses: AddressPolicy
    hosts: HostPolicy
    origins: OriginPolicy
    allow_query_token: bool

    @classmethod
    def from_config(cls, config: Config) -> GatePolicy:
        sec = config.security
        return cls(
            trusted_proxies=parse_networks(sec.trusted_proxies),
            addresses=AddressPolicy(parse_networks(sec.ip_allow), parse_networks(sec.ip_deny)),
            hosts=HostPolicy(allowed_host_names(config)),
            origins=OriginPolicy(
                config.origin_patterns,
                allow_all=sec.origins.allow_all,
                allow_missing=sec.origins.allow_missing,
            ),
            allow_query_token=sec.allow_query_token,
        )


def precheck(facts: HandshakeFacts, policy: GatePolicy) -> Precheck:
    """Run the stateless checks in order, stopping at the first refusal."""
    verdicts: list[Verdict] = []
    address = client_address(facts.peer, facts.forwarded_for, policy.trusted_proxies)
    verdicts.append(Verdict("client address", True, address.detail))
    ip = address.address

    def refuse(error: WardgateError) -> Precheck:
        return Precheck(tuple(verdicts), ip, None, error)

    ip_verdict = policy.addresses.check(ip)
    verdicts.append(Verdict("ip allowlist", ip_verdict.allowed, ip_verdict.detail))
    if not ip_verdict.allowed:
        return refuse(IpForbidden(hint="see security.ip_allow / security.ip_deny"))

    host_verdict = policy.hosts.check(facts.host)
    verdicts.append(Verdict("host", host_verdict.allowed, host_verdict.detail))
    if not host_verdict.allowed:
        return refuse(HostForbidden(hint="add the host name to security.allowed_hosts"))

    try:
        credential = extract_credential(facts.headers, facts.query, allow_query=policy.allow_query_token)
    except WardgateError as exc:
        verdicts.append(Verdict("credential", False, exc.hint or exc.message))
        return refuse(exc)
    verdicts.append(
        Verdict("credential", True, f"found in {credential.source.value}" if credential else "none presented")
    )

    cookie_auth = credential is not None and credential.source is CredentialSource.COOKIE
    if is_same_origin(facts, client_scheme(facts, policy)):
        origin_verdict = OriginVerdict(True, "origin is this server's own (same-origin request)")
    else:
        origin_verdict = policy.origins.check(facts.origin, cookie_auth=cookie_auth)
    verdicts.append(Verdict("origin", origin_verdict.allowed, origin_verdict.detail))
    if not origin_verdict.allowed:
        return Precheck(
            tuple(verdicts),
            ip,
            credential,
            OriginForbidden(hint="add the origin to security.origins.allowed"),
        )
    return Precheck(tuple(verdicts), ip, credential, None)


def client_scheme(facts: HandshakeFacts, policy: GatePolicy) -> str:
    """The scheme the client used: ``X-Forwarded-Proto`` from a trusted proxy, else our own."""
    proto = (facts.forwarded_proto or "").strip().lower()
    if proto in ("http", "https") and peer_is_trusted(facts.peer, policy.trusted_proxies):
        return proto
    return facts.scheme


def is_same_origin(facts: HandshakeFacts, scheme: str | None = None) -> bool:
    """Whether the Origin is the very scheme, host and port the request was sent to.

    Only meaningful after the Host check passed: the Host is then one of ours.
    """
    if not facts.origin or not facts.host:
        return False
    origin = parse_origin(facts.origin)
    own = parse_origin(f"{scheme or facts.scheme}://{facts.host}")
    return origin is not None and origin == own
