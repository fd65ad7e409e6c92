"""Make small Llama-architecture models locally: random weights, a real tokenizer.

No model hub is reachable from our machines, and tests and benchmarks need a model that
`mlx_lm.load(path)` opens exactly like a Hugging Face checkout. This module writes one:
`config.json` (model_type llama), float32 weights in `model.safetensors`, and a
byte-level BPE tokenizer trained on a seeded synthetic corpus (`tokenizer.json` +
`tokenizer_config.json` with a chat template). Everything is deterministic from the
seed, so two runs give byte-identical files.

It uses numpy + safetensors + tokenizers only (no MLX), so any component may call it.
Float32 on purpose: half types skip BLAS on MLX's CPU backend (see notes/mlx-serving.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int  # target; the trained tokenizer decides the final size


SIZES: dict[str, Shape] = {
    # Loads in well under a second; for tests.
    "tiny": Shape(64, 2, 4, 2, 128, 512),
    # About 25M parameters (hidden 512, 8 layers); for benchmarks.
    "bench": Shape(512, 8, 8, 8, 1024, 8192),
}

_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ng", "qu"]
_PHRASES = (
    "The quick brown fox jumps over the lazy dog. Apple Silicon machines serve models. "
    "Kubernetes reconciles the desired state. Hello, world! What is the capital of France? "
    "Once upon a time there was a fleet of small computers. 0123456789 + - * / = ( ) [ ] { }"
)


if TYPE_CHECKING:  # imported when used: training a tokenizer is the slow part
    from tokenizers import Tokenizer


def synthetic_corpus(seed: int, lines: int = 4000) -> list[str]:
    """Seeded pseudo-text: enough distinct words for the BPE trainer to fill a vocabulary."""
    rng = np.random.default_rng(seed)
    words = [
        "".join(rng.choice(_SYLLABLES, size=int(rng.integers(1, 4)))) for _ in range(3000)
    ]
    corpus = [_PHRASES] * 20
    for _ in range(lines):
        picked = rng.choice(words, size=int(rng.integers(4, 16)))
        corpus.append(" ".join(picked).capitalize() + rng.choice([".", "?", "!", ","]))
    return corpus


def train_tokenizer(vocab_size: int, seed: int) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(seed), trainer=trainer)
    return tok


def random_weights(shape: Shape, vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, kv = shape.hidden_size, shape.num_key_value_heads
    head_dim = h // shape.num_attention_heads

    def w(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float32)

    weights = {"model.embed_tokens.weight": w(vocab, h), "model.norm.weight": np.ones(h, np.float32)}
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}"
        weights |= {
            f"{p}.self_attn.q_proj.weight": w(h, h),
            f"{p}.self_attn.k_proj.weight": w(kv * head_dim, h),
            f"{p}.self_attn.v_proj.weight": w(kv * head_dim, h),
            f"{p}.self_attn.o_proj.weight": w(h, h),
            f"{p}.mlp.gate_proj.weight": w(shape.intermediate_size, h),
            f"{p}.mlp.up_proj.weight": w(shape.intermediate_size, h),
            f"{p}.mlp.down_proj.weight": w(h, shape.intermediate_size),
            f"{p}.input_layernorm.weight": np.ones(h, np.float32),
            f"{p}.post_attention_layernorm.weight": np.ones(h, np.float32),
        }
    return weights


def make_tiny(path: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a model of `size` ('tiny' or 'bench') to `path`; returns the path."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    from safetensors.numpy import save_file

    shape, out = SIZES[size], Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(shape.vocab_size, seed)
    vocab = tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": False, "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2)
    )
    config = asdict(shape) | {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "tie_word_embeddings": True, "torch_dtype": "float32",
        "bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS),
        "mlxpool": {"size": size, "seed": seed},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(random_weights(shape, vocab, seed), str(out / "model.safetensors"), metadata={"format": "mlx"})
    return out


def make_variant(base: str | Path, path: str | Path, seed: int = 1, scale: float = 0.01) -> Path:
    """A fine-tune of `base` at `path`: the same config, tokenizer, tensor names, shapes and
    file sizes, every weight nudged by seeded noise (what two checkpoints of one run look like)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    src, out = Path(base), Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and not item.name.startswith(".") and item.name != "model.safetensors":
            shutil.copy2(item, out / item.name)
    rng = np.random.default_rng(seed)
    weights = {name: (value + rng.standard_normal(value.shape, dtype=np.float32) * scale).astype(value.dtype)
               for name, value in load_file(str(src / "model.safetensors")).items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "mlx"})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlxpool model", description="Local model tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-tiny", help="make a small random Llama model with a real tokenizer")
    mk.add_argument("path", type=Path)
    mk.add_argument("--size", choices=sorted(SIZES), default="tiny")
    mk.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_tiny(args.path, args.size, args.seed)

    print(f"made {args.size} model at {out}")  # noqa: T201 (the command's output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
