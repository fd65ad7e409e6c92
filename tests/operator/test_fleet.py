"""The fleet and its two halves: claims (what gets unloaded, orphans, deferred unloads,
probe intervals), observations (failures, reports, who hears about changes) and what
placement sees of both (reservations). Pure in-memory state, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime

from mlxpool.agentapi import CacheEntry, CachePhase, ModelPhase, ModelState, NodeReport
from mlxpool.nodes import Hardware
from mlxpool.operator.logic.claims import Claims
from mlxpool.operator.logic.endpoints import ProbeResult
from mlxpool.operator.logic.fleet import Fleet
from mlxpool.operator.logic.observations import AGENT, HEALTH, Observations
from mlxpool.operator.logic.placement import NodeView

HW = Hardware(chip="c", memory_bytes=1, cpu_cores=1, accelerator="cpu", platform="p")
A, B = ("ns", "a"), ("ns", "b")


def view(name: str, **kw) -> NodeView:
    return NodeView(name=name, endpoint=f"http://{name}", labels={}, ready=True,
                    heartbeat=datetime(2026, 1, 1, tzinfo=UTC), free_memory_bytes=0,
                    models=frozenset(kw.pop("models", ())), **kw)


def report(models: dict[str, str], cache: dict[str, str] | None = None, **sizes: int) -> NodeReport:
    return NodeReport(name="n", endpoint="http://n", hardware=HW, max_models=4, agent_version="t",
                      models=[ModelState(name=m, phase=ModelPhase(p), memory_bytes=sizes.get(m))
                              for m, p in models.items()],
                      cache=[CacheEntry(key=k, source="hf://x", phase=CachePhase(p)) for k, p in (cache or {}).items()])


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_only_models_the_operator_loaded_and_nobody_claims_are_unloaded():
    claims = Claims()
    assert claims.claim(A, {"n1": ["x", "y"], "n2": ["x"]}) == []
    claims.mark_managed("n1", "x")
    claims.mark_managed("n2", "x")
    assert claims.claim(B, {"n1": ["x"]}) == []
    # A leaves both nodes: n2's x is unloaded, n1's x is still B's, y was never ours.
    assert claims.claim(A, {}) == [("n2", "x")]
    assert claims.managed == {("n1", "x")}
    assert claims.release(B) == [("n1", "x")]
    assert claims.release(B) == [] and claims.managed == set()


def test_seeded_claims_protect_models_before_their_pool_reconciles():
    claims = Claims()
    claims.seed(A, {"n1": ["x"]}, managed=[("n1", "x")])
    claims.seed(B, {"n1": ["x"]})
    assert claims.claim(A, {}) == []  # B, seeded from its status, still uses it
    assert claims.release(B) == [("n1", "x")]


def test_candidates_reserve_what_other_pools_are_about_to_load():
    fleet = Fleet()
    fleet.observed.set_view(view("n1"))
    fleet.observed.observe_report("n1", report({"ready-model": "ready", "loading-model": "loading"}))
    fleet.claims.claim(B, {"n1": ["ready-model", "loading-model", "pending-model"]})
    (mine,) = fleet.candidates(A, {"loading-model": 3, "pending-model": 5, "ready-model": 100})
    assert mine.reserved_bytes == 8  # the ready model already shows in free memory
    assert mine.reserved_slots == 1  # the loading model already holds its slot
    (theirs,) = fleet.candidates(B, {})
    assert theirs.reserved_bytes == 0 and theirs.reserved_slots == 0


def test_failures_keep_a_node_away_for_a_while():
    clock = Clock()
    observed = Observations(retry_after=30, clock=clock)
    observed.set_view(view("n1"))
    observed.observe_report("n1", report({"x": "failed"}))
    assert observed.failures("n1") == {"x": "failed"}
    clock.now = 31
    assert observed.failures("n1") == {}
    observed.observe_report("n1", report({"x": "failed"}))  # still failed: not a new failure
    assert observed.failures("n1") == {}
    observed.note_failure("n1", "y", "HTTP 507: no memory")
    assert observed.failures("n1") == {"y": "HTTP 507: no memory"}


def test_listeners_hear_health_and_placement_relevant_agent_changes_only():
    heard: list[tuple[str, str]] = []
    observed = Observations()
    observed.subscribe(lambda node, what: heard.append((node, what)))
    observed.set_view(view("n1"))
    observed.observe_probe("n1", ProbeResult(True))
    observed.observe_probe("n1", ProbeResult(True))
    observed.observe_report("n1", report({"x": "loading"}))
    observed.observe_report("n1", report({"x": "loading"}))
    observed.note_model("n1", ModelState(name="x", phase=ModelPhase.READY))
    for progress in (0.5, 0.7):  # progress is not a change placement sees
        observed.note_cache("n1", CacheEntry(key="k", source="hf://x", phase=CachePhase.DOWNLOADING, progress=progress))
    observed.observe_probe("n1", ProbeResult(False, "cannot connect"))
    assert heard == [("n1", HEALTH), ("n1", AGENT), ("n1", AGENT), ("n1", AGENT), ("n1", HEALTH)]


def test_in_transit_nodes_are_reported_often():
    observed = Observations()
    observed.set_view(view("n1"))
    assert not observed.in_transit("n1")
    observed.observe_report("n1", report({"x": "ready"}, {"k": "Downloading"}))
    assert observed.in_transit("n1")
    observed.observe_report("n1", report({"x": "unloading"}, {"k": "Cached"}))
    assert observed.in_transit("n1")
    observed.observe_report("n1", report({"x": "ready"}, {"k": "Cached"}))
    assert not observed.in_transit("n1")


def test_probe_interval_is_the_shortest_of_the_claiming_pools():
    claims = Claims()
    claims.claim(A, {"n1": ["x"]}, probe_interval=5)
    claims.claim(B, {"n1": ["y"], "n2": ["y"]}, probe_interval=2)
    assert claims.probe_interval("n1", default=1) == 2
    assert claims.probe_interval("n3", default=1) == 1


def test_model_sizes_come_from_reports_and_heartbeats():
    observed = Observations()
    observed.set_view(view("n1", model_bytes={"x": 10}))
    observed.set_view(view("n2"))
    observed.observe_report("n2", report({"x": "ready", "y": "ready"}, x=12, y=3))
    assert observed.model_sizes() == {"x": 12, "y": 3}


def test_dropping_a_node_forgets_what_was_seen_there():
    fleet = Fleet()
    fleet.observed.set_view(view("n1"))
    fleet.observed.note_failure("n1", "x", "boom")
    fleet.claims.defer_unload("n1", "y")
    fleet.drop_view("n1")
    assert fleet.observed.views == {} and fleet.observed.failures("n1") == {} and "n1" not in fleet.observed.nodes
    assert fleet.claims.deferred_unloads("n1") == []


def test_a_report_asked_for_before_a_call_does_not_undo_what_the_call_taught():
    clock = Clock()
    observed = Observations(clock=clock)
    observed.set_view(view("n1"))
    observed.observe_report("n1", report({}))
    asked = observed.now()
    clock.now = 1
    observed.note_model("n1", ModelState(name="x", phase=ModelPhase.LOADING))  # the load call's answer
    assert not observed.observe_report("n1", report({}), asked_at=asked)  # sent before the load arrived
    assert observed.of("n1").agent.models == {"x": ModelPhase.LOADING}
    assert observed.observe_report("n1", report({"x": "ready"}), asked_at=observed.now())


def test_deferred_unloads_wait_for_the_node_and_drop_what_was_claimed_again():
    claims = Claims()
    claims.defer_unload("n1", "x")
    claims.defer_unload("n1", "y")
    claims.defer_unload("n2", "z")
    claims.claim(A, {"n1": ["y"]})  # y is wanted there again: not unloaded after all
    assert claims.deferred_unloads("n1") == ["x"]
    claims.forget_deferred("n1", "x")
    assert claims.deferred_unloads("n1") == [] and claims.deferred_unloads("n2") == ["z"]


def owned_report(models: dict[str, tuple[str, str | None]]) -> NodeReport:
    """A report whose models carry their owner: name -> (phase, owner)."""
    return NodeReport(name="n", endpoint="http://n", hardware=HW, max_models=4, agent_version="t",
                      models=[ModelState(name=m, phase=ModelPhase(p), owner=o) for m, (p, o) in models.items()])


def test_reports_teach_which_models_are_ours_after_a_restart():
    fleet = Fleet(owner="op")
    fleet.observed.set_view(view("n1"))
    fleet.observed.observe_report("n1", owned_report({"x": ("ready", "op"), "y": ("ready", None),
                                                      "z": ("ready", "other"), "w": ("failed", "op")}))
    assert fleet.claims.managed == {("n1", "x")}  # not y (--model), z (another operator) or w (holds nothing)
    fleet.claims.seed(A, {"n1": ["x"]})
    assert fleet.claims.claim(A, {}) == [("n1", "x")]  # so a pool giving it up unloads it


def test_an_unclaimed_model_of_ours_is_an_orphan_after_the_grace_period():
    clock = Clock()
    fleet = Fleet(owner="op", clock=clock)
    fleet.observed.set_view(view("n1"))
    fleet.observed.observe_report("n1", owned_report({"x": ("ready", "op"), "y": ("ready", None),
                                                      "z": ("ready", "other"), "c": ("ready", "op"),
                                                      "l": ("loading", "op")}))
    fleet.claims.seed(A, {"n1": ["c"]})
    assert fleet.orphans_due("n1", grace=10) == []  # not seeded: an unclaimed model may be an unread pool's
    fleet.claims.seeded = True
    assert fleet.orphans_due("n1", grace=10) == []  # x is unclaimed from now on
    clock.now = 9.9
    assert fleet.orphans_due("n1", grace=10) == []
    clock.now = 10.0
    assert fleet.orphans_due("n1", grace=10) == ["x"]  # not y, z (not ours), c (claimed), l (still loading)
    assert ("n1", "x") not in fleet.claims.managed and ("n1", "c") in fleet.claims.managed
    assert fleet.orphans_due("n1", grace=10) == []  # handed out once; the unload's answer updates the view


def test_a_claim_during_the_grace_period_saves_the_model_and_restarts_the_clock():
    clock = Clock()
    fleet = Fleet(owner="op", clock=clock)
    fleet.claims.seeded = True
    fleet.observed.set_view(view("n1"))
    fleet.observed.observe_report("n1", owned_report({"x": ("ready", "op")}))
    assert fleet.orphans_due("n1", grace=10) == []
    clock.now = 5
    fleet.claims.claim(A, {"n1": ["x"]})
    assert fleet.orphans_due("n1", grace=10) == []
    clock.now = 12
    fleet.claims.claim(A, {})  # released normally: that path unloads it, and it counts as unclaimed anew
    assert fleet.orphans_due("n1", grace=10) == []
    clock.now = 21.9
    assert fleet.orphans_due("n1", grace=10) == []
    clock.now = 22
    assert fleet.orphans_due("n1", grace=10) == ["x"]


def test_without_an_owner_nothing_is_an_orphan():
    fleet = Fleet()
    fleet.claims.seeded = True
    fleet.observed.set_view(view("n1"))
    fleet.observed.observe_report("n1", owned_report({"x": ("ready", None)}))
    assert fleet.orphans_due("n1", grace=0) == [] and fleet.claims.managed == set()


def test_a_view_beats_with_the_later_of_its_status_and_its_lease():
    observed = Observations()
    old, new = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 0, 5, tzinfo=UTC)
    observed.renew("a", new)  # the lease can come before the object
    assert observed.set_view(view("a"))  # a new node matters
    assert observed.views["a"].heartbeat == new
    observed.renew("a", datetime(2026, 1, 1, 0, 6, tzinfo=UTC))
    assert observed.views["a"].heartbeat == datetime(2026, 1, 1, 0, 6, tzinfo=UTC)
    assert observed.set_view(view("a")) is False  # a status write with the old heartbeat keeps the lease's
    assert observed.views["a"].heartbeat == datetime(2026, 1, 1, 0, 6, tzinfo=UTC)
    observed.renew("a", None)  # the lease is gone: the status's heartbeat is all there is
    assert observed.views["a"].heartbeat == old


def test_the_node_index_follows_claims_releases_and_seeds():
    claims = Claims()
    claims.claim(A, {"n1": ["x"], "n2": ["x"]}, probe_interval=2.0)
    claims.claim(B, {"n1": ["y"]}, probe_interval=0.5)
    assert claims.claimed_on("n1") == {"x", "y"} and claims.nodes() == {"n1", "n2"}
    assert claims.claimed_by_others(A) == {"n1": {"y"}}
    assert claims.claimed_by_others(B, ["n2", "n3"]) == {"n2": {"x"}}
    assert claims.probe_interval("n1", 9.0) == 0.5 and claims.probe_interval("n2", 9.0) == 2.0
    claims.claim(A, {"n2": ["x"]})  # A leaves n1
    assert claims.claimed_on("n1") == {"y"} and claims.probe_interval("n2", 9.0) == 9.0
    claims.release(B)
    assert claims.nodes() == {"n2"} and claims.claimed_on("n1") == set()
    claims.seed(B, {"n3": ["z"]})
    assert claims.claimed_by_others(A) == {"n3": {"z"}}


def test_managed_pairs_know_each_nodes_models():
    from mlxpool.operator.logic.claims import PairSet

    pairs = PairSet()
    pairs.update([("n1", "a"), ("n1", "b"), ("n2", "a")])
    pairs.discard(("n1", "b"))
    pairs.discard(("n3", "x"))  # not there: nothing happens
    assert pairs.on("n1") == {"a"} and pairs.on("n2") == {"a"} and pairs.on("n3") == set()
    assert pairs == {("n1", "a"), ("n2", "a")} and len(pairs) == 2 and ("n2", "a") in pairs
    pairs.difference_update([("n1", "a")])
    assert pairs == {("n2", "a")} and pairs.on("n1") == set()
