"""Who is calling and where the request goes: the request id, the tenant (by the policy's identification
mode), and the route the compiled plan resolves for the tenant, path and model."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from proxy.call import Call
from proxy.errors import AuthenticationFailed, MissingModel, NoRoute
from proxy.policy.plan import Plan, TenantRule

# Endpoints whose body must name a model; other /v1 paths pass through with model "".
MODEL_REQUIRED = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
    }
)


def new_request_id() -> str:
    """24 hex digits. A correlation id, not a secret: the Mersenne Twister, not a getrandom() call per request."""
    return f"{random.getrandbits(96):024x}"


def request_id_of(headers: Mapping[str, str]) -> str:
    """The client's x-request-id if it is a plain token (printable ASCII, at most 128 characters), else a
    new one: it is echoed in a response header and written to the access log, which take no other bytes."""
    sent = headers.get("x-request-id")
    if sent and len(sent) <= 128 and sent.isascii() and sent.isprintable():
        return sent
    return new_request_id()


def has_dot_segment(raw_path: str) -> bool:
    """A `.` or `..` segment, plain or percent-encoded. Routes match the path as sent, but the upstream (or
    the CDN in front of it) resolves dot segments (RFC 3986 §5.2.4): `/v1/chat/../files` would pass a
    route limited to `/v1/chat/*` and reach the Files API with the platform's key. Refused, not resolved:
    no SDK sends them."""
    for segment in raw_path.split("/"):
        if segment.replace("%2e", ".").replace("%2E", ".") in (".", ".."):
            return True
    return False


def identify(request: web.Request, plan: Plan) -> TenantRule:
    """Which tenant is calling, by the policy's identification mode."""
    ident = plan.identify
    if ident.mode == "api_key":
        key = _bearer(request.headers.get("authorization")) or request.headers.get("x-api-key")
        if not key:
            raise AuthenticationFailed(
                "no API key: send your Signalbox key as 'Authorization: Bearer <key>' (or x-api-key)"
            )
        tenant = plan.tenant_for_key(key)
        if tenant is None:
            raise AuthenticationFailed("the API key is not known to this proxy; check the key your app sends")
        return tenant
    name = request.headers.get(ident.header) if ident.mode in ("header", "passthrough") else None
    name = name or ident.tenant
    if name is None:
        raise AuthenticationFailed(f"no tenant: send the {ident.header} header")
    tenant_rule = plan.tenants.get(name)
    if tenant_rule is None:
        shown = f"'{name}'" if len(name) <= 64 and name.isascii() and name.isprintable() else "(not shown)"
        raise AuthenticationFailed(f"unknown tenant {shown} in the {ident.header} header")
    return tenant_rule


def _bearer(value: str | None) -> str | None:
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip() or None
    return None


def resolve(call: Call, plan: Plan) -> Any:
    assert call.tenant is not None
    if not call.model and call.path in MODEL_REQUIRED:
        raise MissingModel("the request body must name a 'model'", param="model")
    route = plan.resolve(call.path, call.model, call.tenant)
    if route is None:
        models = plan.models_for(call.tenant)
        allowed = ", ".join(models) if models else "none"
        what = f"model '{call.model}' on {call.path}" if call.model else call.path
        raise NoRoute(
            f"no route for {what} for tenant '{call.tenant.name}'. Models you may use: {allowed}",
            param="model" if call.model else None,
        )
    return route
