"""Moves an upstream SSE stream to the client event by event (whole bodies: whole.py).

Stream rules: write only whole events (so an injected heartbeat never splits one), read the next
upstream chunk only after the previous write returned (aiohttp drains above 64 KiB, so a slow
client stops our reads and TCP pushes back on the upstream), close the upstream the moment the
client goes, and end a broken stream with one error event in the client's protocol. A single
watchdog timer per stream does the timing (heartbeats, first-token and idle limits, the deadline, a
slow client) so the per-event path carries no timers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.call import Call
from proxy.errors import (
    ProxyError,
    SlowClient,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
    stream_error_frame,
)
from proxy.policy.plan import StreamSpec, TimeoutSpec
from proxy.providers.exchange import StreamTranslator
from proxy.redact import EMPTY, Redactor
from proxy.streaming.sse import DONE, SSEDecoder, SSEEvent, encode_comment
from proxy.streaming.whole import BodyTransform, read_body, read_failure, too_large
from proxy.tasks import spawn
from proxy.upstream.body import Whole

# `data:` may omit the space (valid SSE; the SDK only checks that the data starts with [DONE]).
_DONE_PREFIXES = (DONE.rstrip(b"\n"), b"data:[DONE]")
log = logging.getLogger("signalbox.relay")


@dataclass(frozen=True, slots=True)
class StreamSettings:
    heartbeat: float = 15.0
    """Write `: ping` after this much downstream silence (0 turns heartbeats off)."""
    slow_client: float = 60.0
    """End the stream when one write to the client has been blocked this long."""
    max_event_buffer: int = 16 * 1024 * 1024
    """Largest partial event held while waiting for its end."""


def route_settings(process: StreamSettings, route: StreamSpec | None) -> StreamSettings:
    """The process settings with a route's `stream:` overrides applied."""
    if route is None:
        return process
    return replace(
        process,
        heartbeat=process.heartbeat if route.heartbeat is None else route.heartbeat,
        slow_client=process.slow_client if route.slow_client is None else route.slow_client,
    )


class _Watch:
    """Shared state between a stream's relay loop and its watchdog."""

    __slots__ = ("last_write", "last_event", "first_event", "writing", "write_started", "failure")

    def __init__(self, now: float) -> None:
        self.last_write = now
        self.last_event = now
        self.first_event = False
        self.writing = 0  # writes in progress: the relay's and a heartbeat's may overlap
        self.write_started = now
        self.failure: ProxyError | None = None


async def respond_stream(
    request: web.Request,
    call: Call,
    upstream: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    timeouts: TimeoutSpec,
    settings: StreamSettings,
    deadline: float,
    translator: StreamTranslator | None = None,
    open_streams: set[Callable[[ProxyError], None]] | None = None,
    prepared: web.StreamResponse | None = None,
    redact: Redactor = EMPTY,
) -> web.StreamResponse:
    """Relay an SSE stream; returns the prepared response once the stream has ended, however it ended.

    With a `translator`, each upstream event is parsed and re-encoded in the client's protocol;
    without one, events pass through byte for byte. `prepared`: the 200 and SSE headers already went
    out while the request was queued (QueuedStream); the events follow them."""
    watch = _Watch(time.monotonic())
    heartbeat = encode_comment("ping")
    if prepared is not None:
        response = prepared
    else:
        headers["Content-Type"] = "text/event-stream; charset=utf-8"
        headers["Cache-Control"] = "no-cache"
        headers["X-Accel-Buffering"] = "no"
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        if settings.heartbeat > 0:
            await _write(response, heartbeat, watch)
    # first_token counts from when the request was sent, so the wait for the headers counts too.
    sent_ago = call.attempts[-1].duration if call.attempts else 0.0
    dog = _Watchdog(request, response, upstream, watch, timeouts, settings, deadline, heartbeat, sent_ago)
    decoder = SSEDecoder()

    def end(error: ProxyError) -> None:
        """Called by the drain at shutdown: end this stream with `error` at the next event boundary."""
        if watch.failure is None:
            watch.failure = error
        upstream.close()

    if open_streams is not None:
        open_streams.add(end)
    ended = False  # the upstream's stream ended and nothing failed: its connection may be reused
    try:
        await _pump(response, upstream, decoder, call, watch, settings, translator, redact)
        ended = watch.failure is None
    except ConnectionResetError:
        call.client_gone = True
    finally:
        dog.stop()
        if isinstance(watch.failure, SlowClient):
            call.client_gone = True
            call.error = watch.failure.reason  # told apart from a client that simply left
        if not ended:
            upstream.close()  # a broken or abandoned stream: the upstream must stop generating now
        if open_streams is not None:
            open_streams.discard(end)
    try:
        if not call.client_gone:
            if watch.failure is not None:
                await _finish_with_error(response, call, watch.failure)
            else:
                try:
                    await response.write_eof()
                except ConnectionResetError:
                    call.client_gone = True
    finally:
        if not ended or call.client_gone:
            upstream.close()
        elif upstream.content.at_eof():
            upstream.release()  # the whole body is read: the connection goes back to the pool
        else:
            try:
                await asyncio.sleep(0)  # one loop turn: the chunk terminator is usually in the socket already
            finally:
                if upstream.content.at_eof():
                    upstream.release()
                else:  # off the request's own time (access log, metrics)
                    spawn(_recycle(upstream), name="recycle")
    return response


_NOT_A_FIELD = frozenset(b":\r\n")  # first bytes of a comment line or a blank line

_RECYCLE_WAIT = 0.1
"""How long a finished stream waits for the end of its upstream body after [DONE] (the chunk terminator
follows within microseconds) so that the connection goes back to the pool instead of being closed."""


async def _recycle(upstream: aiohttp.ClientResponse) -> None:
    """Return a finished stream's upstream connection to the pool once its body ends: a new connection
    per stream would cost a TCP (and, to a real vendor, TLS) handshake each time. Closed instead if the
    end does not come at once."""
    content = upstream.content
    complete = False
    try:
        async with asyncio.timeout(_RECYCLE_WAIT):
            while not content.at_eof() and await content.readany():
                pass  # anything after [DONE] is not for the client
        complete = True
    except (TimeoutError, aiohttp.ClientError):
        pass
    finally:
        if complete:
            upstream.release()
        else:
            upstream.close()


async def _pump(
    response: web.StreamResponse,
    upstream: aiohttp.ClientResponse,
    decoder: SSEDecoder,
    call: Call,
    watch: _Watch,
    settings: StreamSettings,
    translator: StreamTranslator | None,
    redact: Redactor = EMPTY,
) -> None:
    last: SSEEvent | None = None  # the newest event passed through, judged at EOF
    plain = translator is None and not call.want_usage  # pass-through: no event needs parsing
    whole = decoder.whole
    monotonic = time.monotonic
    last_raw: bytes | None = None  # the newest event when it came by the fast path (no SSEEvent built)
    marked = False  # the first event relayed to the client has been timed
    # An upstream's in-stream error may quote the credentials it got: events that say "error" are searched.
    scrub = redact.scrub if redact else None
    try:
        async for chunk in upstream.content.iter_any():
            if plain and whole(chunk) and chunk[0] not in _NOT_A_FIELD:
                # The common case: one whole event that starts with a field line (so not a keep-alive
                # comment), relayed as it came, without building an event. The slow path below does the same.
                last, last_raw = None, chunk
                now = monotonic()
                watch.last_event = now
                watch.first_event = True
                if not marked:
                    marked = True
                    call.mark("first_token")
                call.events_relayed += 1
                call.bytes_out += len(chunk)
                if not watch.writing:
                    watch.write_started = now
                watch.writing += 1
                try:
                    await response.write(scrub(chunk) if scrub is not None and b"error" in chunk else chunk)
                finally:
                    watch.writing -= 1
                    watch.last_write = monotonic()
                if chunk.startswith(_DONE_PREFIXES):
                    return
                continue
            events = decoder.feed(chunk)
            if not events:
                if decoder.buffered > settings.max_event_buffer:
                    watch.failure = UpstreamUnreachable("upstream sent an event larger than the proxy's limit")
                    return
                continue
            done = False
            progressed = False
            out: list[bytes] = []
            for event in events:
                if event.is_comment_only:
                    continue  # upstream keep-alives are not progress; our own heartbeats cover silence
                progressed = True  # even when the translator drops it (a model still thinking is not silent)
                if call.want_usage and _has_usage(event.raw) and _note_usage(call, event.data_bytes()):
                    if call.strip_usage:
                        continue  # the usage chunk the proxy asked for and the client did not
                if translator is not None:
                    out.extend(_translate(translator, event))
                    done = translator.finished
                else:
                    # Framing bytes before the block (a stream-start BOM, or the LF completing a CRLF split
                    # across reads) stay behind: a heartbeat written since must not end up inside a CRLF.
                    raw = event.raw[event.skip :] if event.skip else event.raw
                    out.append(raw)
                    last, last_raw = event, None
                    done = raw.startswith(_DONE_PREFIXES)
                if done:
                    break
            if not progressed:
                continue
            now = time.monotonic()
            watch.last_event = now
            watch.first_event = True  # first_token and idle time the upstream, whatever reaches the client
            if not out:
                continue
            if not marked:
                marked = True
                call.mark("first_token")  # time to first token, for its histogram: the first event relayed
            call.events_relayed += len(out)
            data = out[0] if len(out) == 1 else b"".join(out)
            call.bytes_out += len(data)
            # _write, inlined: this is the per-event path.
            if not watch.writing:
                watch.write_started = now
            watch.writing += 1
            try:
                await response.write(scrub(data) if scrub is not None and b"error" in data else data)
            finally:
                watch.writing -= 1
                watch.last_write = time.monotonic()
            if done:
                return
    except (TimeoutError, aiohttp.ClientError) as exc:
        if watch.failure is None:
            watch.failure = read_failure(call, exc)
        return
    except ConnectionResetError:
        raise
    except Exception:  # a bug must end this stream cleanly, not crash it mid-chunk
        log.exception("request %s: stream relay failed", call.request_id)
        watch.failure = ProxyError(f"internal error while relaying the stream (request id {call.request_id})")
        return
    if watch.failure is not None:
        return
    if translator is not None:
        if not translator.finished:
            # An OpenAI-compatible upstream that sent its finish chunk but no [DONE] ended cleanly; else EOF
            # before the end (message_stop or [DONE]) is a truncation the client must hear about.
            tail = translator.eof()
            if not tail:
                watch.failure = UpstreamUnreachable(f"upstream '{call.upstream}' ended the stream early")
                return
            call.events_relayed += len(tail)
            await _write(response, b"".join(tail), watch)
    elif _cut(decoder.close()) or not _complete(last if last_raw is None else SSEEvent(last_raw)):
        watch.failure = UpstreamUnreachable(
            f"upstream '{call.upstream}' ended the stream early; the answer is incomplete"
        )


async def _write(response: web.StreamResponse, data: bytes, watch: _Watch) -> None:
    if not watch.writing:
        watch.write_started = time.monotonic()  # the oldest write still blocked is what a slow client is judged by
    watch.writing += 1
    try:
        await response.write(data)
    finally:
        watch.writing -= 1
        watch.last_write = time.monotonic()


class _Watchdog:
    """Wakes at the next due time: heartbeat, first token, idle, deadline or slow client.

    A timer re-armed at each wake-up rather than a task per stream (the task, its coroutine and its
    cancellation cost about 1 µs per relayed event in bench/overhead.py); a heartbeat write, when one
    is due (after `heartbeat` of silence, so rarely), runs as a short task of its own."""

    __slots__ = (
        "request", "response", "upstream", "watch", "timeouts", "settings", "deadline", "heartbeat",
        "started", "_loop", "_handle", "_beating", "_stopped",
    )

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        upstream: aiohttp.ClientResponse,
        watch: _Watch,
        timeouts: TimeoutSpec,
        settings: StreamSettings,
        deadline: float,
        heartbeat: bytes,
        sent_ago: float = 0.0,
    ) -> None:
        self.request = request
        self.response = response
        self.upstream = upstream
        self.watch = watch
        self.timeouts = timeouts
        self.settings = settings
        self.deadline = deadline
        self.heartbeat = heartbeat
        self.started = time.monotonic() - sent_ago  # when the request went upstream
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._beating: asyncio.Task[None] | None = None
        self._stopped = False
        self._wake()

    def stop(self) -> None:
        self._stopped = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._beating is not None and not self._beating.done():
            self._beating.cancel()

    def _wake(self) -> None:
        self._handle = None
        if self._stopped:
            return
        watch, settings, timeouts, upstream = self.watch, self.settings, self.timeouts, self.upstream
        now = time.monotonic()
        if watch.writing and now - watch.write_started >= settings.slow_client:
            watch.failure = SlowClient("client stopped reading; stream ended by the slow-client limit")
            upstream.close()
            if self.request.transport is not None:
                self.request.transport.abort()  # the blocked write then fails and the relay loop ends
            return
        limit, reason = (
            (watch.last_event + timeouts.idle, "idle")
            if watch.first_event
            else (self.started + timeouts.first_token, "first_token")
        )
        if now >= self.deadline:
            limit, reason = self.deadline, "total"
        if now >= limit:
            watch.failure = UpstreamTimeout(_timeout_message(reason, timeouts))
            upstream.close()
            return
        if settings.heartbeat > 0 and not watch.writing and now - watch.last_write >= settings.heartbeat:
            self._beating = spawn(self._beat(), name="heartbeat")
            return
        due = min(limit, self.deadline)
        if not watch.first_event:  # once the first event arrives the nearer idle limit applies: look again by then
            due = min(due, now + timeouts.idle)
        due = min(due, watch.write_started + settings.slow_client if watch.writing else now + settings.slow_client)
        if settings.heartbeat > 0:
            due = min(due, watch.last_write + settings.heartbeat)
        self._handle = self._loop.call_later(max(0.005, due - now), self._wake)

    async def _beat(self) -> None:
        try:
            await _write(self.response, self.heartbeat, self.watch)
        except Exception:  # the client is gone (ConnectionResetError) or the response broke: stop generating
            self.upstream.close()
            return
        self._wake()


def _has_usage(raw: bytes) -> bool:
    """Cheap pre-check on an event's bytes: chunks without usage carry `"usage":null` or none."""
    return b'"usage":{' in raw or b'"usage": {' in raw


def _note_usage(call: Call, data: bytes) -> bool:
    """Merge the `usage` an event carries into `call.usage` (for token limits); True for an OpenAI
    usage-only chunk (`choices: []`). Anthropic reports input tokens in message_start and the output
    total in message_delta; merging keeps the latest of each. The Responses API reports it in the
    `response` of its last event (response.completed, .incomplete or .failed)."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(event, dict):
        return False
    usage = event.get("usage")
    if not isinstance(usage, dict):
        holder = event.get("message") or event.get("response")
        usage = holder.get("usage") if isinstance(holder, dict) else None
    if not isinstance(usage, dict):
        return False
    call.usage = {**call.usage, **usage} if call.usage else usage
    return event.get("choices") == []


# Named events that end a stream: Anthropic's, and OpenAI Responses' (which sends no [DONE]).
_TERMINAL_EVENTS = frozenset(
    {"message_stop", "error", "response.completed", "response.failed", "response.incomplete"}
)


def _complete(last: SSEEvent | None) -> bool:
    """Did a stream that reached EOF without [DONE] end with a final event? Servers that never send [DONE]
    (TGI before 2.2, several llama.cpp-style servers) end on a chunk with a finish_reason or on the usage
    chunk; an in-stream error event already told the client. Anything else is a truncated answer."""
    if last is None:
        return False
    if last.event is not None:
        return last.event in _TERMINAL_EVENTS
    try:
        data = orjson.loads(last.data_bytes())
    except orjson.JSONDecodeError:
        return False
    if not isinstance(data, dict):
        return False
    if data.get("error") or data.get("type") in _TERMINAL_EVENTS:
        return True
    choices = data.get("choices")
    if not isinstance(choices, list):
        return False
    if not choices:
        return data.get("usage") is not None
    return any(isinstance(c, dict) and c.get("finish_reason") for c in choices)


def _cut(rest: bytes) -> bool:
    """Leftover bytes at EOF mean a cut event, unless they are only comments (a trailing keep-alive)."""
    return bool(rest.strip()) and not SSEEvent(rest).is_comment_only


def _translate(translator: StreamTranslator, event: SSEEvent) -> list[bytes]:
    data = event.data_bytes()
    if data.startswith(b"[DONE]"):
        return translator.done()
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return []  # not an event either protocol defines; skipped like an unknown event type
    return translator.feed(event.event, parsed) if isinstance(parsed, dict) else []


def _timeout_message(reason: str, timeouts: TimeoutSpec) -> str:
    if reason == "first_token":
        return f"upstream sent no event within timeouts.first_token ({timeouts.first_token:g}s)"
    if reason == "idle":
        return f"upstream went silent for longer than timeouts.idle ({timeouts.idle:g}s)"
    return "the request ran past its total deadline (timeouts.total)"


async def _finish_with_error(response: web.StreamResponse, call: Call, error: ProxyError) -> None:
    call.error = error.reason
    try:
        await response.write(stream_error_frame(error, call.protocol, call.request_id))
        await response.write_eof()
    except ConnectionResetError:
        call.client_gone = True


class QueuedStream:
    """A streamed request that must wait (for a queue slot or a limit) and whose queue sets
    `heartbeat_while_queued`: the 200 and SSE headers go out at once, then a comment such as
    `: queued position=12` every heartbeat, so load balancers do not cut the idle connection.

    The trade-off: once the 200 is out, a later refusal (queue timeout, cleared, an upstream error)
    reaches the client only as an error event inside the stream, not as a 429/503 status.
    """

    __slots__ = ("request", "call", "interval", "response", "_task", "_status")

    def __init__(self, request: web.Request, call: Call, interval: float) -> None:
        self.request = request
        self.call = call
        self.interval = interval
        self.response: web.StreamResponse | None = None
        self._task: asyncio.Task[None] | None = None
        self._status: Callable[[], str] = lambda: "queued"

    async def begin(self, status: Callable[[], str]) -> None:
        self._status = status
        if self.response is None:
            headers = {
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "x-request-id": self.call.request_id,
            }
            if self.call.route is not None:
                headers["x-signalbox-route"] = self.call.route.name
            response = web.StreamResponse(status=200, headers=headers)
            try:
                await response.prepare(self.request)
            except ConnectionResetError:
                self.call.client_gone = True
                return
            self.response = response
        await self._beat()
        if self.interval > 0 and self._task is None:
            self._task = spawn(self._beats(), name="queued-heartbeat")

    def end(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _beat(self) -> None:
        assert self.response is not None
        try:
            await self.response.write(encode_comment(self._status()))
        except ConnectionResetError:
            self.call.client_gone = True

    async def _beats(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._beat()

    async def fail(self, error: ProxyError) -> web.StreamResponse:
        """A refusal after the 200 went out: one error event in the client's protocol, then the end."""
        assert self.response is not None
        self.end()
        self.call.status = 200
        await _finish_with_error(self.response, self.call, error)
        return self.response

    async def relay_whole(
        self,
        upstream: aiohttp.ClientResponse,
        transform: BodyTransform | None = None,
        read_timeout: float | None = None,
        whole: Whole | None = None,
    ) -> web.StreamResponse:
        """The upstream answered without a stream (an error, usually): pass it on as one error event.
        `whole`: what dispatch already read of it."""
        try:
            if whole is None:
                whole = await read_body(upstream, read_timeout, self.call.plan.max_buffered_response)
            if not whole.complete:
                upstream.close()
                return await self.fail(UpstreamBadResponse(too_large(self.call, upstream)))
        except (TimeoutError, aiohttp.ClientError) as exc:
            return await self.fail(read_failure(self.call, exc))
        finally:
            upstream.release()
        body = whole.data
        assert self.response is not None
        status = upstream.status
        if transform is not None:
            status, body = transform(status, body)  # the error body in the client's protocol
        body = body.strip()
        self.call.status = 200
        if status >= 400 and body.startswith(b"{") and b'"error"' in body:
            head = b"event: error\n" if self.call.protocol == "anthropic" else b""
            frame = head + b"data: " + body + b"\n\n"
            self.call.error = f"upstream_{status}"
            try:
                await self.response.write(frame)
                await self.response.write_eof()
            except ConnectionResetError:
                self.call.client_gone = True
            return self.response
        what = f"upstream '{self.call.upstream}' answered {upstream.status} without a stream"
        return await self.fail(UpstreamUnreachable(what))
