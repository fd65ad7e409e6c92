"""The fleet: claims, reservations, what gets unloaded, failures, and who hears about
changes (pure in-memory state, no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime

from mlxpool.agentapi import CacheEntry, CachePhase, ModelPhase, ModelState, NodeReport
from mlxpool.nodes import Hardware
from mlxpool.operator.logic.endpoints import ProbeResult
from mlxpool.operator.logic.fleet import AGENT, HEALTH, Fleet
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
    fleet = Fleet()
    assert fleet.claim(A, {"n1": ["x", "y"], "n2": ["x"]}) == []
    fleet.mark_managed("n1", "x")
    fleet.mark_managed("n2", "x")
    assert fleet.claim(B, {"n1": ["x"]}) == []
    # A leaves both nodes: n2's x is unloaded, n1's x is still B's, y was never ours.
    assert fleet.claim(A, {}) == [("n2", "x")]
    assert fleet.managed == {("n1", "x")}
    assert fleet.release(B) == [("n1", "x")]
    assert fleet.release(B) == [] and fleet.managed == set()


def test_seeded_claims_protect_models_before_their_pool_reconciles():
    fleet = Fleet()
    fleet.seed(A, {"n1": ["x"]}, managed=[("n1", "x")])
    fleet.seed(B, {"n1": ["x"]})
    assert fleet.claim(A, {}) == []  # B, seeded from its status, still uses it
    assert fleet.release(B) == [("n1", "x")]


def test_candidates_reserve_what_other_pools_are_about_to_load():
    fleet = Fleet()
    fleet.set_view(view("n1"))
    fleet.observe_report("n1", report({"ready-model": "ready", "loading-model": "loading"}))
    fleet.claim(B, {"n1": ["ready-model", "loading-model", "pending-model"]})
    (mine,) = fleet.candidates(A, {"loading-model": 3, "pending-model": 5, "ready-model": 100})
    assert mine.reserved_bytes == 8  # the ready model already shows in free memory
    assert mine.reserved_slots == 1  # the loading model already holds its slot
    (theirs,) = fleet.candidates(B, {})
    assert theirs.reserved_bytes == 0 and theirs.reserved_slots == 0


def test_failures_keep_a_node_away_for_a_while():
    clock = Clock()
    fleet = Fleet(retry_after=30, clock=clock)
    fleet.set_view(view("n1"))
    fleet.observe_report("n1", report({"x": "failed"}))
    assert fleet.failures("n1") == {"x": "failed"}
    clock.now = 31
    assert fleet.failures("n1") == {}
    fleet.observe_report("n1", report({"x": "failed"}))  # still failed: not a new failure
    assert fleet.failures("n1") == {}
    fleet.note_failure("n1", "y", "HTTP 507: no memory")
    assert fleet.failures("n1") == {"y": "HTTP 507: no memory"}


def test_listeners_hear_health_and_placement_relevant_agent_changes_only():
    heard: list[tuple[str, str]] = []
    fleet = Fleet()
    fleet.subscribe(lambda node, what: heard.append((node, what)))
    fleet.set_view(view("n1"))
    fleet.observe_probe("n1", ProbeResult(True))
    fleet.observe_probe("n1", ProbeResult(True))
    fleet.observe_report("n1", report({"x": "loading"}))
    fleet.observe_report("n1", report({"x": "loading"}))
    fleet.note_model("n1", ModelState(name="x", phase=ModelPhase.READY))
    fleet.note_cache("n1", CacheEntry(key="k", source="hf://x", phase=CachePhase.DOWNLOADING, progress=0.5))
    fleet.note_cache("n1", CacheEntry(key="k", source="hf://x", phase=CachePhase.DOWNLOADING, progress=0.7))
    fleet.observe_probe("n1", ProbeResult(False, "cannot connect"))
    assert heard == [("n1", HEALTH), ("n1", AGENT), ("n1", AGENT), ("n1", AGENT), ("n1", HEALTH)]


def test_in_transit_nodes_are_reported_often():
    fleet = Fleet()
    fleet.set_view(view("n1"))
    assert not fleet.in_transit("n1")
    fleet.observe_report("n1", report({"x": "ready"}, {"k": "Downloading"}))
    assert fleet.in_transit("n1")
    fleet.observe_report("n1", report({"x": "unloading"}, {"k": "Cached"}))
    assert fleet.in_transit("n1")
    fleet.observe_report("n1", report({"x": "ready"}, {"k": "Cached"}))
    assert not fleet.in_transit("n1")


def test_probe_interval_is_the_shortest_of_the_claiming_pools():
    fleet = Fleet()
    fleet.claim(A, {"n1": ["x"]}, probe_interval=5)
    fleet.claim(B, {"n1": ["y"], "n2": ["y"]}, probe_interval=2)
    assert fleet.probe_interval("n1", default=1) == 2
    assert fleet.probe_interval("n3", default=1) == 1


def test_model_sizes_come_from_reports_and_heartbeats():
    fleet = Fleet()
    fleet.set_view(view("n1", model_bytes={"x": 10}))
    fleet.set_view(view("n2"))
    fleet.observe_report("n2", report({"x": "ready", "y": "ready"}, x=12, y=3))
    assert fleet.model_sizes() == {"x": 12, "y": 3}


def test_dropping_a_node_forgets_what_was_seen_there():
    fleet = Fleet()
    fleet.set_view(view("n1"))
    fleet.note_failure("n1", "x", "boom")
    fleet.drop_view("n1")
    assert fleet.views == {} and fleet.failures("n1") == {} and "n1" not in fleet.observations


def test_a_report_asked_for_before_a_call_does_not_undo_what_the_call_taught():
    clock = Clock()
    fleet = Fleet(clock=clock)
    fleet.set_view(view("n1"))
    fleet.observe_report("n1", report({}))
    asked = fleet.now()
    clock.now = 1
    fleet.note_model("n1", ModelState(name="x", phase=ModelPhase.LOADING))  # the load call's answer
    assert not fleet.observe_report("n1", report({}), asked_at=asked)  # sent before the load arrived
    assert fleet.observation("n1").agent.models == {"x": "loading"}
    assert fleet.observe_report("n1", report({"x": "ready"}), asked_at=fleet.now())


def test_deferred_unloads_wait_for_the_node_and_drop_what_was_claimed_again():
    fleet = Fleet()
    fleet.defer_unload("n1", "x")
    fleet.defer_unload("n1", "y")
    fleet.defer_unload("n2", "z")
    fleet.claim(A, {"n1": ["y"]})  # y is wanted there again: not unloaded after all
    assert fleet.deferred_unloads("n1") == ["x"]
    fleet.forget_deferred("n1", "x")
    assert fleet.deferred_unloads("n1") == [] and fleet.deferred_unloads("n2") == ["z"]


def owned_report(models: dict[str, tuple[str, str | None]]) -> NodeReport:
    """A report whose models carry their owner: name -> (phase, owner)."""
    return NodeReport(name="n", endpoint="http://n", hardware=HW, max_models=4, agent_version="t",
                      models=[ModelState(name=m, phase=ModelPhase(p), owner=o) for m, (p, o) in models.items()])


def test_reports_teach_which_models_are_ours_after_a_restart():
    fleet = Fleet(owner="op")
    fleet.set_view(view("n1"))
    fleet.observe_report("n1", owned_report({"x": ("ready", "op"), "y": ("ready", None), "z": ("ready", "other"),
                                             "w": ("failed", "op")}))
    assert fleet.managed == {("n1", "x")}  # not y (--model), z (another operator) or w (holds nothing)
    fleet.seed(A, {"n1": ["x"]})
    assert fleet.claim(A, {}) == [("n1", "x")]  # so a pool giving it up unloads it


def test_an_unclaimed_model_of_ours_is_an_orphan_after_the_grace_period():
    clock = Clock()
    fleet = Fleet(owner="op", clock=clock)
    fleet.set_view(view("n1"))
    fleet.observe_report("n1", owned_report({"x": ("ready", "op"), "y": ("ready", None), "z": ("ready", "other"),
                                             "c": ("ready", "op"), "l": ("loading", "op")}))
    fleet.seed(A, {"n1": ["c"]})
    assert fleet.orphans_due("n1", grace=10) == []  # not seeded: an unclaimed model may be an unread pool's
    fleet.seeded = True
    assert fleet.orphans_due("n1", grace=10) == []  # x is unclaimed from now on
    clock.now = 9.9
    assert fleet.orphans_due("n1", grace=10) == []
    clock.now = 10.0
    assert fleet.orphans_due("n1", grace=10) == ["x"]  # not y, z (not ours), c (claimed), l (still loading)
    assert ("n1", "x") not in fleet.managed and ("n1", "c") in fleet.managed
    assert fleet.orphans_due("n1", grace=10) == []  # handed out once; the unload's answer updates the view


def test_a_claim_during_the_grace_period_saves_the_model_and_restarts_the_clock():
    clock = Clock()
    fleet = Fleet(owner="op", clock=clock)
    fleet.seeded = True
    fleet.set_view(view("n1"))
    fleet.observe_report("n1", owned_report({"x": ("ready", "op")}))
    assert fleet.orphans_due("n1", grace=10) == []
    clock.now = 5
    fleet.claim(A, {"n1": ["x"]})
    assert fleet.orphans_due("n1", grace=10) == []
    clock.now = 12
    fleet.claim(A, {})  # released normally: that path unloads it, and it counts as unclaimed anew
    assert fleet.orphans_due("n1", grace=10) == []
    clock.now = 21.9
    assert fleet.orphans_due("n1", grace=10) == []
    clock.now = 22
    assert fleet.orphans_due("n1", grace=10) == ["x"]


def test_without_an_owner_nothing_is_an_orphan():
    fleet = Fleet()
    fleet.seeded = True
    fleet.set_view(view("n1"))
    fleet.observe_report("n1", owned_report({"x": ("ready", None)}))
    assert fleet.orphans_due("n1", grace=0) == [] and fleet.managed == set()
