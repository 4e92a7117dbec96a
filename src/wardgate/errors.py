"""The wardgate exception tree and its wire mapping.

Every error a client can see is one of these classes. Each class knows the
reason code (a short machine-readable string), the HTTP status used when the
error happens before a WebSocket upgrade, the JSON-RPC error code used inside
a session, and the WebSocket close code used when it ends one.

Messages are fixed strings chosen here: never user input, never a token, a
path or an exception text from somewhere else.

::

    WardgateError
    ├── ConfigError                       (refuses to start; not a wire error)
    ├── ProtocolError                     the peer broke JSON-RPC
    │   ├── ParseError            -32700
    │   ├── InvalidRequest        -32600
    │   ├── MethodNotFound        -32601
    │   └── InvalidParams         -32602
    ├── AuthError                         credentials
    │   ├── AuthenticationRequired  401  -32000  authentication_required
    │   ├── InvalidToken            401  -32001  invalid_token
    │   ├── TokenExpired            401  -32002  token_expired
    │   ├── SessionExpired          401  -32003  session_expired
    │   ├── TokenRevoked            401  -32001  token_revoked
    │   └── PermissionDenied        403  -32004  permission_denied
    ├── PolicyError                       the gate refused (before auth)
    │   ├── OriginForbidden         403  origin_forbidden
    │   ├── HostForbidden           403  host_forbidden
    │   ├── IpForbidden             403  ip_forbidden
    │   ├── RateLimited             429  rate_limited
    │   ├── TooManyConnections      503  too_many_connections
    │   ├── UpstreamNotFound        404  upstream_not_found
    │   └── MethodNotAllowed        405  method_not_allowed
    ├── BodyTooLarge                413  body_too_large      (a ProtocolError)
    ├── BadGateway                  502  1014  bad_gateway
    ├── GatewayTimeout              504  1014  gateway_timeout
    ├── StoreUnavailable            503  store_unavailable
    └── ApplicationError                  a method failed (-32010 and below)
        ├── AgentNotConfigured           -32011 agent_not_configured
        ├── AgentBusy                    -32012 agent_busy
        ├── AgentNotRunning              -32013 agent_not_running
        ├── SessionNotFound              -32014 session_not_found
        ├── PathRefused                  -32015 path_refused
        ├── FileNotFound                 -32016 file_not_found
        ├── GitFailed                    -32017 git_failed
        └── InternalError           500  -32603 internal_error
"""

from __future__ import annotations

from typing import Any, ClassVar

# JSON-RPC 2.0 standard codes (https://www.jsonrpc.org/specification#error_object)
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# Seed 000's authentication codes. Application errors use -32010 and below.
AUTHENTICATION_REQUIRED = -32000
INVALID_TOKEN = -32001
TOKEN_EXPIRED = -32002
SESSION_EXPIRED = -32003
PERMISSION_DENIED = -32004
APPLICATION_ERROR = -32010

# WebSocket close codes (RFC 6455 section 7.4 plus wardgate's 4xxx range).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_BAD_GATEWAY = 1014
CLOSE_SESSION_EXPIRED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_INIT_TIMEOUT = 4408
CLOSE_RATE_LIMITED = 4429


class WardgateError(Exception):
    """Base of every wardgate error."""

    reason: ClassVar[str] = "error"
    http_status: ClassVar[int] = 400
    rpc_code: ClassVar[int] = APPLICATION_ERROR
    close_code: ClassVar[int] = CLOSE_POLICY_VIOLATION
    message: ClassVar[str] = "Request failed."

    def __init__(self, hint: str | None = None, **data: Any) -> None:
        # `hint` and `data` are chosen by wardgate code, never copied from input.
        super().__init__(self.message)
        self.hint = hint
        self.data = data

    def body(self) -> dict[str, Any]:
        """The JSON body for an HTTP error response (seed 000's shape)."""
        out: dict[str, Any] = {"error": self.reason, "message": self.message}
        if self.hint:
            out["hint"] = self.hint
        return out

    def rpc_error(self) -> dict[str, Any]:
        """The JSON-RPC error object."""
        data: dict[str, Any] = {"reason": self.reason}
        if self.hint:
            data["hint"] = self.hint
        data.update(self.data)
        return {"code": self.rpc_code, "message": self.message, "data": data}


class ConfigError(WardgateError):
    """The configuration is invalid or contradicts its mode; the daemon will not start.

    Unlike wire errors, its text is shown to the operator and names the setting.
    """

    reason = "config_error"

    def __init__(self, text: str) -> None:
        Exception.__init__(self, text)
        self.hint = None
        self.data = {}
        self.text = text

    def __str__(self) -> str:
        return self.text


# --- protocol (the peer broke JSON-RPC) -------------------------------------------------


class ProtocolError(WardgateError):
    reason = "protocol_error"
    http_status = 400


class ParseError(ProtocolError):
    reason = "parse_error"
    rpc_code = PARSE_ERROR
    message = "Parse error"


class InvalidRequest(ProtocolError):
    reason = "invalid_request"
    rpc_code = INVALID_REQUEST
    message = "Invalid Request"


class MethodNotFound(ProtocolError):
    reason = "method_not_found"
    rpc_code = METHOD_NOT_FOUND
    message = "Method not found"


class InvalidParams(ProtocolError):
    reason = "invalid_params"
    rpc_code = INVALID_PARAMS
    message = "Invalid params"


# --- authentication ------------------------------------------------------------------


class AuthError(WardgateError):
    http_status = 401
    close_code = CLOSE_SESSION_EXPIRED


class AuthenticationRequired(AuthError):
    reason = "authentication_required"
    rpc_code = AUTHENTICATION_REQUIRED
    message = "Token required. Scan the pairing QR code to connect."


class InvalidToken(AuthError):
    reason = "invalid_token"
    rpc_code = INVALID_TOKEN
    message = "Token is invalid. Pair again with 'wardgate pair'."


class TokenExpired(AuthError):
    reason = "token_expired"
    rpc_code = TOKEN_EXPIRED
    message = "Token has expired."


class SessionExpired(AuthError):
    reason = "session_expired"
    rpc_code = SESSION_EXPIRED
    message = "Session has expired. Refresh or pair again."


class TokenRevoked(AuthError):
    reason = "token_revoked"
    rpc_code = INVALID_TOKEN
    message = "Token has been revoked."


class PermissionDenied(AuthError):
    reason = "permission_denied"
    http_status = 403
    rpc_code = PERMISSION_DENIED
    close_code = CLOSE_FORBIDDEN
    message = "Permission denied."


class CsrfFailed(PermissionDenied):
    reason = "csrf_failed"
    message = "A request authenticated by the session cookie needs the X-CSRF-Token header from login."


# --- gate policy (before authentication) ---------------------------------------------


class PolicyError(WardgateError):
    http_status = 403
    close_code = CLOSE_FORBIDDEN


class OriginForbidden(PolicyError):
    reason = "origin_forbidden"
    message = "Connection from this origin is not allowed."


class HostForbidden(PolicyError):
    reason = "host_forbidden"
    message = "This host name is not allowed."


class IpForbidden(PolicyError):
    reason = "ip_forbidden"
    message = "Connection from this address is not allowed."


class RateLimited(PolicyError):
    reason = "rate_limited"
    http_status = 429
    close_code = CLOSE_RATE_LIMITED
    message = "Too many requests. Try again later."

    def __init__(self, retry_after: float = 1.0, hint: str | None = None) -> None:
        super().__init__(hint)
        self.retry_after = retry_after


class TooManyConnections(PolicyError):
    reason = "too_many_connections"
    http_status = 503
    close_code = CLOSE_TRY_AGAIN_LATER
    message = "Too many connections. Try again later."


# --- relays (gateway proxy) ---------------------------------------------------------
# Messages are fixed strings: never an upstream's name, URL, status text or header.


class UpstreamNotFound(PolicyError):
    """No upstream of that name. Deliberately does not list the configured ones."""

    reason = "upstream_not_found"
    http_status = 404
    message = "No such upstream."


class MethodNotAllowed(PolicyError):
    reason = "method_not_allowed"
    http_status = 405
    message = "This method is not allowed for this upstream."


class BodyTooLarge(ProtocolError):
    reason = "body_too_large"
    http_status = 413
    close_code = CLOSE_MESSAGE_TOO_BIG
    message = "The request body is too large for this upstream."


class BadGateway(WardgateError):
    """The upstream could not be reached, refused us, or answered with something unusable."""

    reason = "bad_gateway"
    http_status = 502
    close_code = CLOSE_BAD_GATEWAY
    message = "The upstream is unavailable."


class GatewayTimeout(WardgateError):
    reason = "gateway_timeout"
    http_status = 504
    close_code = CLOSE_BAD_GATEWAY
    message = "The upstream did not answer in time."


class StoreUnavailable(WardgateError):
    reason = "store_unavailable"
    http_status = 503
    rpc_code = APPLICATION_ERROR
    close_code = CLOSE_TRY_AGAIN_LATER
    message = "The credential store is unavailable. Try again later."


# --- application -----------------------------------------------------------------------


class ApplicationError(WardgateError):
    """A method failed for a reason the client can act on (-32010 and below)."""

    reason = "application_error"
    rpc_code = APPLICATION_ERROR


class InternalError(ApplicationError):
    """Anything unexpected: the client sees this generic text; the traceback is logged."""

    reason = "internal_error"
    http_status = 500
    rpc_code = INTERNAL_ERROR
    close_code = CLOSE_INTERNAL_ERROR
    message = "Internal error"


class AgentNotConfigured(ApplicationError):
    reason = "agent_not_configured"
    rpc_code = -32011
    message = "No agent of this type is configured (workspace.agent.command / workspace.agents)."


class AgentBusy(ApplicationError):
    reason = "agent_busy"
    rpc_code = -32012
    message = "An agent is already running in this workspace."


class AgentNotRunning(ApplicationError):
    reason = "agent_not_running"
    rpc_code = -32013
    message = "No agent is running in this session."


class SessionNotFound(ApplicationError):
    reason = "session_not_found"
    rpc_code = -32014
    message = "No such session."


class PathRefused(ApplicationError):
    """The path is outside the workspace, deny-listed or malformed. One message for all, on purpose."""

    reason = "path_refused"
    http_status = 403
    rpc_code = -32015
    message = "This path is not available."


class FileNotFound(ApplicationError):
    reason = "file_not_found"
    http_status = 404
    rpc_code = -32016
    message = "No such file in the workspace."


class GitFailed(ApplicationError):
    reason = "git_failed"
    rpc_code = -32017
    message = "git failed."
