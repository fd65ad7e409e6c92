"""`mlxpool up` / `down`: real agents serving the real tiny model and a real router,
following a static routes file, no Kubernetes. The printed curl example is run as is."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from mlxpool.dev import local
from mlxpool.dev.processes import pid_alive
from mlxpool.routing import RoutingTable


@pytest.fixture
def workdir(tmp_path: Path):
    yield tmp_path / "local"
    local.down(tmp_path / "local")  # whatever a failed test left running


def test_up_serves_a_streamed_completion_through_the_printed_curl(tiny_model: Path, workdir: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    t0 = time.monotonic()
    assert local.main_up(["--model", str(tiny_model), "--agents", "2", "--port", "0",
                          "--workdir", str(workdir)]) == 0
    elapsed = time.monotonic() - t0
    out = capsys.readouterr().out
    assert elapsed < 30, f"mlxpool up took {elapsed:.1f}s"
    state = local.LocalState.load(workdir)
    assert state is not None and [m.name for m in state.members] == ["agent-0", "agent-1", "router"]

    # The routes file is the operator's format: it parses as the routing table contract.
    table = RoutingTable.from_json(Path(state.routes_file).read_text())
    assert table.revision == 1 and [e.url for e in table.models["tiny"]] == [m.url for m in state.members[:2]]

    curl = re.search(r"^(curl -N .*?)\n\n", out, re.S | re.M)
    assert curl is not None, out
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed")
    result = subprocess.run(["bash", "-c", curl.group(1)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    events = [line[6:] for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all(c["model"] == "tiny" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])

    # The python example is valid Python naming the same URL and model.
    python = re.search(r"<<'EOF'.*?\n(.*?)\nEOF", out, re.S)
    assert python is not None
    compile(python.group(1), "example", "exec")
    assert f'base_url="{state.router_url}/v1"' in python.group(1) and 'model="tiny"' in python.group(1)

    # Round-robin over both agents: each one served a request.
    for _ in range(2):
        r = httpx.post(f"{state.router_url}/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
    for member in state.members[:2]:
        metrics = httpx.get(f"{member.url}/metrics", timeout=5).text
        served = [line for line in metrics.splitlines()
                  if line.startswith("mlxpool_requests_total") and not line.endswith(" 0.0")]
        assert served, f"{member.name} served nothing"

    # A second `up` is refused while the first runs, naming how to stop it.
    assert local.main_up(["--model", str(tiny_model), "--port", "0", "--workdir", str(workdir)]) == 1
    assert "mlxpool down" in capsys.readouterr().err

    assert local.main_down(["--workdir", str(workdir)]) == 0
    assert "stopped: router, agent-1, agent-0" in capsys.readouterr().out
    assert not any(pid_alive(m.pid) for m in state.members)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{state.router_url}/health", timeout=2)
    assert local.main_down(["--workdir", str(workdir)]) == 0
    assert "nothing was running" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such directory"),
    (["--agents", "0"], "--agents must be between 1 and 16"),
    (["--agents", "17"], "--agents must be between 1 and 16"),
    (["--port", "70000"], "--port must be between 0 and 65535"),
    (["--strategy", "random"], "invalid choice: 'random'"),
])
def test_up_rejects_bad_arguments_naming_them(args: list[str], message: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        local.main_up([*args, "--workdir", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "state.json").exists()


def test_model_problem_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_text("x")
    assert "not a directory" in (local.model_problem(tmp_path / "weights.bin") or "")
    assert "no config.json" in (local.model_problem(tmp_path) or "")
    (tmp_path / "config.json").write_text("{}")
    assert "no *.safetensors" in (local.model_problem(tmp_path) or "")
    (tmp_path / "model.safetensors").write_text("")
    assert local.model_problem(tmp_path) is None


def test_the_mlxpool_command_dispatches_up_and_down(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mlxpool import cli

    assert cli.main(["down", "--workdir", str(tmp_path)]) == 0
    assert "nothing was running" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["up", "--help"])
    assert "--agents" in capsys.readouterr().out
