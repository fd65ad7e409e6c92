"""Prometheus metrics of the agent: HTTP traffic and the engines' queues and tokens.

Engine figures are read at scrape time from each engine's `EngineStats` (a custom
collector), so the engine thread never touches prometheus-client. The queue gauges
are also exported under vLLM's names (`vllm:num_requests_running`,
`vllm:num_requests_waiting`), which inference gateways already scrape. Each app has
its own registry: several agents can live in one test process.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlxpool.agent.lifecycle import Lifecycle
from mlxpool.agent.models import ModelRepository

# `*_created` series double every counter's output and nobody scrapes them here.
disable_created_metrics()


class AgentMetrics:
    def __init__(self, models: ModelRepository, lifecycle: Lifecycle) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "mlxpool_http_requests", "HTTP requests answered, by route, method and status.",
            ["endpoint", "method", "status"], registry=self.registry,
        )
        self.registry.register(_EngineCollector(models, lifecycle))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector(Collector):
    def __init__(self, models: ModelRepository, lifecycle: Lifecycle) -> None:
        self._models = models
        self._lifecycle = lifecycle

    def collect(self) -> Iterator[Metric]:
        label = ["model_name"]
        running = GaugeMetricFamily("mlxpool_requests_running", "Sequences in the engine's batch.", labels=label)
        waiting = GaugeMetricFamily("mlxpool_requests_waiting", "Sequences waiting for a batch slot.", labels=label)
        vllm_running = GaugeMetricFamily("vllm:num_requests_running", "Same as mlxpool_requests_running.", labels=label)
        vllm_waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Same as mlxpool_requests_waiting.", labels=label)
        prompt = CounterMetricFamily("mlxpool_prompt_tokens", "Prompt tokens accepted.", labels=label)
        generated = CounterMetricFamily("mlxpool_generation_tokens", "Tokens generated.", labels=label)
        steps = CounterMetricFamily("mlxpool_decode_steps", "Batched decode steps.", labels=label)
        finished = CounterMetricFamily(
            "mlxpool_requests_finished", "Requests ended, by reason (stop, length, cancelled, error).",
            labels=[*label, "reason"],
        )
        for model in self._models.all():
            stats, name = model.engine.stats, [model.name]
            running.add_metric(name, stats.running)
            waiting.add_metric(name, stats.waiting)
            vllm_running.add_metric(name, stats.running)
            vllm_waiting.add_metric(name, stats.waiting)
            prompt.add_metric(name, stats.prompt_tokens_total)
            generated.add_metric(name, stats.generation_tokens_total)
            steps.add_metric(name, stats.decode_steps_total)
            for reason, count in stats.requests_finished_total.items():
                finished.add_metric([model.name, reason], count)
        in_flight = GaugeMetricFamily("mlxpool_http_generations_in_flight", "Generation requests being answered.")
        in_flight.add_metric([], self._lifecycle.in_flight)
        yield from (running, waiting, vllm_running, vllm_waiting, prompt, generated, steps, finished, in_flight)


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
