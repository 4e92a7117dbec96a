"""The JSON-RPC method registry: each method declares its params schema and scope.

::

    @registry.method("status/get", scope=Scope.STATUS_READ)
    async def status_get(conn: Connection, params: None) -> dict[str, Any]: ...

``call`` is the one place that checks the caller's scope and validates params
(msgspec, before the handler runs) so no handler repeats either check. Invalid
params answer -32602 without echoing the input back.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from wardgate.errors import InvalidParams, MethodNotFound, PermissionDenied
from wardgate.roles import Scope


class HasScopes(Protocol):
    @property
    def scopes(self) -> frozenset[Scope]: ...


CtxT = TypeVar("CtxT", bound=HasScopes)
Handler = Callable[[CtxT, Any], Awaitable[Any]]


class NoParams(msgspec.Struct, forbid_unknown_fields=True):
    """For methods that take no params (absent, ``{}`` or ``[]``)."""


@dataclass(frozen=True, slots=True)
class MethodSpec(Generic[CtxT]):
    name: str
    handler: Handler[CtxT]
    scope: Scope | None
    params: type[msgspec.Struct]
    summary: str


class Registry(Generic[CtxT]):
    def __init__(self) -> None:
        self._methods: dict[str, MethodSpec[CtxT]] = {}

    def method(
        self,
        name: str,
        *,
        scope: Scope | None,
        params: type[msgspec.Struct] = NoParams,
    ) -> Callable[[Handler[CtxT]], Handler[CtxT]]:
        if name.startswith("rpc."):
            raise ValueError(f"method names starting with 'rpc.' are reserved: {name!r}")

        def register(handler: Handler[CtxT]) -> Handler[CtxT]:
            if name in self._methods:
                raise ValueError(f"method {name!r} is already registered")
            summary = (handler.__doc__ or "").strip().splitlines()[0] if handler.__doc__ else ""
            self._methods[name] = MethodSpec(name, handler, scope, params, summary)
            return handler

        return register

    def __iter__(self) -> Iterator[MethodSpec[CtxT]]:
        return iter(sorted(self._methods.values(), key=lambda spec: spec.name))

    def get(self, name: str) -> MethodSpec[CtxT] | None:
        return self._methods.get(name)

    async def call(self, ctx: CtxT, name: str, params: dict[str, Any] | list[Any] | None) -> Any:
        spec = self._methods.get(name)
        if spec is None:
            raise MethodNotFound
        if spec.scope is not None and spec.scope not in ctx.scopes:
            raise PermissionDenied(hint=f"this method needs the {spec.scope.value!r} scope")
        return await spec.handler(ctx, convert_params(spec.params, params))


def convert_params(schema: type[msgspec.Struct], params: dict[str, Any] | list[Any] | None) -> Any:
    """Validate ``params`` against ``schema``; positional params map onto fields in order."""
    if params is None:
        params = {}
    if isinstance(params, list):
        names = schema.__struct_fields__
        if len(params) > len(names):
            raise InvalidParams(hint="too many positional params")
        params = dict(zip(names, params, strict=False))
    try:
        return msgspec.convert(params, schema)
    except msgspec.ValidationError as exc:
        raise InvalidParams(hint=describe_validation_error(exc)) from None


_QUOTED = re.compile(r"'[^']*'|unknown field `[^`]*`")


def describe_validation_error(exc: msgspec.ValidationError) -> str:
    """msgspec's message (expected type and field path) without any value taken from the input."""
    return _QUOTED.sub(lambda m: "unknown field" if m.group().startswith("unknown") else "'...'", str(exc))[
        :200
    ]


def openrpc_document(registry: Registry[Any], *, title: str, version: str) -> dict[str, Any]:
    """The published method list (OpenRPC 1.2.6) with each method's params schema."""
    methods = []
    for spec in registry:
        _, components = msgspec.json.schema_components(
            [spec.params], ref_template="#/components/schemas/{name}"
        )
        schema = components.get(spec.params.__name__, {})
        required = set(schema.get("required", []))
        params = [
            {"name": name, "required": name in required, "schema": prop}
            for name, prop in schema.get("properties", {}).items()
        ]
        entry: dict[str, Any] = {
            "name": spec.name,
            "summary": spec.summary,
            "params": params,
            "paramStructure": "either",
            "result": {"name": "result", "schema": {}},
        }
        if spec.scope is not None:
            entry["x-scope"] = spec.scope.value
        methods.append(entry)
    return {"openrpc": "1.2.6", "info": {"title": title, "version": version}, "methods": methods}
