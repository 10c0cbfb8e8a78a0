"""The LLM endpoints registered as exact routes (proxy/app.py, `handler.EXACT_PATHS`) answer exactly as the
generic `/v1/{tail:.*}` route does: same status, headers and body, in the same protocol."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from conftest import EchoUpstream, Proxy

from proxy.ingress.handler import EXACT_PATHS, protocol_of

pytestmark = pytest.mark.timeout(20)

StartProxy = Callable[..., Awaitable[Proxy]]
POLICY = """
identify: {{mode: api_key}}
upstreams:
  echo: {{provider: openai, base_url: "{url}/v1", api_key: "${{TEST_UPSTREAM_KEY}}"}}
tenants:
  alpha: {{keys: [sk-alpha]}}
routes:
  - {{name: all, upstream: echo}}
"""
_VARYING = {"date", "x-request-id", "request-id"}


async def _answer(http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str]) -> tuple[
    int, dict[str, str], bytes
]:
    async with http.request(method, url, data=b'{"model": "m"}', headers=headers) as resp:
        kept = {name.lower(): value for name, value in resp.headers.items() if name.lower() not in _VARYING}
        return resp.status, kept, await resp.read()


@pytest.mark.parametrize("method", ["POST", "GET", "DELETE"])
async def test_an_exact_route_answers_as_the_generic_route_does(
    start_proxy: StartProxy, echo: EchoUpstream, method: str
) -> None:
    proxy = await start_proxy(POLICY.format(url=echo.url))
    sent = {"Content-Type": "application/json", "x-request-id": "same-id"}
    async with aiohttp.ClientSession() as http:
        for path in sorted(EXACT_PATHS):
            # The same path with a trailing slash is no exact route: it takes `/v1/{tail:.*}`.
            exact = await _answer(http, method, proxy.url + path, sent)
            generic = await _answer(http, method, proxy.url + path + "/", sent)
            assert exact == generic, path
            assert exact[0] == 401
            anthropic_shape = exact[2].startswith(b'{"type":"error"')
            assert anthropic_shape == (protocol_of(path) == "anthropic"), path
    assert echo.received == []

