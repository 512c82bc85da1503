"""Prometheus metrics of one gateway process (its own ``CollectorRegistry``, no globals).

Label sets are bounded: ``model`` is ``base``, an adapter *name* that resolved (never a version or
alias; at most ``MAX_MODEL_LABELS`` distinct), or ``other`` (unknown names, over the cap, no model
given). ``route`` is the route template, ``status`` the HTTP status code.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

MAX_MODEL_LABELS = 200
OTHER = "other"
# Seconds; dense under 50 ms because the gateway's own overhead lives there.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "tunegate_gateway_"
        self.requests = Counter(p + "requests", "Requests by route, status and model",
                                ["route", "status", "model"], registry=r)
        self.latency = Histogram(p + "request_latency_seconds", "Whole request, seconds",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds",
                              "Streaming: request start to first content chunk, seconds",
                              ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r)
        # Inference requests (chat, completions, generate) from arrival to the answer's last
        # byte, by adapter name and served version ("vN"; "base" for the base model).
        self.inference_latency = Histogram(
            p + "inference_latency_seconds", "Inference request, arrival to last byte, seconds",
            ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter(p + "tokens", "Tokens by model and direction (in = prompt)",
                              ["model", "direction"], registry=r)
        self.upstream_errors = Counter(p + "upstream_errors", "Engine replica failures",
                                       ["replica", "kind"], registry=r)
        self.quota_rejections = Counter(p + "quota_rejections", "429s by limit (rpm | tpm)",
                                        ["limit"], registry=r)
        self.quota_fail_open = Counter(p + "quota_fail_open",
                                       "Requests admitted without a quota check (Redis down)",
                                       registry=r)
        self.replica_healthy = Gauge(p + "replica_healthy", "1 when the last health check passed",
                                     ["replica"], registry=r)
        self.replica_in_flight = Gauge(p + "replica_in_flight", "Requests in flight per replica",
                                       ["replica"], registry=r)
        self.replica_adapters = Gauge(p + "replica_adapters",
                                      "Adapter versions a replica holds (as last seen)",
                                      ["replica"], registry=r)
        self.adapter_loads = Counter(p + "adapter_loads", "Adapter loads by outcome",
                                     ["replica", "outcome"], registry=r)
        # Traffic sampling (gateway.traffic_sampler): records by outcome: written (on the stream),
        # dropped (buffer full), failed (Redis error), no_redis.
        self.samples = Counter(p + "samples", "Sampled request records by outcome", ["outcome"],
                               registry=r)
        self._models: set[str] = set()
        # Label sets that exist from the start, so that sums and rates over them are 0, not
        # empty, until the first event (alerts and dashboards read them).
        for outcome in ("written", "dropped", "failed", "no_redis"):
            self.samples.labels(outcome)
        for limit in ("rpm", "tpm"):
            self.quota_rejections.labels(limit)

    def model_label(self, name: str | None) -> str:
        """A bounded label for an adapter name (or ``base``) that resolved."""
        if name is None:
            return OTHER
        if name in self._models:
            return name
        if len(self._models) >= MAX_MODEL_LABELS:
            return OTHER
        self._models.add(name)
        return name
