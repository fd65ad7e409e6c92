"""The waiting queue alone (pure logic): priority order, tier limits, deadlines, removal."""

from __future__ import annotations

import pytest

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
    import threading
    import time

    import httpx

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
