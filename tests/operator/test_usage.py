"""Per-pool load figures from agents' metrics (pure), and the parsing of agent /metrics."""

from __future__ import annotations

from mlxpool.operator.io.scraping import parse_metrics
from mlxpool.operator.logic.usage import ModelSample, PoolUsage, Scrape, pool_usage


def test_queue_running_rate_and_utilization_over_the_pools_nodes_and_models():
    before = {"a": Scrape(10.0, {"x": ModelSample(generated_tokens=100)}),
              "b": Scrape(10.0, {"x": ModelSample(generated_tokens=50), "other": ModelSample(generated_tokens=0)})}
    now = {"a": Scrape(12.0, {"x": ModelSample(running=2, waiting=3, generated_tokens=300)}),
           "b": Scrape(12.0, {"x": ModelSample(running=0, waiting=1, generated_tokens=50),
                              "other": ModelSample(running=9, waiting=9, generated_tokens=999)})}
    usage = pool_usage({"a": ["x"], "b": ["x"], "c": ["x"]}, now, before)
    assert usage == PoolUsage(queue_depth=4, running=2, tokens_per_second=100.0, utilization=0.5, scraped=2)


def test_a_counter_reset_gives_no_rate_and_a_first_scrape_none_either():
    before = {"a": Scrape(1.0, {"x": ModelSample(generated_tokens=500)})}
    now = {"a": Scrape(2.0, {"x": ModelSample(generated_tokens=20)})}
    assert pool_usage({"a": ["x"]}, now, before).tokens_per_second == 0
    assert pool_usage({"a": ["x"]}, now, {}).tokens_per_second == 0


def test_no_scrape_means_zero_utilization_not_a_division_by_zero():
    assert pool_usage({"a": ["x"]}, {}, {}) == PoolUsage()


AGENT_METRICS = """\
# HELP vllm:num_requests_running Same as mlxpool_requests_running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="tiny"} 2.0
vllm:num_requests_running{model_name="big"} 0.0
# HELP vllm:num_requests_waiting Same as mlxpool_requests_waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="tiny"} 5.0
# HELP mlxpool_generation_tokens_total Tokens generated.
# TYPE mlxpool_generation_tokens_total counter
mlxpool_generation_tokens_total{model_name="tiny"} 1234.0
# HELP mlxpool_http_requests_total HTTP requests answered.
# TYPE mlxpool_http_requests_total counter
mlxpool_http_requests_total{endpoint="/health",method="GET",status="200"} 7.0
"""


def test_agent_metrics_are_parsed_per_model():
    assert parse_metrics(AGENT_METRICS) == {
        "tiny": ModelSample(running=2, waiting=5, generated_tokens=1234),
        "big": ModelSample(running=0, waiting=0, generated_tokens=0),
    }
