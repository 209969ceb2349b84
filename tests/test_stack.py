"""The model stack from a checkpoint root (engine/stack.py) and the Wan2.2 VAE conversion
(engine/convert_wan_vae.py).

A preview stack written in the released layout (CHECKPOINTS.md §1) is loaded through the real
loaders (sharded/zstd DiT, HF T5Gemma + tokenizer, diffusers VAEs, the Turbo ``.ckpt``) and must equal
the in-memory preview bit for bit. Partial roots must fail with one error before any weight is read.
The Wan2.2 VAE key mapping is checked for the full-size model against CODECS.md §1.2 (196 tensors,
704,688,668 parameters) without allocating it, and round-tripped on a preview-size VAE.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import engine.checkpoint as ck
import engine.codecs.audio_vae as audio_mod
import engine.codecs.text_encoder as text_mod
import engine.codecs.video_vae as video_mod
from engine import convert_wan_vae as conv
from engine.api import SegmentKind, SegmentRequest
from engine.codecs.turbo_vae import TurboVAED
from engine.factory import build_full_engine
from engine.stack import (
    PREVIEW_MARKER,
    load_stack,
    preview_dit,
    preview_models,
    resolve_stack,
    write_preview_stack,
)

SEED = 3


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    """distill + 540p_sr + 1080p_sr, plain shards."""
    return write_preview_stack(tmp_path_factory.mktemp("stack"), seed=SEED, variants=["distill", "540p_sr", "1080p_sr"])


@pytest.fixture(scope="module")
def reference():
    return preview_models(seed=SEED, sr="540p_sr")


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Any attempt to read weights fails the test: errors must come from the up-front check."""

    def boom(*args, **kwargs):
        raise AssertionError("weights were read before the stack was validated")

    monkeypatch.setattr(ck, "load_dit", boom)
    monkeypatch.setattr(text_mod.T5GemmaTextEncoder, "from_pretrained", boom)
    monkeypatch.setattr(video_mod.WanVideoVAE, "from_pretrained", boom)
    monkeypatch.setattr(audio_mod.OobleckAudioVAE, "from_pretrained", boom)


def copy_stack(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def shard(directory: Path, i: int) -> str:
    """Name of the i-th shard named by a DiT directory's index."""
    return sorted(set(json.loads((directory / ck.INDEX_NAME).read_text())["weight_map"].values()))[i]


# --------------------------------------------------------------------------- layout and loading


def test_written_layout_passes_check_stack_dir(stack):
    layout = ck.check_stack_dir(stack, ["distill", "540p_sr", "1080p_sr"])
    assert all(layout.pieces[p].ok for p in ck.CODEC_PIECES)
    assert sorted(p.name for p in (stack / "turbo_vae").iterdir()) == sorted([ck.TURBO_VAE_CKPT, ck.TURBO_VAE_JSON])
    shards = sorted(p.name for p in (stack / "distill").glob("model-*.safetensors"))
    assert len(shards) > 1 and (stack / "distill" / ck.INDEX_NAME).is_file()
    ckpt = torch.load(stack / "turbo_vae" / ck.TURBO_VAE_CKPT, map_location="cpu", weights_only=True)
    assert all(k.startswith("module.decoder.") for k in ckpt["ema_state_dict"])
    text_files = {p.name for p in (stack / ck.TEXT_ENCODER_DIR).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= text_files
    assert (stack / ck.VIDEO_VAE_DIRS[0] / "vae" / "config.json").is_file()
    assert (stack / ck.AUDIO_VAE_DIR / "vae" / "config.json").is_file()
    assert json.loads((stack / PREVIEW_MARKER).read_text())["seed"] == SEED


def test_load_stack_equals_preview(stack, reference, caplog):
    models = load_stack(stack, sr="540p_sr", dtype=torch.float32, progress=False)
    assert "preview stack" in caplog.text
    assert_same_weights(models.dit, reference.dit)
    assert_same_weights(models.sr_dit, reference.sr_dit)
    assert_same_weights(models.text_encoder.model, reference.text_encoder.model)
    assert_same_weights(models.video_vae.vae, reference.video_vae.vae)
    assert_same_weights(models.audio_vae.vae, reference.audio_vae.vae)
    assert isinstance(models.turbo_decoder, TurboVAED)
    assert_same_weights(models.turbo_decoder, reference.turbo_decoder)
    # the saved byte-level tokenizer reproduces the preview ByteTokenizer, so features are identical
    prompt = "Ein Mann sagt: «Grüß dich!» 你好"
    got, n = models.text_encoder.encode(prompt)
    want, n_ref = reference.text_encoder.encode(prompt)
    assert n == n_ref == len(prompt.encode("utf-8")) + 1 and torch.equal(got, want)
    assert models.compute_dtype == torch.float32 and models.keep_audio_clean is False
    assert models.dit.config.local_attn_layers == ()


def test_load_stack_zstd_bf16_and_1080p(tmp_path, stack):
    root = write_preview_stack(tmp_path / "zst", seed=SEED, compress=True)
    assert list((root / "distill").glob("*.safetensors.zst")) and not list((root / "distill").glob("*.safetensors"))
    models = load_stack(root, use_turbo=False, progress=False)  # bf16, Wan2.2 VAE decoding
    assert_same_weights(models.dit, preview_dit("distill", SEED))
    assert models.turbo_decoder is None and models.compute_dtype == torch.bfloat16
    assert models.video_vae.dtype == torch.bfloat16
    assert next(models.audio_vae.vae.parameters()).dtype == torch.float32  # CODECS.md §3.2
    assert next(models.text_encoder.model.parameters()).dtype == torch.bfloat16

    sr = load_stack(stack, sr="1080p_sr", dtype=torch.float32, progress=False)
    assert sr.sr_dit.config.local_attn_layers == (0, 1, 2, 4, 5)  # DIT.md §1.3, layers of the 6-layer preview
    assert_same_weights(sr.sr_dit, preview_dit("1080p_sr", SEED))


def test_resolve_stack_names_every_file(stack):
    files = resolve_stack(stack, sr="540p_sr")
    assert files.dits == {"distill": stack / "distill", "540p_sr": stack / "540p_sr"}
    assert files.video_vae == stack / ck.VIDEO_VAE_DIRS[0] / "vae"
    assert files.audio_vae == stack / ck.AUDIO_VAE_DIR / "vae"
    assert files.turbo_config.name == ck.TURBO_VAE_JSON and files.turbo_checkpoint.name == ck.TURBO_VAE_CKPT
    assert files.preview
    with pytest.raises(ValueError, match="variant '540p_sr' must be one of"):
        resolve_stack(stack, variant="540p_sr")
    with pytest.raises(ValueError, match="sr 'base' must be one of"):
        resolve_stack(stack, sr="base")


# --------------------------------------------------------------------------- partial roots


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("shard", ["distill", "-of-0000", "partial download"]),
        ("turbo", ["turbo_vae", ck.TURBO_VAE_CKPT]),
        ("video", ["video_vae", "Wan2.2-TI2V-5B/vae is missing"]),
        ("base", ["base", "base is missing"]),
    ],
)
def test_partial_stack_one_error_before_loading(tmp_path, stack, no_weight_reads, damage, expected):
    root = copy_stack(stack, tmp_path / "root")
    variant = "distill"
    if damage == "shard":
        (root / "distill" / shard(root / "distill", 1)).unlink()
    elif damage == "turbo":
        (root / "turbo_vae" / ck.TURBO_VAE_CKPT).unlink()
    elif damage == "video":
        shutil.rmtree(root / ck.VIDEO_VAE_DIRS[0])
    else:
        variant = "base"
    with pytest.raises(ck.StackError) as err:
        load_stack(root, variant=variant)
    for text in expected:
        assert text in str(err.value)


def test_all_problems_in_one_error(tmp_path, stack, no_weight_reads):
    root = copy_stack(stack, tmp_path / "root")
    (root / "540p_sr" / shard(root / "540p_sr", 0)).unlink()
    (root / "turbo_vae" / ck.TURBO_VAE_CKPT).unlink()
    (root / ck.TEXT_ENCODER_DIR / "tokenizer.json").unlink()
    shutil.rmtree(root / ck.VIDEO_VAE_DIRS[0] / "vae")
    with pytest.raises(ck.StackError) as err:
        load_stack(root, sr="540p_sr")
    message = str(err.value)
    for name in ("540p_sr", "turbo_vae", "text_encoder", "video_vae"):
        assert f"{name}:" in message, name
    # without Turbo the turbo problem is not a problem
    with pytest.raises(ck.StackError) as err:
        load_stack(root, use_turbo=False)
    assert "turbo_vae" not in str(err.value)
    with pytest.raises(ck.StackError, match="does not exist"):
        load_stack(tmp_path / "nowhere")


def test_audio_vae_needs_diffusers_folder(tmp_path, stack, no_weight_reads):
    root = copy_stack(stack, tmp_path / "root")
    shutil.rmtree(root / ck.AUDIO_VAE_DIR / "vae")
    (root / ck.AUDIO_VAE_DIR / "model.safetensors").write_bytes(b"stable-audio-tools format")
    (root / "turbo_vae" / ck.TURBO_VAE_CKPT).unlink()  # reported together with the audio VAE
    with pytest.raises(ck.StackError, match=r"(?s)turbo_vae: .*audio_vae: .*vae is missing.*AutoencoderOobleck"):
        load_stack(root)


# --------------------------------------------------------------------------- Wan2.2 VAE conversion


def test_wan22_mapping_covers_full_model():
    """Every one of the 196 original tensors maps to exactly one diffusers tensor of the same shape."""
    original = conv.original_key_shapes(conv.WAN22_VAE_CONFIG)
    assert len(original) == conv.NUM_ORIGINAL_TENSORS == 196
    for key in ("encoder.conv1.weight", "encoder.downsamples.0.downsamples.0.residual.0.gamma", "conv1.weight",
                "conv2.weight", "decoder.conv1.weight", "decoder.head.2.weight"):
        assert key in original  # the example keys of CHECKPOINTS.md §4.3
    mapped = {conv.diffusers_key(k): shape for k, shape in original.items()}
    assert None not in mapped and len(mapped) == 196  # one-to-one
    with torch.device("meta"):
        from diffusers import AutoencoderKLWan

        target = {k: tuple(v.shape) for k, v in AutoencoderKLWan(**conv.WAN22_VAE_CONFIG).state_dict().items()}
    assert mapped == target
    numel = {k: int(np.prod(s)) for k, s in original.items()}
    assert sum(numel.values()) == 704_688_668  # CODECS.md §1.2
    assert sum(v for k, v in numel.items() if k.startswith(("encoder.", "conv1."))) == 149_637_088
    assert sum(v for k, v in numel.items() if k.startswith(("decoder.", "conv2."))) == 555_051_580
    # the converter accepts it (meta tensors: nothing is allocated)
    converted = conv.convert_state_dict({k: torch.empty(s, device="meta") for k, s in original.items()})
    assert list(converted) == list(target)


def fake_original(vae) -> dict[str, torch.Tensor]:
    """Invert the mapping on a diffusers VAE: its tensors under the original Wan2.2 names."""
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    to_original = {conv.diffusers_key(k): k for k in conv.original_key_shapes(config)}
    return {to_original[k]: v.clone() for k, v in vae.state_dict().items()}


def test_conversion_round_trip_and_errors():
    vae = video_mod.WanVideoVAE.preview(seed=SEED).vae
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    original = fake_original(vae)
    assert set(original) == set(conv.original_key_shapes(config))
    converted = conv.convert_state_dict(original, config)
    reference = vae.state_dict()
    assert list(converted) == list(reference)
    assert all(torch.equal(converted[k], reference[k]) for k in reference)

    bad = dict(original)
    bad["encoder.extra.weight"] = torch.zeros(1)
    del bad["decoder.head.2.bias"]
    bad["conv1.weight"] = torch.zeros(3, 3, 1, 1, 1)
    with pytest.raises(conv.ConversionError) as err:
        conv.convert_state_dict(bad, config)
    assert err.value.unmapped == ["encoder.extra.weight"]
    assert err.value.missing == ["decoder.conv_out.bias"]
    assert err.value.misshapen and err.value.misshapen[0].startswith("quant_conv.weight")
    with pytest.raises(conv.ConversionError, match="Wan 2.1"):
        conv.convert_state_dict({"encoder.downsamples.0.residual.0.gamma": torch.zeros(1)}, config)


def test_pth_only_stack_names_conversion_command_then_converts(tmp_path, stack, capsys):
    root = copy_stack(stack, tmp_path / "root")
    wan_dir = root / ck.VIDEO_VAE_DIRS[0]
    vae_config = json.loads((wan_dir / "vae" / "config.json").read_text())
    shutil.rmtree(wan_dir / "vae")
    pth = wan_dir / "Wan2.2_VAE.pth"
    reference = video_mod.WanVideoVAE.preview(seed=SEED).vae
    torch.save(fake_original(reference), pth)
    (tmp_path / "vae_config.json").write_text(json.dumps(vae_config))

    with pytest.raises(ck.StackError) as err:
        load_stack(root)
    message = str(err.value)
    assert f"python -m engine.convert_wan_vae {pth} {wan_dir / 'vae'}" in message

    assert conv.main([str(pth), str(wan_dir / "vae"), "--config", str(tmp_path / "vae_config.json")]) == 0
    assert "wrote" in capsys.readouterr().out
    models = load_stack(root, dtype=torch.float32, use_turbo=False, progress=False)
    assert_same_weights(models.video_vae.vae, reference)
    # a second run refuses to overwrite; a missing source is one error line
    assert conv.main([str(pth), str(wan_dir / "vae")]) == 2
    assert conv.main([str(tmp_path / "nope.pth"), str(tmp_path / "out")]) == 2
    err_text = capsys.readouterr().err
    assert "--overwrite" in err_text and "nope.pth does not exist" in err_text
    # the real Wan2.2 config rejects the preview-size tensors, naming them
    assert conv.main([str(pth), str(tmp_path / "full"), "--overwrite"]) == 2
    assert "misshapen" in capsys.readouterr().err
    # a pickle holding more than tensors is refused unless trusted explicitly
    torch.save({"encoder.conv1.weight": torch.zeros(1), "args": argparse.Namespace(a=1)}, tmp_path / "obj.pth")
    assert conv.main([str(tmp_path / "obj.pth"), str(tmp_path / "o")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert conv.main([str(tmp_path / "obj.pth"), str(tmp_path / "o"), "--trust-pickle"]) == 2
    assert "not a state dict of tensors" in capsys.readouterr().err


# --------------------------------------------------------------------------- streaming engine


def test_build_full_engine_on_preview_stack(stack, media_dir):
    from PIL import Image

    from engine.factory import create_engine
    from engine.pipeline import MagiHumanEngine

    engine = build_full_engine(stack, device="cpu", width=224, height=128, compute_dtype=torch.float32)
    assert isinstance(engine, MagiHumanEngine) and engine.name == "full"
    assert engine.keep_audio_clean is True and isinstance(engine.video_decoder, TurboVAED)
    image = np.asarray(Image.open(media_dir / "portrait.png").convert("RGB"))
    identity = engine.prepare_identity(image, "a person")
    segment = engine.generate(SegmentRequest(identity=identity, kind=SegmentKind.SPEAK, prompt="hello", seconds=1.0))
    assert segment.frames.shape == (25, 128, 224, 3) and segment.audio.shape == (44_100,)

    via_preset = create_engine("full", checkpoint_dir=str(stack), device="cpu")  # bf16 compute, 448x256
    assert via_preset.name == "full" and via_preset.compute_dtype == torch.bfloat16
    assert (via_preset.width, via_preset.height) == (448, 256)


def test_full_engine_with_sr_loads_the_540p_model(tmp_path):
    """`serve --engine full --sr` loads the 540p SR DiT so that idle time can upgrade segments."""
    root = write_preview_stack(tmp_path / "stack", variants=("distill", "540p_sr"))
    engine = build_full_engine(root, device="cpu", width=224, height=128, compute_dtype=torch.float32, sr=True)
    assert engine.sr_dit is not None and (engine.sr_width, engine.sr_height) == (896, 512)
    assert build_full_engine(root, device="cpu", width=224, height=128).sr_dit is None
    with pytest.raises(ck.StackError, match="540p_sr"):
        build_full_engine(write_preview_stack(tmp_path / "no_sr"), device="cpu", sr=True)
