"""The node's memory books and the admission gate, alone (pure: no MLX, no OS)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mlxpool.agent.engine.interface import GenerationRequest, SamplingParams
from mlxpool.agent.engine.memory import (
    KV_STEP_TOKENS,
    MemoryBooks,
    MemoryPolicy,
    Verdict,
    kv_bytes_per_token,
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
