"""The stream pump: reads the upstream in bounded chunks, cuts them into whole SSE events, and hands them to
the client's sink (translated, usage noted, keep-alives dropped), reading on only once the sink has room.

What a stalled client costs is bounded here and in the sink: the upstream reader's buffer (`read_bufsize`,
set for streams in proxy/upstream/client.py: the reader stops reading the socket past twice that), the piece
being relayed, the partial event the decoder holds, and the sink's transport queue (`write_buffer`). The
pump takes the reader's pieces one at a time as the HTTP parser cut them (`iter_chunks`: an HTTP chunk,
usually one whole event, or what one socket read held of it) and passes each on as it is, never a copy.
`iter_chunked(n)` joined pieces and raised the reader's limits to n (its high-water mark to 2n: 32 KiB held
per stalled stream instead of 8 KiB); `iter_any` joins whatever is buffered (a copy, and ~64 KiB per
stalled stream in bench/stalled.py against ~50). The cost: when a fast upstream's events queue up, each
goes out in its own send (a flood of 200-byte events: ~13 instead of ~5 µs each; paced streams unchanged).
"""

from __future__ import annotations

import logging
import time

import aiohttp
import orjson

from proxy.call import Call
from proxy.errors import ProxyError, UpstreamUnreachable
from proxy.providers.exchange import StreamTranslator
from proxy.redact import EMPTY, Redactor
from proxy.streaming.failure import read_failure
from proxy.streaming.settings import StreamSettings
from proxy.streaming.sink import Sink
from proxy.streaming.sse import DONE, SSEDecoder, SSEEvent, has_id_line

# `data:` may omit the space (valid SSE; the SDK only checks that the data starts with [DONE]).
_DONE_PREFIXES = (DONE.rstrip(b"\n"), b"data:[DONE]")
_NOT_A_FIELD = frozenset(b":\r\n")  # first bytes of a comment line or a blank line
log = logging.getLogger("signalbox.relay")


async def pump(
    sink: Sink,
    upstream: aiohttp.ClientResponse,
    decoder: SSEDecoder,
    call: Call,
    settings: StreamSettings,
    translator: StreamTranslator | None,
    redact: Redactor = EMPTY,
) -> None:
    """Relay events until the upstream's stream ends or fails; a failure is left in `sink.watch.failure`.
    An upstream's in-stream error may quote the credentials it got: events that say "error" lose every
    secret `redact` knows."""
    watch = sink.watch
    last = _Last()  # the newest event passed through, judged at EOF
    plain = translator is None and not call.want_usage  # pass-through: no event needs parsing
    whole = decoder.whole
    monotonic = time.monotonic
    write = sink.response.write
    transport = sink.transport
    high = sink.high
    marked = False  # the first event relayed to the client has been timed
    scrub = redact.scrub if redact else None
    try:
        async for chunk, _ in upstream.content.iter_chunks():
            if plain and whole(chunk) and chunk[0] not in _NOT_A_FIELD:
                # The common case: one whole event that starts with a field line (so not a keep-alive
                # comment), relayed as it came, without building an event. The slow path below does the same.
                last.event, last.raw = None, chunk
                now = monotonic()
                watch.last_event = now
                watch.first_event = True
                if not marked:
                    marked = True
                    call.mark("first_token")
                call.events_relayed += 1
                call.bytes_out += len(chunk)
                if not sink.id_sent and b"id:" in chunk:
                    sink.id_sent = has_id_line(chunk)
                # Sink.write, inlined for the per-event path (a chunk is never larger than one piece).
                if not watch.writing:
                    watch.write_started = now
                watch.writing += 1
                try:
                    await write(scrub(chunk) if scrub is not None and b"error" in chunk else chunk)
                    if transport is not None and transport.get_write_buffer_size() > high:
                        await sink.room()
                finally:
                    watch.writing -= 1
                    watch.last_write = monotonic()
                if chunk.startswith(_DONE_PREFIXES):
                    return
                continue
            events = decoder.feed(chunk)
            del chunk  # the events hold their own bytes: no second copy while the client is slow
            if not events:
                if decoder.buffered > settings.max_event_buffer:
                    watch.failure = UpstreamUnreachable("upstream sent an event larger than the proxy's limit")
                    return
                continue
            out, done, progressed = _relayed(events, call, translator, last)
            del events
            if not progressed:
                continue
            now = monotonic()
            watch.last_event = now
            watch.first_event = True  # first_token and idle time the upstream, whatever reaches the client
            if not out:
                continue
            if not marked:
                marked = True
                call.mark("first_token")  # time to first token, for its histogram: the first event relayed
            call.events_relayed += len(out)
            data = out[0] if len(out) == 1 else b"".join(out)
            del out
            call.bytes_out += len(data)
            await sink.write(scrub(data) if scrub is not None and b"error" in data else data)
            del data
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
    if watch.failure is None:
        await _at_eof(sink, decoder, call, translator, last)


class _Last:
    """The newest event passed through: an SSEEvent, or its bytes when it came by the fast path."""

    __slots__ = ("event", "raw")

    def __init__(self) -> None:
        self.event: SSEEvent | None = None
        self.raw: bytes | None = None

    def get(self) -> SSEEvent | None:
        return self.event if self.raw is None else SSEEvent(self.raw)


def _relayed(
    events: list[SSEEvent], call: Call, translator: StreamTranslator | None, last: _Last
) -> tuple[list[bytes], bool, bool]:
    """What the client gets for these upstream events, whether the stream is done, and whether any of them
    was progress (a field, not only a keep-alive comment)."""
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
            last.event, last.raw = event, None
            done = raw.startswith(_DONE_PREFIXES)
        if done:
            break
    return out, done, progressed


async def _at_eof(
    sink: Sink, decoder: SSEDecoder, call: Call, translator: StreamTranslator | None, last: _Last
) -> None:
    """The upstream's body ended without an error: the translator's tail, or a judgement on the last event."""
    watch = sink.watch
    if translator is not None:
        if not translator.finished:
            # An OpenAI-compatible upstream that sent its finish chunk but no [DONE] ended cleanly; else EOF
            # before the end (message_stop or [DONE]) is a truncation the client must hear about.
            tail = translator.eof()
            if not tail:
                watch.failure = UpstreamUnreachable(f"upstream '{call.upstream}' ended the stream early")
                return
            call.events_relayed += len(tail)
            await sink.write(b"".join(tail))
    elif _cut(decoder.close()) or not _complete(last.get()):
        watch.failure = UpstreamUnreachable(
            f"upstream '{call.upstream}' ended the stream early; the answer is incomplete"
        )


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


