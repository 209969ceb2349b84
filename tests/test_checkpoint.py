"""DiT checkpoint loading (engine/checkpoint.py, CHECKPOINTS.md §1-§2).

What these catch: a loader that changes any bit of a weight (all layouts: sharded + index,
single file, zstd shards, mixed), that casts wrongly or ignores stored rope bands (DIT.md §4.5),
that accepts a mismatched checkpoint silently or reads data before finding the mismatch, and
one that keeps a second copy of the weights in host memory.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
import zstandard

import engine.checkpoint as ck
from engine.config import LOCAL_ATTN_LAYERS_1080P, DiTConfig, full_config, preview_config
from engine.dit import DiTModel, FourierRope, init_seeded

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
TSV = SHARED / "spec" / "DIT_STATE_DICT.tsv"


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view for bitwise comparison."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert list(got) == list(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype, name
        assert got[name].shape == want.shape, name
        assert torch.equal(bits(got[name]), bits(want)), name


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    """Seeded preview weights in module dtypes (bf16 block linears, fp32 rest)."""
    model = DiTModel(preview_config())
    init_seeded(model, 1234)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def no_data_reads(monkeypatch):
    """Fail the test if any tensor data is read (only headers may be)."""

    def boom(*args, **kwargs):
        raise AssertionError("tensor data was read before the checkpoint was validated")

    monkeypatch.setattr(ck, "_load_shard", boom)


def shard_bytes(sd: dict[str, torch.Tensor], parts: int) -> int:
    return sum(t.nbytes for t in sd.values()) // parts + 1


# --------------------------------------------------------------------------- manifest


def test_manifest_of_meta_model_equals_tsv():
    from_model = ck.expected_manifest(full_config())
    from_tsv = ck.load_manifest_tsv(TSV)
    assert len(from_tsv) == 331
    assert list(from_model.items()) == list(from_tsv.items())  # same names, order, shapes, dtypes
    numel = {k: torch.Size(s).numel() for k, (s, _) in from_tsv.items()}
    assert sum(n for k, n in numel.items() if k != ck.ROPE_BANDS_KEY) == 15_299_419_136
    assert sum(n for k, n in numel.items() if from_tsv[k][1] == torch.bfloat16) == 15_277_834_240


def test_manifest_tsv_rejects_bad_line(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("name\tshape\tdtype\nfoo\t[1, 2]\tnotadtype\n")
    with pytest.raises(ValueError, match=r"bad.tsv:2"):
        ck.load_manifest_tsv(bad)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("layout", ["sharded", "single", "zstd"])
def test_roundtrip_bitwise(tmp_path, source, layout):
    max_shard = None if layout == "single" else shard_bytes(source, 4)
    files = ck.save_dit_checkpoint(source, tmp_path, max_shard_bytes=max_shard, compress=layout == "zstd")
    names = sorted(p.name for p in tmp_path.iterdir())
    if layout == "single":
        assert names == ["model.safetensors"]
    else:
        suffix = ".safetensors.zst" if layout == "zstd" else ".safetensors"
        n = len(files) - 1
        assert n >= 4
        assert names == sorted([f"model-{i:05d}-of-{n:05d}{suffix}" for i in range(1, n + 1)] + [ck.INDEX_NAME])
        index = json.loads((tmp_path / ck.INDEX_NAME).read_text())
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in source.values())
        assert set(index["weight_map"]) == set(source)
        assert all(v.endswith(".safetensors") for v in index["weight_map"].values())

    # Our files are valid safetensors for the reference library.
    first = files[0]
    raw = first.read_bytes()
    if layout == "zstd":  # one frame that records its uncompressed size
        size = zstandard.get_frame_parameters(raw[:18]).content_size
        raw = zstandard.ZstdDecompressor().decompress(raw)
        assert size == len(raw)
    for name, t in safetensors.torch.load(raw).items():
        assert torch.equal(bits(t), bits(source[name])), name

    model = ck.load_dit(tmp_path, preview_config(), progress=False)
    assert_bitwise(model, source)
    assert not model.training
    assert all(not p.requires_grad and p.device.type == "cpu" for p in model.parameters())


def test_reads_file_written_by_safetensors(tmp_path, source):
    safetensors.torch.save_file(source, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert_bitwise(ck.load_dit(tmp_path, preview_config(), progress=False, workers=1), source)


def test_fp32_shard_cast_and_bf16_rope_bands_used_as_stored(tmp_path, source):
    """A shard stored in fp32 (values not representable in bf16) is cast with round-to-nearest-even
    into the bf16 module; bf16-rounded bands in the file replace the formula (DIT.md §4.5); shards
    compressed by another writer (no content size in the frame) mix with plain ones."""
    ck.save_dit_checkpoint(source, tmp_path, max_shard_bytes=shard_bytes(source, 4))
    weight_map = json.loads((tmp_path / ck.INDEX_NAME).read_text())["weight_map"]
    expected = dict(source)
    gen = torch.Generator().manual_seed(7)

    bf16_name = next(k for k, v in source.items() if v.dtype == torch.bfloat16)
    fp32_shard = weight_map[bf16_name]
    shard = safetensors.torch.load_file(tmp_path / fp32_shard)
    for name, t in shard.items():
        stored = t.float() + torch.randn(t.shape, generator=gen) * 1e-3  # off the bf16 grid
        shard[name] = stored
        expected[name] = stored.to(source[name].dtype)
    safetensors.torch.save_file(shard, tmp_path / fp32_shard)
    assert not torch.equal(shard[bf16_name].to(torch.bfloat16).float(), shard[bf16_name])

    bands_shard = weight_map[ck.ROPE_BANDS_KEY]
    shard = safetensors.torch.load_file(tmp_path / bands_shard)
    shard[ck.ROPE_BANDS_KEY] = source[ck.ROPE_BANDS_KEY].to(torch.bfloat16)
    expected[ck.ROPE_BANDS_KEY] = shard[ck.ROPE_BANDS_KEY].float()
    safetensors.torch.save_file(shard, tmp_path / bands_shard)
    assert not torch.equal(expected[ck.ROPE_BANDS_KEY], source[ck.ROPE_BANDS_KEY])

    # Compress one other shard the way `zstd` does (streamed, no content size) and drop the original.
    other = next(s for s in sorted(set(weight_map.values())) if s not in (fp32_shard, bands_shard))
    with open(tmp_path / other, "rb") as src, open(tmp_path / (other + ".zst"), "wb") as dst:
        zstandard.ZstdCompressor(level=1).copy_stream(src, dst)
    (tmp_path / other).unlink()

    info = ck.inspect_checkpoint(tmp_path)
    assert info.tensors[bf16_name].dtype == torch.float32
    assert info.tensors[ck.ROPE_BANDS_KEY].dtype == torch.bfloat16
    assert {s.name: s.compressed for s in info.shards}[other]

    model = ck.load_dit(tmp_path, preview_config(), progress=False)
    assert_bitwise(model, expected)
    assert model.adapter.rope.bands.dtype == torch.float32


def test_missing_rope_bands_keep_formula(tmp_path, source, caplog):
    partial = {k: v for k, v in source.items() if k != ck.ROPE_BANDS_KEY}
    ck.save_dit_checkpoint(partial, tmp_path, max_shard_bytes=None)
    with caplog.at_level("INFO", logger="engine.checkpoint"):
        model = ck.load_dit(tmp_path, preview_config(), progress=False)
    formula = FourierRope(preview_config().head_dim).bands
    assert torch.equal(bits(model.adapter.rope.bands), bits(formula))
    assert_bitwise(model, source)  # the seeded source holds the formula bands too
    assert any(ck.ROPE_BANDS_KEY in r.getMessage() for r in caplog.records)


def test_config_json_and_1080p_variant(tmp_path, source):
    directory = tmp_path / "1080p_sr"
    ck.save_dit_checkpoint(source, directory, max_shard_bytes=shard_bytes(source, 2), compress=True)
    (directory / "config.json").write_text(json.dumps({"model_config": preview_config().to_dict()}))
    model = ck.load_dit(directory, progress=False)
    assert model.config.hidden_size == preview_config().hidden_size
    layers = preview_config().num_layers
    assert model.config.local_attn_layers == tuple(i for i in LOCAL_ATTN_LAYERS_1080P if i < layers)
    assert_bitwise(model, source)
    assert ck.load_dit(directory, progress=False, variant="base").config.local_attn_layers == ()


# --------------------------------------------------------------------------- errors before any data read


def test_mismatch_is_one_error_naming_each(tmp_path, source, no_data_reads):
    bad = dict(source)
    missing = "block.layers.2.mlp.down_proj.weight"
    del bad[missing]
    bad["block.layers.0.attention.extra.weight"] = torch.zeros(3)
    bad["final_norm_audio.weight"] = torch.zeros(source["final_norm_audio.weight"].numel() + 1)
    bad["adapter.audio_embedder.bias"] = torch.zeros(source["adapter.audio_embedder.bias"].shape, dtype=torch.int64)
    ck.save_dit_checkpoint(bad, tmp_path, max_shard_bytes=shard_bytes(bad, 3))
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_dit(tmp_path, preview_config(), progress=False)
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert err.value.missing == [missing]
    assert err.value.unexpected == ["block.layers.0.attention.extra.weight"]
    assert set(err.value.misshapen) == {"final_norm_audio.weight", "adapter.audio_embedder.bias"}
    for name in (missing, "block.layers.0.attention.extra.weight", "final_norm_audio.weight", "adapter.audio_embedder.bias"):
        assert name in message
    d = preview_config().hidden_size
    assert f"stored [{d + 1}], expected [{d}]" in message
    assert "torch.int64" in message


def test_index_naming_missing_shard(tmp_path, source, no_data_reads):
    files = ck.save_dit_checkpoint(source, tmp_path, max_shard_bytes=shard_bytes(source, 3))
    files[1].unlink()
    with pytest.raises(ck.CheckpointError, match=files[1].name):
        ck.load_dit(tmp_path, preview_config(), progress=False)


def test_index_assigns_tensor_absent_from_shard(tmp_path, source, no_data_reads):
    ck.save_dit_checkpoint(source, tmp_path, max_shard_bytes=shard_bytes(source, 3))
    index = json.loads((tmp_path / ck.INDEX_NAME).read_text())
    first = index["weight_map"]["adapter.video_embedder.weight"]
    assert index["weight_map"]["final_norm_video.weight"] != first
    index["weight_map"]["final_norm_video.weight"] = first
    (tmp_path / ck.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ck.CheckpointError, match=f"'final_norm_video.weight' to {first}, whose header lacks it"):
        ck.inspect_checkpoint(tmp_path)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_shard_found_in_header_pass(tmp_path, source, no_data_reads, compress):
    files = ck.save_dit_checkpoint(source, tmp_path, max_shard_bytes=None, compress=compress)
    if compress:  # a truncated download: the frame's content size still tells the full size
        raw = zstandard.ZstdDecompressor().decompress(files[0].read_bytes())
        files[0].write_bytes(zstandard.ZstdCompressor().compress(raw[:-100]))
    else:
        with open(files[0], "r+b") as fh:
            fh.truncate(files[0].stat().st_size - 100)
    with pytest.raises(ck.CheckpointError, match="truncated"):
        ck.load_dit(tmp_path, preview_config(), progress=False)


def test_truncated_zstd_without_content_size_fails_while_reading(tmp_path, source):
    files = ck.save_dit_checkpoint(source, tmp_path, max_shard_bytes=None)
    raw = files[0].read_bytes()[:-100]
    out = io.BytesIO()
    zstandard.ZstdCompressor().copy_stream(io.BytesIO(raw), out)
    (tmp_path / "model.safetensors.zst").write_bytes(out.getvalue())
    files[0].unlink()
    with pytest.raises(ck.CheckpointError, match="truncated"):
        ck.load_dit(tmp_path, preview_config(), progress=False)


def test_missing_or_empty_directory(tmp_path, no_data_reads):
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load_dit(tmp_path / "nope", preview_config())
    with pytest.raises(ck.CheckpointError, match="neither model.safetensors.index.json nor model.safetensors"):
        ck.load_dit(tmp_path, preview_config())


def test_preview_weights_against_full_manifest(tmp_path, source, no_data_reads):
    ck.save_dit_checkpoint(source, tmp_path, max_shard_bytes=shard_bytes(source, 2))
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_dit(tmp_path, progress=False)  # no config.json -> full_config()
    d = preview_config().hidden_size
    assert f"hidden size {d} with {preview_config().num_layers} layers, expected hidden size 5120 with 40 layers" in str(
        err.value
    )
    assert "block.layers.39.mlp.down_proj.weight" in err.value.missing


def test_writer_refuses_to_shadow(tmp_path, source):
    ck.save_dit_checkpoint(source, tmp_path, max_shard_bytes=None, compress=True)
    with pytest.raises(FileExistsError):
        ck.save_dit_checkpoint(source, tmp_path, max_shard_bytes=None)
    ck.save_dit_checkpoint(source, tmp_path, max_shard_bytes=None, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


# --------------------------------------------------------------------------- checkpoint root


def make_stack(root: Path, source: dict[str, torch.Tensor]) -> None:
    """A CHECKPOINTS.md §1 tree with a preview DiT and stand-in files for the other models."""
    distill = root / "distill"
    ck.save_dit_checkpoint(source, distill, max_shard_bytes=shard_bytes(source, 2), compress=True)
    (distill / "config.json").write_text(json.dumps({"model_config": preview_config().to_dict()}))
    (root / "turbo_vae").mkdir()
    (root / "turbo_vae" / ck.TURBO_VAE_JSON).write_text("{}")
    (root / "turbo_vae" / ck.TURBO_VAE_CKPT).write_bytes(b"ckpt")
    text = root / ck.TEXT_ENCODER_DIR
    text.mkdir()
    for name in ("config.json", "tokenizer.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (text / name).write_text("{}")
    (text / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    audio = root / ck.AUDIO_VAE_DIR
    (audio / "vae").mkdir(parents=True)
    for name in ("model_config.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"):
        (audio / name).write_text("{}")
    video = root / ck.VIDEO_VAE_DIRS[0]
    (video / "vae").mkdir(parents=True)
    for name in ("vae/config.json", "vae/diffusion_pytorch_model.safetensors"):
        (video / name).write_text("{}")


def test_check_stack_dir(tmp_path, source, no_data_reads):
    make_stack(tmp_path, source)
    layout = ck.check_stack_dir(tmp_path, ["distill"])
    assert layout.pieces["distill"].ok and "distill" in layout.dit
    assert not layout.pieces["base"].present
    assert all(layout.pieces[p].ok for p in ck.CODEC_PIECES)
    assert layout.pieces["turbo_vae"].files["checkpoint"].name == ck.TURBO_VAE_CKPT
    assert "absent" in layout.summary()

    with pytest.raises(ck.StackError, match=r"base: .*base is missing"):
        ck.check_stack_dir(tmp_path, ["distill", "base"])
    with pytest.raises(ck.StackError, match="does not exist"):
        ck.check_stack_dir(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown stack pieces"):
        ck.check_stack_dir(tmp_path, ["720p"])

    (tmp_path / ck.TEXT_ENCODER_DIR / "model-00002-of-00002.safetensors").unlink()
    (tmp_path / "turbo_vae" / ck.TURBO_VAE_CKPT).write_bytes(b"")  # interrupted download
    with pytest.raises(ck.StackError) as err:
        ck.check_stack_dir(tmp_path, ["distill"])
    assert "text_encoder" in str(err.value) and "model-00002-of-00002.safetensors" in str(err.value)
    assert "turbo_vae" in str(err.value) and ck.TURBO_VAE_CKPT in str(err.value)
    ck.check_stack_dir(tmp_path, ["distill"], require=["audio_vae", "video_vae"])


def test_check_stack_dir_wrong_size_dit(tmp_path, source, no_data_reads):
    make_stack(tmp_path, source)
    (tmp_path / "distill" / "config.json").unlink()  # now validated against the full model
    with pytest.raises(ck.StackError) as err:
        ck.check_stack_dir(tmp_path, ["distill"])
    message = str(err.value)
    assert f"hidden size {preview_config().hidden_size}" in message and "expected hidden size 5120" in message
    assert "adapter.video_embedder.weight: stored" in message and "more" in message
    assert len(message) < 3000


# --------------------------------------------------------------------------- host memory

_MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    from engine.checkpoint import load_dit, inspect_checkpoint
    from engine.config import DiTConfig
    from engine.dit import DiTModel

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    path, cfg = sys.argv[1], DiTConfig.from_dict(json.loads(sys.argv[2]))
    with torch.device("meta"):
        DiTModel(cfg)  # warm up lazy imports/allocations outside the measured window
    total = inspect_checkpoint(path).total_bytes
    before = status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass  # VmHWM then also covers import-time peaks: only makes the ratio larger
    model = load_dit(path, cfg, progress=False)
    peak = status("VmHWM")
    sums = {k: float(v.double().sum()) for k, v in list(model.state_dict().items())[::50]}
    print(json.dumps({"ratio": (peak - before) / total, "total": total, "sums": sums}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_host_memory_one_copy(tmp_path_factory):
    """Full 40-layer structure at d = 768 (0.72 GB in mixed bf16/fp32), 8 shards like the release."""
    cfg = DiTConfig(hidden_size=768, num_query_groups=2)
    model = DiTModel(cfg)
    init_seeded(model, 5)
    sd = model.state_dict()
    want = {k: float(v.double().sum()) for k, v in list(sd.items())[::50]}
    root = tmp_path_factory.mktemp("memory")
    ratios = {}
    for compress in (False, True):
        directory = root / ("zstd" if compress else "plain")
        ck.save_dit_checkpoint(sd, directory, max_shard_bytes=shard_bytes(sd, 8), compress=compress)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(directory), json.dumps(cfg.to_dict())],
            capture_output=True, text=True, cwd=REPO, env=env, timeout=120, check=False,
        )
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["sums"] == want
        ratios[directory.name] = result["ratio"]
    del model, sd
    print(f"\npeak host RSS increase / checkpoint bytes: plain {ratios['plain']:.3f}, zstd {ratios['zstd']:.3f}")
    assert ratios["plain"] < 1.5 and ratios["zstd"] < 1.5, ratios


def test_bad_config_json_is_a_checkpoint_error(tmp_path, source, no_data_reads):
    ck.save_dit_checkpoint(source, tmp_path, max_shard_bytes=None)
    (tmp_path / "config.json").write_text(json.dumps({"model_config": {"hidden_size": 100, "head_dim": 64}}))
    with pytest.raises(ck.CheckpointError, match="config.json: unusable model config"):
        ck.load_dit(tmp_path)
