"""Prometheus metrics of the agent: HTTP traffic, request latencies, the engines' state.

Three sources:
- HTTP responses by route and status (`HttpMetricsMiddleware`).
- Requests as the data plane saw them (`AgentMetrics.request_done`, one call per
  request at its end): outcome, time to first token, inter-token gaps and end-to-end
  latency, each by model and priority tier.
- Engine figures, read at scrape time from each engine's `EngineStats` (a custom
  collector), so the engine thread never touches prometheus-client: queue depth (also
  per tier), running sequences, tokens, prompt-cache bytes and hit rate, KV bytes,
  model memory, where the weights are (resident, pinned, mapped) and how fast they loaded.

Also exported under vLLM's names, which inference gateways already scrape:
`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:gpu_cache_usage_perc`
and `vllm:lora_requests_info`. Gateways read the cache usage as "how close is this
server to making new requests wait" (vLLM's KV blocks in use): ours has no fixed KV
block pool, so it is the share of batch slots in use (running / decode concurrency),
which reaches 1 exactly when the next request must queue. (The prefix cache's bytes
would not do: it stays full of idle entries on any busy node.) The LoRA gauge says
what is true, no adapters and none waiting (mlxpool serves none), so pickers that
read it for adapter affinity find it and skip nobody.

Each app has its own registry: several agents can live in one test process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlxpool.agent.engine.interface import Buckets, DeviceProbe
from mlxpool.agent.serving.lifecycle import Lifecycle
from mlxpool.agent.serving.repository import ModelRepository
from mlxpool.agentapi import ModelTier
from mlxpool.priorities import Priority

# `*_created` series double every counter's output and nobody scrapes them here.
disable_created_metrics()

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
SWITCH_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


class AgentMetrics:
    """The agent's registry; also the data plane's `RequestObserver`."""

    def __init__(self, models: ModelRepository, lifecycle: Lifecycle, probe: DeviceProbe | None = None) -> None:
        self.registry = registry = CollectorRegistry()
        labels = ["model_name", "priority"]
        self.http_requests = Counter(
            "mlxpool_http_requests", "HTTP requests answered, by route, method and status.",
            ["endpoint", "method", "status"], registry=registry,
        )
        self.requests = Counter(
            "mlxpool_requests", "Generation requests that reached an engine, by outcome "
            "(stop, length, cancelled, error, queue_full, deadline).", [*labels, "outcome"], registry=registry,
        )
        self.ttft = Histogram(
            "mlxpool_time_to_first_token_seconds", "From the request reaching the data plane to its first token.",
            labels, buckets=TTFT_BUCKETS, registry=registry,
        )
        self.inter_token = Histogram(
            "mlxpool_inter_token_latency_seconds", "Gaps between a request's consecutive tokens.",
            labels, buckets=INTER_TOKEN_BUCKETS, registry=registry,
        )
        self.latency = Histogram(
            "mlxpool_e2e_request_latency_seconds", "From the request reaching the data plane to its last token.",
            labels, buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.sla = Counter(
            "mlxpool_sla_requests", "Requests whose tier has a TTFT target, by whether the first token came "
            "within it (met), late or never (missed: refused, expired or failed before a token).",
            [*labels, "result"], registry=registry,
        )
        # Set at each scrape (on the loop): a count that only grows is a task leak (the soak watches it).
        self.loop_tasks = Gauge(
            "mlxpool_agent_asyncio_tasks", "asyncio tasks alive in the agent's event loop at scrape time.",
            registry=registry,
        )
        self.switch = Histogram(
            "mlxpool_model_switch_seconds", "Bringing a model into an engine, by the residency tier it came from "
            "(parked: woken; page_cache, disk: loaded, warm-up included).",
            ["tier"], buckets=SWITCH_BUCKETS, registry=registry,
        )
        registry.register(_EngineCollector(models, lifecycle, probe))

    def watch_shared_tensors(self, saved_bytes: Callable[[], int | None]) -> None:
        """Export what the tensor share saves (`multi_model.share_tensors`), read at each scrape."""
        gauge = Gauge("mlxpool_shared_tensor_bytes_saved",
                      "Weight bytes not in memory because loaded models hold equal tensors as one copy.",
                      registry=self.registry)
        gauge.set_function(lambda: float(saved_bytes() or 0))

    def model_switched(self, tier: ModelTier, seconds: float) -> None:
        """The model manager's `SwitchObserver`."""
        self.switch.labels(tier.value).observe(seconds)

    def request_done(self, model: str, priority: Priority, outcome: str, ttft: float | None,
                     inter_token: list[float], latency: float, ttft_target: float | None = None) -> None:
        tier = priority.value
        self.requests.labels(model, tier, outcome).inc()
        if ttft_target is not None and outcome != "cancelled":  # a client that left says nothing of us
            met = ttft is not None and ttft <= ttft_target
            self.sla.labels(model, tier, "met" if met else "missed").inc()
        if ttft is not None:
            self.ttft.labels(model, tier).observe(ttft)
            self.latency.labels(model, tier).observe(latency)
        if inter_token:
            observe = self.inter_token.labels(model, tier).observe
            for gap in inter_token:
                observe(gap)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector(Collector):
    def __init__(self, models: ModelRepository, lifecycle: Lifecycle, probe: DeviceProbe | None) -> None:
        self._models = models
        self._lifecycle = lifecycle
        self._probe = probe

    def collect(self) -> Iterator[Metric]:
        label = ["model_name"]

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=[*label, *extra])

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=[*label, *extra])

        running = gauge("mlxpool_requests_running", "Sequences in the engine's batch.")
        waiting = gauge("mlxpool_requests_waiting", "Sequences waiting for a batch slot.")
        waiting_tier = gauge("mlxpool_requests_waiting_by_priority", "Sequences waiting, by priority tier.",
                             ("priority",))
        vllm_running = gauge("vllm:num_requests_running", "Same as mlxpool_requests_running.")
        vllm_waiting = gauge("vllm:num_requests_waiting", "Same as mlxpool_requests_waiting.")
        vllm_cache = gauge("vllm:gpu_cache_usage_perc",
                           "Share of batch slots in use (0-1): running / decode concurrency.")
        prompt = counter("mlxpool_prompt_tokens", "Prompt tokens of the requests admitted.")
        cached = counter("mlxpool_prompt_tokens_cached", "Prompt tokens served from the prefix cache.")
        shared = counter("mlxpool_prompt_tokens_shared",
                         "Prompt tokens served from KV state other agents computed (distributed cache).")
        generated = counter("mlxpool_generation_tokens", "Tokens generated.")
        steps = counter("mlxpool_decode_steps", "Batched decode steps.")
        finished = counter("mlxpool_requests_finished",
                           "Requests ended, by reason (stop, length, cancelled).", ("reason",))
        rejected = counter("mlxpool_requests_rejected",
                           "Requests refused without running, by reason (queue_full, deadline).", ("reason",))
        cache_bytes = gauge("mlxpool_prompt_cache_bytes", "Bytes held by the prefix cache.")
        cache_cap = gauge("mlxpool_prompt_cache_max_bytes", "The prefix cache's byte cap (0: disabled).")
        cache_entries = gauge("mlxpool_prompt_cache_entries", "Sequences held by the prefix cache.")
        lookups = counter("mlxpool_prompt_cache_lookups", "Prefix-cache lookups (one per admitted request).")
        hits = counter("mlxpool_prompt_cache_hits", "Lookups that reused a cached prefix.")
        instant = counter("mlxpool_instant_answers",
                          "1-token completions of a repeated prompt drawn from its kept first-token "
                          "log-probabilities (no forward pass).")
        hit_rate = gauge("mlxpool_prompt_cache_hit_rate", "Hits over lookups since start (0 before any lookup).")
        kv_bytes = gauge("mlxpool_kv_cache_bytes", "Key/value cache bytes of the running batch.")
        memory = gauge("mlxpool_model_memory_bytes", "Bytes of the model's parameters.")
        weight_bytes = gauge("mlxpool_model_weight_bytes",
                             "Bytes of the model's weights by where they are: resident (in physical memory, "
                             "mincore), pinned (mlocked), mapped (still backed by the model files).", ("state",))
        load_rate = gauge("mlxpool_model_load_gbps", "Rate the weights were read at when the model loaded (GB/s).",
                          ("reader", "transfer"))
        warmup = gauge("mlxpool_warmup_shapes", "Shapes of the engine's warm-up plan, planned and warmed.", ("state",))
        preempted = counter("mlxpool_preemptions", "Running sequences paused (KV kept or dropped) for a more "
                            "urgent request, by the paused sequence's tier.", ("priority",))
        resumed = counter("mlxpool_resumes", "Paused sequences back in the batch, by tier.", ("priority",))
        recomputed = counter("mlxpool_recomputed_tokens",
                             "Tokens computed again for resumed sequences whose KV could not be kept.")
        paused = gauge("mlxpool_paused_sequences", "Sequences paused now, waiting to resume.")
        paused_kv = gauge("mlxpool_paused_kv_bytes", "KV bytes held by paused sequences (in the memory books).")
        wait_hist = HistogramMetricFamily("mlxpool_queue_wait_seconds",
                                          "From arrival to admission into the batch, by tier.",
                                          labels=[*label, "priority"])
        error_hist = HistogramMetricFamily("mlxpool_ttft_prediction_error_seconds",
                                           "Actual minus predicted time to first token (predicted on arrival), "
                                           "by tier; negative: sooner than predicted (prometheus-client leaves "
                                           "out _sum and _count while the sum is negative: read the +Inf bucket).",
                                           labels=[*label, "priority"])
        unwarmed = counter("mlxpool_unwarmed_shapes",
                           "Distinct shapes first compiled after warm-up, while requests waited.")
        device = GaugeMetricFamily("mlxpool_device_memory_bytes",
                                   "The accelerator's memory: total, and MLX's active, peak and cached bytes.",
                                   labels=["accelerator", "kind"])
        # The accelerator is read once (cached by the probe); the counters come from the engines'
        # own readings, taken on their threads, so a scrape never calls into MLX.
        accelerator = self._probe.accelerator() if self._probe is not None else None
        if accelerator is not None and accelerator.memory_bytes:
            device.add_metric([accelerator.kind.value, "total"], accelerator.memory_bytes)
        reading = None
        for model in self._models.all():
            stats, name = model.engine.stats, [model.name]
            running.add_metric(name, stats.running)
            waiting.add_metric(name, stats.waiting)
            for tier in Priority:
                waiting_tier.add_metric([model.name, tier.value], stats.waiting_by_priority.get(tier.value, 0))
            vllm_running.add_metric(name, stats.running)
            vllm_waiting.add_metric(name, stats.waiting)
            slots = stats.max_running
            vllm_cache.add_metric(name, min(1.0, stats.running / slots) if slots else 0.0)
            cap = stats.prompt_cache_max_bytes
            prompt.add_metric(name, stats.prompt_tokens_total)
            cached.add_metric(name, stats.prompt_tokens_cached_total)
            shared.add_metric(name, stats.shared_prefix_tokens_total)
            generated.add_metric(name, stats.generation_tokens_total)
            steps.add_metric(name, stats.decode_steps_total)
            for reason, count in stats.requests_finished_total.items():
                finished.add_metric([model.name, reason], count)
            for reason, count in stats.requests_rejected_total.items():
                rejected.add_metric([model.name, reason], count)
            cache_bytes.add_metric(name, stats.prompt_cache_bytes)
            cache_cap.add_metric(name, cap)
            cache_entries.add_metric(name, stats.prompt_cache_entries)
            lookups.add_metric(name, stats.prompt_cache_lookups_total)
            hits.add_metric(name, stats.prompt_cache_hits_total)
            instant.add_metric(name, stats.instant_answers_total)
            looked = stats.prompt_cache_lookups_total
            hit_rate.add_metric(name, stats.prompt_cache_hits_total / looked if looked else 0.0)
            kv_bytes.add_metric(name, stats.kv_cache_bytes)
            memory.add_metric(name, model.info.memory_bytes)
            if (view := model.info.weights) is not None:
                where = view.residency()
                for state, value in (("resident", where.resident), ("pinned", where.pinned), ("mapped", where.mapped)):
                    weight_bytes.add_metric([model.name, state], value)
                load_rate.add_metric([model.name, view.report.reader, view.report.transfer], view.report.gbps)
            warmup.add_metric([model.name, "planned"], stats.warmup_shapes_total)
            warmup.add_metric([model.name, "warmed"], stats.warmup_shapes_done)
            unwarmed.add_metric(name, stats.unwarmed_shapes_total)
            for tier_name, count in stats.preemptions_total.items():
                preempted.add_metric([model.name, tier_name], count)
            for tier_name, count in stats.resumes_total.items():
                resumed.add_metric([model.name, tier_name], count)
            recomputed.add_metric(name, stats.recomputed_tokens_total)
            paused.add_metric(name, stats.paused)
            paused_kv.add_metric(name, stats.paused_kv_bytes)
            for family, by_tier in ((wait_hist, stats.wait_seconds), (error_hist, stats.ttft_error_seconds)):
                for tier_name, buckets in list(by_tier.items()):
                    family.add_metric([model.name, tier_name], _cumulative(buckets), buckets.total)
            reading = stats  # the allocator's counters are the process's: any engine's last reading
        if reading is not None and accelerator is not None:
            for kind, value in (("active", reading.device_memory_active_bytes),
                                ("peak", reading.device_memory_peak_bytes),
                                ("cache", reading.device_memory_cache_bytes)):
                device.add_metric([accelerator.kind.value, kind], value)
        in_flight = GaugeMetricFamily("mlxpool_http_generations_in_flight", "Generation requests being answered.")
        in_flight.add_metric([], self._lifecycle.in_flight)
        # vLLM's shape: adapter lists as labels, the value the time of the reading.
        lora = GaugeMetricFamily("vllm:lora_requests_info", "LoRA adapters running and waiting (none: not served).",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        lora.add_metric(["", "", "0"], time.time())
        yield from (running, waiting, waiting_tier, vllm_running, vllm_waiting, vllm_cache, prompt, cached, shared,
                    generated, steps, finished, rejected, cache_bytes, cache_cap, cache_entries, lookups, hits, instant,
                    hit_rate, kv_bytes, memory, weight_bytes, load_rate, warmup, unwarmed, device, in_flight,
                    lora, preempted, resumed, recomputed, paused, paused_kv, wait_hist, error_hist)


def _cumulative(buckets: Buckets) -> list[tuple[str, float]]:
    """Prometheus' cumulative `le` buckets of one engine histogram (read while the engine may write)."""
    counts = list(buckets.counts)
    out, running = [], 0
    for bound, count in zip(buckets.bounds, counts, strict=False):
        running += count
        out.append((repr(float(bound)), float(running)))
    out.append(("+Inf", float(running + counts[-1])))
    return out


class HttpMetricsMiddleware:
    """Counts every HTTP response by route template (not raw path: bounded labels)."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_recording_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.counter.labels(endpoint, scope["method"], str(status)).inc()
