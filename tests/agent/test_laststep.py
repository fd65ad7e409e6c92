"""`engine.laststep`: no forward pass after the last token, same tokens, tokens and KV agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator, GenerationBatch
from mlx_lm.utils import load

from mlxpool.agent.engine import laststep


class Counting:
    """The model, counting its forward passes."""

    def __init__(self, model: Any) -> None:
        self.model, self.calls = model, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Counting:
    laststep.install()
    loaded, _ = load(str(tiny_model))[:2]
    return Counting(loaded)


def run(model: Counting, prompts: list[list[int]], max_tokens: list[int]) -> tuple[dict[int, list[int]], dict, int]:
    """Generate to the end; (tokens per uid, finished responses per uid, forward passes)."""
    model.calls = 0
    generator = BatchGenerator(model, stream=mx.default_stream(mx.default_device()))  # type: ignore[arg-type]
    uids = generator.insert(prompts, max_tokens=max_tokens)
    tokens: dict[int, list[int]] = {u: [] for u in uids}
    finished: dict[int, Any] = {}
    while len(finished) < len(uids):
        _, responses = generator.next()
        for r in responses:
            tokens[r.uid].append(r.token)
            if r.finish_reason is not None:
                finished[r.uid] = r
    generator.close()
    return tokens, finished, model.calls


def test_one_token_takes_the_prompt_pass_and_one_more(model: Counting) -> None:
    prompt = [5, 17, 33, 41, 9]
    one, finished, calls = run(model, [prompt], [1])
    assert calls == 2  # prompt[:-1], then the last prompt token (mlx-lm alone: 3)
    six, _, _ = run(model, [prompt], [6])
    (uid,) = one
    assert one[uid] == six[next(iter(six))][:1]
    response = finished[uid]
    assert response.all_tokens == prompt  # the KV holds the prompt, not the token it never fed
    assert response.prompt_cache[0].offset == len(response.all_tokens)


def test_only_a_step_that_ends_every_sequence_skips_the_pass(model: Counting) -> None:
    prompts, lengths = [[5, 17, 33, 41, 9], [7, 8, 9]], [3, 5]
    together, finished, calls = run(model, prompts, lengths)
    alone = [run(model, [p], [n])[0] for p, n in zip(prompts, lengths, strict=True)]
    assert [together[u] for u in sorted(together)] == [next(iter(a.values())) for a in alone]
    # one prompt pass each group, then decode passes up to the longer one, none after its last
    assert calls == 1 + 5
    for response in finished.values():
        assert response.prompt_cache[0].offset == len(response.all_tokens)


def test_install_is_idempotent() -> None:
    step = GenerationBatch._step
    laststep.install()
    assert GenerationBatch._step is step


def test_an_mlx_lm_without_what_it_relies_on_is_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    class OtherBatch:  # a later mlx-lm: the step is there, the batch's state is not what it reads
        def __init__(self) -> None:
            self.uids: list[int] = []

        def _step(self) -> None: ...

    step = OtherBatch._step
    assert laststep.install(OtherBatch) is False
    assert OtherBatch._step is step
    assert "engine.laststep off" in caplog.text and "_next_tokens" in caplog.text
    assert laststep.install(GenerationBatch) is True  # today's mlx-lm has all of it
