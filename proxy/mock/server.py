"""Built-in upstream server (`provider: mock`): the OpenAI (chat, completions, Responses, embeddings) and
Anthropic wire formats on a real aiohttp server, with scripted faults (status, stall, mid-stream drop),
per-request `x-mock-*` overrides and live counters at `GET /mock/stats`. Bodies and events come from the
pure protocol modules beside it (chat, responses, messages, embeddings)."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
import uvloop
from aiohttp import web

from proxy.mock import chat, embeddings, messages, realtime, responses
from proxy.mock import content as mc
from proxy.mock.content import Json
from proxy.mock.faults import BadHeader, Knobs, MockFault, MockSettings, resolve_knobs
from proxy.mock.stats import MOCK_STATS, MockStats
from proxy.mock.wire import error_response, ok_headers

__all__ = ["MOCK_STATS", "BadHeader", "Knobs", "MockFault", "MockSettings", "MockStats", "build_mock_app",
           "resolve_knobs", "run_mock_forever", "start_mock"]

MOCK_MODELS = ("mock-gpt-4o", "mock-gpt-4o-mini", "mock-embedding-3-small", "mock-claude-sonnet")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_SETTINGS = web.AppKey("mock_settings", MockSettings)
_RNG = web.AppKey("mock_rng", random.Random)
_USED = web.AppKey("mock_used", list[int])
"""Per fault: the requests it was given to (faults with `times` are spent after that many)."""
_KNOBS = web.RequestKey("mock_knobs", Knobs)
_GONE = web.RequestKey("mock_gone", bool)


def _note_disconnect(request: web.Request) -> None:
    if not request.get(_GONE):  # count once, whether seen as a failed write or a cancellation
        request[_GONE] = True
        request.app[MOCK_STATS].disconnects += 1


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _drop(request: web.Request) -> None:
    """Close the TCP connection mid-response: what was written is flushed, the rest never comes."""
    request.app[MOCK_STATS].faults["drop"] += 1
    if request.transport is not None:
        request.transport.close()


# --- responding -----------------------------------------------------------------------------------


async def _reply(request: web.Request, obj: Json, tokens: int, anthropic: bool) -> web.StreamResponse:
    """A JSON body after the simulated generation time; a drop fault sends headers and then closes."""
    knobs = request[_KNOBS]
    wait = knobs.ttft + knobs.token_delay * tokens
    if wait > 0:
        await asyncio.sleep(wait)
    if _client_gone(request):
        _note_disconnect(request)
    body = orjson.dumps(obj)
    if knobs.drop_after is None:
        return web.Response(body=body, content_type="application/json", headers=ok_headers(anthropic))
    resp = web.StreamResponse(headers=ok_headers(anthropic))
    resp.content_type = "application/json"
    resp.content_length = len(body)
    try:
        await resp.prepare(request)
    except ConnectionResetError:
        _note_disconnect(request)
    _drop(request)
    return resp


async def _stream(request: web.Request, events: Iterator[bytes], anthropic: bool) -> web.StreamResponse:
    """Write each event as it is produced: headers at once, ttft before the first event,
    token_delay between events; stop generating as soon as the client is gone."""
    knobs = request[_KNOBS]
    resp = web.StreamResponse(headers=ok_headers(anthropic))
    resp.content_type = "text/event-stream"
    resp.charset = "utf-8"
    resp.headers["cache-control"] = "no-cache"
    try:
        await resp.prepare(request)
        for i, event in enumerate(events):
            if knobs.drop_after is not None and i >= knobs.drop_after:
                _drop(request)
                return resp
            pause = knobs.ttft if i == 0 else knobs.token_delay
            if pause > 0:
                await asyncio.sleep(pause)
            await resp.write(event)
        await resp.write_eof()
    except ConnectionResetError:
        _note_disconnect(request)
    return resp


async def _start(request: web.Request) -> tuple[Json, Knobs, mc.Gen]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise mc.InvalidRequest("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise mc.InvalidRequest("The request body must be a JSON object.")
    return body, request[_KNOBS], mc.Gen(rid=secrets.token_hex(12), created=int(time.time()))


# --- handlers -------------------------------------------------------------------------------------


async def _chat(request: web.Request) -> web.StreamResponse:
    body, knobs, gen = await _start(request)
    plan = chat.plan_chat(body, knobs.output_tokens, gen)
    if body.get("stream"):
        return await _stream(request, chat.chat_events(plan, gen), anthropic=False)
    return await _reply(request, chat.chat_response(plan, gen), plan.completion_tokens, anthropic=False)


async def _completions(request: web.Request) -> web.StreamResponse:
    body, knobs, gen = await _start(request)
    plan = chat.plan_completion(body, knobs.output_tokens)
    if body.get("stream"):
        return await _stream(request, chat.completion_events(plan, gen), anthropic=False)
    return await _reply(request, chat.completion_response(plan, gen), plan.completion_tokens, anthropic=False)


async def _responses(request: web.Request) -> web.StreamResponse:
    body, knobs, gen = await _start(request)
    plan = responses.plan_response(body, knobs.output_tokens, gen)
    if body.get("stream"):
        return await _stream(request, responses.response_events(plan, gen, body), anthropic=False)
    answer = responses.response_body(plan, gen, body)
    return await _reply(request, answer, plan.completion_tokens, anthropic=False)


async def _embeddings(request: web.Request) -> web.StreamResponse:
    body, _, _ = await _start(request)
    resp = embeddings.embeddings_response(body, request.app[_SETTINGS].embedding_dim)
    return await _reply(request, resp, 0, anthropic=False)


async def _models(request: web.Request) -> web.StreamResponse:
    data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "signalbox"} for m in MOCK_MODELS]
    return await _reply(request, {"object": "list", "data": data}, 0, anthropic=False)


async def _messages(request: web.Request) -> web.StreamResponse:
    body, knobs, gen = await _start(request)
    plan = messages.plan_messages(body, knobs.output_tokens, gen)
    if body.get("stream"):
        return await _stream(request, messages.messages_events(plan, gen), anthropic=True)
    return await _reply(request, messages.messages_response(plan, gen), plan.completion_tokens, anthropic=True)


async def _count_tokens(request: web.Request) -> web.StreamResponse:
    body, _, _ = await _start(request)
    mc.require_field(body, "model", str)
    return await _reply(request, {"input_tokens": messages.anthropic_input_tokens(body)}, 0, anthropic=True)


async def _realtime(request: web.Request) -> web.StreamResponse:
    return await realtime.realtime_socket(request, request[_KNOBS].output_tokens)


async def _stats(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(request.app[MOCK_STATS].as_json()), content_type="application/json")


async def _stats_reset(request: web.Request) -> web.Response:
    request.app[MOCK_STATS].reset()
    return await _stats(request)


@web.middleware
async def _mock_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts, draws faults and applies header overrides for every /v1 request; renders
    errors in the protocol of the endpoint (Anthropic under /v1/messages, else OpenAI)."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    stats = request.app[MOCK_STATS]
    resource = request.match_info.route.resource
    stats.begin(resource.canonical if resource is not None else "unmatched")
    anthropic = request.path.startswith("/v1/messages")
    try:
        knobs = resolve_knobs(request.headers, request.app[_SETTINGS], request.app[_RNG], request.app[_USED])
        if knobs.stall > 0:
            stats.faults["stall"] += 1
            await asyncio.sleep(knobs.stall)
        if knobs.status is not None:
            stats.faults["status"] += 1
            message = f"mock upstream: injected status {knobs.status}"
            return error_response(knobs.status, message, anthropic, retry_after=knobs.retry_after)
        request[_KNOBS] = knobs
        return await handler(request)
    except BadHeader as exc:
        return error_response(400, str(exc), anthropic)
    except mc.InvalidRequest as exc:
        return error_response(400, str(exc), anthropic, param=exc.param)
    except web.HTTPException as exc:  # unknown path or method, still in the provider's error shape
        return error_response(exc.status, exc.reason, anthropic)
    except asyncio.CancelledError:
        _note_disconnect(request)  # with handler_cancellation the handler is cancelled when the client leaves
        raise
    finally:
        stats.in_flight -= 1


def build_mock_app(settings: MockSettings) -> web.Application:
    """A fresh mock upstream app; its state (stats, fault RNG) hangs off the app."""
    app = web.Application(middlewares=[_mock_middleware], client_max_size=32 * 1024**2)
    app[MOCK_STATS] = MockStats()
    app[_SETTINGS] = settings
    app[_RNG] = random.Random(settings.seed)
    app[_USED] = [0] * len(settings.faults)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/responses", _responses)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/messages", _messages)
    app.router.add_post("/v1/messages/count_tokens", _count_tokens)
    app.router.add_get("/v1/realtime", _realtime)
    app.router.add_get("/mock/stats", _stats)
    app.router.add_post("/mock/stats/reset", _stats_reset)
    return app


_RUNNER_OPTIONS: dict[str, Any] = {"handler_cancellation": True, "access_log": None, "shutdown_timeout": 1.0}


async def start_mock(
    settings: MockSettings, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve the mock in this event loop; returns the runner (call `cleanup()`) and the base URL."""
    runner = web.AppRunner(build_mock_app(settings), **_RUNNER_OPTIONS)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    url_host = "127.0.0.1" if host in ("", "0.0.0.0") else f"[{host}]" if ":" in host else host
    return runner, f"http://{url_host}:{bound_port}"


def run_mock_forever(settings: MockSettings, host: str, port: int) -> None:
    """Blocking server on uvloop for `signalbox mock --port N`; returns on SIGINT/SIGTERM."""
    app = build_mock_app(settings)
    web.run_app(app, host=host, port=port, loop=uvloop.new_event_loop(), **_RUNNER_OPTIONS)
