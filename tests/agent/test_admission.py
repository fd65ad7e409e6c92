"""The waiting queue alone (pure logic): priority order, tier limits, deadlines, removal."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from mlxpool.agent.engine.admission import protected_prefill_tokens
from mlxpool.agent.engine.generation import BatchEngine, EngineConfig, _Paused, _Sequence
from mlxpool.agent.engine.interface import GenerationRequest, SamplingParams, TierTerms
from mlxpool.agent.engine.scheduling import PriorityAdmission
from mlxpool.agent.errors import QueueFull
from mlxpool.priorities import Priority

CRITICAL, HIGH, NORMAL, LOW, BACKGROUND = Priority


def test_pops_by_priority_then_arrival_up_to_free_slots():
    queue: PriorityAdmission[str] = PriorityAdmission()
    for name, tier in [("a", NORMAL), ("b", LOW), ("c", CRITICAL), ("d", NORMAL), ("e", BACKGROUND), ("f", HIGH)]:
        queue.push(name, name.upper(), tier)
    assert queue.pop(3) == ["C", "F", "A"]
    assert len(queue) == 3
    assert queue.pop(0) == []
    queue.push("g", "G", CRITICAL)  # a later, more urgent request still goes first
    assert queue.pop(10) == ["G", "D", "B", "E"]


def test_counts_per_tier_follow_pushes_pops_and_removals():
    queue: PriorityAdmission[str] = PriorityAdmission()
    queue.push("a", "A", HIGH)
    queue.push("b", "B", HIGH)
    queue.push("c", "C", LOW)
    assert queue.counts() == {CRITICAL: 0, HIGH: 2, NORMAL: 0, LOW: 1, BACKGROUND: 0}
    queue.pop(1)
    queue.remove("c")
    assert queue.counts()[HIGH] == 1 and queue.counts()[LOW] == 0


def test_a_full_tier_refuses_new_requests_others_still_queue():
    queue: PriorityAdmission[str] = PriorityAdmission({LOW: 2})
    queue.push("a", "A", LOW)
    queue.push("b", "B", LOW)
    with pytest.raises(QueueFull, match="low tier already has 2"):
        queue.push("c", "C", LOW)
    queue.push("d", "D", NORMAL)  # unlimited
    assert queue.pop(1) == ["D"]
    queue.pop(1)  # one low request leaves: room for the next
    queue.push("c", "C", LOW)
    assert len(queue) == 2


def test_a_zero_limit_refuses_the_tier_entirely():
    queue: PriorityAdmission[str] = PriorityAdmission({BACKGROUND: 0})
    with pytest.raises(QueueFull):
        queue.push("a", "A", BACKGROUND)


def test_expire_takes_out_only_requests_past_their_deadline():
    queue: PriorityAdmission[str] = PriorityAdmission()
    queue.push("a", "A", NORMAL, deadline=10.0)
    queue.push("b", "B", NORMAL, deadline=30.0)
    queue.push("c", "C", NORMAL)  # no deadline
    queue.push("d", "D", HIGH, deadline=5.0)
    assert queue.expire(now=4.0) == []
    assert queue.expire(now=20.0) == ["D", "A"]
    assert queue.pop(5) == ["B", "C"]
    assert queue.expire(now=100.0) == []  # B left through pop: not expired again


def test_remove_takes_a_waiting_item_out():
    queue: PriorityAdmission[str] = PriorityAdmission()
    queue.push("a", "A", deadline=1.0)
    queue.push("b", "B")
    assert queue.remove("a") == "A"
    assert queue.remove("a") is None
    assert queue.expire(now=2.0) == []
    assert queue.drain() == ["B"]
    assert len(queue) == 0 and queue.pop(1) == []


def test_a_request_id_can_return_after_it_left():
    queue: PriorityAdmission[str] = PriorityAdmission()
    queue.push("a", "A1", LOW)
    queue.remove("a")
    queue.push("a", "A2", HIGH)
    assert queue.pop(5) == ["A2"]  # the stale LOW entry is skipped


def test_duplicate_request_ids_are_refused():
    queue: PriorityAdmission[str] = PriorityAdmission()
    queue.push("a", "A")
    with pytest.raises(ValueError, match="already waiting"):
        queue.push("a", "A2")


def test_heaps_stay_bounded_when_many_leave_out_of_order():
    queue: PriorityAdmission[int] = PriorityAdmission()
    for i in range(1000):
        queue.push(str(i), i, deadline=float(i))
        if i >= 1:
            queue.remove(str(i - 1))
    assert len(queue) == 1
    assert len(queue._deadlines) < 100
    assert queue.pop(1) == [999]


def test_a_token_budget_stops_at_the_first_prompt_that_does_not_fit():
    queue: PriorityAdmission[str] = PriorityAdmission()
    for name, tier in [("aa", NORMAL), ("bbbbbb", NORMAL), ("c", NORMAL), ("dd", LOW)]:
        queue.push(name, name, tier)
    # "bbbbbb" does not fit after "aa": it stays first in line, "c" does not overtake it.
    assert queue.pop(10, cost=len, budget=5) == ["aa"]
    assert queue.pop(10, cost=len, budget=5) == []
    assert queue.pop(10, cost=len, budget=5, at_least_one=True) == ["bbbbbb"]  # alone, over budget
    assert queue.pop(10, cost=len, budget=2) == ["c"]  # "dd" would make 3
    assert queue.pop(1, cost=len, budget=100) == ["dd"]
    assert len(queue) == 0


def test_the_budget_respects_priority_before_size():
    queue: PriorityAdmission[str] = PriorityAdmission()
    queue.push("short-low", "s", LOW)
    queue.push("long-critical", "llll", CRITICAL)
    assert queue.pop(10, cost=len, budget=3) == []  # the critical one is next; nothing skips it
    assert queue.pop(10, cost=len, budget=5) == ["llll", "s"]


# ---- the wait bound on a real agent ----


def test_a_tier_predicted_to_age_into_the_critical_lane_is_refused_at_once(agent_factory, tiny_model, tmp_path):
    """One slot held by a long request; `aging_seconds: 0.5`, so a `high` request (rank 1,
    target 3 s) predicted to wait more than 0.5 s would rank with fresh `critical` ones:
    429 `wait_bound` at once. `background` (no target) keeps the aging guarantee: it waits
    and is served once the slot frees."""
    config = tmp_path / "runtime.yaml"
    config.write_text("serving: {decode_concurrency: 1, prefill_concurrency: 1}\n"
                      "priority_scheduling: {aging_seconds: 0.5}\n")
    agent = agent_factory(tiny_model, ["--config", str(config)])
    hold = {"model": "tiny", "prompt": "hold the slot", "max_tokens": 1900, "temperature": 0, "stream": True}
    patient: dict = {}
    with httpx.Client(base_url=agent.url, timeout=60) as client, client.stream("POST", "/v1/completions",
                                                                               json=hold) as holder:
        lines = holder.iter_lines()
        next(lines)  # the slot is taken (and the outlook published after that step)
        started = time.monotonic()
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "urgent-ish", "max_tokens": 3,
                                                 "priority": "high"})
        took = time.monotonic() - started
        error = r.json()["error"]
        assert r.status_code == 429 and error["code"] == "wait_bound", r.text
        assert "critical" in error["message"] and int(r.headers["retry-after"]) >= 1
        assert took < 1.0
        waiter = threading.Thread(target=lambda: patient.setdefault("r", httpx.post(
            f"{agent.url}/v1/completions", json={"model": "tiny", "prompt": "patient", "max_tokens": 2,
                                                 "temperature": 0, "priority": "background"}, timeout=60)))
        waiter.start()
        deadline = time.monotonic() + 10
        while 'vllm:num_requests_waiting{model_name="tiny"} 1.0' not in client.get("/metrics").text:
            assert time.monotonic() < deadline, "the background request never queued"
            time.sleep(0.02)
        text = client.get("/metrics").text
        assert 'mlxpool_requests_rejected_total{model_name="tiny",reason="wait_bound"} 1.0' in text
    waiter.join(60)  # the holder went away: the background request runs
    assert patient["r"].status_code == 200, patient["r"].text


# ---- the engine's admission while a protected first token is on its way ----


def test_while_a_critical_waits_for_its_first_token_other_tiers_bring_no_big_prefill(tmp_path):
    """The engine's own glue (`BatchEngine._pop_admissions`, no model loaded): a waiting
    critical request (it may preempt, its deadline ahead) is taken first, and the low ones
    bring at most `protected_prefill_tokens` prompt tokens with it; once no protected
    request waits for a first token, admission is the plain ordered pop again."""
    engine = BatchEngine(str(tmp_path), EngineConfig(max_running=8, prefill_batch_size=8))
    loop = asyncio.new_event_loop()
    now = time.monotonic()

    def push(name: str, priority: Priority, tokens: int, terms: TierTerms) -> None:
        request = GenerationRequest(name, tuple(range(3, 3 + tokens)), SamplingParams(max_tokens=4), priority,
                                    terms=terms, arrival=now)
        sequence = _Sequence(request, asyncio.Queue(), loop)
        sequence.forecast = engine._forecast(request)
        engine._waiting.push(name, sequence, priority, forecast=sequence.forecast, weight=tokens)

    critical = TierTerms(ttft_target_s=0.3, preempt=True)
    low = TierTerms(ttft_target_s=30.0)
    for i in range(3):
        push(f"low-{i}", Priority.LOW, 40, low)
    push("critical", Priority.CRITICAL, 40, critical)
    cap = protected_prefill_tokens(0.3, engine._speed.step_seconds(1), engine._speed.prefill_tps or 400.0)
    assert cap < 40  # the priors: 0.05 s a step, 400 tokens/s: 20 tokens, less than one low prompt
    taken = engine._pop_admissions(8)
    assert [s.request.request_id for s in taken] == ["critical"]
    # A low request aged into the critical lane (3 x aging_seconds) is not held back: the aging bound holds.
    aged = GenerationRequest("aged", tuple(range(3, 43)), SamplingParams(max_tokens=4), Priority.LOW, terms=low,
                             arrival=now - 3 * engine._config.aging_s - 1)
    old = _Sequence(aged, asyncio.Queue(), loop)
    old.forecast = engine._forecast(aged)
    engine._waiting.push("aged", old, Priority.LOW, forecast=old.forecast, weight=40)
    engine._waiting.push("critical", taken[0], Priority.CRITICAL, forecast=taken[0].forecast, weight=40)
    paused_request = GenerationRequest("paused", tuple(range(3, 43)), SamplingParams(max_tokens=4), Priority.LOW,
                                       terms=low, arrival=now)
    paused = _Sequence(paused_request, asyncio.Queue(), loop)
    paused.forecast = engine._forecast(paused_request)
    paused.paused = _Paused([object()], list(range(3, 45)))  # its KV kept: one token to feed on resume
    engine._waiting.push("paused", paused, Priority.LOW, forecast=paused.forecast, over_limit=True)
    taken = engine._pop_admissions(8)
    assert {s.request.request_id for s in taken} == {"critical", "aged", "paused"}
    paused.paused = None
    # The critical has its first token: nothing is protected any more, the lows go together.
    for uid, sequence in enumerate(taken):
        sequence.generated = 1
        engine._running[uid] = sequence
    assert sorted(s.request.request_id for s in engine._pop_admissions(8)) == ["low-0", "low-1", "low-2"]
    loop.close()
