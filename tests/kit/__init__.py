"""The shared test kit: polling, metric scraping and loopback servers, so test files do not each carry a copy."""

from kit.metrics import Samples, sample_key, samples, scrape, total
from kit.polling import until
from kit.servers import Loopback

__all__ = ["Loopback", "Samples", "sample_key", "samples", "scrape", "total", "until"]
