"""The headers an upstream is sent after the client's own (its configured headers, its credentials, the
protocol's defaults): they depend only on the upstream, so they are worked out once per policy load
(`UpstreamSpec.sent` and `sent_passthrough`) instead of per request (proxy/upstream/headers.py)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

ANTHROPIC_VERSION = "2023-06-01"
"""Sent to an Anthropic upstream when neither the client nor the policy names a version."""


def sent_headers(
    headers: tuple[tuple[str, str], ...],
    basic_auth: str | None,
    api_key: str | None,
    auth_header: str,
) -> Mapping[str, str]:
    """The upstream's own headers in the order they are set over the client's; `api_key` None: the
    pass-through mode's variant (the app's credentials go in their place, then `after_credentials`).
    Built by setting one after the other, so a later one replaces an earlier one in its place."""
    out = dict(headers)
    if basic_auth is not None:  # from base_url's user:password@ (the loader refuses a second Authorization)
        out["authorization"] = basic_auth
    if api_key is not None:
        out[auth_header] = "Bearer " + api_key if auth_header == "authorization" else api_key
    return MappingProxyType(out)
