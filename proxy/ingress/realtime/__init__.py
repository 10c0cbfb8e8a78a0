"""`GET /v1/realtime`: the Realtime API's WebSocket relayed to an OpenAI-compatible upstream
(docs/apps/realtime.md). sessions.py counts open sessions (pure), relay.py moves the frames."""
