"""The server's TLS context from the configuration (``security.tls.*``)."""

from __future__ import annotations

import ssl
from pathlib import Path

from wardgate.config import Config, allowed_host_names
from wardgate.errors import ConfigError
from wardgate.tls import ensure_auto_cert, fingerprint_from_file, server_ssl_context


def server_ssl_for(config: Config) -> tuple[ssl.SSLContext | None, str | None]:
    """(context, certificate fingerprint), or (None, None) when TLS is off."""
    tls = config.security.tls
    if not config.tls_enabled:
        return None, None
    if tls.auto_cert:
        try:
            paths = ensure_auto_cert(config.home, allowed_host_names(config))
        except ValueError as exc:
            raise ConfigError(f"security.tls.auto_cert: {exc}") from None
        return server_ssl_context(paths.cert_file, paths.key_file), paths.fingerprint_sha256
    cert, key = Path(tls.cert_file).expanduser(), Path(tls.key_file).expanduser()
    context = server_ssl_context(cert, key)
    return context, fingerprint_from_file(cert)
