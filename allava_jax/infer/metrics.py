"""Prometheus metrics of the server (``GET /metrics``), named as vLLM names its own.

``allava:num_requests_running`` / ``allava:num_requests_waiting`` (gauges: sequences in the
decode batch / queued; a request with ``n`` choices counts ``n``), ``allava:time_to_first_token_seconds``
and ``allava:inter_token_latency_seconds`` (histograms, vLLM's buckets), ``allava:prompt_tokens_total``
and ``allava:generation_tokens_total`` (counters), all labelled with ``model_name``. Latencies are
measured in the scheduler thread, from the request's submission to each token leaving the model.
Each app has its own registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from allava_jax.infer.scheduler import Event, Scheduler

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    """The server's metrics; ``track`` one per sequence, ``render`` for ``/metrics``."""

    def __init__(self, scheduler: Scheduler, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"labelnames": ["model_name"], "registry": self.registry}
        Gauge("allava:num_requests_running", "Sequences in the decode batch.", **labels).labels(model_name).set_function(
            lambda: sum(job is not None for job in scheduler.slots))
        Gauge("allava:num_requests_waiting", "Sequences waiting for a slot.", **labels).labels(model_name).set_function(
            scheduler.waiting.qsize)
        self.ttft = Histogram("allava:time_to_first_token_seconds", "Submission to first token.", buckets=TTFT_BUCKETS,
                              **labels).labels(model_name)
        self.itl = Histogram("allava:inter_token_latency_seconds", "Time between a sequence's tokens.", buckets=ITL_BUCKETS,
                             **labels).labels(model_name)
        self.prompt_tokens = Counter("allava:prompt_tokens", "Prefilled prompt tokens.", **labels).labels(model_name)
        self.generation_tokens = Counter("allava:generation_tokens", "Generated tokens.", **labels).labels(model_name)

    def track(self, prompt_tokens: int) -> "SequenceTimer":
        return SequenceTimer(self, prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SequenceTimer:
    """Observes one sequence's events (call ``observe`` from the scheduler thread, in order)."""

    def __init__(self, metrics: ServerMetrics, prompt_tokens: int) -> None:
        self.metrics, self.prompt_tokens = metrics, prompt_tokens
        self.last = self.submitted = time.perf_counter()
        self.first = True

    def observe(self, event: Event) -> None:
        """A chunk of ``k`` tokens ``dt`` after the previous one counts as ``k`` inter-token gaps of
        ``dt / k``, so the histogram's count is the tokens after the first and its sum the decode time."""
        if not event.num_tokens:
            return
        now = time.perf_counter()
        m = self.metrics
        gaps = event.num_tokens
        if self.first:
            m.ttft.observe(now - self.submitted)
            m.prompt_tokens.inc(self.prompt_tokens)
            self.first, gaps = False, gaps - 1
            self.last = now  # tokens that came with the first one came at once
        for _ in range(gaps):
            m.itl.observe((now - self.last) / gaps)
        m.generation_tokens.inc(event.num_tokens)
        self.last = now
