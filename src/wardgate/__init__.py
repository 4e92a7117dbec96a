"""wardgate: a secure WebSocket gateway daemon."""

__version__ = "0.1.0.dev0"
