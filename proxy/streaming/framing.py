"""What the client gets for each upstream chunk of a stream, and how a stream that reached EOF ended: pure
decisions over bytes and parsed events (no I/O, no clock), fed by the pump (pump.py).

- `Framer.frame(chunk)`: the bytes to write for a chunk (whole events only: translated, the usage noted
  and, when the proxy asked for it, the usage chunk dropped; upstream keep-alives dropped), whether the
  stream's end went by, and whether anything in it was progress. A pass-through chunk that is exactly one
  whole event starting with a field line goes out as it came, without building an event (the fast path).
- `Framer.end()`: at a clean EOF, the translator's tail, or the judgement that the stream was cut.
"""

from __future__ import annotations

import orjson

from proxy.call import Call
from proxy.errors import ProxyError, UpstreamUnreachable
from proxy.providers.exchange import StreamTranslator
from proxy.providers.usage import usage_in
from proxy.streaming.sse import DONE, SSEDecoder, SSEEvent

# `data:` may omit the space (valid SSE; the SDK only checks that the data starts with [DONE]).
DONE_PREFIXES = (DONE.rstrip(b"\n"), b"data:[DONE]")
_NOT_A_FIELD = frozenset(b":\r\n")  # first bytes of a comment line or a blank line
# Named events that end a stream: Anthropic's, and OpenAI Responses' (which sends no [DONE]).
_TERMINAL_EVENTS = frozenset(
    {"message_stop", "error", "response.completed", "response.failed", "response.incomplete"}
)


class Framer:
    """One stream's framing state. After each `frame`: `done` (the end went by: stop reading),
    `progressed` (an event was a field, not only a keep-alive comment: the upstream is not silent) and
    `failure` (set when the stream must end with an error)."""

    __slots__ = ("decoder", "call", "translator", "limit", "plain", "done", "progressed", "failure",
                 "_last_event", "_last_raw")

    def __init__(self, decoder: SSEDecoder, call: Call, translator: StreamTranslator | None, limit: int) -> None:
        self.decoder = decoder
        self.call = call
        self.translator = translator
        self.limit = limit
        """Largest partial event held while waiting for its end (settings.max_event_buffer)."""
        # pass-through: no event needs parsing (a traced call's are read for its model, usage, finish reasons)
        self.plain = translator is None and not call.want_usage and call.trace is None
        self.done = False
        self.progressed = False
        self.failure: ProxyError | None = None
        # The newest event passed through, judged at EOF: an SSEEvent, or its bytes from the fast path.
        self._last_event: SSEEvent | None = None
        self._last_raw: bytes | None = None

    def frame(self, chunk: bytes) -> bytes | None:
        """The bytes the client gets for this chunk (None: nothing yet); counts the events relayed."""
        if self.plain and self.decoder.whole(chunk) and chunk[0] not in _NOT_A_FIELD:
            self._last_raw = chunk
            self.progressed = True
            self.done = chunk.startswith(DONE_PREFIXES)
            self.call.events_relayed += 1
            return chunk
        events = self.decoder.feed(chunk)
        if not events:
            self.progressed = False
            if self.decoder.buffered > self.limit:
                self.failure = UpstreamUnreachable("upstream sent an event larger than the proxy's limit")
            return None
        out = self._relayed(events)
        if not out:
            return None
        self.call.events_relayed += len(out)
        return out[0] if len(out) == 1 else b"".join(out)

    def _relayed(self, events: list[SSEEvent]) -> list[bytes]:
        """What the client gets for these upstream events; sets `done` and `progressed`."""
        call, translator = self.call, self.translator
        self.progressed = False
        out: list[bytes] = []
        for event in events:
            if event.is_comment_only:
                continue  # upstream keep-alives are not progress; our own heartbeats cover silence
            self.progressed = True  # even when the translator drops it (a model still thinking is not silent)
            if call.trace is not None:
                call.trace.event(event.event, event.data_bytes())
            if call.want_usage and has_usage(event.raw) and note_usage(call, event.data_bytes()):
                if call.strip_usage:
                    continue  # the usage chunk the proxy asked for and the client did not
            if translator is not None:
                out.extend(translate(translator, event))
                self.done = translator.finished
            else:
                # Framing bytes before the block (a stream-start BOM, or the LF completing a CRLF split
                # across reads) stay behind: a heartbeat written since must not end up inside a CRLF.
                raw = event.raw[event.skip :] if event.skip else event.raw
                out.append(raw)
                self._last_event, self._last_raw = event, None
                self.done = raw.startswith(DONE_PREFIXES)
            if self.done:
                break
        return out

    def end(self) -> bytes | None:
        """The upstream's body ended without an error: the translator's tail to write (None: nothing), or
        `failure` set when the stream ended early (the answer is incomplete)."""
        translator, call = self.translator, self.call
        if translator is not None:
            if translator.finished:
                return None
            # An OpenAI-compatible upstream that sent its finish chunk but no [DONE] ended cleanly; else EOF
            # before the end (message_stop or [DONE]) is a truncation the client must hear about.
            tail = translator.eof()
            if not tail:
                self.failure = UpstreamUnreachable(f"upstream '{call.upstream}' ended the stream early")
                return None
            call.events_relayed += len(tail)
            return b"".join(tail)
        last = self._last_event if self._last_raw is None else SSEEvent(self._last_raw)
        tool = call.route is not None and call.route.tool_prefix is not None  # a tool's stream ends at EOF
        if cut(self.decoder.close()) or (not tool and not complete(last)):
            self.failure = UpstreamUnreachable(
                f"upstream '{call.upstream}' ended the stream early; the answer is incomplete"
            )
        return None


def has_usage(raw: bytes) -> bool:
    """Cheap pre-check on an event's bytes: chunks without usage carry `"usage":null` or none."""
    return b'"usage":{' in raw or b'"usage": {' in raw


def note_usage(call: Call, data: bytes) -> bool:
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
    usage = usage_in(event)
    if usage is None:
        return False
    call.usage = {**call.usage, **usage} if call.usage else usage
    return event.get("choices") == []


def complete(last: SSEEvent | None) -> bool:
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


def cut(rest: bytes) -> bool:
    """Leftover bytes at EOF mean a cut event, unless they are only comments (a trailing keep-alive)."""
    return bool(rest.strip()) and not SSEEvent(rest).is_comment_only


def translate(translator: StreamTranslator, event: SSEEvent) -> list[bytes]:
    data = event.data_bytes()
    if data.startswith(b"[DONE]"):
        return translator.done()
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return []  # not an event either protocol defines; skipped like an unknown event type
    return translator.feed(event.event, parsed) if isinstance(parsed, dict) else []
