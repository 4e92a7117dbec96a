"""Prometheus metrics (``/metrics``): what the gate decided and what flowed through.

Each gateway has its own ``CollectorRegistry`` (several can live in one test
process). Label values are wardgate's own fixed strings (reasons, method names
from the registry, directions), never client input, so cardinality is bounded.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections_open = Gauge(
            "wardgate_connections_open", "WebSocket connections open now.", registry=r
        )
        self.handshakes = Counter(
            "wardgate_handshakes",
            "Upgrade requests by outcome and reason.",
            ["outcome", "reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "wardgate_auth_failures", "Failed authentications by reason.", ["reason"], registry=r
        )
        self.rate_limited = Counter(
            "wardgate_rate_limited", "Requests refused by a rate limit, by limit.", ["limit"], registry=r
        )
        self.messages = Counter(
            "wardgate_messages", "WebSocket messages by direction.", ["direction"], registry=r
        )
        self.relay_bytes = Counter(
            "wardgate_relay_bytes", "Bytes relayed to and from upstreams.", ["direction"], registry=r
        )
        self.disconnects = Counter(
            "wardgate_disconnects", "Connections closed by wardgate, by reason.", ["reason"], registry=r
        )
        self.method_seconds = Histogram(
            "wardgate_method_seconds",
            "JSON-RPC method latency.",
            ["method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        # Hot-path children resolved once.
        self.messages_in = self.messages.labels("in")
        self.messages_out = self.messages.labels("out")
        self.accepted = self.handshakes.labels("accepted", "ok")

    def rejected(self, reason: str) -> None:
        self.handshakes.labels("rejected", reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
