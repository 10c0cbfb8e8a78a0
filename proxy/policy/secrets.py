"""Which values of a policy are secrets (pure): what the proxy sends upstream as credentials and what
identifies a caller. The compiled `Redactor` (proxy/redact.py) removes them from every output."""

from __future__ import annotations

from urllib.parse import unquote

from yarl import URL

from proxy.policy.schema import Policy
from proxy.redact import Redactor, basic_values


def policy_secrets(policy: Policy) -> tuple[Redactor, Redactor]:
    """(every secret: upstream keys, base_url credentials, upstream header values, tenant keys and the
    Redis password; the upstream credentials alone: what the proxy sends, so what an upstream can echo)."""
    sent: list[str] = []
    for upstream in policy.upstreams.values():
        if upstream.api_key is not None:
            sent.append(upstream.api_key.get_secret_value())
        sent += upstream.headers.values()  # OpenAI-Organization, a gateway's own key: any may be one
        if upstream.base_url:
            sent += _url_credentials(upstream.base_url)
    values = list(sent)
    for tenant in policy.tenants.values():
        values += (key.get_secret_value() for key in tenant.keys)
    if policy.state.url:
        values += _redis_credentials(policy.state.url)
    return Redactor(values), Redactor(sent)


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
    parse as one URL, so the user info is cut out by hand, as proxy/admission/redis_client.py does)."""
    rest = url.partition("://")[2]
    credentials = rest.split("/", 1)[0].rpartition("@")[0]
    if not credentials:
        return []
    user, _, password = credentials.partition(":")
    secret = password or user
    return [secret, unquote(secret), credentials, unquote(credentials)]
