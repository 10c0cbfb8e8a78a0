"""A minimal Realtime API endpoint (`GET /v1/realtime`, a WebSocket) in the GA event shapes, so the proxy's
pass-through can be tested: `session.created` at once; `session.update` answered by `session.updated`;
`conversation.item.create` by `conversation.item.added` and `conversation.item.done`; `response.create` by
`response.created`, `response.output_item.added`, one `response.output_text.delta` per token of the
mock's usual text over the last user text (`mock` then its words), `response.output_text.done`,
`response.output_item.done` and `response.done` with usage. Anything else gets an `error` event.
Text only: no audio is generated."""

from __future__ import annotations

import secrets
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from proxy.mock.content import Json, estimate_tokens, gen_tokens

MODEL = "mock-realtime"


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class RealtimeSession:
    """One session's state: its settings and the conversation's user text (pure: events in, events out)."""

    def __init__(self, model: str, output_tokens: int) -> None:
        self.session: Json = {
            "type": "realtime", "object": "realtime.session", "id": _id("sess"), "model": model,
            "output_modalities": ["text"], "instructions": "", "tools": [], "tool_choice": "auto",
            "max_output_tokens": "inf",
        }
        self.output_tokens = output_tokens
        self.items: list[Json] = []
        self.user_text = ""

    def _event(self, kind: str, **fields: Any) -> Json:
        return {"type": kind, "event_id": _id("event"), **fields}

    def start(self) -> list[Json]:
        return [self._event("session.created", session=self.session)]

    def handle(self, event: Json) -> list[Json]:
        kind = event.get("type")
        if kind == "session.update":
            update = event.get("session")
            if isinstance(update, dict):
                self.session = {**self.session, **{k: v for k, v in update.items() if k != "id"}}
            return [self._event("session.updated", session=self.session)]
        if kind == "conversation.item.create":
            return self._item(event.get("item"))
        if kind == "response.create":
            return self._response()
        return [self._event("error", error={
            "type": "invalid_request_error", "code": "unknown_event", "message": f"unknown event type {kind!r}",
            "param": None, "event_id": event.get("event_id"),
        })]

    def _item(self, item: object) -> list[Json]:
        if not isinstance(item, dict):
            return [self._event("error", error={"type": "invalid_request_error", "code": "missing_item",
                                                "message": "'item' is required", "param": "item"})]
        stored = {"id": item.get("id") or _id("item"), "object": "realtime.item", "status": "completed", **item}
        for part in item.get("content") or ():
            if isinstance(part, dict) and part.get("type") == "input_text" and isinstance(part.get("text"), str):
                self.user_text = part["text"]
        previous = self.items[-1]["id"] if self.items else None
        self.items.append(stored)
        return [
            self._event("conversation.item.added", previous_item_id=previous, item=stored),
            self._event("conversation.item.done", previous_item_id=previous, item=stored),
        ]

    def _response(self) -> list[Json]:
        tokens = gen_tokens(self.user_text, self.output_tokens)
        text = "".join(tokens)
        rid, iid = _id("resp"), _id("item")
        where = {"response_id": rid, "item_id": iid, "output_index": 0, "content_index": 0}
        item = {"id": iid, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}
        response: Json = {"id": rid, "object": "realtime.response", "status": "in_progress", "output": [],
                          "usage": None}
        out = [
            self._event("response.created", response=response),
            self._event("response.output_item.added", response_id=rid, output_index=0, item=item),
        ]
        out += [self._event("response.output_text.delta", **where, delta=token) for token in tokens]
        out.append(self._event("response.output_text.done", **where, text=text))
        done_item = {**item, "status": "completed", "content": [{"type": "output_text", "text": text}]}
        out.append(self._event("response.output_item.done", response_id=rid, output_index=0, item=done_item))
        prompt = estimate_tokens(self.user_text)
        usage = {"total_tokens": prompt + len(tokens), "input_tokens": prompt, "output_tokens": len(tokens)}
        final = {**response, "status": "completed", "output": [done_item], "usage": usage}
        out.append(self._event("response.done", response=final))
        return out


async def realtime_socket(request: web.Request, output_tokens: int) -> web.StreamResponse:
    """The socket: events in order, one JSON text message each; closed when the client closes."""
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    session = RealtimeSession(request.query.get("model") or MODEL, output_tokens)
    for event in session.start():
        await ws.send_str(orjson.dumps(event).decode())
    async for message in ws:
        if message.type != WSMsgType.TEXT:
            continue
        try:
            event = orjson.loads(message.data)
        except orjson.JSONDecodeError:
            event = {"type": None}
        for answer in session.handle(event if isinstance(event, dict) else {"type": None}):
            await ws.send_str(orjson.dumps(answer).decode())
    return ws
