"""Batcher: concurrent embedding calls share one upstream call; each caller gets exactly its own answer.

A call arrives admitted (its own limits, in ingress). It joins the open group of callers with the same
key (`batching.keys`) or opens one. A group is sealed when full (max_items / max_tokens) or max_wait
after it opened, whichever comes first; its flush takes ONE scheduler slot and makes ONE
`dispatch.dispatch` for everyone, so retries, deadline, breaker and the upstream's own limits apply to
the batch as a whole (an upstream limit counts the batch's upstream call once, with its real usage). The
answer is split back by offset (`batching.merge`); a 400-class answer is bisected until only the
caller whose input caused it gets it. A caller that leaves before the seal is taken out; after it,
its share is dropped, and a flush whose callers have all left is cancelled (closing the upstream call).
A group left with one caller sends that caller's own bytes and relays the answer untouched.

Hand-written: no library coalesces HTTP calls with per-caller splitting and error isolation.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.batching import keys, merge
from proxy.batching.keys import Inputs
from proxy.call import Call
from proxy.errors import (
    ProxyError,
    ServiceUnavailable,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.headers import client_headers
from proxy.policy.plan import BatchRule
from proxy.providers import exchange as exchanges
from proxy.tasks import TaskSet
from proxy.telemetry.metrics import Metrics
from proxy.upstream import dispatch
from proxy.upstream.body import read_all
from proxy.upstream.client import UpstreamClients

BATCH_SIZE_HEADER = "x-signalbox-batch-size"
SlotFor = Callable[[Call, Mapping[str, str]], AbstractAsyncContextManager[None]]
"""The scheduler slot for a batch, taken with its first caller's call and headers (priority)."""
log = logging.getLogger("signalbox.batcher")


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


class _Group:
    __slots__ = ("key", "rule", "route", "members", "items", "tokens", "timer", "sealed", "task")

    def __init__(self, key: Hashable | None, rule: BatchRule, route: str) -> None:
        self.key = key
        self.rule = rule
        self.route = route
        self.members: list[Member] = []
        self.items = 0
        self.tokens = 0
        self.timer: asyncio.TimerHandle | None = None
        self.sealed = False
        self.task: asyncio.Task[None] | None = None

    def add(self, member: Member) -> None:
        self.members.append(member)
        self.items += member.count
        self.tokens += member.tokens

    def remove(self, member: Member) -> None:
        self.members.remove(member)
        self.items -= member.count
        self.tokens -= member.tokens

    def live(self) -> list[Member]:
        return [m for m in self.members if not m.gone]


class Batcher:
    """Open groups by key, and the flushes in flight; one per app."""

    __slots__ = ("metrics", "clients", "slot", "groups", "tasks")

    def __init__(self, metrics: Metrics, clients: UpstreamClients, slot: SlotFor) -> None:
        self.metrics = metrics
        self.clients = clients
        self.slot = slot
        self.groups: dict[Hashable, _Group] = {}
        self.tasks = TaskSet()

    async def submit(self, request: web.Request, call: Call) -> web.StreamResponse:
        """The caller's answer: its share of a batched call (or of a call it made alone)."""
        assert call.route is not None and call.route.batch is not None and call.tenant is not None
        rule = call.route.batch
        loop = asyncio.get_running_loop()
        body = call.body or {}
        inputs = keys.inputs_of(body.get("input"))
        member = Member(call, inputs, request.headers, request.rel_url.raw_query_string, loop.time(),
                        loop.create_future())
        key = self._key(call, member, rule) if inputs is not None else None
        group: _Group | None = self.groups.get(key) if key is not None else None
        try:
            if key is None:
                group = _Group(None, rule, call.route.name)
                group.add(member)
                self._seal(group, "alone")
                await self._flush(group)  # in the caller's own task: nothing to share
            else:
                assert inputs is not None
                if group is not None and not merge.fits(group.items, group.tokens, inputs, rule.max_items,
                                                        rule.max_tokens):
                    self._seal(group, "full")
                    group = None
                if group is None:
                    group = self.groups[key] = _Group(key, rule, call.route.name)
                    group.timer = loop.call_later(rule.max_wait, self._due, group)
                group.add(member)
                if merge.full(group.items, group.tokens, rule.max_items, rule.max_tokens):
                    self._seal(group, "full")
            reply = await member.future
        except asyncio.CancelledError:
            self._leave(group, member)
            raise
        call.status = reply.status
        call.bytes_out = len(reply.body)
        if reply.usage is not None:
            call.usage = reply.usage
        return web.Response(status=reply.status, body=reply.body, headers=reply.headers)

    def _key(self, call: Call, member: Member, rule: BatchRule) -> Hashable | None:
        assert call.route is not None and call.tenant is not None and member.inputs is not None
        if merge.too_big(member.inputs, rule.max_items, rule.max_tokens):
            return None
        ident = call.plan.identify
        signature = keys.header_signature(
            member.headers.items(),
            credentials=ident.mode == "passthrough",
            drop=frozenset((ident.header,)) if ident.mode != "api_key" else frozenset(),
        )
        return keys.group_key(
            call.body or {}, member.inputs, route=call.route.name, plan=call.plan.digest, path=call.path,
            tenant=None if rule.cross_tenant else call.tenant.name, query=member.query, headers=signature,
        )

    # --- sealing and leaving ------------------------------------------------------------------------

    def _due(self, group: _Group) -> None:
        if not group.sealed:
            self._seal(group, "timeout")

    def _seal(self, group: _Group, reason: str) -> None:
        """Close the group to newcomers and send it (a task, unless it is a lone call sent inline)."""
        group.sealed = True
        if group.timer is not None:
            group.timer.cancel()
        if group.key is not None and self.groups.get(group.key) is group:
            del self.groups[group.key]
        live = group.live()
        self.metrics.batch_flushed(group.route, reason, len(live), sum(m.count for m in live))
        now = asyncio.get_running_loop().time()
        for member in live:
            self.metrics.batch_waited(group.route, now - member.joined)
            member.call.mark("batched")
        if reason != "alone":
            group.task = self.tasks.spawn(self._flush(group), name="batch-flush")

    def _leave(self, group: _Group | None, member: Member) -> None:
        """The caller's client left: before the seal it leaves the group; after, its share is dropped."""
        member.gone = True
        future = member.future
        if future.done() and not future.cancelled():
            future.exception()  # retrieved: nobody will read it now
        future.cancel()
        if group is None or member not in group.members:
            return
        if not group.sealed:
            group.remove(member)
            if not group.members:
                if group.timer is not None:
                    group.timer.cancel()
                if group.key is not None and self.groups.get(group.key) is group:
                    del self.groups[group.key]
        elif group.task is not None and all(m.gone or m.future.done() for m in group.members):
            group.task.cancel()  # nobody is left to answer: close the upstream call

    async def close(self) -> None:
        """At shutdown: open groups and flushes still running end with a 503."""
        for group in list(self.groups.values()):
            if group.timer is not None:
                group.timer.cancel()
            group.sealed = True
            _fail(group.members, ServiceUnavailable("the proxy is shutting down; retry the request"))
        self.groups.clear()
        await self.tasks.close()

    # --- the flush ------------------------------------------------------------------------------------

    async def _flush(self, group: _Group) -> None:
        live = group.live()
        if not live:
            return
        first = live[0]
        route = first.call.route
        assert route is not None
        try:
            async with self.slot(first.call, first.headers), asyncio.timeout(route.timeouts.total):
                # One deadline for the whole flush, bisecting included; dispatch's retries respect it.
                await self._exchange(live, time.monotonic() + route.timeouts.total)
        except ProxyError as err:
            _fail(live, err)
        except TimeoutError:
            _fail(live, UpstreamTimeout("the request ran past its total deadline (timeouts.total)"))
        except asyncio.CancelledError:
            _fail(live, ServiceUnavailable("the batch was cancelled; retry the request"))
            raise
        except Exception:
            log.exception("batch flush on route %s failed inside the proxy", group.route)
            _fail(live, ProxyError("internal error in the proxy while sending a batch; please report it"))

    async def _exchange(self, members: list[Member], deadline: float) -> None:
        """One upstream call for `members`; a 400-class answer is bisected: one bad input, one failure."""
        members = [m for m in members if not m.gone]
        if len(members) <= 1:
            if members:
                await self._alone(members[0], deadline)
            return
        first = members[0]
        merged = _merged_call(first, members)
        try:
            status, headers, body = await self._send(merged, _merged_headers(first.headers), first.query, deadline)
        finally:
            for i, member in enumerate(members):
                _share_attempts(member.call, merged, counted=i == 0)
        if 200 <= status < 300:
            self._split(members, merged, status, headers, body)
        elif merge.should_bisect(status, len(members)):
            self.metrics.batch_split(first.call.route.name if first.call.route else "")
            left, right = merge.halves([m.count for m in members], merge.named_item(body))
            await self._exchange([members[i] for i in left], deadline)
            await self._exchange([members[i] for i in right], deadline)
        else:  # the same for everyone (401, 404, 429 or 5xx after dispatch's retries): everyone gets it
            for member in members:
                _deliver(member, _whole(member.call, merged, status, headers, body, len(members)))

    async def _alone(self, member: Member, deadline: float) -> None:
        """The caller's own bytes, its answer relayed untouched (batch size 1)."""
        call = member.call
        status, headers, body = await self._send(call, member.headers, member.query, deadline)
        _deliver(member, _whole(call, call, status, headers, body, 1))

    async def _send(self, call: Call, headers: Mapping[str, str], query: str, deadline: float
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
                usage = merge.usage_of(body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamUnreachable(
                f"upstream '{call.upstream}' broke off its answer ({type(exc).__name__}); try again"
            ) from None
        finally:
            upstream.release()
            await sent.finish(call, usage)
        return upstream.status, list(upstream.headers.items()), body

    def _split(self, members: list[Member], merged: Call, status: int, headers: list[tuple[str, str]],
               body: bytes) -> None:
        counts = [m.count for m in members]
        try:
            parts = merge.split(orjson.loads(body), counts, [m.tokens for m in members])
        except (orjson.JSONDecodeError, merge.SplitError) as exc:
            _fail(members, UpstreamBadResponse(
                f"upstream '{merged.upstream}' answered a batched embeddings call with a body that cannot "
                f"be split back ({exc}); try again"
            ))
            return
        for member, part in zip(members, parts, strict=True):
            if member.gone:
                continue  # its client left after the flush: its share is dropped
            usage = part.get("usage")
            reply = Reply(status, _headers(member.call, merged, headers, len(members)), orjson.dumps(part),
                          usage if isinstance(usage, dict) else None)
            reply.headers["Content-Type"] = "application/json"
            _deliver(member, reply)


def _merged_call(first: Member, members: list[Member]) -> Call:
    """A Call for the merged body on the same route (dispatch sends it like any other)."""
    call = first.call
    body = merge.merged_body(call.body or {}, [m.inputs for m in members if m.inputs is not None])
    return Call(
        request_id=os.urandom(12).hex(), plan=call.plan, method=call.method, path=call.path,
        protocol=call.protocol, started=time.perf_counter(), tenant=call.tenant, route=call.route,
        raw_body=orjson.dumps(body), body=body, model=call.model,
    )


def _merged_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The first caller's headers, less what belongs to its request alone."""
    out = CIMultiDict(headers)
    out.popall("idempotency-key", None)
    return out


def _share_attempts(call: Call, merged: Call, *, counted: bool) -> None:
    """Every caller of a merged call shows its attempts (access log, admission's request count); one
    caller (`counted`) carries them into the upstream metrics, which count upstream calls."""
    call.attempts.extend(merged.attempts if counted else (replace(a, shared=True) for a in merged.attempts))
    call.upstream = merged.upstream
    call.exchange = merged.exchange
    if "upstream_headers" in merged.marks:
        call.marks["upstream_headers"] = merged.started + merged.marks["upstream_headers"] - call.started


def _headers(call: Call, sent: Call, upstream: Iterable[tuple[str, str]], size: int) -> CIMultiDict[str]:
    route = call.route.name if call.route is not None else ""
    answered_by = sent.plan.upstreams.get(sent.upstream)
    out = client_headers(upstream, request_id=call.request_id, route=route, upstream_name=sent.upstream,
                         hide=answered_by.hide_response_headers if answered_by is not None else None,
                         redact=answered_by.secrets if answered_by is not None else sent.plan.secrets)
    out[BATCH_SIZE_HEADER] = str(size)
    return out


def _whole(
    call: Call, sent: Call, status: int, upstream: list[tuple[str, str]], body: bytes, size: int
) -> Reply:
    """An answer relayed as the upstream gave it (error shapes normalised, as the plain path does)."""
    headers = _headers(call, sent, upstream, size)
    if status >= 400 and sent.exchange is not None:
        status, body = exchanges.response_body(sent.exchange, status, body, model=call.model,
                                               created=int(call.started_wall), redact=sent.plan.secrets)
        headers["Content-Type"] = "application/json"
    usage = merge.usage_of(body) if status < 300 and call.want_usage else None
    return Reply(status, headers, body, usage)


def _deliver(member: Member, reply: Reply) -> None:
    if not member.future.done():
        member.future.set_result(reply)


def _fail(members: list[Member], error: ProxyError) -> None:
    """Every caller still waiting gets its own copy of `error`, with the batch size it shared."""
    size = str(len(members))
    for member in members:
        if not member.future.done():
            mine = copy.copy(error)
            mine.headers = {**error.headers, BATCH_SIZE_HEADER: size}
            member.future.set_exception(mine)
