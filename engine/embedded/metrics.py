"""Prometheus metrics under vLLM's names, in a registry of the app's own (no globals).

All carry the labels ``engine`` ("0": one engine core per replica) and ``model_name`` (the served
base name, also for adapter requests, as vLLM labels them). They are updated
from the engine thread after each step (prometheus-client is thread safe).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; vLLM's buckets for these two histograms (trimmed at the slow end).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0)


class EngineMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["engine", "model_name"]
        values = ("0", model_name)
        r = self.registry
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", labels,
                              buckets=TTFT_BUCKETS, registry=r).labels(*values)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of end to end request latency in seconds.", labels,
                             buckets=E2E_BUCKETS, registry=r).labels(*values)
        self.running = Gauge("vllm:num_requests_running",
                             "Number of requests in model execution batches.", labels,
                             registry=r).labels(*values)
        self.waiting = Gauge("vllm:num_requests_waiting",
                             "Number of requests waiting to be processed.", labels,
                             registry=r).labels(*values)
        # vLLM (v1 engine) reports the share of KV-cache blocks in use; ours is the share of the
        # slot cache's positions (max_num_seqs x max_model_len) the running sequences fill.
        self.kv_cache_usage = Gauge("vllm:kv_cache_usage_perc",
                                    "KV-cache usage. 1 means 100 percent usage.", labels,
                                    registry=r).labels(*values)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                     labels, registry=r).labels(*values)
        self.generation_tokens = Counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.", labels,
                                         registry=r).labels(*values)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               ["engine", "finished_reason", "model_name"], registry=r)
        for reason in ("stop", "length", "abort"):
            self.success.labels("0", reason, model_name)
        self._values = values
        self._generated_seen: dict[str, int] = {}

    def on_step(self, scheduler: Any, admitted: list[Any], finished: list[Any]) -> None:
        now = time.monotonic()
        for s in admitted:
            self.prompt_tokens.inc(len(s.prompt_ids))
            if s.first_token_at is not None:
                self.ttft.observe(s.first_token_at - s.arrival)
        new_tokens = sum(len(s.output_ids) for s in scheduler.running)
        new_tokens += sum(len(s.output_ids) for s in finished)
        # Tokens made this step = total now - total seen before, per live request.
        seen = self._generated_seen
        total_before = sum(seen.get(s.request_id, 0) for s in (*scheduler.running, *finished))
        self.generation_tokens.inc(max(0, new_tokens - total_before))
        for s in scheduler.running:
            seen[s.request_id] = len(s.output_ids)
        for s in finished:
            seen.pop(s.request_id, None)
            if s.finish_reason:
                self.success.labels(self._values[0], s.finish_reason, self._values[1]).inc()
            if s.finish_reason != "abort":
                self.e2e.observe(now - s.arrival)
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        capacity = scheduler.max_num_seqs * scheduler.max_model_len
        self.kv_cache_usage.set(sum(len(s.prompt_ids) + len(s.output_ids)
                                    for s in scheduler.running) / capacity if capacity else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
