"""Render benchmarks' JSON lines as PNG charts (matplotlib, the `plots` extra).

    python -m bench.plots RUN.log [RUN2.json ...] [--out docs/plots] [--note "2-core, load 4"] [--keep-data]

Each input is a benchmark's output (its last JSON line is taken) or a saved JSON line.
The kind comes from the line's `bench` key (`serving`, `serving-cold`, `switching`,
`scaling`, `memory`, `sharedkv`, `scheduling`, ...), or from its shape for
bench.controlplane (`converge_s`, or `curve` for `--curve`). Known kinds get charts made
for them; any other kind gets every numeric figure as a bar (so a new benchmark plots
before anyone writes it a chart). The PNG is `<out>/<kind>.png`; with `--keep-data` the
JSON line is saved beside it as `<kind>.json`, so the chart can be made again from the
very figures it shows (the README's plots come from such files).

Deliberately no figures of its own: it draws what a run printed and nothing else.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

OURS, THEIRS = "mlxpool", "mlx_lm.server"
COLOURS = {OURS: "#1f77b4", THEIRS: "#ff7f0e"}
Renderer = Callable[[Figure, dict[str, Any]], None]


# ---- reading ----


def last_json_line(text: str) -> dict[str, Any]:
    """The last line of `text` that is a JSON object (a benchmark prints its figures last)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    raise ValueError("no JSON object line found")


def kind_of(data: dict[str, Any]) -> str:
    if isinstance(data.get("bench"), str):
        return re.sub(r"[^a-z0-9_-]", "-", data["bench"].lower())
    if "curve" in data:
        return "controlplane-curve"
    if "converge_s" in data:
        return "controlplane"
    if "hot_switch_ms" in data:  # bench.switching's line names no bench
        return "switching"
    return "bench"


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _suffixed(data: dict[str, Any], pattern: str) -> list[tuple[float, float]]:
    """(n, value) for keys matching `pattern` with one numeric group, sorted by n."""
    rx = re.compile(pattern)
    points = []
    for key, value in data.items():
        m = rx.fullmatch(key)
        if m and _num(value) is not None:
            points.append((float(m.group(1)), float(value)))
    return sorted(points)


def _bars(ax: Axes, labels: list[str], values: list[float | None], title: str, unit: str,
          colours: list[str] | None = None) -> None:
    shown = [(lab, v, colours[i] if colours else None) for i, (lab, v) in enumerate(zip(labels, values, strict=True))
             if v is not None]
    if not shown:
        ax.set_visible(False)
        return
    y = range(len(shown))
    ax.barh(list(y), [v for _, v, _ in shown], color=[c or "#4c72b0" for _, _, c in shown])
    ax.set_yticks(list(y), [lab for lab, _, _ in shown])
    ax.invert_yaxis()
    for i, (_, v, _) in enumerate(shown):
        ax.annotate(f"{v:g}", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(unit)
    ax.margins(x=0.15)


# ---- one renderer per benchmark ----


def serving(fig: Figure, d: dict[str, Any]) -> None:
    results: dict[str, dict[str, dict[str, Any]]] = d.get("results", {})
    axes = fig.subplots(1, 3)
    levels_shown = sorted({int(c) for per_level in results.values() for c in per_level})
    for name, per_level in results.items():
        levels = sorted(per_level, key=int)
        xs = [int(c) for c in levels]
        colour = COLOURS.get(name)
        axes[0].plot(xs, [per_level[c]["tok_s"] for c in levels], "o-", label=name, color=colour)
        axes[1].plot(xs, [per_level[c]["ttft_p50_s"] for c in levels], "o-", label=f"{name} p50", color=colour)
        axes[1].plot(xs, [per_level[c]["ttft_p99_s"] for c in levels], "s--", label=f"{name} p99", color=colour)
        axes[2].plot(xs, [per_level[c]["latency_p99_s"] for c in levels], "o-", label=name, color=colour)
    for ax, title, unit in ((axes[0], "output tokens/s (higher is better)", "tok/s"),
                            (axes[1], "time to first token", "s"), (axes[2], "request latency p99", "s")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(unit)
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels_shown, [str(c) for c in levels_shown])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    rss = d.get("peak_rss_mb") or {}
    fig.suptitle(f"bench.serving: {d.get('model_params_m', '?')}M-parameter model, {d.get('max_tokens')} tokens"
                 + (f"; peak RSS {', '.join(f'{k} {v} MB' for k, v in rss.items())}" if rss else ""), fontsize=11)


def serving_cold(fig: Figure, d: dict[str, Any]) -> None:
    results: dict[str, dict[str, dict[str, Any]]] = d.get("results", {})
    ax = fig.subplots(1, 1)
    labels, values, colours = [], [], []
    for start in ("cold", "warm"):
        for what in ("ready_s", "first_completion_s"):
            for name, per_start in results.items():
                labels.append(f"{name} {start} {what.removesuffix('_s').replace('_', ' ')}")
                values.append(_num((per_start.get(start) or {}).get(what)))
                colours.append(COLOURS.get(name, "#4c72b0"))
    _bars(ax, labels, values, "bench.serving --cold: start to ready and to the first completion", "s", colours)


def switching(fig: Figure, d: dict[str, Any]) -> None:
    left, right = fig.subplots(1, 2)
    kinds = [("hot (both resident)", "hot_switch_ms", OURS), ("mlx_lm.server, same pair", "mlx_lm_switch_ms", THEIRS),
             ("adapter (over one base)", "adapter_switch_ms", OURS),
             ("mlx_lm.server, adapter", "mlx_lm_adapter_switch_ms", THEIRS),
             ("parked, into the big model", "parked_switch_ms", OURS),
             ("parked, into the small one", "parked_switch_ms_small", OURS),
             ("mlx_lm.server, into the big model", "mlx_lm_big_switch_ms", THEIRS),
             ("page cache warm (reload)", "page_cache_switch_ms", OURS), ("cold (page cache dropped)",
                                                                          "cold_switch_ms", OURS),
             ("cold, next one announced (prefetch)", "prefetched_switch_ms", OURS)]
    _bars(left, [k[0] for k in kinds], [_num(d.get(k[1])) for k in kinds],
          "added time to first token per switch", "ms", [COLOURS[k[2]] for k in kinds])
    loads = [("LRU", "lru_loads"), ("cost-aware", "cost_loads"), ("cost-aware + parking", "parked_loads"),
             ("Belady (bound)", "belady_loads")]
    _bars(right, [k[0] for k in loads], [_num(d.get(k[1])) for k in loads],
          f"Zipf over 5 models, room for 3: loads in {d.get('zipf_requests', '?')} requests", "loads")
    fig.suptitle("bench.switching: model switches, ours vs mlx_lm.server"
                 + (f" (x{d['speedup_vs_mlx_lm']} / x{d.get('speedup_vs_mlx_lm_big')} total time)"
                    if _num(d.get("speedup_vs_mlx_lm")) else ""), fontsize=11)


def scaling(fig: Figure, d: dict[str, Any]) -> None:
    axes = fig.subplots(2, 2).flatten()
    eff, direct = _suffixed(d, r"efficiency_(\d+)"), _suffixed(d, r"efficiency_direct_(\d+)")
    if eff:
        axes[0].plot(*zip(*eff, strict=True), "o-", label="through the router")
    if direct:
        axes[0].plot(*zip(*direct, strict=True), "s--", label="direct to agents")
    axes[0].set(title="efficiency (tok/s over n x one agent's)", xlabel="simulated agents", ylim=(0, 1.1))
    axes[0].set_xscale("log", base=2)
    if eff:
        axes[0].set_xticks([n for n, _ in eff], [f"{n:g}" for n, _ in eff])
    p50, p99 = _suffixed(d, r"router_p50_ms_(\d+)"), _suffixed(d, r"router_p99_ms_(\d+)")
    if p50:
        axes[1].plot(*zip(*p50, strict=True), "o-", label="router p50 added")
    if p99:
        axes[1].plot(*zip(*p99, strict=True), "s--", label="router p99 added")
    if _num(d.get("litellm_p50_ms_20")) is not None:
        axes[1].plot([20], [d["litellm_p50_ms_20"]], "D", color=COLOURS[THEIRS], label="LiteLLM p50 added")
    axes[1].set(title="latency added over direct", xlabel="offered req/s", ylabel="ms")
    axes[1].set_xscale("log")
    rates = [("router max", "router_max_rps"), ("LiteLLM max", "litellm_max_rps"), ("direct max", "direct_max_rps"),
             ("1 router replica", "replicas1_rps"), ("3 router replicas", "replicas3_rps")]
    _bars(axes[2], [r[0] for r in rates], [_num(d.get(r[1])) for r in rates], "throughput", "req/s")
    strategies = sorted({k.removeprefix("skewed_p99_ms_") for k in d if k.startswith("skewed_p99_ms_")})
    prefix = sorted({k.removeprefix("prefix_ttft_p90_ms_") for k in d if k.startswith("prefix_ttft_p90_ms_")})
    labels = [f"skewed p99: {s}" for s in strategies] + [f"shared prefix TTFT p90: {s}" for s in prefix]
    values = [_num(d.get(f"skewed_p99_ms_{s}")) for s in strategies] + [
        _num(d.get(f"prefix_ttft_p90_ms_{s}")) for s in prefix]
    _bars(axes[3], labels, values, "strategies", "ms")
    for ax in axes[:2]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("bench.scaling: router and agents"
                 + (f" (load average {d.get('load_average_start')} -> {d.get('load_average_end')})"
                    if d.get("load_average_start") is not None else ""), fontsize=11)


def controlplane(fig: Figure, d: dict[str, Any]) -> None:
    left, right = fig.subplots(1, 2)
    times = [("converge (all pools Ready)", "converge_s"), ("failover p50", "failover_p50_s"),
             ("failover p99", "failover_p99_s"), ("failover max", "failover_max_s")]
    _bars(left, [t[0] for t in times], [_num(d.get(t[1])) for t in times], "convergence and failover", "s")
    rates = [("API server writes/s at rest", "steady_apiserver_writes_per_s"),
             ("operator API requests/s at rest", "steady_api_requests_per_s"),
             ("probes/s at rest", "steady_probes_per_s"),
             ("operator cores converging", "operator_cpu_cores_converging"),
             ("operator cores at rest", "operator_cpu_cores_at_rest")]
    _bars(right, [r[0] for r in rates], [_num(d.get(r[1])) for r in rates], "at rest", "per second / cores")
    fig.suptitle(f"bench.controlplane: {d.get('pools')} pools over {d.get('nodes')} nodes", fontsize=11)


def controlplane_curve(fig: Figure, d: dict[str, Any]) -> None:
    runs = [r for r in d.get("curve", []) if "error" not in r]
    failed = [r for r in d.get("curve", []) if "error" in r]
    axes = fig.subplots(1, 3)
    nodes = [r["nodes"] for r in runs]
    axes[0].plot(nodes, [r.get("converge_s") for r in runs], "o-")
    axes[0].set(title="converge", xlabel="nodes", ylabel="s")
    axes[1].plot(nodes, [r.get("failover_p50_s") for r in runs], "o-", label="p50")
    axes[1].plot(nodes, [r.get("failover_p99_s") for r in runs], "s--", label="p99")
    axes[1].set(title="failover", xlabel="nodes", ylabel="s")
    axes[1].legend(fontsize=8)
    axes[2].plot(nodes, [r.get("operator_cpu_cores_at_rest") for r in runs], "o-", label="at rest")
    axes[2].plot(nodes, [r.get("operator_cpu_cores_converging") for r in runs], "s--", label="converging")
    axes[2].set(title="operator CPU", xlabel="nodes", ylabel="cores")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("bench.controlplane --curve" + (
        f" (did not converge: {', '.join(str(r['nodes']) + ' nodes' for r in failed)})" if failed else ""),
        fontsize=11)


def memory(fig: Figure, d: dict[str, Any]) -> None:
    left, right = fig.subplots(1, 2)
    labels, values, colours = [], [], []
    for model, per in (d.get("load_gbps") or {}).items():
        for who, v in per.items():
            labels.append(f"{model} model: {who}")
            values.append(_num(v))
            colours.append(COLOURS.get(who, "#4c72b0"))
    _bars(left, labels, values, "load rate (higher is better)", "GB/s", colours)
    labels, values, colours = [], [], []
    for who, runs in (d.get("cold_ttft_s") or {}).items():
        for i, v in enumerate(runs):
            labels.append(f"{who} cold start {i + 1}")
            values.append(_num(v))
            colours.append(COLOURS.get(who, "#4c72b0"))
    _bars(right, labels, values, "cold start to first token", "s", colours)
    fig.suptitle("bench.memory" + (f": pinned jitter ratio {d['pinned_jitter_ratio']}"
                                   if _num(d.get("pinned_jitter_ratio")) is not None else ""), fontsize=11)


def sharedkv(fig: Figure, d: dict[str, Any]) -> None:
    ax = fig.subplots(1, 1)
    second, first = d.get("second_node_ttft_p50_s") or {}, d.get("first_node_ttft_p50_s") or {}
    labels = ["second node, KV from Redis", "second node, prefilled", "first node, publishing", "first node, plain"]
    _bars(ax, labels, [_num(second.get("shared")), _num(second.get("plain")), _num(first.get("shared")),
                       _num(first.get("plain"))], "time to first token p50", "s")
    fig.suptitle(f"bench.sharedkv: {d.get('prompts', '?')} long system prompts, asked on node A then node B",
                 fontsize=11)


def scheduling(fig: Figure, d: dict[str, Any]) -> None:
    left, right = fig.subplots(1, 2)
    tiers = [("critical, ours", "critical_sla", OURS), ("critical, mlx_lm.server", "theirs_critical_sla", THEIRS),
             ("high, ours", "high_sla", OURS), ("high, mlx_lm.server", "theirs_high_sla", THEIRS)]
    _bars(left, [t[0] for t in tiers], [_num(d.get(t[1])) for t in tiers],
          "overload at 1.5x saturation: share meeting its TTFT target", "share of requests",
          [COLOURS[t[2]] for t in tiers])
    ratios = [("short requests p50 latency", "ratio_short_p50"), ("long requests p50 latency", "ratio_long_p50"),
              ("output tokens/s", "ratio_tok_s")]
    _bars(right, [r[0] for r in ratios], [_num(d.get(r[1])) for r in ratios],
          "mixed workload: ours / mlx_lm.server", "ratio")
    figures = (("429 p99 ms", "reject_p99_ms"), ("Jain", "jain_index"), ("recomputed", "recompute_fraction"))
    parts = [f"{label} {d[key]}" for label, key in figures if _num(d.get(key)) is not None]
    fig.suptitle("bench.scheduling: SLA tiers vs mlx_lm.server (FIFO)" + (f"; {', '.join(parts)}" if parts else ""),
                 fontsize=11)


def generic(fig: Figure, d: dict[str, Any]) -> None:
    """Every numeric figure as a bar, grouped by unit suffix so that bars on one axis compare."""
    leaves = [(k, v) for k, v in _flatten(d) if _num(v) is not None and k not in ("seconds", "cpus")]
    groups: dict[str, list[tuple[str, float]]] = {}
    for key, value in leaves:
        unit = next((u for u in ("_ms", "_s", "_rps", "_ratio", "_rate", "_bytes", "_mb") if u in key), "")
        groups.setdefault(unit or "other", []).append((key, float(value)))
    axes = fig.subplots(1, max(len(groups), 1), squeeze=False)[0]
    for ax, (unit, items) in zip(axes, sorted(groups.items()), strict=False):
        items = items[:30]
        _bars(ax, [k for k, _ in items], [v for _, v in items], unit.strip("_"), unit.strip("_"))
    fig.suptitle(f"bench {d.get('bench', '?')}: every numeric figure", fontsize=11)


def _flatten(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


RENDERERS: dict[str, tuple[Renderer, tuple[float, float]]] = {
    "serving": (serving, (15, 4.5)),
    "serving-cold": (serving_cold, (9, 4)),
    "switching": (switching, (14, 4.5)),
    "scaling": (scaling, (13, 9)),
    "controlplane": (controlplane, (13, 4)),
    "controlplane-curve": (controlplane_curve, (15, 4.5)),
    "memory": (memory, (13, 4)),
    "sharedkv": (sharedkv, (9, 3.5)),
    "scheduling": (scheduling, (14, 4)),
}


def render(data: dict[str, Any], out_dir: Path, note: str = "", keep_data: bool = False) -> Path:
    """Draw `data` (one benchmark's JSON line) into `<out_dir>/<kind>.png`; return the path."""
    kind = kind_of(data)
    renderer, size = RENDERERS.get(kind, (generic, (14, 6)))
    fig = plt.figure(figsize=size, layout="constrained")
    try:
        renderer(fig, data)
        footer = " · ".join(p for p in (note, "--quick" if data.get("quick") else "",
                                        f"run took {data['seconds']} s" if "seconds" in data else "") if p)
        if footer:
            fig.supxlabel(footer, fontsize=8, color="#555555")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{kind}.png"
        fig.savefig(path, dpi=90)
    finally:
        plt.close(fig)
    if keep_data:
        (out_dir / f"{kind}.json").write_text(json.dumps({**data, "note": note} if note else data) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="benchmark logs or saved JSON lines")
    parser.add_argument("--out", type=Path, default=Path("docs/plots"), help="where the PNGs go (docs/plots)")
    parser.add_argument("--note", default="", help="a footer line: machine and load average of the run")
    parser.add_argument("--keep-data", action="store_true", help="save each JSON line beside its PNG")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    status = 0
    for path in args.inputs:
        try:
            data = last_json_line(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            status = 1
            continue
        note = args.note or str(data.get("note", ""))
        print(render(data, args.out, note, args.keep_data))
    return status


if __name__ == "__main__":
    sys.exit(main())
