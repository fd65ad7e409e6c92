"""bench/plots.py: every benchmark's JSON line becomes a PNG (real matplotlib, sample lines;
the README's plots are rendered from the saved lines of real runs in docs/plots/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.plots import RENDERERS, kind_of, last_json_line, main, render

PNG = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def level(tok_s: float) -> dict:
    return {"tok_s": tok_s, "ttft_p50_s": 0.2, "ttft_p99_s": 0.5, "latency_p99_s": 2.0}


SAMPLES: dict[str, dict] = {
    "serving": {"bench": "serving", "quick": True, "model_params_m": 23.6, "max_tokens": 64, "seconds": 344.0,
                "peak_rss_mb": {"mlxpool": 1360.8, "mlx_lm.server": 1257.3},
                "results": {"mlxpool": {"1": level(45.2), "8": level(88.0)},
                            "mlx_lm.server": {"1": level(41.5), "8": level(86.3)}}},
    "serving-cold": {"bench": "serving-cold", "results": {
        "mlxpool": {"cold": {"ready_s": 152, "first_completion_s": 153}, "warm": {"ready_s": 21.7}},
        "mlx_lm.server": {"cold": {"ready_s": 12.9, "first_completion_s": 69}, "warm": {"ready_s": 11}}}},
    "switching": {"bench": "switching", "hot_switch_ms": -15, "mlx_lm_switch_ms": 120, "parked_switch_ms": 316,
                  "cold_switch_ms": None, "lru_loads": 269, "parked_loads": 5, "belady_loads": 4,
                  "zipf_requests": 1000, "speedup_vs_mlx_lm": 1.41, "speedup_vs_mlx_lm_big": 0.87},
    "scaling": {"bench": "scaling", "efficiency_1": 1.0, "efficiency_8": 0.95, "efficiency_direct_8": 0.98,
                "router_p50_ms_20": 12.5, "router_p99_ms_20": 40, "litellm_p50_ms_20": 35.6, "router_max_rps": 83,
                "replicas1_rps": 40, "replicas3_rps": 78.5, "skewed_p99_ms_round-robin": 900,
                "prefix_ttft_p90_ms_oracle": 50, "load_average_start": 3.1, "load_average_end": 6.0},
    "controlplane": {"pools": 50, "nodes": 100, "converge_s": 20.8, "failover_p50_s": 0.33, "failover_p99_s": 0.39,
                     "steady_probes_per_s": 49.6, "operator_cpu_cores_at_rest": 0.25},
    "controlplane-curve": {"curve": [{"nodes": 100, "pools": 50, "converge_s": 20.8, "failover_p50_s": 0.33,
                                      "failover_p99_s": 0.39, "operator_cpu_cores_at_rest": 0.25,
                                      "operator_cpu_cores_converging": 0.74},
                                     {"nodes": 1000, "pools": 500, "error": "no pool Ready in 240 s"}]},
    "memory": {"bench": "memory", "load_gbps": {"big": {"mlxpool": 1.5, "mlx_lm.server": 1.0}},
               "cold_ttft_s": {"mlxpool": [1.2], "mlx_lm.server": [1.4]}, "pinned_jitter_ratio": 0.85},
    "sharedkv": {"bench": "sharedkv", "prompts": 12, "second_node_ttft_p50_s": {"shared": 0.43, "plain": 2.72},
                 "first_node_ttft_p50_s": {"shared": 0.5, "plain": 0.48}},
    "scheduling": {"bench": "scheduling", "ratio_short_p50": 0.81, "ratio_long_p50": 1.02, "ratio_tok_s": 1.04,
                   "critical_sla": 0.025, "theirs_critical_sla": 0.0, "high_sla": 0.05, "theirs_high_sla": 0.0,
                   "reject_p99_ms": 29.5, "jain_index": 0.996, "recompute_fraction": 0.0},
}


@pytest.mark.parametrize("kind", sorted(RENDERERS))
def test_every_known_benchmark_renders_a_png(kind: str, tmp_path: Path) -> None:
    assert kind_of(SAMPLES[kind]) == kind
    path = render(SAMPLES[kind], tmp_path, note="sample")
    assert path == tmp_path / f"{kind}.png" and path.read_bytes().startswith(PNG) and path.stat().st_size > 10_000


def test_an_unknown_benchmark_gets_every_numeric_figure_and_a_log_is_read_to_its_last_line(tmp_path: Path) -> None:
    line = {"bench": "example", "quick": True, "ttft_p99_ms": {"critical": 80, "low": 900}, "shed_rps": 3,
            "ratio_vs_fifo": 0.4, "label": "text is skipped", "seconds": 12}
    log = tmp_path / "run.log"
    log.write_text("warming up\n{not json\n" + json.dumps({"partial": 1}) + "\nsome table\n" + json.dumps(line) + "\n")
    assert last_json_line(log.read_text()) == line
    assert main([str(log), "--out", str(tmp_path / "plots"), "--keep-data", "--note", "2-core, load 3"]) == 0
    assert (tmp_path / "plots" / "example.png").read_bytes().startswith(PNG)
    saved = json.loads((tmp_path / "plots" / "example.json").read_text())
    assert saved == {**line, "note": "2-core, load 3"}
    assert main([str(tmp_path / "missing.log"), "--out", str(tmp_path / "plots")]) == 1


def test_the_saved_lines_of_real_runs_render(tmp_path: Path) -> None:
    saved = sorted((REPO / "docs" / "plots").glob("*.json"))
    assert {p.stem for p in saved} >= {"serving"}, saved
    for path in saved:
        assert render(last_json_line(path.read_text()), tmp_path).read_bytes().startswith(PNG)
