"""Batcher: concurrent embedding calls share one upstream call; each caller gets exactly its own answer.
This module holds the groups (join, seal, leave, shut down); `flush` sends a sealed one.

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
import logging
import time
from collections.abc import Callable, Hashable, Mapping
from contextlib import AbstractAsyncContextManager

from aiohttp import web

from proxy.batching import keys, merge, split
from proxy.batching.flush import Member, Sender, fail
from proxy.call import Call
from proxy.errors import ProxyError, ServiceUnavailable, UpstreamTimeout
from proxy.policy.plan import BatchRule
from proxy.tasks import TaskSet
from proxy.telemetry.metrics import Metrics
from proxy.upstream.client import UpstreamClients

SlotFor = Callable[[Call, Mapping[str, str]], AbstractAsyncContextManager[None]]
"""The scheduler slot for a batch, taken with its first caller's call and headers (priority)."""
log = logging.getLogger("signalbox.batcher")


class _Group:
    __slots__ = ("key", "rule", "route", "members", "items", "tokens", "timer", "sealed", "task")

    def __init__(self, key: Hashable | None, rule: BatchRule | None, route: str) -> None:
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

    __slots__ = ("metrics", "slot", "groups", "tasks", "sender")

    def __init__(self, metrics: Metrics, clients: UpstreamClients, slot: SlotFor) -> None:
        self.metrics = metrics
        self.slot = slot
        self.groups: dict[Hashable, _Group] = {}
        self.tasks = TaskSet()
        self.sender = Sender(clients, metrics)

    async def submit(self, request: web.Request, call: Call) -> web.StreamResponse:
        """The caller's answer: its share of a batched call (or of a call it made alone)."""
        assert call.route is not None and call.tenant is not None
        rule = call.route.batch  # None: a route that only splits (batching.split)
        loop = asyncio.get_running_loop()
        body = call.body or {}
        inputs = keys.inputs_of(body.get("input"))
        member = Member(call, inputs, request.headers, request.rel_url.raw_query_string, loop.time(),
                        loop.create_future())
        key = self._key(call, member, rule) if inputs is not None and rule is not None else None
        group: _Group | None = self.groups.get(key) if key is not None else None
        try:
            if key is None:
                group = _Group(None, rule, call.route.name)
                group.add(member)
                self._seal(group, "alone")
                await self._flush(group)  # in the caller's own task: nothing to share
            else:
                assert inputs is not None and rule is not None
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
            fail(group.members, ServiceUnavailable("the proxy is shutting down; retry the request"))
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
                deadline = time.monotonic() + route.timeouts.total
                if len(live) == 1 and group.key is None and split.wanted(first.call):
                    await split.send(self.sender, first, deadline)  # above the upstream's batch limits
                else:
                    await self.sender.exchange(live, deadline)
        except ProxyError as err:
            fail(live, err)
        except TimeoutError:
            fail(live, UpstreamTimeout("the request ran past its total deadline (timeouts.total)"))
        except asyncio.CancelledError:
            fail(live, ServiceUnavailable("the batch was cancelled; retry the request"))
            raise
        except Exception:
            log.exception("batch flush on route %s failed inside the proxy", group.route)
            fail(live, ProxyError("internal error in the proxy while sending a batch; please report it"))
