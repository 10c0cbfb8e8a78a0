"""The unified event stream (docs/apps/unified-stream.md): one event model (text_delta, tool_call, usage,
stream_complete, error, heartbeat, queued) for any route and upstream, framed as SSE or as WebSocket messages.

events.py (pure: the wire shapes), translate.py (pure: upstream events to unified events), sinks.py (the two
transports' writes and heartbeats), waiting.py (queued events), relay.py (an upstream answer to events)."""
