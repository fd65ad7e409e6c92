"""The scorers on the agents' load reports, the pickers, and profile choice: pure functions."""

from __future__ import annotations

import pytest

from mlxpool.loadsignals import ModelSignals
from mlxpool.operator.logic.specs import STRATEGIES
from mlxpool.priorities import Priority
from mlxpool.router.picking.loadscorers import (
    PredictedTtftParams,
    PredictedTtftScorer,
    QueueDepthScorer,
    SlotUtilisationScorer,
    StickyPrefixParams,
    StickyPrefixScorer,
    predicted_ttft,
)
from mlxpool.router.picking.picker import MaxScorePicker, WeightedRandomParams, WeightedRandomPicker
from mlxpool.router.picking.plugins import PickRequest
from mlxpool.router.picking.profiles import Strategies, load_strategies
from mlxpool.router.picking.signals import EndpointSignals
from mlxpool.router.settings import StalePolicy
from mlxpool.routing import RouteEndpoint

NOW = 100.0
EPS = [RouteEndpoint(node=n, url=f"http://{n}") for n in ("a", "b", "c")]


def reported(reports: dict[str, ModelSignals | None], *, at: float = NOW, in_flight: dict[str, int] | None = None,
             policy: StalePolicy = StalePolicy.SATURATED) -> EndpointSignals:
    """Signals where each node reported `reports[node]` at `at` (None: never reported)."""
    signals = EndpointSignals(max_age=0.5, stale_policy=policy)
    for node, report in reports.items():
        if report is not None:
            signals.report(f"http://{node}", {"m": report}, draining=False, now=at)
    for node, n in (in_flight or {}).items():
        for _ in range(n):
            signals.started(f"http://{node}")
    return signals


def request(prompt: str = "") -> PickRequest:
    return PickRequest("m", prompt, Priority.NORMAL, NOW)


def s(waiting: int = 0, running: int = 0, slots: int = 8, queued: int = 0, rate: float = 1000.0,
      step: float = 0.02) -> ModelSignals:
    return ModelSignals(waiting={Priority.NORMAL: waiting} if waiting else {}, running=running, slots=slots,
                        queued_prompt_tokens=queued, prefill_tokens_per_second=rate, decode_step_seconds=step)


@pytest.mark.parametrize(("waiting", "expected"), [
    ((0, 4, 8), [1.0, 0.5, 0.0]),
    ((3, 3, 3), [1.0, 1.0, 1.0]),
    ((5, 0, 1), [0.0, 1.0, 0.8]),
])
def test_queue_depth_is_min_max_on_the_agents_waiting_counts(waiting, expected):
    signals = reported({n: s(waiting=w) for n, w in zip("abc", waiting, strict=True)})
    assert QueueDepthScorer().score(request(), EPS, signals) == pytest.approx(expected)


def test_queue_depth_scores_a_stale_endpoint_0_or_falls_back_to_local_counts():
    signals = reported({"a": s(waiting=0), "b": s(waiting=0), "c": s(waiting=0)}, at=NOW - 1.0,
                       in_flight={"a": 2, "b": 0, "c": 1})
    assert QueueDepthScorer().score(request(), EPS, signals) == [0.0, 0.0, 0.0]  # all saturated
    signals.report("http://b", {"m": s(waiting=9)}, draining=False, now=NOW)  # b fresh, a and c stale
    assert QueueDepthScorer().score(request(), EPS, signals) == [0.0, 1.0, 0.0]
    fallback = reported({"a": s(), "b": s(), "c": s()}, at=NOW - 1.0, in_flight={"a": 2, "b": 0, "c": 1},
                        policy=StalePolicy.FALLBACK)
    assert QueueDepthScorer().score(request(), EPS, fallback) == [0.0, 1.0, 0.5]
    never = reported({"a": None, "b": None, "c": None}, in_flight={"a": 0, "b": 4, "c": 2})
    assert QueueDepthScorer().score(request(), EPS, never) == [1.0, 0.0, 0.5]


def test_slot_utilisation_counts_running_and_waiting_over_slots():
    signals = reported({"a": s(running=8, waiting=4), "b": s(running=2), "c": s(running=4, slots=4)})
    # usage 1.5, 0.25, 1.0
    assert SlotUtilisationScorer().score(request(), EPS, signals) == pytest.approx([0.0, 1.0, 0.4])


def test_predicted_ttft_adds_queued_prefill_and_a_slot_wait():
    params = PredictedTtftParams(mean_output_tokens=100)
    assert predicted_ttft(s(queued=1000, rate=1000), 500, params) == pytest.approx(1.5)
    # Full batch (8 running of 8) and 1 waiting: 2 ahead, each waits 100 steps x 0.02 s / 8 slots.
    assert predicted_ttft(s(running=8, waiting=1, queued=0, rate=1000), 0, params) == pytest.approx(0.5)
    # Unmeasured rate: the default is assumed.
    assert predicted_ttft(s(queued=1000, rate=0.0), 0, params) == pytest.approx(1.0)


def test_predicted_ttft_prefers_the_fast_idle_agent_in_proportion():
    signals = reported({"a": s(queued=4000, rate=1000), "b": s(queued=0, rate=500), "c": s(queued=0, rate=2000)})
    scores = PredictedTtftScorer(PredictedTtftParams(chars_per_token=4)).score(request("x" * 4000), EPS, signals)
    # prompt 1000 tokens: a 5 s, b 2 s, c 0.5 s
    assert scores == pytest.approx([0.1, 0.25, 1.0])


def test_sticky_prefix_stays_until_the_warm_endpoint_is_saturated():
    scorer = StickyPrefixScorer(StickyPrefixParams(block_size=8, max_queued_prompt_tokens=1000))
    prompt = "system prompt that is long enough " * 4
    signals = reported({"a": s(), "b": s(), "c": s()})
    first = request(prompt)
    assert scorer.score(first, EPS, signals) == [0.0, 0.0, 0.0]
    scorer.picked(first, [EPS[1], EPS[0], EPS[2]])  # b was chosen
    assert scorer.score(request(prompt), EPS, signals) == [0.0, 1.0, 0.0]
    signals.report("http://b", {"m": s(queued=1001)}, draining=False, now=NOW)
    assert scorer.score(request(prompt), EPS, signals) == [0.0, 0.0, 0.0]  # saturated: spills
    stale = reported({"a": s(), "b": s(), "c": s()}, at=NOW - 1, policy=StalePolicy.FALLBACK, in_flight={"b": 40})
    scorer.picked(request(prompt), [EPS[0]])
    assert scorer.score(request(prompt), EPS, stale) == [1.0, 0.0, 0.0]  # b: 40 in flight >= 32


def test_max_score_picker_keeps_table_order_on_ties_and_weighted_random_is_proportional():
    assert [e.node for e in MaxScorePicker().order(request(), EPS, [0.5, 1.0, 0.5])] == ["b", "a", "c"]
    picker = WeightedRandomPicker(WeightedRandomParams(seed=7))
    firsts = [picker.order(request(), EPS, [3.0, 1.0, 0.0])[0].node for _ in range(4000)]
    assert 0.70 < firsts.count("a") / 4000 < 0.80 and firsts.count("c") < 40
    assert sorted(e.node for e in picker.order(request(), EPS, [1, 1, 1])) == ["a", "b", "c"]


def test_weighted_random_honours_the_tables_capacity_weights():
    """Equal scores, weights 6:2:2 (a Mac three times as fast as the others): shares 60/20/20."""
    weighted = [RouteEndpoint(node=n, url=f"http://{n}", weight=w) for n, w in (("a", 6), ("b", 2), ("c", 2))]
    picker = WeightedRandomPicker(WeightedRandomParams(seed=3))
    firsts = [picker.order(request(), weighted, [1.0, 1.0, 1.0])[0].node for _ in range(4000)]
    assert 0.55 < firsts.count("a") / 4000 < 0.65
    assert 0.15 < firsts.count("b") / 4000 < 0.25


def test_every_crd_strategy_is_a_builtin_profile_and_the_load_profiles_use_reports():
    strategies = Strategies(load_strategies())
    assert set(STRATEGIES) <= set(strategies.pipelines)
    signals = reported({"a": s(waiting=6, running=8), "b": s(running=1), "c": s(running=8, waiting=2)})
    for name in ("load-aware", "predicted-latency", "sticky-prefix"):
        assert strategies.for_name(name).rank(request("hello"), EPS, signals)[0].node == "b", name


def test_a_profile_names_its_picker_and_a_bad_picker_is_named(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("profiles:\n  r:\n    scorers: [{type: queue-depth}]\n    picker: {type: weighted-random, "
                    "params: {seed: 1}}\n")
    assert isinstance(Strategies(load_strategies(path)).for_name("r").picker, WeightedRandomPicker)
    path.write_text("profiles:\n  r:\n    scorers: [{type: queue-depth}]\n    picker: {type: queue-depth}\n")
    with pytest.raises(ValueError, match="'queue-depth' is not a picker"):
        Strategies(load_strategies(path))
