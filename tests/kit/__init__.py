"""The shared test kit: polling and metric scraping, so test files do not each carry a copy."""

from kit.metrics import Samples, sample_key, samples, scrape, total
from kit.polling import until

__all__ = ["Samples", "sample_key", "samples", "scrape", "total", "until"]
