"""Prometheus metrics (`GET /metrics`), in a registry of the app's own: requests by endpoint and status,
prompt and completion tokens, time to first token, time per output token, queue depth and slots in use."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("jaxlm_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("jaxlm_prompt_tokens", "prompt tokens of the requests served", registry=r)
        self.choices = Counter(
            "jaxlm_choices", "choices ended, by why: length, stop, cancelled", ["finish"], registry=r
        )
        self.completion_tokens = Counter("jaxlm_completion_tokens", "tokens generated and returned", registry=r)
        self.ttft = Histogram(
            "jaxlm_time_to_first_token_seconds", "from a request's arrival to its first token", buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "jaxlm_time_per_output_token_seconds", "a choice's time per token after its first", buckets=TOKEN_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.queue = Gauge("jaxlm_queue_depth", "sequences waiting for a slot", registry=r)
        self.busy = Gauge("jaxlm_slots_in_use", "slots decoding a sequence", registry=r)
        self.slots = Gauge("jaxlm_slots", "slots in all", registry=r)

    def render(self, stats: dict | None) -> bytes:
        if stats is not None:
            self.queue.set(stats["queue"])
            self.busy.set(stats["slots_busy"])
            self.slots.set(stats["slots"])
        return generate_latest(self.registry)
