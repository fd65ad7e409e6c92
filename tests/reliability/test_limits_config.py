"""The limits are configuration: documented keys with defaults, bad values refused naming the
key, the agent's file and the router's flags agreeing (pure logic, no process)."""

from __future__ import annotations

import pytest

from mlxpool.agent.config import ConfigError, LimitsConfig, load_runtime_config
from mlxpool.httpguards import SizeLimits
from mlxpool.router.main import build_parser, settings_from_args


def test_agent_and_router_defaults_agree():
    agent = LimitsConfig()
    parser = build_parser()
    router = settings_from_args(parser, parser.parse_args(["--routes-file", "routes.json"])).limits
    assert router == SizeLimits(agent.max_body_bytes, agent.max_header_bytes)


def test_router_flags_set_the_limits():
    parser = build_parser()
    args = parser.parse_args(["--routes-file", "r.json", "--max-body-bytes", "2048", "--max-header-bytes", "4096"])
    assert settings_from_args(parser, args).limits == SizeLimits(2048, 4096)


def test_router_refuses_a_zero_limit(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        settings_from_args(parser, parser.parse_args(["--routes-file", "r.json", "--max-body-bytes", "0"]))
    assert "max_body_bytes must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "needle"), [
    ("limits: {max_body_bytes: 10}", "limits.max_body_bytes: Input should be greater than or equal to 1024"),
    ("limits: {max_header_bytes: 0}", "limits.max_header_bytes"),
    ("limits: {max_prompt_chars: 0}", "limits.max_prompt_chars"),
    ("limits: {max_stop_strings: 65}", "limits.max_stop_strings: Input should be less than or equal to 64"),
    ("limits: {max_stop_chars: many}", "limits.max_stop_chars: Input should be a valid integer"),
    ("limits: {max_logit_bias: -1}", "limits.max_logit_bias"),
    ("limits: {max_messages: 0}", "limits.max_messages"),
    ("limits: {max_body: 1}", "limits.max_body: unknown key"),
])
def test_bad_limits_are_refused_naming_the_key(tmp_path, text, needle):
    path = tmp_path / "runtime.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_runtime_config(path, environ={})
    assert needle in str(error.value)


def test_limits_from_file_and_environment(tmp_path):
    path = tmp_path / "runtime.yaml"
    path.write_text("limits: {max_prompt_chars: 5000, max_stop_strings: 2}\n")
    config = load_runtime_config(path, environ={"MLXPOOL_LIMITS__MAX_BODY_BYTES": "65536"})
    assert config.limits == LimitsConfig(max_prompt_chars=5000, max_stop_strings=2, max_body_bytes=65536)


def test_size_limits_refuse_nonsense():
    with pytest.raises(ValueError, match="max_header_bytes must be >= 1"):
        SizeLimits(max_header_bytes=0)
