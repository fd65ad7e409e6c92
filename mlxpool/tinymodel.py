"""Make small Llama-architecture models locally: random weights, a real tokenizer.

No model hub is reachable from our machines, and tests and benchmarks need a model that
`mlx_lm.load(path)` opens exactly like a Hugging Face checkout. This module writes one:
`config.json` (model_type llama), float32 weights in `model.safetensors`, and a
byte-level BPE tokenizer trained on a seeded synthetic corpus (`tokenizer.json` +
`tokenizer_config.json` with a chat template). Everything is deterministic from the
seed, so two runs give byte-identical files.

It uses numpy + tokenizers only (no MLX; the safetensors files are written here, numpy has
no bfloat16), so any component may call it.
Float32 on purpose: half types skip BLAS on MLX's CPU backend (see notes/mlx-serving.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
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


DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
MAX_SHARDS = 64


def encode(array: np.ndarray, dtype: str) -> bytes:
    """The tensor's bytes in `dtype` (little-endian); bfloat16 keeps float32's upper half."""
    if dtype == "float32":
        return array.astype("<f4").tobytes()
    if dtype == "float16":
        return array.astype("<f2").tobytes()
    bits = array.astype("<f4").view("<u4")
    return ((bits + 0x8000) >> 16).astype("<u2").tobytes()  # round to nearest


def save_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str, metadata: dict[str, str]) -> None:
    """A safetensors file (header, then the tensors in name order); numpy has no bfloat16."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in sorted(tensors):
        nbytes = tensors[name].size * (4 if dtype == "float32" else 2)
        header[name] = {"dtype": DTYPES[dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name in sorted(tensors):
            f.write(encode(tensors[name], dtype))


def make_tiny(path: str | Path, size: str = "tiny", seed: int = 0, *, layers: int | None = None,
              hidden: int | None = None, intermediate: int | None = None, dtype: str = "float32",
              shards: int = 1) -> Path:
    """Write a model of `size` ('tiny' or 'bench') to `path`; returns the path. `layers`,
    `hidden` and `intermediate` override the size's shape (hidden 2048 with 10 layers is
    ~0.6 GB of float32), `dtype` the weights' type, `shards` splits them over that many files
    (with a model.safetensors.index.json, as Hugging Face checkouts have)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be 1..{MAX_SHARDS}, got {shards}")
    shape, out = SIZES[size], Path(path)
    heads = shape.num_attention_heads
    if hidden is not None and (hidden < heads or hidden % heads or hidden > 16384):
        raise ValueError(f"hidden must be a multiple of {heads} attention heads up to 16384, got {hidden}")
    if layers is not None and not 1 <= layers <= 512:
        raise ValueError(f"layers must be 1..512, got {layers}")
    if intermediate is not None and not 1 <= intermediate <= 65536:
        raise ValueError(f"intermediate must be 1..65536, got {intermediate}")
    shape = replace(shape, num_hidden_layers=layers or shape.num_hidden_layers,
                    hidden_size=hidden or shape.hidden_size,
                    intermediate_size=intermediate or (2 * hidden if hidden else shape.intermediate_size))
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
    config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    weights = random_weights(shape, vocab, seed)
    if shards == 1:
        save_safetensors(out / "model.safetensors", weights, dtype, {"format": "mlx"})
        return out
    names = sorted(weights)
    index: dict[str, str] = {}
    for k in range(shards):
        part = {n: weights[n] for n in names[k::shards]}
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_safetensors(out / file, part, dtype, {"format": "mlx"})
        index |= dict.fromkeys(part, file)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=2))
    return out


def make_variant(base: str | Path, path: str | Path, seed: int = 1, scale: float = 0.01,
                 layers: Collection[int] | None = None) -> Path:
    """A fine-tune of `base` at `path`: the same config, tokenizer, tensor names, shapes and
    file sizes, every weight nudged by seeded noise (what two checkpoints of one run look like).
    `layers`: only those decoder layers' tensors are nudged; every other tensor keeps its
    base's bytes (a fine-tune of a few layers, what shared-tensor accounting finds)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    src, out = Path(base), Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and not item.name.startswith(".") and item.name != "model.safetensors":
            shutil.copy2(item, out / item.name)
    rng = np.random.default_rng(seed)
    def changed(name: str) -> bool:
        return layers is None or any(name.startswith(f"model.layers.{k}.") for k in layers)

    weights = {name: (value + rng.standard_normal(value.shape, dtype=np.float32) * scale).astype(value.dtype)
               if changed(name) else value
               for name, value in load_file(str(src / "model.safetensors")).items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "mlx"})
    return out


LORA_KEYS = ("self_attn.q_proj", "self_attn.v_proj")


def make_adapter(base: str | Path, path: str | Path, seed: int = 1, rank: int = 4, scale: float = 2.0) -> Path:
    """A LoRA adapter of `base` at `path`, in mlx-lm's format (`adapter_config.json` +
    `adapters.safetensors`, what `mlx_lm.lora` trains and `mlx_lm.tuner.utils.load_adapters`
    reads): seeded `lora_a`/`lora_b` on every layer's q and v projections. Unlike a fresh
    LoRA (`lora_b` zero), `lora_b` is random too, so the adapter changes the output."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    src, out = Path(base), Path(path)
    config = json.loads((src / "config.json").read_text())
    layers = int(config["num_hidden_layers"])
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    with safe_open(str(src / "model.safetensors"), framework="numpy") as f:
        for i in range(layers):
            for key in LORA_KEYS:
                out_dims, in_dims = f.get_slice(f"model.layers.{i}.{key}.weight").get_shape()
                bound = 1 / np.sqrt(in_dims)
                prefix = f"model.layers.{i}.{key}"
                tensors[f"{prefix}.lora_a"] = rng.uniform(-bound, bound, (in_dims, rank)).astype(np.float32)
                tensors[f"{prefix}.lora_b"] = (rng.standard_normal((rank, out_dims)) * 0.05).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapters.safetensors"), metadata={"format": "mlx"})
    (out / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": layers, "base_model": src.name,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": list(LORA_KEYS)},
        "mlxpool": {"seed": seed},
    }, indent=2, sort_keys=True))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlxpool model", description="Local model tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-tiny", help="make a small random Llama model with a real tokenizer")
    mk.add_argument("path", type=Path)
    mk.add_argument("--size", choices=sorted(SIZES), default="tiny")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--layers", type=int, help="decoder layers (overrides the size's)")
    mk.add_argument("--hidden", type=int, help="hidden size (overrides the size's; intermediate 2x)")
    mk.add_argument("--intermediate", type=int, help="MLP width (overrides)")
    mk.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    mk.add_argument("--shards", type=int, default=1, help=f"weight files, 1..{MAX_SHARDS}")
    args = parser.parse_args(argv)
    try:
        out = make_tiny(args.path, args.size, args.seed, layers=args.layers, hidden=args.hidden,
                        intermediate=args.intermediate, dtype=args.dtype, shards=args.shards)
    except ValueError as exc:
        parser.error(str(exc))

    print(f"made {args.size} model at {out}")  # noqa: T201 (the command's output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
