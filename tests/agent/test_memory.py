"""The node's memory books and the admission gate, alone (pure: no MLX, no OS)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mlxpool.agent.engine.interface import GenerationRequest, SamplingParams
from mlxpool.agent.engine.memory import (
    KV_STEP_TOKENS,
    MemoryBooks,
    MemoryPolicy,
    PrefillShape,
    Verdict,
    kv_bytes_per_token,
    prefill_scratch_bytes,
    prefill_shape,
    projected_kv_bytes,
)
from mlxpool.agent.engine.memorybudget import MemoryBudget
from mlxpool.agent.engine.memorygate import MemoryGate
from mlxpool.agent.errors import InsufficientMemory

MIB = 1 << 20


def books(capacity=100 * MIB, headroom=10 * MIB, pressure=5 * MIB, long=8 * MIB, weights=40 * MIB) -> MemoryBooks:
    b = MemoryBooks(MemoryPolicy(capacity, headroom, pressure, long))
    b.add_weights("m", weights)
    return b


def test_kv_sizing_follows_the_model_config():
    config = {"num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 512}
    assert kv_bytes_per_token(config, 4) == 2 * 8 * 2 * 64 * 4
    assert kv_bytes_per_token({"text_config": config}, 2) == 2 * 8 * 2 * 64 * 2
    with pytest.raises(ValueError, match="KV sizing"):
        kv_bytes_per_token({}, 4)
    assert projected_kv_bytes(10, 20, 100) == KV_STEP_TOKENS * 100
    assert projected_kv_bytes(200, 57, 1) == 2 * KV_STEP_TOKENS


def test_the_budget_is_capacity_less_headroom_and_weights():
    b = books()
    budget: MemoryBudget = b  # the scheduler's protocol (issue 9), checked by mypy
    assert budget.reserved_bytes == 0
    assert b.kv_budget_bytes == 50 * MIB
    assert b.can_hold(50 * MIB) and not b.can_hold(50 * MIB + 1)
    assert b.reserve("a", 30 * MIB) and not b.reserve("b", 30 * MIB) and b.reserved_bytes == 30 * MIB
    assert b.reserve("a", 10 * MIB) and b.reserved_bytes == 10 * MIB  # replaces what `a` held
    assert b.release("a") == 10 * MIB and b.release("a") == 0 and b.reserved_bytes == 0
    b.remove_weights("m")
    assert b.kv_budget_bytes == 90 * MIB


def test_decisions():
    b = books()
    assert b.decide(60 * MIB, None).verdict is Verdict.REFUSE  # never fits
    assert b.decide(60 * MIB, None).shortfall_bytes == 10 * MIB
    assert b.decide(20 * MIB, None).verdict is Verdict.ADMIT
    b.reserve("a", 35 * MIB)
    b.set_prefix_bytes("m", 10 * MIB)
    decision = b.decide(10 * MIB, None)  # 5 free, 10 of prefix cache: shed 5
    assert decision.verdict is Verdict.SHED_THEN_ADMIT and decision.shortfall_bytes == 5 * MIB
    decision = b.decide(20 * MIB, None)
    assert decision.verdict is Verdict.WAIT and decision.shortfall_bytes == 5 * MIB
    # Under pressure (4 MiB available < 5): long requests refused, short ones still decided by room.
    pressed = b.decide(9 * MIB, 4 * MIB)
    assert pressed.verdict is Verdict.REFUSE and "memory pressure" in pressed.reason
    assert b.decide(1 * MIB, 4 * MIB).verdict is Verdict.ADMIT
    assert set(b.snapshot()) >= {"kv_budget_bytes", "kv_reserved_bytes", "prefix_cache_bytes", "weights_bytes"}


@dataclass
class Seq:
    request: GenerationRequest


@dataclass
class Prefix:
    nbytes: int = 0

    def shed(self, nbytes: int) -> int:
        freed = min(nbytes, self.nbytes)
        self.nbytes -= freed
        return freed


def seq(rid: str, prompt: int, max_tokens: int) -> Seq:
    return Seq(GenerationRequest(request_id=rid, prompt_tokens=tuple(range(prompt)),
                                 sampling=SamplingParams(max_tokens=max_tokens)))


def test_the_gate_admits_by_projected_bytes_waits_bounded_and_refuses_clearly():
    now = [0.0]
    available: list[int | None] = [None]
    b = books()  # 50 MiB of KV budget
    gate = MemoryGate(b, "m", kv_bytes_per_token=MIB // KV_STEP_TOKENS * 4, available=lambda: available[0],
                      wait_seconds=2.0, clock=lambda: now[0])  # 4 MiB per 256 tokens
    big = seq("big", 3000, 100)  # 13 steps: 52 MiB, more than the budget
    refusal = gate.refuse_on_arrival(big.request)
    assert isinstance(refusal, InsufficientMemory) and refusal.status_code == 503
    assert "exceeds this node's whole KV budget" in str(refusal) and "short by" in str(refusal)
    assert refusal.param == "max_tokens"
    a, b2, c = seq("a", 2000, 48), seq("b", 2000, 48), seq("c", 10, 10)  # 32, 32, 4 MiB
    prefix = Prefix()
    go, back, refused = gate.admit([a, b2, c], prefix)
    assert go == [a] and back == [b2, c] and refused == []  # c keeps its place behind b
    assert gate.books.reserved_bytes == 32 * MIB
    now[0] = 2.5
    go, back, refused = gate.admit([b2, c], prefix)  # b waited too long; c fits behind it
    assert go == [c] and back == [] and [s for s, _ in refused] == [b2]
    assert "memory_wait_seconds" in str(refused[0][1])
    gate.done("a")
    gate.done("c")
    assert gate.books.reserved_bytes == 0
    # The prefix cache is shed to make room, and entirely under pressure.
    prefix.nbytes = 45 * MIB
    gate.prefix_changed(prefix.nbytes)
    d = seq("d", 2000, 48)
    go, _, _ = gate.admit([d], prefix)
    assert go == [d] and prefix.nbytes == 18 * MIB
    available[0] = 1 * MIB
    gate.admit([], prefix)
    assert prefix.nbytes == 0 and gate.shed_bytes == 45 * MIB


def test_weight_management_keys_reach_the_books_and_the_engine(tmp_path):
    from mlxpool.agent import runtime
    from mlxpool.agent.config import load_runtime_config

    path = tmp_path / "runtime.yaml"
    path.write_text("weight_management:\n  memory_capacity_bytes: 1000000\n  memory_headroom_bytes: 1000\n"
                    "  memory_pressure_free_bytes: 2000\n  long_request_kv_bytes: 3000\n  memory_wait_seconds: 4\n"
                    "  mlx_cache_limit_bytes: 5000\n  use_mmap: false\n  pin_policy: all\n  pin_budget_bytes: 6000\n"
                    "  prefetch_threads: 3\n  prefetch_depth: 5\n")
    weights = load_runtime_config(path, environ={}).weight_management
    books = runtime._memory_books(weights)
    assert books is not None and books.policy == MemoryPolicy(1000000, 1000, 2000, 3000)
    assert runtime._memory_books(weights.model_copy(update={"memory_admission": False})) is None
    detected = runtime._memory_books(weights.model_copy(update={"memory_capacity_bytes": None}))
    assert detected is not None and detected.policy.capacity_bytes > 1 << 20  # physical or cgroup
    config = runtime.AgentRuntime.engine_config(_Holder(load_runtime_config(path, environ={})))  # type: ignore[arg-type]
    assert config.memory_wait_s == 4 and config.mlx_cache_limit_bytes == 5000
    assert (config.load.native, config.load.pin_policy, config.load.pin_budget_bytes) == (False, "all", 6000)
    assert (config.load.prefetch_threads, config.load.prefetch_depth) == (3, 5)


BENCH = {"num_attention_heads": 8, "vocab_size": 5113, "hidden_size": 512, "intermediate_size": 1024}


def test_prefill_scratch_is_the_padded_chunk_against_every_key():
    shape = prefill_shape(BENCH, 4)
    assert shape == PrefillShape(heads=8, vocab=5113, intermediate=1024, itemsize=4)
    per_token = 5113 * 4 + 3 * 1024 * 4
    # 1,600 tokens: one chunk padded to 2,048, scores 8 x 2,048 x 2,048 floats (the measured
    # peak of that prefill on the CPU was 163 MiB; this says 192 MiB).
    assert prefill_scratch_bytes(1600, shape, 2048) == 2048 * (8 * 2048 * 4 + per_token)
    assert prefill_scratch_bytes(100, shape, 2048) == 128 * (8 * 128 * 4 + per_token)
    # Longer than a step: chunks of 2,048, the last against all 5,000 keys.
    assert prefill_scratch_bytes(5000, shape, 2048) == 2048 * (8 * 5000 * 4 + per_token)
    assert prefill_scratch_bytes(0, shape, 2048) == 0 and prefill_scratch_bytes(100, None, 2048) == 0
    assert prefill_shape({"hidden_size": 512}, 4) is None  # no heads or vocab: nothing counted
    assert prefill_shape({"text_config": BENCH}, 2) == PrefillShape(8, 5113, 1024, 2)


def test_the_gate_holds_prefill_scratch_until_the_prompt_is_processed():
    """Prompts prefilled together each hold their scratch: the books let in only what fits
    with it (a 900 MiB cgroup soak was OOM-killed when five 1,600-token prompts were admitted
    by their KV alone and prefilled in one batch), and give it back once the prompt is done."""
    shape = prefill_shape(BENCH, 4)
    b = books(capacity=700 * MIB, headroom=0, weights=100 * MIB)  # 600 MiB of budget
    gate = MemoryGate(b, "m", kv_bytes_per_token=32768, available=lambda: None, wait_seconds=60.0,
                      prefill=shape, prefill_step=2048)
    first, second, third = seq("a", 1600, 200), seq("b", 1600, 200), seq("c", 1600, 200)
    kv, scratch = gate.projected(first.request), gate.scratch(first.request)
    assert kv == 8 * 256 * 32768 and scratch == prefill_scratch_bytes(1600, shape, 2048)
    assert gate.refuse_on_arrival(first.request) is None
    go, back, refused = gate.admit([first, second, third], Prefix())
    assert go == [first, second] and back == [third] and refused == []  # 2 x (64 + 192) MiB fit, not 3
    assert b.reserved_bytes == 2 * (kv + scratch)
    gate.prefilled(first.request)
    gate.prefilled(second.request)
    assert b.reserved_bytes == 2 * kv  # the KV stays until they end
    go, _, _ = gate.admit([third], Prefix())
    assert go == [third]
    gate.done("a")
    gate.prefilled(first.request)  # after its end (a cancel): nothing comes back
    assert b.reserved_bytes == kv + kv + scratch
    # A prompt whose scratch alone exceeds the budget can never be prefilled: refused on arrival, saying so.
    refusal = gate.refuse_on_arrival(seq("long", 2000, 10).request)
    assert refusal is None
    huge = gate.refuse_on_arrival(seq("huge", 8000, 10).request)
    assert isinstance(huge, InsufficientMemory) and "prefill scratch" in str(huge)


@dataclass
class _Holder:
    runtime: object

    @property
    def config(self) -> _Holder:
        return self


def test_cgroup_files_v1_and_v2(tmp_path):
    from mlxpool.agent.node import memoryinfo

    v2 = tmp_path / "app"
    v2.mkdir()
    (v2 / "memory.max").write_text("1048576\n")
    (v2 / "memory.current").write_text("4096\n")
    files = memoryinfo.cgroup_files("0::/app\n", root=tmp_path)
    assert memoryinfo.cgroup_limit_and_usage(files) == (1048576, 4096)
    (v2 / "memory.max").write_text("max\n")
    assert memoryinfo.cgroup_limit_and_usage(files) == (None, 4096)
    v1 = tmp_path / "memory" / "box"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    (v1 / "memory.usage_in_bytes").write_text("10\n")
    files = memoryinfo.cgroup_files("4:memory:/box\n0::/\n", root=tmp_path)
    assert files is not None and files[0].name == "memory.limit_in_bytes"
    assert memoryinfo.cgroup_limit_and_usage(files) == (None, 10)
    assert memoryinfo.cgroup_files("1:cpu:/\n", root=tmp_path) is None
    assert memoryinfo.capacity_bytes() > 0 and (memoryinfo.available_bytes() or 1) > 0
