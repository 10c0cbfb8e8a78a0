"""The stream pump: reads the upstream in bounded chunks, has framing.py turn each into whole SSE events for
the client (translated, usage noted, keep-alives dropped), and writes them to the client's sink, reading on
only once the sink has room.

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

from proxy.call import Call
from proxy.errors import ProxyError
from proxy.policy.redact import EMPTY, Redactor
from proxy.providers.exchange import StreamTranslator
from proxy.streaming.failure import read_failure
from proxy.streaming.framing import Framer
from proxy.streaming.settings import StreamSettings
from proxy.streaming.sink import Sink
from proxy.streaming.sse import SSEDecoder

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
        async for chunk, _ in upstream.content.iter_chunks():
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
