"""The stream pump: reads the upstream in bounded chunks, has framing.py turn each into whole SSE events for
the client (translated, usage noted, keep-alives dropped), and writes them to the client's sink, reading on
only once the sink has room.

What a stalled client costs is bounded here and in the sink: at most READ_MAX bytes read per turn, the
upstream reader's own buffer (`read_bufsize`, set for streams in proxy/upstream/client.py), the partial
event the decoder holds, and the sink's transport queue.
"""

from __future__ import annotations

import logging
import time

import aiohttp

from proxy.call import Call
from proxy.errors import ProxyError
from proxy.policy.redact import EMPTY, Redactor
from proxy.providers.exchange import StreamTranslator
from proxy.streaming.failure import read_failure
from proxy.streaming.framing import Framer
from proxy.streaming.settings import StreamSettings
from proxy.streaming.sink import Sink
from proxy.streaming.sse import SSEDecoder

READ_MAX = 16 * 1024
"""Largest upstream read handed to the decoder at once (a whole upstream read was up to 0.5 MiB)."""

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
    What to write is framing.py's decision; every write goes through `Sink.write` (the one timed write).
    An upstream's in-stream error may quote the credentials it got: events that say "error" lose every
    secret `redact` knows."""
    watch = sink.watch
    framer = Framer(decoder, call, translator, settings.max_event_buffer)
    frame = framer.frame
    monotonic = time.monotonic
    write = sink.write
    marked = False  # the first event relayed to the client has been timed
    scrub = redact.scrub if redact else None
    try:
        async for chunk in upstream.content.iter_chunked(READ_MAX):
            data = frame(chunk)
            del chunk  # the events hold their own bytes: no second copy while the client is slow
            if framer.progressed:
                watch.last_event = monotonic()
                watch.first_event = True  # first_token and idle time the upstream, whatever reaches the client
            if data is None:
                if framer.failure is not None:
                    watch.failure = framer.failure
                    return
                continue
            if not marked:
                marked = True
                call.mark("first_token")  # time to first token, for its histogram: the first event relayed
            call.bytes_out += len(data)
            await write(scrub(data) if scrub is not None and b"error" in data else data)
            del data
            if framer.done:
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
        tail = framer.end()
        if framer.failure is not None:
            watch.failure = framer.failure
        elif tail is not None:
            await write(tail)
