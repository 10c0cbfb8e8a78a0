"""Split an oversized embeddings request into several upstream calls and merge the answers back in order.

A route's `split` limits (the strictest `batch_limits` of the upstreams it may reach, policy/batch_limits.py)
bound one upstream call. A caller above them is cut into contiguous parts (greedy: each part as large as
the limits allow, so 5,000 inputs at 2,048 make 2,048 + 2,048 + 904); the parts go out at most
`concurrency` at a time, each through `dispatch` as its own upstream call (retries, breaker, upstream
limits, one shared deadline), inside the one scheduler slot the caller's request holds.

The answer keeps the caller's order: each part's embeddings sorted by index and renumbered from the part's
offset; every integer of `usage` summed over the parts; other top-level fields from the first part.
The answers are held until the last one arrives; together they stay under `max_buffered_response` (past
it: 502, and no further part is sent). The first part that fails ends the request: the caller gets that
failure (the upstream's error normalised to the client's protocol, or the proxy's own), no further part is
sent, and parts still in flight are cancelled (their connections closed; an upstream limit keeps their
reserved estimate, as for any call cancelled before its usage is known). Upstream error messages name
inputs by their index in the part.

Hand-written: no library splits an HTTP request by a vendor's per-request limits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.batching import keys, merge
from proxy.batching.flush import Member, Reply, Sender, deliver, reply_headers, share_attempts, whole_reply
from proxy.call import Call
from proxy.errors import UpstreamBadResponse
from proxy.policy.batch_limits import SplitLimits
from proxy.tasks import TaskSet

PARTS_HEADER = "x-signalbox-split-parts"
"""How many upstream calls answered the request (only on a split request)."""

Span = tuple[int, int]


# --- pure: when and where to cut, and how answers join --------------------------------------------------


def item_tokens(kind: keys.Kind, item: Any) -> int:
    """The token estimate of one input, as batching counts it (exact for a token array)."""
    return keys.text_tokens(item) if kind == "text" else max(1, len(item))


def spans(inputs: keys.Inputs, limits: SplitLimits) -> list[Span]:
    """Contiguous parts [start, end) within the limits, each as large as they allow. An input alone above
    max_tokens goes in a part of its own (the upstream judges it)."""
    most = limits.max_inputs
    budget = limits.max_tokens
    out: list[Span] = []
    start = tokens = 0
    for i, item in enumerate(inputs.items):
        cost = item_tokens(inputs.kind, item)
        if i > start and ((most is not None and i - start >= most) or (budget is not None and tokens + cost > budget)):
            out.append((start, i))
            start, tokens = i, 0
        tokens += cost
    out.append((start, len(inputs.items)))
    return out


def surely_within(value: object, limits: SplitLimits) -> bool:
    """A cheap test on the raw `input` that needs no token estimate: True when it cannot be over the limits
    (a string is at most 4 UTF-8 bytes per character, so at most len + 1 estimated tokens)."""
    if not isinstance(value, list):
        return limits.max_tokens is None or not isinstance(value, str) or len(value) + 1 <= limits.max_tokens
    if limits.max_inputs is not None and len(value) > limits.max_inputs:
        return False
    if limits.max_tokens is None:
        return True
    if value and isinstance(value[0], str):
        return sum(len(v) + 1 if isinstance(v, str) else limits.max_tokens for v in value) <= limits.max_tokens
    return sum(len(v) if isinstance(v, list) else 1 for v in value) <= limits.max_tokens


def wanted(call: Call) -> bool:
    """Must this call be split? (Checked by ingress on routes with limits, before choosing the path.)"""
    route = call.route
    if route is None or route.split is None or not call.path.endswith("/embeddings") or call.body is None:
        return False
    value = call.body.get("input")
    if surely_within(value, route.split):
        return False
    inputs = keys.inputs_of(value)
    return inputs is not None and len(spans(inputs, route.split)) > 1


def summed(total: Mapping[str, Any] | None, part: object) -> dict[str, Any] | None:
    """`usage` objects added: every integer (nested ones too) summed, other values from the first."""
    if not isinstance(part, Mapping):
        return dict(total) if total is not None else None
    out: dict[str, Any] = dict(total) if total is not None else {}
    for key, value in part.items():
        mine = out.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            out[key] = mine + value if isinstance(mine, int) and not isinstance(mine, bool) else value
        elif isinstance(value, Mapping):
            out[key] = summed(mine if isinstance(mine, Mapping) else None, value)
        elif key not in out:
            out[key] = value
    return out


def joined(answers: Sequence[Any], counts: Sequence[int]) -> dict[str, Any]:
    """The parts' parsed answers as one: data in input order with indexes 0..n-1, usage summed.
    Raises merge.SplitError when a part does not hold one embedding per input."""
    data: list[dict[str, Any]] = []
    usage: dict[str, Any] | None = None
    for answer, count in zip(answers, counts, strict=True):
        own = merge.split(answer, [count], [1])[0]  # checked: `count` embeddings, indexes 0..count-1, sorted
        offset = len(data)
        data.extend({**d, "index": offset + d["index"]} for d in own["data"])
        usage = summed(usage, answer.get("usage"))
    out = dict(answers[0])
    out["data"] = data
    if usage is not None:
        out["usage"] = usage
    return out


# --- the exchange ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Part:
    call: Call
    count: int
    status: int = 0
    headers: list[tuple[str, str]] | None = None
    body: bytes = b""


class _Refused(Exception):
    """A part's upstream answered an error: the caller gets it (the lowest part's, if several did)."""

    def __init__(self, index: int, reply: Reply) -> None:
        super().__init__(index)
        self.index = index
        self.reply = reply


async def send(sender: Sender, member: Member, deadline: float) -> None:
    """Answer `member` (its inputs above its route's split limits) from several upstream calls."""
    call = member.call
    assert call.route is not None and call.route.split is not None and member.inputs is not None
    limits = call.route.split
    parts = [_Part(_part_call(call, member.inputs, span), span[1] - span[0]) for span in spans(member.inputs, limits)]
    queue = iter(range(len(parts)))
    stopped = asyncio.Event()  # a part failed: no worker takes another one, even before it is cancelled
    held, cap = [0], call.plan.max_buffered_response
    metrics, route = sender.metrics, call.route.name
    metrics.split_request(route)

    async def worker() -> None:
        for index in queue:  # shared: each part is taken once, in order
            if stopped.is_set():
                return
            part = parts[index]
            metrics.split_part(route)
            try:
                part.status, part.headers, part.body = await sender.send(part.call, member.headers, member.query,
                                                                         deadline)
            except BaseException:
                stopped.set()
                raise
            finally:
                share_attempts(call, part.call, counted=True)  # every part is an upstream call of its own
            if not 200 <= part.status < 300:
                stopped.set()
                raise _Refused(index, whole_reply(call, part.call, part.status, part.headers, part.body, 1))
            held[0] += len(part.body)
            if held[0] > cap:  # every answer is held until the last arrives: one bound for all of them
                stopped.set()
                raise UpstreamBadResponse(
                    f"the answers to this split embeddings request exceed max_buffered_response ({cap} bytes); "
                    "send fewer inputs per request, or ask the platform team to raise max_buffered_response"
                )

    try:
        await _all(worker() for _ in range(min(limits.concurrency, len(parts))))
    except _Refused as refused:
        refused.reply.headers[PARTS_HEADER] = str(len(parts))
        deliver(member, refused.reply)
        return
    deliver(member, _merged(call, parts))


async def _all(workers: Any) -> None:
    """Run the workers; the first to fail cancels the others (their parts in flight) and is raised."""
    tasks = TaskSet()
    running = [tasks.spawn(w, name="embeddings-split-part") for w in workers]
    try:
        await asyncio.wait(running, return_when=asyncio.FIRST_EXCEPTION)
        failed: list[BaseException] = [
            exc for t in running if t.done() and not t.cancelled() and (exc := t.exception()) is not None
        ]
        own = [e for e in failed if not isinstance(e, _Refused)]
        if own:
            raise own[0]  # the proxy's own error (timeout, circuit open, upstream limit): first one seen
        refused = [e for e in failed if isinstance(e, _Refused)]
        if refused:
            raise min(refused, key=lambda e: e.index)
    finally:
        await tasks.close()  # a failure, or the caller's own cancellation: parts in flight are cancelled


def _merged(call: Call, parts: list[_Part]) -> Reply:
    last = parts[-1].call
    try:
        answer = joined([orjson.loads(p.body) for p in parts], [p.count for p in parts])
    except (orjson.JSONDecodeError, merge.SplitError) as exc:
        raise UpstreamBadResponse(
            f"upstream '{last.upstream}' answered part of a split embeddings call with a body that cannot be "
            f"merged ({exc}); try again"
        ) from None
    headers = reply_headers(call, parts[0].call, parts[0].headers or [], 1)
    headers["Content-Type"] = "application/json"
    headers[PARTS_HEADER] = str(len(parts))
    usage = answer.get("usage")
    return Reply(parts[0].status, headers, orjson.dumps(answer), usage if isinstance(usage, dict) else None)


def _part_call(call: Call, inputs: keys.Inputs, span: Span) -> Call:
    """A Call for one part on the caller's route (dispatch sends it like any other)."""
    start, end = span
    own = keys.Inputs(inputs.kind, inputs.items[start:end], 0)
    body = merge.merged_body(call.body or {}, [own])
    return call.derive(body)
