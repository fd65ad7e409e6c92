"""The scheduler's pure policy: aged tiers, EDF, SJF, fair share, speed model, admission."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxpool.agent.engine.admission import (
    Outlook,
    RefusalReason,
    RunningView,
    choose_victim,
    predicted_wait,
    refusal,
    retry_after_seconds,
    shed,
    tier_waits,
)
from mlxpool.agent.engine.scheduling import Forecast, PriorityAdmission, lane_floor, lane_wait_bound
from mlxpool.agent.engine.speed import PRIOR_PREFILL_TPS, PRIOR_STEP_S, SpeedModel
from mlxpool.priorities import Priority

CRITICAL, HIGH, NORMAL, LOW, BACKGROUND = Priority


def queue(**kw) -> PriorityAdmission[str]:
    return PriorityAdmission(aging_s=10.0, edf_slack_s=0.2, **kw)


# ---- shortest job first within a tier ----


def test_shortest_predicted_job_first_within_a_tier_tier_still_first():
    q = queue()
    q.push("long", "long", NORMAL, forecast=Forecast(arrival=0.0, duration_s=5.0))
    q.push("short", "short", NORMAL, forecast=Forecast(arrival=0.1, duration_s=0.5))
    q.push("mid", "mid", NORMAL, forecast=Forecast(arrival=0.2, duration_s=2.0))
    q.push("low-short", "low-short", LOW, forecast=Forecast(arrival=0.0, duration_s=0.1))
    assert q.ordered(now=1.0) == ["short", "mid", "long", "low-short"]


def test_a_long_job_is_overtaken_only_by_jobs_that_would_finish_before_it():
    q = queue()
    q.push("long", "long", NORMAL, forecast=Forecast(arrival=0.0, duration_s=3.0))
    q.push("later-short", "later-short", NORMAL, forecast=Forecast(arrival=3.5, duration_s=0.1))
    assert q.ordered(now=4.0) == ["long", "later-short"]  # 0 + 3 < 3.5 + 0.1


# ---- earliest deadline first when a deadline is near ----


def test_requests_near_their_deadline_go_earliest_deadline_first():
    q = queue()
    q.push("short", "short", HIGH, forecast=Forecast(arrival=0.0, duration_s=0.1))
    q.push("due-later", "due-later", HIGH, forecast=Forecast(arrival=0.0, duration_s=9.0, ttft_deadline=1.15,
                                                             prefill_s=0.0))
    q.push("due-first", "due-first", HIGH, forecast=Forecast(arrival=0.0, duration_s=8.0, ttft_deadline=1.1,
                                                             prefill_s=0.0))
    q.push("not-near", "not-near", HIGH, forecast=Forecast(arrival=0.0, duration_s=5.0, ttft_deadline=9.0))
    assert q.ordered(now=1.0) == ["due-first", "due-later", "short", "not-near"]
    # A deadline already missed is not urgent any more: it takes its turn by size.
    assert q.ordered(now=1.2) == ["short", "not-near", "due-first", "due-later"]


def test_edf_does_not_jump_tiers():
    q = queue()
    q.push("normal-due", "normal-due", NORMAL, forecast=Forecast(ttft_deadline=1.1))
    q.push("critical", "critical", CRITICAL, forecast=Forecast(ttft_deadline=50.0))
    assert q.ordered(now=1.0) == ["critical", "normal-due"]


# ---- aging ----


def test_a_request_rises_one_tier_per_aging_period_and_then_past_critical():
    q = queue()
    q.push("old-background", "old-background", BACKGROUND, forecast=Forecast(arrival=0.0))
    q.push("new-critical", "new-critical", CRITICAL, forecast=Forecast(arrival=39.0))
    assert q.ordered(now=39.0) == ["new-critical", "old-background"]  # aged 3 tiers: rank 1
    assert q.group(BACKGROUND, 0.0, 40.0) == 0
    q.push("newer-critical", "newer-critical", CRITICAL,
           forecast=Forecast(arrival=49.0, ttft_deadline=49.1))  # urgent, even
    assert q.ordered(now=50.0)[0] == "old-background"  # rank 4 - 5 = -1: ahead of any critical


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(Priority)), st.floats(0, 100), st.floats(0, 20)),
                min_size=1, max_size=30),
       st.sampled_from(list(Priority)), st.floats(0, 50), st.floats(0.001, 30))
def test_aging_bound_nothing_arriving_rank_plus_one_periods_later_goes_first(entries, tier, arrival, later):
    """The stated bound: a request of rank r goes before every request that arrives more than
    (r + 1) x aging_seconds after it, whatever its tier, size or deadline; so its wait is at
    most that plus the time to serve what was already queued (bounded by the queue limits)."""
    q = queue()
    for i, (t, a, duration) in enumerate(entries):
        q.push(str(i), str(i), t, forecast=Forecast(arrival=a, duration_s=duration, ttft_deadline=a + 0.1))
    q.push("x", "x", tier, forecast=Forecast(arrival=arrival, duration_s=1000.0))
    newcomer = arrival + (tier.rank + 1) * q.aging_s + later
    q.push("late", "late", CRITICAL, forecast=Forecast(arrival=newcomer, duration_s=0.0, ttft_deadline=newcomer + 0.1))
    for now in (newcomer, newcomer + 0.05, newcomer + 7.0, newcomer + 100.0):
        order = q.ordered(now=now)
        assert order.index("x") < order.index("late"), now


# ---- weighted fair queuing between tenants ----


def _drain_in_turns(q: PriorityAdmission[str], n: int) -> list[str]:
    return [q.pop(1, now=0.0)[0] for _ in range(n)]


def test_one_tenants_flood_does_not_starve_another():
    q = queue()
    for i in range(20):
        q.push(f"a{i}", "a", NORMAL, forecast=Forecast(arrival=0.0, tokens=10, tenant="a"))
    for i in range(3):
        q.push(f"b{i}", "b", NORMAL, forecast=Forecast(arrival=1.0, tokens=10, tenant="b"))
    first = _drain_in_turns(q, 6)
    assert first.count("b") == 3  # alternating while b has work, though a came first


def test_tenants_share_by_weight_on_tokens():
    q = PriorityAdmission(aging_s=10.0, tenant_weights={"gold": 3.0})
    for i in range(40):
        q.push(f"g{i}", "gold", NORMAL, forecast=Forecast(tokens=10, tenant="gold"))
        q.push(f"s{i}", "silver", NORMAL, forecast=Forecast(tokens=10, tenant="silver"))
    taken = _drain_in_turns(q, 40)
    assert taken.count("gold") == pytest.approx(30, abs=1)


def test_fair_share_is_on_tokens_not_requests():
    q = queue()
    for i in range(30):
        q.push(f"big{i}", "big", NORMAL, forecast=Forecast(tokens=100, tenant="big"))
        q.push(f"small{i}", "small", NORMAL, forecast=Forecast(tokens=10, tenant="small"))
    taken = _drain_in_turns(q, 22)
    assert taken.count("small") == 20  # 20 x 10 tokens vs 2 x 100


def test_a_returning_tenant_gets_no_saved_up_credit():
    q = queue()
    for i in range(10):
        q.push(f"a{i}", "a", NORMAL, forecast=Forecast(tokens=10, tenant="a"))
    _drain_in_turns(q, 5)  # only a was there: its virtual time is 50
    for i in range(4):
        q.push(f"b{i}", "b", NORMAL, forecast=Forecast(tokens=10, tenant="b"))
    assert _drain_in_turns(q, 4).count("b") == 2  # level, not b x 4


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["t1", "t2", "t3", "t4"]), min_size=40, max_size=120))
def test_backlogged_tenants_get_equal_shares(arrivals):
    q = queue()
    for i, tenant in enumerate(arrivals):
        q.push(str(i), tenant, NORMAL, forecast=Forecast(tokens=5, tenant=tenant))
    backlog = {t: arrivals.count(t) for t in set(arrivals)}
    n = len(backlog) * min(backlog.values())
    taken = _drain_in_turns(q, n)
    counts = [taken.count(t) for t in backlog]
    assert max(counts) - min(counts) <= 1


# ---- the speed model ----


def test_the_speed_model_starts_from_priors_and_learns():
    speed = SpeedModel()
    assert speed.prefill_seconds(400) == pytest.approx(400 / PRIOR_PREFILL_TPS)
    assert speed.step_seconds(8) == PRIOR_STEP_S
    speed.observe_prefill(1000, 0.5)
    assert speed.prefill_seconds(1000) == pytest.approx(0.5)
    for _ in range(50):
        speed.observe_step(1, 0.01)
        speed.observe_step(16, 0.04)
        speed.observe_finished(25, 100)
    assert speed.step_seconds(1) == pytest.approx(0.01)
    assert 0.01 < speed.step_seconds(4) < 0.04  # between the buckets seen
    assert speed.step_seconds(64) == pytest.approx(0.16)  # per-sequence cost past what was seen
    assert speed.produced_tokens(100) == pytest.approx(25)
    assert speed.duration_seconds(1000, 100, 16) == pytest.approx(0.5 + 25 * 0.04)
    assert speed.remaining_seconds(10, 100, 1) == pytest.approx(15 * 0.01)
    assert speed.remaining_seconds(40, 100, 1) == pytest.approx(30 * 0.01)  # past the estimate: halfway


def test_the_speed_model_follows_a_slower_machine():
    speed = SpeedModel()
    for _ in range(30):
        speed.observe_step(2, 0.01)
    for _ in range(30):
        speed.observe_step(2, 0.05)
    assert speed.step_seconds(2) == pytest.approx(0.05, rel=0.01)


# ---- admission ----


def test_predicted_wait_is_list_scheduling_over_the_slots():
    assert predicted_wait(4, [1.0, 2.0], []) == 0.0  # a slot is free
    assert predicted_wait(2, [1.0, 2.0], []) == 1.0
    assert predicted_wait(2, [1.0, 2.0], [3.0]) == 2.0  # the one ahead takes the slot freed at 1
    assert predicted_wait(2, [1.0, 2.0], [3.0, 0.5]) == 2.5
    assert predicted_wait(0, [], []) == math.inf


def test_shedding_and_retry_after():
    assert shed(True, 1.0, wait_s=0.9, prefill_s=0.2)
    assert not shed(True, 1.0, wait_s=0.7, prefill_s=0.2)
    assert not shed(False, 1.0, wait_s=9.0, prefill_s=0.2)
    assert not shed(True, None, wait_s=9.0, prefill_s=0.2)
    assert [retry_after_seconds(w) for w in (0.0, 0.2, 1.0, 1.01, math.inf)] == [1, 1, 1, 2, 3600]


def test_tier_waits_are_predicted_wait_for_each_tier_in_one_pass():
    waiting = [(LOW, 3.0), (CRITICAL, 1.0), (NORMAL, 2.0), (CRITICAL, 0.5)]
    waits = tier_waits(2, [1.0, 4.0], [(p, d, 0.0) for p, d in waiting])
    for tier in Priority:
        # Tiers in order, arrival order inside one (sorted is stable).
        ahead = [d for p, d in sorted(((p, d) for p, d in waiting if p.rank <= tier.rank), key=lambda x: x[0].rank)]
        assert waits[tier] == predicted_wait(2, [1.0, 4.0], ahead), tier
    assert waits[CRITICAL] == 2.5 and waits[BACKGROUND] >= waits[LOW] >= waits[NORMAL]
    assert tier_waits(0, [], []) == dict.fromkeys(Priority, math.inf)


def test_tier_waits_are_bounded_below_by_the_serial_prefill_ahead():
    # 32 free slots: list scheduling alone says nobody waits, but the 20 prompts ahead of a
    # low one take 0.5 s each of serial prefill (and 1 s is left of a running one's prompt).
    waiting = [(CRITICAL, 9.0, 0.5)] * 4 + [(HIGH, 9.0, 0.5)] * 16
    waits = tier_waits(32, [], waiting, prefilling_s=1.0)
    assert waits[CRITICAL] == pytest.approx(3.0)  # its own tier's 4 prompts and the running one's rest
    assert waits[HIGH] == pytest.approx(11.0)
    assert waits[LOW] == waits[HIGH]
    # Where the slots are the bottleneck, the list-scheduling wait stands.
    assert tier_waits(1, [5.0], [(NORMAL, 4.0, 0.1)])[NORMAL] == pytest.approx(9.0)


@settings(max_examples=200, deadline=None)
@given(slots=st.integers(1, 8), running=st.lists(st.floats(0, 50), max_size=10),
       waiting=st.lists(st.tuples(st.sampled_from(list(Priority)), st.floats(0, 50), st.floats(0, 5)), max_size=20),
       prefilling=st.floats(0, 5))
def test_tier_waits_serial_bound_properties(slots, running, waiting, prefilling):
    waits = tier_waits(slots, running, waiting, prefilling_s=prefilling)
    plain = tier_waits(slots, running, [(p, d, 0.0) for p, d, _ in waiting])
    for tier in Priority:
        ahead = sum(f for p, _, f in waiting if p.rank <= tier.rank)
        # Never below the slots' wait nor below the serial prefill of what goes first; one of the two.
        assert waits[tier] >= plain[tier] - 1e-9 and waits[tier] >= prefilling + ahead - 1e-6
        assert waits[tier] == pytest.approx(max(plain[tier], prefilling + ahead))
    ranks = [waits[t] for t in Priority]
    assert ranks == sorted(ranks)  # a less urgent tier never waits less


def test_refusal_by_bound_or_unreachable_target_with_retry_after_from_the_wait():
    outlook = Outlook({LOW: 2, NORMAL: 0}, {LOW: 4.2, NORMAL: 1.5, CRITICAL: 0.0}, prefill_tps=100.0)
    full = refusal(outlook, LOW, pending=0, max_waiting=2, sheddable=False, ttft_target_s=None, prompt_tokens=10)
    assert full is not None and full.reason is RefusalReason.QUEUE_FULL and full.retry_after_s == 5
    assert full.limit == 2 and full.predicted_ttft_s == pytest.approx(4.3)
    # Pending submissions count against the bound; no bound, no refusal.
    assert refusal(outlook, NORMAL, pending=3, max_waiting=3, sheddable=False, ttft_target_s=None,
                   prompt_tokens=1).reason is RefusalReason.QUEUE_FULL
    assert refusal(outlook, NORMAL, pending=3, max_waiting=None, sheddable=False, ttft_target_s=None,
                   prompt_tokens=1) is None
    # Sheddable: refused when wait + prefill misses the target, else queued.
    shed_one = refusal(outlook, NORMAL, pending=0, max_waiting=None, sheddable=True, ttft_target_s=1.5,
                       prompt_tokens=10)
    assert shed_one is not None and shed_one.reason is RefusalReason.TARGET_UNREACHABLE and shed_one.retry_after_s == 2
    assert refusal(outlook, NORMAL, pending=0, max_waiting=None, sheddable=True, ttft_target_s=1.7,
                   prompt_tokens=10) is None
    assert refusal(outlook, NORMAL, pending=0, max_waiting=None, sheddable=False, ttft_target_s=0.1,
                   prompt_tokens=10) is None
    # A free slot now (wait 0): the bound is the engine's to apply (the next admission takes it).
    assert refusal(outlook, CRITICAL, pending=5, max_waiting=1, sheddable=False, ttft_target_s=None,
                   prompt_tokens=1) is None


def test_a_deadline_the_predicted_wait_passes_is_refused_at_once_whatever_the_tier():
    outlook = Outlook({NORMAL: 1}, {CRITICAL: 0.0, NORMAL: 2.5}, prefill_tps=100.0)
    late = refusal(outlook, NORMAL, pending=0, max_waiting=None, sheddable=False, ttft_target_s=None,
                   prompt_tokens=10, deadline_in_s=2.0)
    assert late is not None and late.reason is RefusalReason.DEADLINE_UNREACHABLE
    assert late.retry_after_s == 3 and late.predicted_ttft_s == pytest.approx(2.6)
    for deadline_in_s in (None, 2.5, 30.0):  # none, or one the wait meets
        assert refusal(outlook, NORMAL, pending=0, max_waiting=None, sheddable=False, ttft_target_s=None,
                       prompt_tokens=10, deadline_in_s=deadline_in_s) is None
    # A free slot meets any deadline, even one already passed (the engine expires it); a full tier is queue_full first.
    assert refusal(outlook, CRITICAL, pending=0, max_waiting=None, sheddable=False, ttft_target_s=None,
                   prompt_tokens=10, deadline_in_s=-1.0) is None
    assert refusal(outlook, NORMAL, pending=0, max_waiting=1, sheddable=False, ttft_target_s=None,
                   prompt_tokens=10, deadline_in_s=0.1).reason is RefusalReason.QUEUE_FULL


def test_the_speed_model_predicts_durations_from_busy_steps_prefills_included():
    speed = SpeedModel()
    for _ in range(50):
        speed.observe_step(32, 0.07)  # decode only
        speed.observe_step(32, 0.5, decode_only=False)  # a prefill shared the step
    assert speed.step_seconds(32) == pytest.approx(0.07)
    busy = speed.busy_step_seconds(32)
    assert 0.07 < busy < 0.5
    assert speed.duration_seconds(0, 10, 32) == pytest.approx(10 * busy)
    assert speed.remaining_seconds(0, 10, 32) == pytest.approx(10 * busy)
    fresh = SpeedModel()
    fresh.observe_step(4, 0.02)
    assert fresh.busy_step_seconds(4) == fresh.step_seconds(4) == pytest.approx(0.02)
    assert SpeedModel().busy_step_seconds(8) == PRIOR_STEP_S


def test_the_wait_bound_is_where_aging_reaches_the_most_urgent_preempting_lane():
    assert lane_wait_bound(HIGH, 10.0, [CRITICAL], has_target=True) == (10.0, CRITICAL)
    assert lane_wait_bound(LOW, 10.0, [CRITICAL, HIGH], has_target=True) == (30.0, CRITICAL)
    assert lane_wait_bound(LOW, 10.0, [HIGH], has_target=True) == (20.0, HIGH)
    assert lane_wait_bound(HIGH, 10.0, [HIGH, LOW], has_target=True) is None  # nothing above it preempts
    assert lane_wait_bound(CRITICAL, 10.0, [CRITICAL], has_target=True) is None
    assert lane_wait_bound(BACKGROUND, 10.0, [CRITICAL], has_target=False) is None  # keeps the aging guarantee


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(Priority)), st.sampled_from(list(Priority)),
       st.floats(0.01, 100.0), st.floats(0.0, 0.999))
def test_a_request_within_its_wait_bound_never_ranks_with_the_lane_past_it_does(tier, lane, aging, fraction):
    bound = lane_wait_bound(tier, aging, [lane], has_target=True)
    if lane.rank >= tier.rank:
        assert bound is None
        return
    assert bound is not None and bound[1] is lane
    q = PriorityAdmission(aging_s=aging)
    assert q.group(tier, 0.0, bound[0] * fraction) > lane.rank  # still behind the lane's fresh requests
    assert q.group(tier, 0.0, bound[0] * (1 + 1e-9) + 1e-9) <= lane.rank  # past it: in the lane


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([HIGH, NORMAL, LOW]), st.floats(0, 1000), st.floats(0, 1000))
def test_a_request_with_a_wait_bound_never_ages_into_the_preempting_lane(tier, waited, critical_waited):
    """Pushed with its lane floor, a targeted tier's request stays behind every critical request,
    however long it waits (the engine refuses it at its bound instead), but still ages into the
    tiers between (e.g. low into high's group); without the floor it overtakes fresh criticals."""
    floor = lane_floor(lane_wait_bound(tier, 10.0, [CRITICAL], has_target=True))
    assert floor == 1
    now = 1000.0
    q = queue()
    q.push("old", "old", tier, forecast=Forecast(arrival=now - waited), floor=floor)
    q.push("critical", "critical", CRITICAL, forecast=Forecast(arrival=now - min(waited, critical_waited)))
    assert q.ordered(now=now) == ["critical", "old"]
    assert q.group(tier, now - waited, now, floor) == max(1, tier.rank - math.floor(waited / 10.0))
    unbounded = queue()
    unbounded.push("old", "old", tier, forecast=Forecast(arrival=0.0))
    unbounded.push("critical", "critical", CRITICAL, forecast=Forecast(arrival=now))
    assert unbounded.ordered(now=now) == ["old", "critical"]
    assert lane_floor(None) is None


def test_a_wait_past_the_bound_is_refused_with_its_own_reason():
    outlook = Outlook({HIGH: 40}, {CRITICAL: 0.5, HIGH: 12.0}, prefill_tps=100.0)
    bounded = refusal(outlook, HIGH, pending=0, max_waiting=256, sheddable=False, ttft_target_s=1.0,
                      prompt_tokens=10, max_wait_s=10.0)
    assert bounded is not None and bounded.reason is RefusalReason.WAIT_BOUND and bounded.retry_after_s == 12
    assert refusal(outlook, HIGH, pending=0, max_waiting=256, sheddable=False, ttft_target_s=1.0,
                   prompt_tokens=10, max_wait_s=12.5) is None
    assert refusal(outlook, CRITICAL, pending=0, max_waiting=256, sheddable=False, ttft_target_s=1.0,
                   prompt_tokens=10, max_wait_s=None) is None


def test_the_policy_gives_each_tier_its_wait_bound():
    from mlxpool.agent.config import PriorityScheduling, TierConfig
    from mlxpool.agent.serving.policies import wait_bound

    defaults = PriorityScheduling()  # critical preempts; every tier but background has a target
    assert wait_bound(defaults, CRITICAL) is None
    assert wait_bound(defaults, HIGH) == (10.0, CRITICAL)
    assert wait_bound(defaults, NORMAL) == (20.0, CRITICAL)
    assert wait_bound(defaults, LOW) == (30.0, CRITICAL)
    assert wait_bound(defaults, BACKGROUND) is None
    calm = PriorityScheduling(aging_seconds=2.0, tiers={CRITICAL: TierConfig(preempt=False)})
    assert all(wait_bound(calm, p) is None for p in Priority)  # nobody preempts: nothing to protect


def test_the_victim_is_the_lowest_tier_with_the_most_work_left():
    running = [RunningView("n", NORMAL, 5.0), RunningView("l1", LOW, 1.0), RunningView("l2", LOW, 4.0),
               RunningView("b-prefilling", BACKGROUND, 9.0, decoding=False)]
    assert choose_victim(CRITICAL, 0.5, 0, running).key == "l2"
    assert choose_victim(CRITICAL, 0.5, 1, running) is None  # a slot is free
    assert choose_victim(CRITICAL, 2.0, 0, running) is None  # l1 ends in time
    assert choose_victim(LOW, 0.5, 0, running) is None  # nothing strictly lower decodes
    assert choose_victim(CRITICAL, 0.5, 0, [RunningView("c", CRITICAL, 9.0)]) is None
    assert choose_victim(HIGH, 0.1, 0, [RunningView("x", LOW, 9.0, preemptible=False)]) is None


def test_engine_histograms_export_as_cumulative_le_buckets():
    from mlxpool.agent.engine.interface import Buckets
    from mlxpool.agent.http.metrics import _cumulative

    buckets = Buckets((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        buckets.observe(value)
    assert buckets.counts == [2, 1, 1] and buckets.total == pytest.approx(3.65)
    assert _cumulative(buckets) == [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 4.0)]


def test_serial_prefill_seconds_use_the_aggregate_rate_once_measured():
    speed = SpeedModel(alpha=1.0)
    assert speed.serial_prefill_seconds(800) == pytest.approx(800 / PRIOR_PREFILL_TPS)
    speed.observe_prefill(100, 1.0)  # one prompt: 100 tok/s from admission to prefilled
    assert speed.serial_prefill_seconds(800) == pytest.approx(8.0)
    speed.observe_prefill_work(2000, 2.0)  # 16 prompts in one step: 1000 tok/s of work
    speed.observe_prefill_work(0, 1.0)  # a step with no prompt says nothing
    assert speed.serial_prefill_seconds(800) == pytest.approx(0.8)
