"""Reading a daemon's ``GET /metrics`` in tests and benchmarks."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import Objfs
from tests.support.rest import rest

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(daemon: Objfs) -> Samples:
    """Every sample of GET /metrics: (name, sorted labels) -> value."""
    status, text = rest(daemon.api, "GET", "/metrics")
    assert status == 200, text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the samples whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))
