"""GET /v1/models and /v1/models/{id}: the models a tenant's routes take, from the policy (no upstream
call), in the caller's protocol."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from proxy.call import Call
from proxy.errors import NoRoute
from proxy.ingress.identify import identify
from proxy.runtime import Runtime
from proxy.upstream.headers import QUEUE_WAIT_HEADER


async def list_models(request: web.Request, call: Call, state: Runtime) -> web.Response:
    """The models the tenant's routes take, from the policy (no upstream call)."""
    protocol = call.protocol
    call.tenant = tenant = identify(request, call.plan)
    models = call.plan.models_for(tenant)
    wanted = request.match_info.get("model")
    headers = {"x-request-id": call.request_id, QUEUE_WAIT_HEADER: "0"}
    if protocol == "anthropic":
        headers["request-id"] = call.request_id
    entry = _anthropic_model if protocol == "anthropic" else _openai_model
    created = int(state.started_wall)
    body: dict[str, Any]
    if wanted is not None:
        call.model = wanted
        if wanted not in models:
            raise NoRoute(f"model '{wanted}' is not available to you. Models you may use: {', '.join(models)}")
        body = entry(wanted, created)
    elif protocol == "anthropic":
        body = {
            "data": [entry(m, created) for m in models],
            "has_more": False,
            "first_id": models[0] if models else None,
            "last_id": models[-1] if models else None,
        }
    else:
        body = {"object": "list", "data": [entry(m, created) for m in models]}
    call.status = 200
    data = orjson.dumps(body)
    call.bytes_out = len(data)
    return web.Response(body=data, content_type="application/json", headers=headers)


def _openai_model(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "signalbox"}


def _anthropic_model(model: str, created: int) -> dict[str, Any]:
    stamp = datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"type": "model", "id": model, "display_name": model, "created_at": stamp}
