"""The unified stream's endpoints: `POST /signalbox/v1/stream` (SSE) and `GET` of the same path upgraded to
a WebSocket that multiplexes requests (docs/apps/unified-stream.md). Both run each request through the
data path of every other request (run.py)."""
