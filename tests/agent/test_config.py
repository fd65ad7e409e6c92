"""The runtime file, environment overrides and command-line precedence (pure logic, plus
one real agent process refusing a bad file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from mlxpool.agent.config import ConfigError, RuntimeConfig, load_runtime_config
from mlxpool.agent.main import parse_config
from mlxpool.dev.controlplane import REPO_ROOT
from mlxpool.priorities import Priority

SAMPLE = REPO_ROOT / "config" / "runtime.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "runtime.yaml"
    path.write_text(text)
    return path


def field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, info in model.model_fields.items():
        paths.append(prefix + name)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths += field_paths(annotation, f"{prefix}{name}.")
    return paths


def test_the_sample_file_loads_to_the_defaults():
    assert load_runtime_config(SAMPLE, environ={}) == RuntimeConfig()


def test_the_sample_file_documents_every_key():
    text = SAMPLE.read_text()
    data = yaml.safe_load(text)
    assert set(data) == set(RuntimeConfig.model_fields)
    for path in field_paths(RuntimeConfig):
        key = path.rsplit(".", 1)[-1]
        assert f"{key}:" in text, f"{path} is not in {SAMPLE.name}"
        if "." in path:  # a key set in the sample has a comment line above it
            section = path.split(".")[0]
            if key in (data.get(section) or {}):
                lines = text.splitlines()
                index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:"))
                assert lines[index - 1].strip().startswith("#"), f"{path} has no comment"
    # The tier keys, which the sample shows as an example.
    for key in ("max_waiting", "deadline_seconds"):
        assert key in text


def test_no_file_gives_the_defaults_and_an_empty_file_too(tmp_path):
    assert load_runtime_config(None, environ={}) == RuntimeConfig()
    assert load_runtime_config(write(tmp_path, ""), environ={}) == RuntimeConfig()


def test_values_from_the_file(tmp_path):
    config = load_runtime_config(write(tmp_path, """
serving: {decode_concurrency: 4, prompt_cache_bytes: 0}
priority_scheduling:
  default_priority: low
  tiers:
    background: {max_waiting: 2, deadline_seconds: 1.5}
"""), environ={})
    assert config.serving.decode_concurrency == 4 and config.serving.prompt_cache_bytes == 0
    assert config.serving.prefill_concurrency == 16
    assert config.priority_scheduling.default_priority is Priority.LOW
    assert config.priority_scheduling.tier(Priority.BACKGROUND).max_waiting == 2
    assert config.priority_scheduling.tier(Priority.BACKGROUND).deadline_seconds == 1.5
    assert config.priority_scheduling.tier(Priority.HIGH).max_waiting == 256  # its default: queues are bounded
    # A key a tier does not list keeps that tier's default.
    assert config.priority_scheduling.tier(Priority.BACKGROUND).sheddable is True


def test_every_scheduling_key_is_read(tmp_path):
    config = load_runtime_config(write(tmp_path, """
priority_scheduling:
  tiers:
    critical: {ttft_target_ms: 250, preempt: false}
    low: {max_waiting: null, sheddable: false}
  aging_seconds: 2.5
  edf_slack_ms: 50
  max_paused: 4
  allow_tenant_header: true
  tenant_weights: {acme: 2}
  key_tiers: {batch-jobs: low}
  default_key_tier: normal
  over_tier: reject
"""), environ={}).priority_scheduling
    assert config.tier(Priority.CRITICAL).ttft_target_ms == 250 and config.tier(Priority.CRITICAL).preempt is False
    assert config.tier(Priority.CRITICAL).max_waiting == 256  # not listed: the default
    assert config.tier(Priority.LOW).max_waiting is None and config.tier(Priority.LOW).sheddable is False
    assert config.tier(Priority.HIGH).ttft_target_ms == 3000
    assert (config.aging_seconds, config.edf_slack_ms, config.max_paused) == (2.5, 50, 4)
    assert config.allow_tenant_header and config.tenant_weights == {"acme": 2}
    assert config.key_tiers == {"batch-jobs": Priority.LOW} and config.default_key_tier is Priority.NORMAL
    assert config.over_tier == "reject"


def test_the_default_tiers_bound_every_queue_and_preempt_for_critical():
    config = RuntimeConfig().priority_scheduling
    assert all(config.tier(p).max_waiting is not None for p in Priority)
    assert [p for p in Priority if config.tier(p).preempt] == [Priority.CRITICAL]
    targets = [config.tier(p).ttft_target_ms for p in Priority][:4]
    assert targets == sorted(targets)


def test_multi_model_eviction_is_cost_aware_by_default_and_configurable(tmp_path):
    assert RuntimeConfig().multi_model.eviction == "cost"
    config = load_runtime_config(write(tmp_path, """
multi_model: {eviction: lru, usage_half_life_seconds: 60, keep_alive_seconds: 300, default_load_gbps: 2.5}
"""), environ={})
    m = config.multi_model
    assert (m.eviction, m.usage_half_life_seconds, m.keep_alive_seconds, m.default_load_gbps) == ("lru", 60, 300, 2.5)


@pytest.mark.parametrize(("text", "needle"), [
    ("serving: {decode_concurency: 4}", "serving.decode_concurency: unknown key"),
    ("servng: {}", "servng: unknown key"),
    ("serving: {decode_concurrency: 0}", "serving.decode_concurrency: Input should be greater than or equal to 1"),
    ("serving: {warmup: sometimes}", "serving.warmup: Input should be a valid boolean"),
    ("serving: {compile_cache_dir: [a]}", "serving.compile_cache_dir: Input is not a valid path"),
    ("priority_scheduling: {tiers: {urgent: {}}}", "priority_scheduling.tiers.urgent"),
    ("priority_scheduling: {tiers: {low: {max_wait: 3}}}", "priority_scheduling.tiers.low.max_wait: unknown key"),
    ("priority_scheduling: {tiers: {low: {ttft_target_ms: 0}}}", "priority_scheduling.tiers.low.ttft_target_ms"),
    ("priority_scheduling: {tiers: {low: {preempt: maybe}}}", "priority_scheduling.tiers.low.preempt"),
    ("priority_scheduling: {tiers: {low: {max_waiting: -1}}}", "priority_scheduling.tiers.low.max_waiting"),
    ("priority_scheduling: {aging_seconds: 0}", "priority_scheduling.aging_seconds"),
    ("priority_scheduling: {edf_slack_ms: -1}", "priority_scheduling.edf_slack_ms"),
    ("priority_scheduling: {max_paused: 5000}", "priority_scheduling.max_paused"),
    ("priority_scheduling: {tenant_weights: {a: 0}}", "priority_scheduling.tenant_weights.a"),
    ("priority_scheduling: {key_tiers: {k: vip}}", "priority_scheduling.key_tiers.k"),
    ("priority_scheduling: {default_key_tier: vip}", "priority_scheduling.default_key_tier"),
    ("priority_scheduling: {over_tier: ignore}", "priority_scheduling.over_tier"),
    ("priority_scheduling: {allow_tenant_header: perhaps}", "priority_scheduling.allow_tenant_header"),
    ("horizontal_scaling: {replicas: 3}", "horizontal_scaling.replicas: unknown key"),
    ("horizontal_scaling: {publish_signals: sometimes}", "horizontal_scaling.publish_signals"),
    ("multi_model: {eviction: lfu}", "multi_model.eviction: Input should be 'cost', 'lru' or 'none'"),
    ("multi_model: {usage_half_life_seconds: 0}", "multi_model.usage_half_life_seconds: Input should be greater"),
    ("multi_model: {keep_alive_seconds: -1}", "multi_model.keep_alive_seconds: Input should be greater"),
    ("multi_model: {default_load_gbps: 0}", "multi_model.default_load_gbps: Input should be greater"),
    ("serving: [1, 2]", "serving: Input should be"),
    ("weight_management: {pin_policy: some}",
     "weight_management.pin_policy: Input should be 'none', 'critical' or 'all'"),
    ("weight_management: {pin_budget_bytes: -1}", "weight_management.pin_budget_bytes: Input should be greater"),
    ("weight_management: {prefetch_threads: 65}", "weight_management.prefetch_threads: Input should be less"),
    ("weight_management: {prefetch_depth: 0}", "weight_management.prefetch_depth: Input should be greater"),
    ("weight_management: {use_mmap: maybe}", "weight_management.use_mmap: Input should be a valid boolean"),
    ("weight_management: {memory_capacity_bytes: 0}", "weight_management.memory_capacity_bytes: Input should be"),
    ("weight_management: {memory_headroom_bytes: -1}", "weight_management.memory_headroom_bytes: Input should"),
    ("weight_management: {memory_pressure_free_bytes: x}", "weight_management.memory_pressure_free_bytes"),
    ("weight_management: {long_request_kv_bytes: -5}", "weight_management.long_request_kv_bytes: Input should"),
    ("weight_management: {memory_wait_seconds: 7200}", "weight_management.memory_wait_seconds: Input should be"),
    ("weight_management: {mlx_cache_limit_bytes: -1}", "weight_management.mlx_cache_limit_bytes: Input should"),
    ("weight_management: {memory_admission: perhaps}", "weight_management.memory_admission: Input should be"),
    ("- a list", "must hold a mapping"),
    ("serving: {a: [", "not valid YAML"),
])
def test_bad_files_are_refused_naming_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError) as error:
        load_runtime_config(write(tmp_path, text), environ={})
    assert needle in str(error.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.yaml"):
        load_runtime_config(tmp_path / "nope.yaml", environ={})


def test_environment_overrides_the_file(tmp_path):
    path = write(tmp_path, "serving: {decode_concurrency: 4, max_tokens_default: 10}")
    env = {
        "MLXPOOL_SERVING__DECODE_CONCURRENCY": "16",
        "MLXPOOL_PRIORITY_SCHEDULING__TIERS__LOW__MAX_WAITING": "3",
        "MLXPOOL_SERVING__WARMUP": "false",
        "MLXPOOL_API_KEY": "not a config override",  # no "__": not a config key
        "OTHER__THING": "ignored",
    }
    config = load_runtime_config(path, environ=env)
    assert config.serving.decode_concurrency == 16
    assert config.serving.max_tokens_default == 10  # from the file
    assert config.serving.warmup is False
    assert config.priority_scheduling.tier(Priority.LOW).max_waiting == 3


@pytest.mark.parametrize(("env", "needle"), [
    ({"MLXPOOL_SERVING__NOPE": "1"}, "serving.nope (from MLXPOOL_SERVING__NOPE): unknown key"),
    ({"MLXPOOL_NOSECTION__X": "1"}, "nosection (from MLXPOOL_NOSECTION__X): unknown key"),
    ({"MLXPOOL_SERVING__DECODE_CONCURRENCY": "lots"}, "serving.decode_concurrency (from MLXPOOL_SERVING__"),
    ({"MLXPOOL_SERVING__": "1"}, "empty key"),
    ({"MLXPOOL_SERVING__WARMUP__X": "1"}, "serving.warmup"),
])
def test_bad_environment_overrides_are_refused_naming_the_variable(env, needle):
    with pytest.raises(ConfigError) as error:
        load_runtime_config(None, environ=env)
    assert needle in str(error.value)


def test_flags_override_file_and_environment(tiny_model, tmp_path, monkeypatch):
    path = write(tmp_path, "serving: {decode_concurrency: 4, prefill_concurrency: 2, max_tokens_default: 10}")
    monkeypatch.setenv("MLXPOOL_SERVING__PREFILL_CONCURRENCY", "3")
    config = parse_config(["--model", str(tiny_model), "--config", str(path), "--max-running", "12",
                           "--prompt-cache-bytes", "0", "--no-warmup", "--stream-interval-ms", "0"])
    serving = config.runtime.serving
    assert (serving.decode_concurrency, serving.prefill_concurrency, serving.max_tokens_default) == (12, 3, 10)
    assert (serving.prompt_cache_bytes, serving.warmup, serving.stream_interval_ms) == (0, False, 0)
    assert config.max_running == 12 and config.max_tokens_default == 10
    monkeypatch.setenv("MLXPOOL_CONFIG", str(path))  # the file can come from the environment too
    assert parse_config(["--model", str(tiny_model)]).runtime.serving.decode_concurrency == 4


def test_secrets_come_from_files_or_the_environment(tiny_model, tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text("# rotated monthly\nkey-a\n\nkey-b\n")
    token = tmp_path / "token"
    token.write_text("ops-secret\n")
    config = parse_config(["--model", str(tiny_model), "--api-key-file", str(keys), "--ops-token-file", str(token)])
    assert config.credentials.api_keys == {"key-a", "key-b"} and config.credentials.ops_token == "ops-secret"
    assert "key-a" not in repr(config) and "ops-secret" not in repr(config)
    monkeypatch.setenv("MLXPOOL_API_KEY", "env-key")
    monkeypatch.setenv("MLXPOOL_OPS_TOKEN", "env-token")
    config = parse_config(["--model", str(tiny_model)])
    assert config.credentials.api_keys == {"env-key"} and config.credentials.ops_token == "env-token"
    file_wins = parse_config(["--model", str(tiny_model), "--api-key-file", str(keys)])
    assert file_wins.credentials.api_keys == {"key-a", "key-b"}


def run_agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlxpool", "agent", *args], capture_output=True, text=True,
                          timeout=60)


def test_the_agent_refuses_to_start_on_bad_configuration(tiny_model, tmp_path):
    bad = run_agent("--model", str(tiny_model), "--config", str(write(tmp_path, "serving: {batch: 3}")))
    assert bad.returncode == 2 and "serving.batch: unknown key" in bad.stderr
    empty = tmp_path / "empty"
    empty.write_text("\n# nothing\n")
    no_key = run_agent("--model", str(tiny_model), "--api-key-file", str(empty))
    assert no_key.returncode == 2 and "holds no secret" in no_key.stderr
    two = tmp_path / "two"
    two.write_text("a\nb\n")
    two_tokens = run_agent("--model", str(tiny_model), "--ops-token-file", str(two))
    assert two_tokens.returncode == 2 and "expected one" in two_tokens.stderr
    missing = run_agent("--model", str(tiny_model), "--ops-token-file", str(tmp_path / "absent"))
    assert missing.returncode == 2 and "cannot read secret file" in missing.stderr


def test_compile_cache_dir_defaults_under_the_agents_cache_and_is_given_to_mlx(tmp_path, monkeypatch):
    from mlxpool.agent.main import PTX_CACHE_ENV, use_compile_cache

    assert load_runtime_config(None, environ={}).serving.compile_cache_dir == Path("~/.cache/mlxpool/compile")
    config = load_runtime_config(write(tmp_path, f"serving: {{compile_cache_dir: {tmp_path / 'k'}}}"), environ={})
    monkeypatch.delenv(PTX_CACHE_ENV, raising=False)
    assert use_compile_cache(config.serving.compile_cache_dir) == tmp_path / "k"
    assert (tmp_path / "k").is_dir() and os.environ[PTX_CACHE_ENV] == str(tmp_path / "k")
    monkeypatch.setenv(PTX_CACHE_ENV, "/elsewhere")  # the environment wins
    assert use_compile_cache(tmp_path / "other") == Path("/elsewhere")
    assert use_compile_cache(None) is None
