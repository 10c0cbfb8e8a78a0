"""One sealed batch's upstream side: the callers' inputs merged into one embeddings call, sent through
dispatch, and the answer split back so that each caller gets exactly its own share; a 400-class answer is
bisected until only the caller whose input caused it gets it (the pure halves: `keys` and `merge`)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict

from proxy.batching import merge
from proxy.batching.keys import Inputs
from proxy.call import Call
from proxy.errors import ProxyError, UpstreamBadResponse, UpstreamUnreachable
from proxy.providers import exchange as exchanges
from proxy.providers.usage import usage_of
from proxy.telemetry.metrics import Metrics
from proxy.upstream import dispatch
from proxy.upstream.body import read_all
from proxy.upstream.client import UpstreamClients
from proxy.upstream.headers import client_headers

BATCH_SIZE_HEADER = "x-signalbox-batch-size"


@dataclass(slots=True)
class Reply:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    usage: dict[str, Any] | None = None


@dataclass(slots=True, eq=False)
class Member:
    """One caller waiting in a batch."""

    call: Call
    inputs: Inputs | None
    headers: Mapping[str, str]
    query: str
    joined: float
    future: asyncio.Future[Reply]
    gone: bool = False

    @property
    def count(self) -> int:
        return self.inputs.count if self.inputs is not None else 0

    @property
    def tokens(self) -> int:
        return self.inputs.tokens if self.inputs is not None else 0


class Sender:
    """Sends sealed groups upstream and answers their callers; one per app (the batcher's)."""

    __slots__ = ("clients", "metrics")

    def __init__(self, clients: UpstreamClients, metrics: Metrics) -> None:
        self.clients = clients
        self.metrics = metrics

    async def exchange(self, members: list[Member], deadline: float) -> None:
        """One upstream call for `members`; a 400-class answer is bisected: one bad input, one failure."""
        members = [m for m in members if not m.gone]
        if len(members) <= 1:
            if members:
                await self.alone(members[0], deadline)
            return
        first = members[0]
        merged = _merged_call(first, members)
        try:
            status, headers, body = await self.send(merged, _merged_headers(first.headers), first.query, deadline)
        finally:
            for i, member in enumerate(members):
                share_attempts(member.call, merged, counted=i == 0)
        if 200 <= status < 300:
            self.split(members, merged, status, headers, body)
        elif merge.should_bisect(status, len(members)):
            self.metrics.batch_split(first.call.route.name if first.call.route else "")
            left, right = merge.halves([m.count for m in members], merge.named_item(body))
            await self.exchange([members[i] for i in left], deadline)
            await self.exchange([members[i] for i in right], deadline)
        else:  # the same for everyone (401, 404, 429 or 5xx after dispatch's retries): everyone gets it
            for member in members:
                deliver(member, whole_reply(member.call, merged, status, headers, body, len(members)))

    async def alone(self, member: Member, deadline: float) -> None:
        """The caller's own bytes, its answer relayed untouched (batch size 1)."""
        call = member.call
        status, headers, body = await self.send(call, member.headers, member.query, deadline)
        deliver(member, whole_reply(call, call, status, headers, body, 1))

    async def send(self, call: Call, headers: Mapping[str, str], query: str, deadline: float
                    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """dispatch (deployment choice, retries, breaker, fallbacks, upstream limits), then the whole body.

        `call` is the merged Call (or a lone caller's own): one upstream call, so an upstream limit counts
        it once per attempt, and the answering attempt settles here with the whole answer's `usage`. The
        callers' own admissions (tenant, route) were taken one by one and settle with their shares."""
        sent = await dispatch.dispatch(call, self.clients, headers, query, deadline=deadline)
        sent.done()  # the deployment stops counting as busy at the headers
        upstream = sent.response
        usage: dict[str, Any] | None = None
        try:
            body = await read_all(upstream, call.plan.max_buffered_response, sent.body, call.upstream)
            if sent.hold is not None and upstream.status < 300:
                usage = usage_of(body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamUnreachable(
                f"upstream '{call.upstream}' broke off its answer ({type(exc).__name__}); try again"
            ) from None
        finally:
            upstream.release()
            await sent.finish(call, usage)
        return upstream.status, list(upstream.headers.items()), body

    def split(self, members: list[Member], merged: Call, status: int, headers: list[tuple[str, str]],
               body: bytes) -> None:
        counts = [m.count for m in members]
        try:
            parts = merge.split(orjson.loads(body), counts, [m.tokens for m in members])
        except (orjson.JSONDecodeError, merge.SplitError) as exc:
            fail(members, UpstreamBadResponse(
                f"upstream '{merged.upstream}' answered a batched embeddings call with a body that cannot "
                f"be split back ({exc}); try again"
            ))
            return
        for member, part in zip(members, parts, strict=True):
            if member.gone:
                continue  # its client left after the flush: its share is dropped
            usage = part.get("usage")
            reply = Reply(status, reply_headers(member.call, merged, headers, len(members)), orjson.dumps(part),
                          usage if isinstance(usage, dict) else None)
            reply.headers["Content-Type"] = "application/json"
            deliver(member, reply)


def _merged_call(first: Member, members: list[Member]) -> Call:
    """A Call for the merged body on the same route (dispatch sends it like any other)."""
    call = first.call
    body = merge.merged_body(call.body or {}, [m.inputs for m in members if m.inputs is not None])
    return call.derive(body)


def _merged_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The first caller's headers, less what belongs to its request alone."""
    out = CIMultiDict(headers)
    out.popall("idempotency-key", None)
    return out


def share_attempts(call: Call, merged: Call, *, counted: bool) -> None:
    """Every caller of a merged call shows its attempts (access log, admission's request count); one
    caller (`counted`) carries them into the upstream metrics, which count upstream calls."""
    call.attempts.extend(merged.attempts if counted else (replace(a, shared=True) for a in merged.attempts))
    call.upstream = merged.upstream
    call.exchange = merged.exchange
    if "upstream_headers" in merged.marks:
        call.marks["upstream_headers"] = merged.started + merged.marks["upstream_headers"] - call.started


def reply_headers(call: Call, sent: Call, upstream: Iterable[tuple[str, str]], size: int) -> CIMultiDict[str]:
    route = call.route.name if call.route is not None else ""
    answered_by = sent.plan.upstreams.get(sent.upstream)
    out = client_headers(upstream, request_id=call.request_id, route=route, upstream_name=sent.upstream,
                         hide=answered_by.hide_response_headers if answered_by is not None else None,
                         redact=answered_by.secrets if answered_by is not None else sent.plan.secrets)
    out[BATCH_SIZE_HEADER] = str(size)
    return out


def whole_reply(
    call: Call, sent: Call, status: int, upstream: list[tuple[str, str]], body: bytes, size: int
) -> Reply:
    """An answer relayed as the upstream gave it (error shapes normalised, as the plain path does)."""
    headers = reply_headers(call, sent, upstream, size)
    if status >= 400 and sent.exchange is not None:
        status, body = exchanges.response_body(sent.exchange, status, body, model=call.model,
                                               created=int(call.started_wall), redact=sent.plan.secrets)
        headers["Content-Type"] = "application/json"
    usage = usage_of(body) if status < 300 and call.want_usage else None
    return Reply(status, headers, body, usage)


def deliver(member: Member, reply: Reply) -> None:
    if not member.future.done():
        member.future.set_result(reply)


def fail(members: list[Member], error: ProxyError) -> None:
    """Every caller still waiting gets its own copy of `error`, with the batch size it shared."""
    size = str(len(members))
    for member in members:
        if not member.future.done():
            mine = copy.copy(error)
            mine.headers = {**error.headers, BATCH_SIZE_HEADER: size}
            member.future.set_exception(mine)
