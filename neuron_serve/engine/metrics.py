"""Prometheus metrics, named as vLLM names them under the `neuron_serve:` prefix.

Under gunicorn every worker is a replica; prometheus-client's multiprocess mode (the directory in
PROMETHEUS_MULTIPROC_DIR, set by `neuron-serve serve`) sums counters and histograms over them, and
each gauge says how it combines (`livesum`, `max`, ...).
"""

from __future__ import annotations

import os
import time
import weakref

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from neuron_serve.artifact.traffic import HISTOGRAMS, ITL, QUEUE_TIME, STEP_TOKENS, TTFT, Binned, TrafficProfile
from neuron_serve.model.step import StepBatch

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
OCCUPANCY_BUCKETS = tuple(i / 16 for i in range(1, 17))
TOKEN_BUCKETS = tuple(2**i for i in range(13))
P = "neuron_serve:"
# The latency and step-size histograms a traffic profile carries beside its own (artifact/traffic.py).
PROFILED = {TTFT: LATENCY_BUCKETS, ITL: LATENCY_BUCKETS, QUEUE_TIME: LATENCY_BUCKETS, STEP_TOKENS: TOKEN_BUCKETS}


_families: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _family(kind, name: str, doc: str, **kwargs):
    """One family per name and registry, shared by every model's `Metrics`, each of which takes its own
    `model_name` labels: prometheus-client refuses to register a name twice."""
    registered = _families.setdefault(kwargs.get("registry") or REGISTRY, {})
    if name not in registered:
        registered[name] = kind(name, doc, **kwargs)
    return registered[name]


class Metrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.model_name = model_name
        kw = {"labelnames": ["model_name"], "registry": registry} if registry else {"labelnames": ["model_name"]}

        def hist(name, doc, buckets=LATENCY_BUCKETS):
            return _family(Histogram, P + name, doc, buckets=buckets, **kw).labels(model_name)

        self.ttft = hist(TTFT, "Time from request arrival to its first token")
        self.itl = hist(ITL, "Time between two tokens of one request")
        self.e2e = hist("e2e_request_latency_seconds", "Time from request arrival to its last token")
        self.queue_time = hist(QUEUE_TIME, "Time a request waited for a slot")
        self.prefill_time = hist("request_prefill_time_seconds", "Time of a request's prefill")
        self.decode_time = hist("request_decode_time_seconds", "Time from a request's first token to its last")
        self.occupancy = hist("batch_occupancy", "Busy slots / slots, per decode step", OCCUPANCY_BUCKETS)
        self.step_time = hist("engine_step_seconds", "Time of one engine step (one graph call)")
        self.step_tokens = hist(STEP_TOKENS, "Tokens per engine step, decode and prompt", TOKEN_BUCKETS)
        self.step_seconds = _family(
            Counter,
            P + "engine_step_seconds_by_part",
            "Engine step time split between decode and prompt tokens, in proportion to their count",
            **{**kw, "labelnames": ["model_name", "part"]},
        )
        self.running = _family(
            Gauge, P + "num_requests_running", "Requests in slots", multiprocess_mode="livesum", **kw
        )
        self.waiting = _family(Gauge, P + "num_requests_waiting", "Requests queued", multiprocess_mode="livesum", **kw)
        self.prompt_tokens = _family(Counter, P + "prompt_tokens", "Prefilled prompt tokens", **kw).labels(model_name)
        self.generation_tokens = _family(Counter, P + "generation_tokens", "Generated tokens", **kw).labels(model_name)
        labels = {**kw, "labelnames": ["model_name", "finished_reason"]}
        self.finished = _family(Counter, P + "request_success", "Finished requests by reason", **labels)
        # Metering: by tenant name (server/tenants.py), never by key.
        tenant_kw = {**kw, "labelnames": ["model_name", "tenant", "status"]}
        self.tenant_requests = _family(
            Counter, P + "tenant_requests", "Requests of a tenant, by HTTP status", **tenant_kw
        )
        tenant_kw = {**kw, "labelnames": ["model_name", "tenant"]}
        self.tenant_prompt_tokens = _family(
            Counter, P + "tenant_prompt_tokens", "Prompt tokens, by tenant", **tenant_kw
        )
        self.tenant_completion_tokens = _family(
            Counter, P + "tenant_completion_tokens", "Completion tokens, by tenant", **tenant_kw
        )
        bucket_kw = {**kw, "labelnames": ["model_name", "bucket"]}
        self.bucket_real = _family(
            Counter, P + "bucket_real_tokens", "Real tokens run through a bucket's graph", **bucket_kw
        )
        self.bucket_padded = _family(
            Counter, P + "bucket_padded_tokens", "Token slots the bucket's graph ran", **bucket_kw
        )
        self.padding_ratio = _family(
            Gauge,
            P + "padding_ratio",
            "Share of a bucket's token slots that were padding",
            multiprocess_mode="max",
            **bucket_kw,
        )
        phase_kw = {**kw, "labelnames": ["model_name", "phase"]}
        self.cold_start = _family(
            Gauge, P + "cold_start_seconds", "Start-up time by phase", multiprocess_mode="max", **phase_kw
        )
        self.accelerator_occupancy = _family(
            Gauge,
            P + "accelerator_occupancy",
            "Share of wall time in forward passes (cpu) or neuroncore_utilization/100 (neuron)",
            multiprocess_mode="max",
            **kw,
        )
        # The traffic profile's histograms (artifact/traffic.py owns their names and bins).
        self.traffic = {name: hist(name, doc, bins) for name, (doc, bins) in HISTOGRAMS.items()}
        self.running, self.waiting = self.running.labels(model_name), self.waiting.labels(model_name)
        self.accelerator_occupancy = self.accelerator_occupancy.labels(model_name)
        self._busy_s = 0.0
        self._window_start = time.perf_counter()
        self._padding_totals: dict[str, tuple[int, int]] = {}
        # On neuron, neuron-monitor's neuroncore_utilization sets the occupancy instead.
        self.occupancy_from_forward_time = True

    def bucket_usage(self, bucket: str, real: int, padded: int) -> None:
        self.bucket_real.labels(self.model_name, bucket).inc(real)
        self.bucket_padded.labels(self.model_name, bucket).inc(padded)
        total_real, total_padded = self._padding_totals.get(bucket, (0, 0))
        total_real, total_padded = total_real + real, total_padded + padded
        self._padding_totals[bucket] = (total_real, total_padded)
        self.padding_ratio.labels(self.model_name, bucket).set(1 - total_real / total_padded if total_padded else 0)

    def step(self, decode_tokens: int, prompt_tokens: int, seconds: float) -> None:
        """One engine step. Decode and prompt tokens go through the layers together, so the time is
        split between them by their share of the step's tokens."""
        total = decode_tokens + prompt_tokens
        self.step_time.observe(seconds)
        self.step_tokens.observe(total)
        for part, count in (("decode", decode_tokens), ("prompt", prompt_tokens)):
            self.step_seconds.labels(self.model_name, part).inc(seconds * count / total if total else 0.0)

    def traffic_step(self, batch: StepBatch, running: int) -> None:
        """What a step asked of the graphs: its prompt tokens, the KV length it attends (every decode
        position and the continued prompt's cached tokens) and its decode rows; and the concurrency."""
        if batch.chunks:
            self.traffic["engine_step_prompt_tokens"].observe(batch.prompt_tokens)
        if batch.kv_length:
            self.traffic["engine_step_kv_length"].observe(batch.kv_length)
        if batch.decode_slots:
            self.traffic["engine_step_decode_rows"].observe(max(batch.decode_slots) + 1)
        self.traffic["engine_step_running"].observe(running)

    def forward_time(self, seconds: float) -> None:
        """Accumulate forward-pass time; publish busy/wall over windows of at least 2 s."""
        self._busy_s += seconds
        now = time.perf_counter()
        if self.occupancy_from_forward_time and now - self._window_start >= 2.0:
            self.accelerator_occupancy.set(min(1.0, self._busy_s / (now - self._window_start)))
            self._busy_s, self._window_start = 0.0, now

    def idle(self) -> None:
        self.forward_time(0.0)


def _registry() -> CollectorRegistry:
    """Summed over gunicorn workers in multiprocess mode (live or exited), else this process's."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def render() -> tuple[bytes, str]:
    """The exposition text: summed over gunicorn workers when in multiprocess mode."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return generate_latest(_registry()), CONTENT_TYPE_LATEST


def traffic_profile(model_name: str) -> TrafficProfile:
    """The model's traffic histograms as they stand, over every replica: counts only."""
    families = {family.name: _of_model(family, model_name) for family in _registry().collect()}
    profile = TrafficProfile(model_name)
    binned = {name: bins for name, (_, bins) in HISTOGRAMS.items()} | PROFILED
    for name, bins in binned.items():
        profile.histograms[name] = _binned(families.get(P + name, []), bins)
    profile.graphs = _graph_padding(families)
    return profile


def _of_model(family, model_name: str) -> list:
    return [sample for sample in family.samples if sample.labels.get("model_name") == model_name]


def _graph_padding(families: dict[str, list]) -> dict[str, tuple[int, int]]:
    """Each graph's (real, padded) token slots, summed over replicas."""
    totals: dict[str, list[int]] = {}
    for index, kind in enumerate(("real", "padded")):
        for sample in families.get(P + f"bucket_{kind}_tokens", []):
            if sample.name.endswith("_total"):
                totals.setdefault(sample.labels["bucket"], [0, 0])[index] += round(sample.value)
    return {graph: (real, padded) for graph, (real, padded) in totals.items()}


def _binned(samples, bins: tuple[float, ...]) -> Binned:
    """Prometheus' cumulative `le` buckets (summed over labels) as counts per bin."""
    cumulative, everything, total = dict.fromkeys(bins, 0.0), 0.0, 0.0
    for sample in samples:
        if sample.name.endswith("_bucket"):
            le = float(sample.labels["le"])
            if le in cumulative:
                cumulative[le] += sample.value
            else:
                everything += sample.value  # le="+Inf"
        elif sample.name.endswith("_sum"):
            total += sample.value
    counts, below = [], 0.0
    for bound in bins:
        counts.append(round(cumulative[bound] - below))
        below = cumulative[bound]
    return Binned(bins, counts, round(everything - below), total)


_by_model: dict[str, Metrics] = {}


def metrics_for(model_name: str) -> Metrics:
    """One set per model and process: prometheus-client refuses to register a name twice."""
    if model_name not in _by_model:
        _by_model[model_name] = Metrics(model_name)
    return _by_model[model_name]
