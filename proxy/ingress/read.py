"""The request body, read once within the policy's size limit and the client's body timeouts, and parsed
once: JSON (its `model` and `stream` noted on the call) or a multipart upload passed through as bytes."""

from __future__ import annotations

from functools import partial
from typing import Any

import orjson
from aiohttp import web

from proxy.call import Call
from proxy.errors import BodyTooLarge, InvalidJSON, InvalidRequest
from proxy.ingress.edge import timeouts as edge
from proxy.providers import multipart
from proxy.runtime import ClientTimeouts


async def read_body(request: web.Request, call: Call, limit: int, timeouts: ClientTimeouts) -> None:
    """Read the body once, within the size limit and the body timeouts, and parse it once."""
    if not request.body_exists:
        return
    content = request.content
    if content.is_eof():  # the body came with the head (most requests): no coroutine, no timer
        call.raw_body = edge.read_ready(content, limit, partial(_refused, limit))  # (its length checked there)
    else:
        _check_length(request, limit)  # refused before any of it is read
        call.raw_body = await edge.read_body(content, limit, partial(_refused, limit), timeouts)
    if not call.raw_body:
        return
    content_type = request.headers.get("Content-Type")
    if content_type is not None and content_type[:10].lower() == "multipart/":
        read_form(content_type, call)
        return
    try:
        body: Any = orjson.loads(call.raw_body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"the request body is not valid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(body, dict):
        raise InvalidJSON("the request body must be a JSON object")
    call.body = body
    model = body.get("model")
    if isinstance(model, str):
        call.model = model
    call.stream = body.get("stream") is True


async def read_raw(request: web.Request, call: Call, limit: int, timeouts: ClientTimeouts) -> None:
    """The body's bytes, within the size limit and the body timeouts, unparsed (a tool route's). The same
    steps as read_body, not shared: read_body stays one coroutine on the LLM path."""
    if not request.body_exists:
        return
    content = request.content
    if content.is_eof():  # the body came with the head (most requests): no coroutine, no timer
        call.raw_body = edge.read_ready(content, limit, partial(_refused, limit))  # (its length checked there)
    else:
        _check_length(request, limit)  # refused before any of it is read
        call.raw_body = await edge.read_body(content, limit, partial(_refused, limit), timeouts)


def read_form(content_type: str, call: Call) -> None:
    """An upload (audio, files, image edits) goes through as the client's bytes; its `model` and `stream`
    form fields route it like a JSON body's would."""
    boundary = multipart.boundary_of(content_type)
    if boundary is None:
        raise InvalidRequest(f"the Content-Type {content_type!r} names no multipart boundary")
    span = multipart.field_span(call.raw_body, boundary, "model")
    if span is not None:
        call.model = call.raw_body[span[0] : span[1]].decode("utf-8", "replace")
        call.form_model = span
    call.stream = multipart.field_value(call.raw_body, boundary, "stream") == "true"


def _check_length(request: web.Request, limit: int) -> None:
    """A Content-Length over the limit. A body already whole is checked by its size instead: the same
    number, as the parser takes exactly Content-Length bytes."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(_too_large(length, limit))


def _refused(limit: int, size: int) -> BodyTooLarge:
    return BodyTooLarge(_too_large(size, limit))


def _too_large(size: int, limit: int) -> str:
    return (
        f"the request body is {size} bytes, over this proxy's limit of {limit} bytes; "
        "send a smaller request or raise max_body_size in the policy"
    )
