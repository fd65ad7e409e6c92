"""Loading through the native weight manager: bytes, errors, pinning, prefetch.

Real here: the tiny MLX model, MLX's CPU backend, the compiled `mlxpool._native`, the
kernel's mlock/mincore (a child process with RLIMIT_MEMLOCK at one page and no
CAP_IPC_LOCK shows a refusal). Nothing is faked.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlxpool import _native
from mlxpool.agent.engine import loading, weightreading
from mlxpool.agent.engine.interface import LoadOptions
from tests.agent.operations.test_weights import memlock_forbidden, needs_limits


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny shape with 4 layers (so 'critical' is not everything), in bfloat16, in 3 shards."""
    from mlxpool.tinymodel import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "four", layers=4, dtype="bfloat16", shards=3)


@pytest.fixture(scope="module")
def reference(tiny_model: Path):
    import mlx_lm

    model, _ = mlx_lm.load(str(tiny_model))
    return model


def logits(model):
    import mlx.core as mx

    return model(mx.array([[1, 2, 3, 4, 5]]))


def test_native_load_gives_the_same_model_as_mlx_lm(tiny_model: Path, reference):
    import mlx.core as mx

    loaded = loading.load(tiny_model, LoadOptions(pin_policy="none"))
    try:
        assert mx.array_equal(logits(loaded.model), logits(reference)).item()
        report = loaded.weights.report
        assert report.reader == "native" and report.transfer == "copy" and report.files == 1
        assert report.bytes == loaded.info.memory_bytes and report.gbps > 0 and report.pinned_bytes == 0
        where = loaded.weights.residency()
        assert where.total == loaded.info.memory_bytes and where.resident == where.total  # just copied
        assert where.pinned == 0 and where.mapped == 0
        assert loaded.info.weights is loaded.weights
    finally:
        loaded.weights.close()
    assert loaded.weights.residency().total == 0


def test_mlx_lm_reader_when_mmap_is_off(tiny_model: Path, reference):
    import mlx.core as mx

    loaded = loading.load(tiny_model, LoadOptions(native=False, pin_policy="none", prefetch_threads=0))
    assert loaded.weights.report.reader == "mlx" and loaded.weights.report.prefetch_threads == 0
    assert mx.array_equal(logits(loaded.model), logits(reference)).item()
    loaded.weights.close()


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_file_saved_by_mlx_without_metadata_loads(tiny_model: Path, tmp_path: Path, reference):
    """`mx.save_safetensors(path, arrays)` writes `"__metadata__":null` (the H200 kit's model)."""
    import mlx.core as mx

    model = copy_model(tiny_model, tmp_path / "m")
    shard = model / "model.safetensors"
    mx.save_safetensors(str(shard), mx.load(str(shard)))
    assert b'"__metadata__":null' in shard.read_bytes()[:64]
    loaded = loading.load(model, LoadOptions(pin_policy="none"))
    try:
        assert loaded.weights.report.reader == "native"
        assert mx.array_equal(logits(loaded.model), logits(reference)).item()
    finally:
        loaded.weights.close()


def test_a_truncated_shard_fails_naming_file_and_offset(tiny_model: Path, tmp_path: Path):
    model = copy_model(tiny_model, tmp_path / "m")
    shard = model / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{shard}: offset \d+: tensor '.*': data ends at \d+, past the end"):
        loading.load(model)
    shard.write_bytes(data[:100])
    with pytest.raises(ValueError, match=rf"{shard}: offset 0: header of \d+ bytes runs past the end"):
        loading.load(model)


def test_a_malformed_header_fails_naming_the_offset(tiny_model: Path, tmp_path: Path):
    model = copy_model(tiny_model, tmp_path / "m")
    shard = model / "model.safetensors"
    data = bytearray(shard.read_bytes())
    at = data.index(b'"dtype"', 8)
    data[at:at + 7] = b'"dtyp" '  # an unknown key where `dtype` was
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{shard}: offset {at}: tensor '.*': unexpected or repeated key 'dtyp'"):
        loading.load(model)


def test_layer_order_and_what_critical_means():
    names = ["lm_head.weight", "model.norm.weight", "model.layers.10.mlp.w", "model.layers.2.mlp.w",
             "model.layers.0.input_layernorm.weight", "model.layers.2.input_layernorm.weight",
             "model.embed_tokens.weight"]
    assert weightreading.layer_groups(names) == [
        ["model.embed_tokens.weight"], ["model.layers.0.input_layernorm.weight"],
        ["model.layers.2.input_layernorm.weight", "model.layers.2.mlp.w"], ["model.layers.10.mlp.w"],
        ["lm_head.weight", "model.norm.weight"],
    ]
    critical = weightreading.pin_order(names, "critical")
    assert set(critical) == {"model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                             "model.layers.2.input_layernorm.weight", "model.layers.10.mlp.w",
                             "lm_head.weight", "model.norm.weight"}
    everything = weightreading.pin_order(names, "all")
    assert everything[: len(critical)] == critical and everything[-1] == "model.layers.2.mlp.w"
    assert weightreading.pin_order(names, "none") == []


@pytest.mark.parametrize("depth", [1, 3])
def test_the_prefetch_runs_prefetch_depth_layers_ahead_of_the_copy(four_layers: Path, monkeypatch, depth: int):
    """weight_management.prefetch_depth: before layer group k is copied, the pool has been
    given groups 0..k+depth (in layer order) and no more; prefetch_threads sizes the pool."""
    events: list[tuple[str, tuple[str, int]]] = []
    pools: list[int] = []
    real_copy = weightreading._from_mapping

    class Recording:  # the native pool's interface, recording instead of paging in
        def __init__(self, threads: int) -> None:
            pools.append(threads)

        def submit(self, file: _native.SafetensorsFile, begin: int, nbytes: int) -> None:
            events.append(("submit", (file.path, begin)))

        def close(self) -> None:
            events.append(("close", ("", 0)))

    def copy(t):
        events.append(("copy", (t.file.path, t.begin)))
        return real_copy(t)

    monkeypatch.setattr(weightreading._native, "Prefetcher", Recording)
    monkeypatch.setattr(weightreading, "_from_mapping", copy)
    loaded = loading.load(four_layers, LoadOptions(pin_policy="none", prefetch_threads=3, prefetch_depth=depth))
    loaded.weights.close()
    assert pools == [3] and events[-1][0] == "close"
    files = [_native.SafetensorsFile(str(p)) for p in sorted(four_layers.glob("model*.safetensors"))]
    where = {name: (f.path, begin) for f in files for name, _, _, begin, _ in f.tensors()}
    groups = weightreading.layer_groups(where)
    assert len(groups) == 6  # embeddings, 4 layers, the rest
    group_of = {where[n]: g for g, names in enumerate(groups) for n in names}
    submitted: set[int] = set()
    for kind, at in events[:-1]:
        if kind == "submit":
            submitted.add(group_of[at])
        else:
            k = group_of[at]
            assert submitted == set(range(min(len(groups), k + 1 + depth))), (k, sorted(submitted))


def test_shards_and_bfloat16_load_as_mlx_lm_loads_them(four_layers: Path):
    import mlx.core as mx
    import mlx_lm

    assert len(weightreading.weight_files(four_layers)) == 3
    reference, _ = mlx_lm.load(str(four_layers))
    loaded = loading.load(four_layers, LoadOptions(pin_policy="none"))
    assert loaded.weights.report.files == 3
    assert loaded.model.parameters()["model"]["embed_tokens"]["weight"].dtype == mx.bfloat16
    assert mx.array_equal(logits(loaded.model), logits(reference)).item()
    loaded.weights.close()


def test_pin_policies_and_the_budget(four_layers: Path):
    tiny_model = four_layers
    loaded = loading.load(tiny_model, LoadOptions(pin_policy="all", pin_budget_bytes=1 << 40))
    total = loaded.info.memory_bytes
    report = loaded.weights.report
    where = loaded.weights.residency()
    loaded.weights.close()
    if report.pin_message is not None and "RLIMIT_MEMLOCK" in report.pin_message:
        pytest.skip(f"this host refuses mlock: {report.pin_message}")
    assert report.pin_message is None and report.pinned_bytes >= total  # whole pages
    assert where.pinned == where.total == total  # residency counts the weights' bytes, not their pages
    assert loaded.weights.residency().pinned == 0  # released on close
    critical = loading.load(tiny_model, LoadOptions(pin_policy="critical", pin_budget_bytes=1 << 40))
    assert 0 < critical.weights.report.pinned_bytes < total and critical.weights.residency().pinned > 0
    critical.weights.close()
    small = loading.load(tiny_model, LoadOptions(pin_policy="all", pin_budget_bytes=total // 4))
    assert 0 < small.weights.report.pinned_bytes <= total // 4
    assert "pin budget reached" in (small.weights.report.pin_message or "")
    assert "weight_management.pin_budget_bytes" in (small.weights.report.pin_message or "")
    small.weights.close()


@needs_limits
def test_a_refused_pin_is_a_warning_and_the_model_serves(tiny_model: Path):
    script = (
        "import sys\n"
        "import mlx.core as mx\n"
        "from mlxpool.agent.engine import loading\n"
        "from mlxpool.agent.engine.interface import LoadOptions\n"
        "m = loading.load(sys.argv[1], LoadOptions(pin_policy='all'))\n"
        "out = m.model(mx.array([[1, 2, 3]]))\n"
        "mx.eval(out)\n"
        "print('pinned', m.weights.report.pinned_bytes, 'message', m.weights.report.pin_message)\n"
    )
    done = subprocess.run(memlock_forbidden([sys.executable, "-c", script, str(tiny_model)]),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "message the OS refused to lock more memory" in done.stdout
    assert "RLIMIT_MEMLOCK is 4096 bytes" in done.stdout and "CAP_IPC_LOCK" in done.stdout
    assert "weights not fully pinned" in done.stderr  # the warning in the log


def test_the_prefetch_pool_joins_its_threads(tiny_model: Path):
    shard = _native.SafetensorsFile(str(tiny_model / "model.safetensors"))
    pool = _native.Prefetcher(3)
    assert pool.threads == 3 and pool.running == 3 and not pool.closed
    for _, _, _, begin, nbytes in shard.tensors():
        pool.submit(shard, begin, nbytes)
    pool.wait()
    assert pool.bytes_done == sum(t[4] for t in shard.tensors())
    assert shard.resident_bytes() >= pool.bytes_done
    pool.close()
    assert pool.closed and pool.running == 0 and pool.threads == 0
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(shard, 0, 1)
    with pytest.raises(ValueError, match=r"prefetch threads must be 1\.\.64"):
        _native.Prefetcher(0)


def test_loading_without_prefetch_threads(tiny_model: Path, reference):
    import mlx.core as mx

    loaded = loading.load(tiny_model, LoadOptions(prefetch_threads=0, pin_policy="none"))
    assert loaded.weights.report.prefetch_threads == 0
    assert mx.array_equal(logits(loaded.model), logits(reference)).item()
    loaded.weights.close()


def test_pin_set_reports_refusals_as_errno_not_exceptions():
    import mlx.core as mx

    array = mx.zeros((4096,))
    mx.eval(array)
    pins = _native.PinSet(0)
    assert pins.add(array) == errno.ENOBUFS and pins.bytes == 0
    assert _native.resident_bytes(array) >= 4096 * 4


def test_weights_in_device_memory_are_neither_viewed_nor_pinned(tiny_model: Path, reference):
    """On CUDA (`host_memory=False`): mlx-lm's reader, no host views, no pins; all of it resident."""
    import mlx.core as mx

    from mlxpool.agent.engine import device
    from mlxpool.agent.engine.interface import AcceleratorKind

    assert not device.weights_in_host_memory(AcceleratorKind.CUDA)
    assert device.weights_in_host_memory(AcceleratorKind.CPU) and device.weights_in_host_memory(AcceleratorKind.METAL)
    loaded = loading.load(tiny_model, LoadOptions(pin_policy="critical"), host_memory=False)
    try:
        assert mx.array_equal(logits(loaded.model), logits(reference)).item()
        report = loaded.weights.report
        assert report.reader == "mlx" and report.pinned_bytes == 0
        assert report.pin_message == "not pinned: the weights are in device memory"
        where = loaded.weights.residency()
        assert where.total == where.resident == loaded.info.memory_bytes > 0 and where.pinned == 0
    finally:
        loaded.weights.close()
    assert loaded.weights.residency().total == 0


def test_the_mapping_is_a_read_only_buffer(tiny_model: Path):
    import numpy as np

    f = _native.SafetensorsFile(str(tiny_model / "model.safetensors"))
    view = memoryview(f)
    assert view.readonly and view.nbytes == f.size and view.format == "B"
    _, _, shape, begin, nbytes = f.tensors()[0]
    a = np.frombuffer(f, dtype=np.float32, count=nbytes // 4, offset=begin).reshape(shape)
    with pytest.raises(ValueError):
        a[...] = 0  # the mapping is PROT_READ: numpy refuses the write
    del a, view
