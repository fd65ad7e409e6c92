"""Prefix affinity as pure logic: the block hashes, the bounded index, the scorer, the profile."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from mlxpool.router.picking.picker import Pipeline
from mlxpool.router.picking.plugins import PickRequest
from mlxpool.router.picking.prefixindex import PrefixIndex, prompt_blocks
from mlxpool.router.picking.profiles import REGISTRY, Strategies, build_pipeline, load_strategies
from mlxpool.router.picking.scorers import PrefixAffinityParams, PrefixAffinityScorer
from mlxpool.router.picking.signals import EndpointSignals
from mlxpool.routing import RouteEndpoint

BLOCK = 8
EPS = [RouteEndpoint(node=n, url=f"http://{n}") for n in ("a", "b", "c")]
URLS = [e.url for e in EPS]


def text(tag: str, length: int) -> str:
    """`length` characters of `tag` repeated: distinct tags differ from the first block on."""
    return ((tag + " ") * length)[:length]


def scorer(**params: int) -> PrefixAffinityScorer:
    return PrefixAffinityScorer(PrefixAffinityParams(**{"block_size": BLOCK, **params}))


def score(s: PrefixAffinityScorer, prompt: str, model: str = "m") -> list[float]:
    return s.score(PickRequest(model, prompt), EPS, EndpointSignals())


def send(s: PrefixAffinityScorer, prompt: str, node: str, model: str = "m") -> None:
    """What the pipeline does once `node` was chosen for `prompt`."""
    s.picked(PickRequest(model, prompt), [e for e in EPS if e.node == node])


def test_blocks_chain_the_prefix_and_ignore_the_partial_tail():
    base = prompt_blocks("m", "abcdefgh12345678xyz", BLOCK, 100)
    assert len(base) == 2  # "xyz" is less than a block
    assert prompt_blocks("m", "abcdefgh12345678", BLOCK, 100) == base
    assert len(set(base)) == 2 and all(len(h) == 8 for h in base)
    # The second block's hash stands for both blocks: equal text after a different first block differs.
    other = prompt_blocks("m", "ABCDEFGH12345678", BLOCK, 100)
    assert other[0] != base[0] and other[1] != base[1]
    assert prompt_blocks("m", "abcdefgh87654321", BLOCK, 100)[0] == base[0]
    assert prompt_blocks("m", "abcdefgh" * 10, BLOCK, 3) == prompt_blocks("m", "abcdefgh" * 3, BLOCK, 100)
    assert prompt_blocks("m", "short", BLOCK, 100) == prompt_blocks("m", "", BLOCK, 100) == []


def test_blocks_are_stable_across_runs():
    # A fixed value (BLAKE2b of the model's hash and the block): no PYTHONHASHSEED, no platform in it.
    assert prompt_blocks("m", "abcdefgh", BLOCK, 1)[0].hex() == "9a6d31e414172e39"


def test_blocks_of_different_models_never_coincide():
    prompt = text("shared system prompt", 64)
    assert not set(prompt_blocks("m", prompt, BLOCK, 100)) & set(prompt_blocks("other", prompt, BLOCK, 100))


def test_same_prefix_goes_to_the_same_endpoint():
    s = scorer()
    system = text("system", 80)
    assert score(s, system + "first question") == [0.0, 0.0, 0.0]
    send(s, system + "first question", "b")
    a, b, c = score(s, system + "second question")
    assert b > 0.5 and a == c == 0.0


def test_a_longer_shared_prefix_scores_higher():
    s = scorer()
    send(s, text("alpha", 40) + text("one", 40), "a")
    send(s, text("alpha", 40) + text("two", 40), "b")
    prompt = text("alpha", 40) + text("one", 24) + text("three", 16)
    a, b, c = score(s, prompt)
    assert (a, b, c) == (8 / 10, 5 / 10, 0.0)  # a was sent 3 more leading blocks than b
    assert score(s, text("alpha", 40) + text("one", 40)) == [1.0, 0.5, 0.0]


def test_different_models_never_match():
    s = scorer()
    prompt = text("system", 80)
    send(s, prompt, "a", model="m")
    assert score(s, prompt, model="other") == [0.0, 0.0, 0.0]
    assert score(s, prompt, model="m")[0] == 1.0


@pytest.mark.parametrize("prompt", ["", "seven!!"])
def test_no_prompt_scores_all_zero_and_records_nothing(prompt):
    s = scorer()
    assert score(s, prompt) == [0.0, 0.0, 0.0]
    send(s, prompt, "a")
    assert len(s.index) == 0


def test_only_the_endpoints_given_are_scored():
    s = scorer()
    send(s, text("system", 80), "a")
    remaining = EPS[1:]  # a left the table
    assert s.score(PickRequest("m", text("system", 80)), remaining, EndpointSignals()) == [0.0, 0.0]


def test_the_index_never_exceeds_its_bound_and_forgets_the_oldest_first():
    index = PrefixIndex(max_entries=10)
    old = prompt_blocks("m", text("old", 32), BLOCK, 100)    # 4 blocks
    new = prompt_blocks("m", text("new", 48), BLOCK, 100)    # 6 blocks
    index.record(old, "http://a")
    index.record(new, "http://b")
    assert len(index) == 10
    assert index.match(old, ["http://a"]) == [4] and index.match(new, ["http://b"]) == [6]

    index.record(prompt_blocks("m", text("newest", 24), BLOCK, 100), "http://c")  # 3 more
    assert len(index) == 10
    # The 3 least recent entries went: old's deepest blocks (recorded first), so old keeps its
    # leading block, which a match can still reach.
    assert index.match(old, ["http://a"]) == [1] and index.match(new, ["http://b"]) == [6]

    for i in range(20):
        index.record(prompt_blocks("m", text(f"filler {i}", 40), BLOCK, 100), "http://a")
        assert len(index) <= 10
    assert index.match(new, ["http://b"]) == [0]


def test_sending_again_refreshes_a_prompt():
    index = PrefixIndex(max_entries=8)
    first, second = (prompt_blocks("m", text(t, 32), BLOCK, 100) for t in ("first", "second"))
    index.record(first, "http://a")
    index.record(second, "http://a")
    index.record(first, "http://a")  # first is now the most recent
    index.record(prompt_blocks("m", text("third", 32), BLOCK, 100), "http://a")
    assert index.match(first, ["http://a"]) == [4]
    assert index.match(second, ["http://a"]) == [0]


def test_one_prompt_longer_than_the_index_keeps_its_leading_blocks():
    index = PrefixIndex(max_entries=3)
    blocks = prompt_blocks("m", text("long", 80), BLOCK, 100)
    index.record(blocks, "http://a")
    assert len(index) == 3 and index.match(blocks, ["http://a"]) == [3]


@pytest.mark.parametrize(("params", "needle"), [
    ({"block_size": 0}, "block_size"),
    ({"block_size": 100_000}, "block_size"),
    ({"max_entries": 0}, "max_entries"),
    ({"max_prompt_blocks": -1}, "max_prompt_blocks"),
    ({"block_size": "big"}, "block_size"),
    ({"blocks": 8}, "blocks"),
])
def test_bad_params_name_the_param(tmp_path: Path, params, needle):
    path = tmp_path / "strategies.yaml"
    path.write_text(f"profiles: {{x: {{scorers: [{{type: prefix-affinity, params: {params}}}]}}}}")
    with pytest.raises(ValueError) as info:
        Strategies(load_strategies(path))
    message = str(info.value)
    assert "plugin 'prefix-affinity': invalid params" in message and needle in message


def test_the_profile_is_built_in():
    assert REGISTRY["prefix-affinity"] is PrefixAffinityScorer
    pipeline = Strategies(load_strategies()).for_name("prefix-affinity")
    assert [(w.scorer.type_name, w.weight) for w in pipeline.scorers] == [
        ("prefix-affinity", 2.0), ("least-in-flight", 1.0), ("weighted-round-robin", 0.1), ("session-affinity", 4.0)]
    assert [f.type_name for f in pipeline.filters] == ["circuit-breaker"]


def profile() -> Pipeline:
    """The built-in profile, with blocks of BLOCK characters so prompts here stay short."""
    config = load_strategies().profiles["prefix-affinity"]
    assert config.scorers[0].type == "prefix-affinity" and not config.scorers[0].params
    config.scorers[0].params = {"block_size": BLOCK}
    return build_pipeline("prefix-affinity", config)


def test_prefix_groups_stick_to_their_endpoint_under_load():
    pipeline, signals = profile(), EndpointSignals()
    groups = {g: text(f"group {g} system prompt", 200) for g in range(6)}
    answered: dict[int, list[str]] = {g: [] for g in groups}
    for turn in range(5):
        for g, system in groups.items():
            ranked = pipeline.rank(PickRequest("m", system + text(f"question {turn}", 40)), EPS, signals)
            answered[g].append(ranked[0].node)
            signals.started(ranked[0].url)  # requests stay in flight: the load is uneven all along
    assert all(len(set(nodes)) == 1 for nodes in answered.values()), answered
    assert Counter(nodes[0] for nodes in answered.values()) == {"a": 2, "b": 2, "c": 2}


def test_distinct_prompts_spread_by_load():
    pipeline, signals = profile(), EndpointSignals()
    for _ in range(4):
        signals.started("http://a")  # a already holds 4 requests
    chosen = []
    for i in range(8):
        ranked = pipeline.rank(PickRequest("m", text(f"{i} unrelated prompt", 200)), EPS, signals)
        chosen.append(ranked[0].node)
        signals.started(ranked[0].url)
    assert Counter(chosen) == {"b": 4, "c": 4}  # until all three hold 4
    signals.finished("http://a")
    assert pipeline.rank(PickRequest("m", text("8 unrelated prompt", 200)), EPS, signals)[0].node == "a"


def test_load_wins_over_a_short_shared_opening():
    pipeline, signals = profile(), EndpointSignals()
    opening = text("Hello", 16)
    pipeline.rank(PickRequest("m", opening + text("first topic", 64)), EPS, signals)  # to a
    signals.started("http://a")
    # A third of the prompt matches on a, which is busier: load decides.
    assert pipeline.rank(PickRequest("m", opening + text("other topic", 32)), EPS, signals)[0].node != "a"
    # Most of the prompt matches on a: affinity decides, busier or not.
    assert pipeline.rank(PickRequest("m", opening + text("first topic", 56)), EPS, signals)[0].node == "a"


def test_a_shared_index_queues_its_records_and_merges_without_queueing():
    index = PrefixIndex(max_entries=100)
    outbox = index.share(max_pending=2)
    blocks = prompt_blocks("m", text("sys", 4 * BLOCK), BLOCK, 64)

    index.record(blocks, "http://a")
    index.merge(blocks, "http://b")  # what another replica sent: matched, never sent on
    index.record(blocks[:1], "http://c")
    index.record(blocks[:2], "http://c")

    assert index.match(blocks, ["http://a", "http://b", "http://c"]) == [4, 4, 2]
    assert list(outbox) == [(tuple(blocks[:1]), "http://c"), (tuple(blocks[:2]), "http://c")]  # bounded


def test_session_affinity_is_one_endpoint_per_session_the_same_in_any_order():
    from mlxpool.router.picking.scorers import SessionAffinityScorer

    eps = [RouteEndpoint(node=f"n{i}", url=f"http://n{i}") for i in range(8)]
    scorer_ = SessionAffinityScorer()

    def holder(session: str | None, endpoints: list[RouteEndpoint]) -> str | None:
        scores = scorer_.score(PickRequest("m", session=session), endpoints, EndpointSignals())
        assert sorted(scores)[:-1] == [0.0] * (len(endpoints) - 1)
        return endpoints[scores.index(1.0)].node if 1.0 in scores else None

    sessions = [f"conversation-{i}" for i in range(400)]
    placed = {s: holder(s, eps) for s in sessions}
    assert all(holder(s, list(reversed(eps))) == placed[s] for s in sessions)  # another replica's order
    assert min(Counter(placed.values()).values()) > 400 / 8 / 2  # spread over every endpoint
    assert holder(None, eps) is None
    # n3 leaves: only its own conversations move.
    rest = [e for e in eps if e.node != "n3"]
    assert all(holder(s, rest) == placed[s] for s in sessions if placed[s] != "n3")


def test_builtin_prefix_profiles_put_a_session_first():
    strategies = Strategies(load_strategies())
    for name in ("prefix-affinity", "sticky-prefix"):
        pipeline = strategies.for_name(name)
        signals = EndpointSignals()
        first = pipeline.rank(PickRequest("m", text("x", 4 * BLOCK), session="s-1"), EPS, signals)[0]
        for i in range(6):  # other prompts and load do not move it
            assert pipeline.rank(PickRequest("m", text(f"p{i}", 4 * BLOCK), session="s-1"), EPS, signals)[0] == first
    assert set(strategies.prefix_indexes()) == {"prefix-affinity/0/prefix-affinity", "sticky-prefix/0/sticky-prefix"}
