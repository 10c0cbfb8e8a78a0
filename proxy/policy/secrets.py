"""Which values of a policy are secrets (pure): what the proxy sends upstream as credentials and what
identifies a caller. The compiled `Redactor` (proxy/policy/redact.py) removes them from every output."""

from __future__ import annotations

from urllib.parse import unquote

from yarl import URL

from proxy.policy.redact import Redactor, basic_values
from proxy.policy.schema import Policy, Upstream


def policy_secrets(policy: Policy) -> Redactor:
    """Every secret: upstream keys, base_url credentials, upstream header values, tenant keys and the
    Redis password."""
    values: list[str] = []
    for upstream in policy.upstreams.values():
        values += upstream_credentials(upstream)
    for tenant in policy.tenants.values():
        values += (key.get_secret_value() for key in tenant.keys)
    if policy.state.url:
        values += _redis_credentials(policy.state.url)
    return Redactor(values)


_PUBLIC_HEADERS = frozenset(
    {"accept", "content-type", "user-agent", "openai-beta", "openai-version", "anthropic-version", "anthropic-beta"}
)
"""Headers whose values describe the protocol, never a credential: `application/json` in every answer's
Content-Type must not become `[redacted]`."""


def upstream_credentials(upstream: Upstream) -> list[str]:
    """What the proxy sends an upstream that may be secret: its key, its base_url's credentials, and its
    header values (OpenAI-Organization, a gateway's own key: any may be one, protocol headers aside)."""
    values = [value for name, value in upstream.headers.items() if name.lower() not in _PUBLIC_HEADERS]
    if upstream.api_key is not None:
        values.append(upstream.api_key.get_secret_value())
    if upstream.base_url:
        values += _url_credentials(upstream.base_url)
    return values


def _url_credentials(url: str) -> list[str]:
    try:
        parsed = URL(url)
    except ValueError:  # refused by the schema already
        return []
    if parsed.user is None:
        return []
    return basic_values(parsed.user, parsed.password, parsed.raw_user, parsed.raw_password)


def _redis_credentials(url: str) -> list[str]:
    """`scheme://[user:]password@host...`, sentinel and cluster forms included (several hosts do not
    parse as one URL, so the user info is cut out by hand, as proxy/admission/redis/client.py does)."""
    rest = url.partition("://")[2]
    credentials = rest.split("/", 1)[0].rpartition("@")[0]
    if not credentials:
        return []
    user, _, password = credentials.partition(":")
    secret = password or user
    return [secret, unquote(secret), credentials, unquote(credentials)]
