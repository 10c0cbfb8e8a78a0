"""Where a small text field sits in a multipart/form-data body (pure).

Uploads (`/v1/audio/transcriptions`, `/v1/files`, `/v1/images/edits`) name their model in a form field,
not in JSON. Routing needs that value, and a deployment's model rewrite needs its byte span, so the
upload is forwarded as the client's bytes with only that value spliced. aiohttp's MultipartReader
reads a stream and re-encodes what it yields, and the stdlib's email parser gives no offsets, so this
is a bounded scan of the part headers; file contents are skipped, never copied or decoded.
"""

from __future__ import annotations

MAX_FIELD_BYTES = 256
"""A model name or a `stream` flag; a longer value is not what we are looking for."""


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a `multipart/...; boundary=...` content type, or None."""
    kind, _, params = content_type.partition(";")
    if not kind.strip().lower().startswith("multipart/"):
        return None
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value.encode("latin-1") if 0 < len(value) <= 200 else None
    return None


def field_span(body: bytes, boundary: bytes, name: str) -> tuple[int, int] | None:
    """Start and end offsets of the value of the form field `name` (a part without a filename), or None."""
    delimiter = b"--" + boundary
    wanted = name.encode("latin-1")
    position = body.find(delimiter)
    while position != -1:
        head_start = position + len(delimiter)
        if body[head_start : head_start + 2] == b"--":
            return None  # the closing delimiter
        head_end = body.find(b"\r\n\r\n", head_start)
        if head_end == -1:
            return None
        value_start = head_end + 4
        following = body.find(b"\r\n" + delimiter, value_start)
        if following == -1:
            return None
        if _names(body[head_start:head_end], wanted) and following - value_start <= MAX_FIELD_BYTES:
            return value_start, following
        position = following + 2
    return None


def _names(headers: bytes, wanted: bytes) -> bool:
    """Whether part headers say `Content-Disposition: form-data; name="wanted"` with no filename."""
    for line in headers.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() != b"content-disposition":
            continue
        params = [p.strip() for p in value.split(b";")]
        if params[0].lower() != b"form-data" or any(p.lower().startswith(b"filename") for p in params[1:]):
            return False
        return any(p.lower().startswith(b"name=") and p[5:].strip(b'"') == wanted for p in params[1:])
    return False


def field_value(body: bytes, boundary: bytes, name: str) -> str | None:
    span = field_span(body, boundary, name)
    if span is None:
        return None
    return body[span[0] : span[1]].decode("utf-8", "replace")


def with_field(body: bytes, span: tuple[int, int], value: str) -> bytes:
    """The body with one field's value replaced (the part's framing is unchanged: no length inside)."""
    return body[: span[0]] + value.encode("utf-8") + body[span[1] :]
