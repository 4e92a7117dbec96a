"""Relays to configured upstreams: WebSocket, SSE and HTTP (DESIGN.md, "Gateway proxy")."""
