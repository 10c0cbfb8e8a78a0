"""The shared test kit: polling, metric scraping, loopback servers and policies, so test files carry no copies.

`kit.browser` (headless Chromium for pages) is imported by name where it is needed, so only those tests load
Selenium."""

from kit.metrics import Samples, sample_key, samples, scrape, total
from kit.policy import UPSTREAM_KEY_REF, build_policy, route_spec, upstream_spec
from kit.polling import until
from kit.servers import Loopback

__all__ = [
    "UPSTREAM_KEY_REF",
    "Loopback",
    "Samples",
    "build_policy",
    "route_spec",
    "sample_key",
    "samples",
    "scrape",
    "total",
    "until",
    "upstream_spec",
]
