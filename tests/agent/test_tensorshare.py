"""The tensor share and the memory books' count of shared tensors (pure: no MLX, no agent).

The real-agent test (a fine-tune loaded beside its base) is in
tests/agent/operations/test_adapters.py; here the bookkeeping's edge cases, fast."""

from __future__ import annotations

from mlxpool.agent.engine.memory import MemoryBooks, MemoryPolicy
from mlxpool.agent.engine.tensorshare import TensorShare


def test_a_tensor_is_held_once_while_any_model_holds_it() -> None:
    share = TensorShare()
    a1, a2 = object(), object()
    assert share.offer("a", "d1", a1, 100) and share.offer("a", "d2", a2, 50)
    assert share.candidate("a", "d1") is None  # its own: nothing to share with itself
    assert share.candidate("b", "d1") is a1
    assert share.join("b", "d1", a1)
    assert not share.join("b", "d1", a1)  # a second tensor of b's with that digest stays b's own
    assert not share.join("b", "d2", object())  # not the held array: refused
    assert not share.offer("b", "d2", object(), 50)  # held already (by a): b keeps its own
    assert share.saved_bytes == 100 and share.shared_bytes("a") == share.shared_bytes("b") == 100
    assert share.held_by("b") == {"d1": 100} and share.held_bytes == 150
    share.release("a")  # the model that brought it goes: b still holds it
    assert share.candidate("c", "d1") is a1 and share.saved_bytes == 0 and share.held_bytes == 100
    share.release("b")
    assert share.candidate("c", "d1") is None and share.held_bytes == 0
    assert not share.join("c", "d1", a1)  # gone meanwhile: the caller offers its own


def test_the_books_count_a_shared_tensor_once_until_its_last_holder_goes() -> None:
    books = MemoryBooks(MemoryPolicy(capacity_bytes=10_000, headroom_bytes=1_000, pressure_free_bytes=0,
                                     long_request_bytes=0))
    books.add_weights("base", 300, shared={"d1": 1_000, "d2": 500})
    books.add_weights("tuned", 200, shared={"d1": 1_000})
    assert books.weights_bytes == 300 + 200 + 1_000 + 500
    assert books.shared_bytes_saved == 1_000 and books.kv_budget_bytes == 9_000 - 2_000
    books.remove_weights("base")
    assert books.weights_bytes == 200 + 1_000 and books.shared_bytes_saved == 0
    books.remove_weights("tuned")
    assert books.weights_bytes == 0
    books.add_weights("plain", 700)  # no share: as before
    assert books.weights_bytes == 700 and books.shared_bytes_saved == 0
