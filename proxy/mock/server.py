"""Built-in upstream server (`provider: mock`): the OpenAI and Anthropic wire formats on a real aiohttp
server, with scripted faults (status, stall, mid-stream drop), per-request `x-mock-*` overrides and
live counters at `GET /mock/stats`. Bodies and events come from the pure `proxy.mock_content`."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import uvloop
from aiohttp import web

from proxy import mock_content as mc
from proxy.mock_content import Json

__all__ = ["MOCK_STATS", "BadHeader", "Knobs", "MockFault", "MockSettings", "MockStats", "build_mock_app",
           "resolve_knobs", "run_mock_forever", "start_mock"]

MOCK_MODELS = ("mock-gpt-4o", "mock-gpt-4o-mini", "mock-embedding-3-small", "mock-claude-sonnet")
_RATE_HEADERS = {
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-limit-tokens": "2000000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-remaining-tokens": "1999000",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-reset-tokens": "30ms",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class MockFault:
    """A scripted failure, drawn per request with `probability`."""

    kind: Literal["status", "stall", "drop"]
    probability: float = 1.0
    status: int = 503
    retry_after: float | None = None
    stall: float = 0.0
    after_events: int = 3


@dataclass(frozen=True, slots=True)
class MockSettings:
    """Server-wide defaults; `x-mock-*` request headers override them per request."""

    ttft: float = 0.0
    token_delay: float = 0.0
    output_tokens: int = 16
    embedding_dim: int = 8
    faults: tuple[MockFault, ...] = ()
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Knobs:
    """What one request gets once settings, fault draws and `x-mock-*` headers are combined."""

    ttft: float
    token_delay: float
    output_tokens: int
    status: int | None
    retry_after: float | None
    stall: float
    drop_after: int | None


class BadHeader(ValueError):
    """An `x-mock-*` header value that cannot be used."""


def _header(headers: Mapping[str, str], name: str, lo: float, hi: float, integer: bool) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(int(raw.strip())) if integer else float(raw.strip())
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise BadHeader(f"header {name} must be {kind}, got {raw!r}") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise BadHeader(f"header {name} must be between {lo:g} and {hi:g}, got {raw!r}")
    return value


def resolve_knobs(headers: Mapping[str, str], settings: MockSettings, rng: random.Random) -> Knobs:
    """Draw the configured faults (one RNG draw per fault, in order), then let headers override."""
    status: int | None = None
    retry_after: float | None = None
    stall = 0.0
    drop: int | None = None
    for fault in settings.faults:
        if rng.random() >= fault.probability:
            continue
        if fault.kind == "status" and status is None:
            status, retry_after = fault.status, fault.retry_after
        elif fault.kind == "stall":
            stall = max(stall, fault.stall)
        elif fault.kind == "drop":
            drop = fault.after_events if drop is None else min(drop, fault.after_events)
    ttft = _header(headers, "x-mock-ttft-ms", 0, 600_000, False)
    delay = _header(headers, "x-mock-token-delay-ms", 0, 60_000, False)
    tokens = _header(headers, "x-mock-output-tokens", 0, 100_000, True)
    h_status = _header(headers, "x-mock-status", 400, 599, True)
    h_retry = _header(headers, "x-mock-retry-after", 0, 86_400, False)
    h_stall = _header(headers, "x-mock-stall-ms", 0, 600_000, False)
    h_drop = _header(headers, "x-mock-drop-after", 0, 1_000_000, True)
    status = int(h_status) if h_status is not None else status
    retry_after = h_retry if h_retry is not None else retry_after
    stall = h_stall / 1000 if h_stall is not None else stall
    drop = int(h_drop) if h_drop is not None else drop
    return Knobs(
        ttft=ttft / 1000 if ttft is not None else settings.ttft,
        token_delay=delay / 1000 if delay is not None else settings.token_delay,
        output_tokens=int(tokens) if tokens is not None else settings.output_tokens,
        status=status,
        retry_after=retry_after,
        stall=stall,
        drop_after=drop,
    )


# --- errors -------------------------------------------------------------------------------------

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def openai_error(status: int, message: str, param: str | None = None) -> Json:
    etype, code = "invalid_request_error", None
    if status == 429:
        etype, code = "requests", "rate_limit_exceeded"
    elif status >= 500:
        etype = "server_error"
    elif status == 401:
        code = "invalid_api_key"
    elif status == 404:
        code = "not_found"
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def anthropic_error(status: int, message: str, request_id: str) -> Json:
    etype = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": etype, "message": message}, "request_id": request_id}



def _seconds(value: float) -> str:
    """Header form of a number: an integer when whole, else up to millisecond precision."""
    return str(int(value)) if value == int(value) else repr(round(value, 3))


def _request_id() -> str:
    return "req_" + secrets.token_hex(12)


def _ok_headers(anthropic: bool) -> dict[str, str]:
    return {"request-id": _request_id()} if anthropic else {"x-request-id": _request_id(), **_RATE_HEADERS}


def _error(
    status: int, message: str, anthropic: bool, param: str | None = None, retry_after: float | None = None
) -> web.Response:
    rid = _request_id()
    headers = {"request-id": rid} if anthropic else {"x-request-id": rid}
    if retry_after is not None:
        headers["retry-after"] = _seconds(retry_after)
        headers["retry-after-ms"] = _seconds(retry_after * 1000)
    body = anthropic_error(status, message, rid) if anthropic else openai_error(status, message, param)
    reason = "Overloaded" if status == 529 else None  # not in http.HTTPStatus
    return web.Response(status=status, reason=reason, body=orjson.dumps(body), headers=headers,
                        content_type="application/json")


# --- stats ----------------------------------------------------------------------------------------


def _no_faults() -> dict[str, int]:
    return {"status": 0, "stall": 0, "drop": 0}


@dataclass(slots=True)
class MockStats:
    """Counters for tests and the benchmark; lives on the app, one per server."""

    requests_total: int = 0
    by_path: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    disconnects: int = 0  # the client went away before the response was complete
    faults: dict[str, int] = field(default_factory=_no_faults)

    def begin(self, path: str) -> None:
        self.requests_total += 1
        self.by_path[path] = self.by_path.get(path, 0) + 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def reset(self) -> None:
        """Zero the counters; requests still running stay counted as in flight."""
        self.requests_total, self.by_path, self.disconnects = 0, {}, 0
        self.max_in_flight, self.faults = self.in_flight, _no_faults()

    def as_json(self) -> Json:
        return dataclasses.asdict(self)


MOCK_STATS = web.AppKey("mock_stats", MockStats)
_SETTINGS = web.AppKey("mock_settings", MockSettings)
_RNG = web.AppKey("mock_rng", random.Random)
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
        return web.Response(body=body, content_type="application/json", headers=_ok_headers(anthropic))
    resp = web.StreamResponse(headers=_ok_headers(anthropic))
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
    resp = web.StreamResponse(headers=_ok_headers(anthropic))
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
    plan = mc.plan_chat(body, knobs.output_tokens, gen)
    if body.get("stream"):
        return await _stream(request, mc.chat_events(plan, gen), anthropic=False)
    return await _reply(request, mc.chat_response(plan, gen), plan.completion_tokens, anthropic=False)


async def _completions(request: web.Request) -> web.StreamResponse:
    body, knobs, gen = await _start(request)
    plan = mc.plan_completion(body, knobs.output_tokens)
    if body.get("stream"):
        return await _stream(request, mc.completion_events(plan, gen), anthropic=False)
    return await _reply(request, mc.completion_response(plan, gen), plan.completion_tokens, anthropic=False)


async def _embeddings(request: web.Request) -> web.StreamResponse:
    body, _, _ = await _start(request)
    resp = mc.embeddings_response(body, request.app[_SETTINGS].embedding_dim)
    return await _reply(request, resp, 0, anthropic=False)


async def _models(request: web.Request) -> web.StreamResponse:
    data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "signalbox"} for m in MOCK_MODELS]
    return await _reply(request, {"object": "list", "data": data}, 0, anthropic=False)


async def _messages(request: web.Request) -> web.StreamResponse:
    body, knobs, gen = await _start(request)
    plan = mc.plan_messages(body, knobs.output_tokens, gen)
    if body.get("stream"):
        return await _stream(request, mc.messages_events(plan, gen), anthropic=True)
    return await _reply(request, mc.messages_response(plan, gen), plan.completion_tokens, anthropic=True)


async def _count_tokens(request: web.Request) -> web.StreamResponse:
    body, _, _ = await _start(request)
    mc.require_field(body, "model", str)
    return await _reply(request, {"input_tokens": mc.anthropic_input_tokens(body)}, 0, anthropic=True)


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
        knobs = resolve_knobs(request.headers, request.app[_SETTINGS], request.app[_RNG])
        if knobs.stall > 0:
            stats.faults["stall"] += 1
            await asyncio.sleep(knobs.stall)
        if knobs.status is not None:
            stats.faults["status"] += 1
            message = f"mock upstream: injected status {knobs.status}"
            return _error(knobs.status, message, anthropic, retry_after=knobs.retry_after)
        request[_KNOBS] = knobs
        return await handler(request)
    except BadHeader as exc:
        return _error(400, str(exc), anthropic)
    except mc.InvalidRequest as exc:
        return _error(400, str(exc), anthropic, param=exc.param)
    except web.HTTPException as exc:  # unknown path or method, still in the provider's error shape
        return _error(exc.status, exc.reason, anthropic)
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
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/messages", _messages)
    app.router.add_post("/v1/messages/count_tokens", _count_tokens)
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
