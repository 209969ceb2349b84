"""Convert the original ``Wan2.2_VAE.pth`` into a diffusers ``AutoencoderKLWan`` directory.

Usage::

    python -m engine.convert_wan_vae ROOT/Wan2.2-TI2V-5B/Wan2.2_VAE.pth ROOT/Wan2.2-TI2V-5B/vae

The upstream code reads only ``Wan2.2_VAE.pth`` (CHECKPOINTS.md §4.3): a plain state dict of 196
tensors named after the original Wan VAE module tree. This port loads the video VAE through
``diffusers.AutoencoderKLWan`` (CODECS.md §1.7), whose parameters are the same tensors under other
names; ``Wan-AI/Wan2.2-TI2V-5B-Diffusers`` ships them renamed. This module does the renaming for a
local ``.pth`` so that a stack holding only the original file can be used without a download.

Original module tree (Wan2.2 ``WanVAE_``; dims ``enc = base_dim * [1] + dim_mult``,
``dec = decoder_base_dim * [dim_mult[-1]] + dim_mult[::-1]``; CODECS.md §1.2):

=====================================================  ==============================================
original                                               diffusers
=====================================================  ==============================================
``encoder.conv1``                                      ``encoder.conv_in``
``encoder.downsamples.i.downsamples.j`` (j < nrb)      ``encoder.down_blocks.i.resnets.j``
``encoder.downsamples.i.downsamples.nrb`` (Resample)   ``encoder.down_blocks.i.downsampler``
``encoder.middle.0`` / ``.1`` / ``.2``                 ``encoder.mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``
``encoder.head.0`` / ``encoder.head.2``                ``encoder.norm_out`` / ``encoder.conv_out``
``conv1`` / ``conv2``                                  ``quant_conv`` / ``post_quant_conv``
``decoder.conv1``                                      ``decoder.conv_in``
``decoder.middle.0`` / ``.1`` / ``.2``                 ``decoder.mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``
``decoder.upsamples.i.upsamples.j`` (j <= nrb)         ``decoder.up_blocks.i.resnets.j``
``decoder.upsamples.i.upsamples.nrb+1`` (Resample)     ``decoder.up_blocks.i.upsampler``
``decoder.head.0`` / ``decoder.head.2``                ``decoder.norm_out`` / ``decoder.conv_out``
=====================================================  ==============================================

Inside a residual block (``nn.Sequential`` ``residual``: RMS_norm, SiLU, conv, RMS_norm, SiLU,
Dropout, conv): ``residual.0.gamma`` -> ``norm1.gamma``, ``residual.2`` -> ``conv1``,
``residual.3.gamma`` -> ``norm2.gamma``, ``residual.6`` -> ``conv2``, ``shortcut`` ->
``conv_shortcut``. A Resample keeps ``resample.1`` (the conv after the pad/upsample) and
``time_conv``; an attention block keeps ``norm``, ``to_qkv``, ``proj``. The average-pool /
channel-duplicate shortcuts of the Wan 2.2 residual blocks have no parameters. Every tensor keeps
its shape (``nrb`` = ``num_res_blocks``).

Verification (tests/test_stack.py): :func:`original_key_shapes` lists the original tree's 196
tensors with their shapes for the Wan2.2 config, independently of diffusers; mapped through
:func:`diffusers_key` they equal the state dict of ``AutoencoderKLWan`` built with the same config
on the meta device one-to-one, shapes included (704,688,668 parameters: encoder side 149,637,088,
decoder side 555,051,580, CODECS.md §1.2). A preview-size VAE is renamed to original keys and
converted back bit-exactly. The renaming agrees with diffusers' own ``convert_vae_22`` script.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from engine.codecs.video_vae import WAN22_LATENT_MEAN, WAN22_LATENT_STD

logger = logging.getLogger(__name__)

__all__ = [
    "WAN22_VAE_CONFIG",
    "ConversionError",
    "convert_state_dict",
    "convert_wan_vae",
    "diffusers_key",
    "main",
    "original_key_shapes",
]

ORIGINAL_FILE_NAME = "Wan2.2_VAE.pth"
NUM_ORIGINAL_TENSORS = 196  # CHECKPOINTS.md §4.3

WAN22_VAE_CONFIG: dict[str, Any] = dict(
    base_dim=160,
    decoder_base_dim=256,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    z_dim=48,
    temperal_downsample=[False, True, True],
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_spatial=16,
    scale_factor_temporal=4,
    latents_mean=list(WAN22_LATENT_MEAN),
    latents_std=list(WAN22_LATENT_STD),
)
"""``AutoencoderKLWan`` config of the Wan2.2-TI2V-5B VAE (CODECS.md §1.7)."""

_RESNET_PARTS = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_RESAMPLE_PARTS = ("resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias")
_ATTENTION_PARTS = ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")
_FIXED = {
    "encoder.conv1.weight": "encoder.conv_in.weight",
    "encoder.conv1.bias": "encoder.conv_in.bias",
    "encoder.head.0.gamma": "encoder.norm_out.gamma",
    "encoder.head.2.weight": "encoder.conv_out.weight",
    "encoder.head.2.bias": "encoder.conv_out.bias",
    "conv1.weight": "quant_conv.weight",
    "conv1.bias": "quant_conv.bias",
    "conv2.weight": "post_quant_conv.weight",
    "conv2.bias": "post_quant_conv.bias",
    "decoder.conv1.weight": "decoder.conv_in.weight",
    "decoder.conv1.bias": "decoder.conv_in.bias",
    "decoder.head.0.gamma": "decoder.norm_out.gamma",
    "decoder.head.2.weight": "decoder.conv_out.weight",
    "decoder.head.2.bias": "decoder.conv_out.bias",
}
_MIDDLE_RE = re.compile(r"(encoder|decoder)\.middle\.([012])\.(.+)")
_STAGE_RE = re.compile(r"(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(?:downsamples|upsamples)\.(\d+)\.(.+)")
_WAN21_RE = re.compile(r"(encoder\.downsamples|decoder\.upsamples)\.\d+\.residual\.")


class ConversionError(ValueError):
    """The source state dict is not a Wan2.2 VAE of the given config.

    ``unmapped``: source keys with no diffusers name; ``missing``: diffusers keys nothing maps to;
    ``misshapen``: diffusers keys whose source tensor has another shape. The message lists them all.
    """

    def __init__(self, message: str, *, unmapped=(), missing=(), misshapen=()) -> None:
        super().__init__(message)
        self.unmapped, self.missing, self.misshapen = list(unmapped), list(missing), list(misshapen)


def diffusers_key(key: str) -> str | None:
    """The ``AutoencoderKLWan`` (Wan 2.2 residual layout) name of an original ``Wan2.2_VAE.pth`` key.

    Returns None for a key outside the original tree (see the module docstring for the table).
    A Resample's index inside its stage is dropped (``...downsamples.2.resample.1.weight`` ->
    ``...downsampler.resample.1.weight``); that it is the stage's last entry is checked by
    :func:`convert_state_dict` (every destination key is produced exactly once).
    """
    if key in _FIXED:
        return _FIXED[key]
    m = _MIDDLE_RE.fullmatch(key)
    if m:
        side, index, part = m.groups()
        if index == "1":
            return f"{side}.mid_block.attentions.0.{part}" if part in _ATTENTION_PARTS else None
        sub = _RESNET_PARTS.get(part)
        return f"{side}.mid_block.resnets.{int(index) // 2}.{sub}" if sub else None
    m = _STAGE_RE.fullmatch(key)
    if m:
        stage, i, j, part = m.groups()
        side, blocks, sampler = (
            ("encoder", "down_blocks", "downsampler") if stage.startswith("encoder") else ("decoder", "up_blocks", "upsampler")
        )
        if part in _RESNET_PARTS:
            return f"{side}.{blocks}.{i}.resnets.{j}.{_RESNET_PARTS[part]}"
        if part in _RESAMPLE_PARTS:
            return f"{side}.{blocks}.{i}.{sampler}.{part}"
    return None


def original_key_shapes(config: Mapping[str, Any] = WAN22_VAE_CONFIG) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the original Wan2.2 VAE state dict for an ``AutoencoderKLWan`` config.

    Built from the original module tree (``Encoder3d`` / ``Decoder3d`` of the Wan 2.2 VAE with
    residual stages), not from diffusers, so that comparing it with diffusers' state dict checks
    the renaming. Conv weights are ``[out, in, kt, kh, kw]`` (3-D) or ``[out, in, kh, kw]`` (2-D),
    RMS-norm gains ``[C, 1, 1, 1]`` (``[C, 1, 1]`` in the attention blocks).

    Args:
        config: ``base_dim``, ``decoder_base_dim``, ``z_dim``, ``dim_mult``, ``num_res_blocks``,
            ``temperal_downsample``, ``in_channels``, ``out_channels`` as in CODECS.md §1.7.

    Returns:
        ``{name: shape}`` in module order (196 entries for :data:`WAN22_VAE_CONFIG`).
    """
    dim, z = int(config["base_dim"]), int(config["z_dim"])
    dec_dim = int(config.get("decoder_base_dim") or dim)
    mult, nrb = list(config["dim_mult"]), int(config["num_res_blocks"])
    t_down = list(config["temperal_downsample"])
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(prefix: str, cin: int, cout: int, kernel: tuple[int, ...]) -> None:
        shapes[f"{prefix}.weight"] = (cout, cin, *kernel)
        shapes[f"{prefix}.bias"] = (cout,)

    def residual(prefix: str, cin: int, cout: int) -> None:
        shapes[f"{prefix}.residual.0.gamma"] = (cin, 1, 1, 1)
        conv(f"{prefix}.residual.2", cin, cout, (3, 3, 3))
        shapes[f"{prefix}.residual.3.gamma"] = (cout, 1, 1, 1)
        conv(f"{prefix}.residual.6", cout, cout, (3, 3, 3))
        if cin != cout:
            conv(f"{prefix}.shortcut", cin, cout, (1, 1, 1))

    def middle(prefix: str, d: int) -> None:
        residual(f"{prefix}.0", d, d)
        shapes[f"{prefix}.1.norm.gamma"] = (d, 1, 1)
        conv(f"{prefix}.1.to_qkv", d, 3 * d, (1, 1))
        conv(f"{prefix}.1.proj", d, d, (1, 1))
        residual(f"{prefix}.2", d, d)

    enc = [dim * u for u in [1, *mult]]
    conv("encoder.conv1", int(config.get("in_channels", 12)), enc[0], (3, 3, 3))
    for i, (cin, cout) in enumerate(zip(enc[:-1], enc[1:], strict=True)):
        for j in range(nrb):
            residual(f"encoder.downsamples.{i}.downsamples.{j}", cin if j == 0 else cout, cout)
        if i != len(mult) - 1:  # spatial (and, where flagged, temporal) downsample closes the stage
            conv(f"encoder.downsamples.{i}.downsamples.{nrb}.resample.1", cout, cout, (3, 3))
            if i < len(t_down) and t_down[i]:
                conv(f"encoder.downsamples.{i}.downsamples.{nrb}.time_conv", cout, cout, (3, 1, 1))
    middle("encoder.middle", enc[-1])
    shapes["encoder.head.0.gamma"] = (enc[-1], 1, 1, 1)
    conv("encoder.head.2", enc[-1], 2 * z, (3, 3, 3))
    conv("conv1", 2 * z, 2 * z, (1, 1, 1))
    conv("conv2", z, z, (1, 1, 1))

    dec = [dec_dim * u for u in [mult[-1], *mult[::-1]]]
    t_up = t_down[::-1]
    conv("decoder.conv1", z, dec[0], (3, 3, 3))
    middle("decoder.middle", dec[0])
    for i, (cin, cout) in enumerate(zip(dec[:-1], dec[1:], strict=True)):
        for j in range(nrb + 1):
            residual(f"decoder.upsamples.{i}.upsamples.{j}", cin if j == 0 else cout, cout)
        if i != len(mult) - 1:
            conv(f"decoder.upsamples.{i}.upsamples.{nrb + 1}.resample.1", cout, cout, (3, 3))
            if i < len(t_up) and t_up[i]:
                conv(f"decoder.upsamples.{i}.upsamples.{nrb + 1}.time_conv", cout, 2 * cout, (3, 1, 1))
    shapes["decoder.head.0.gamma"] = (dec[-1], 1, 1, 1)
    conv("decoder.head.2", dec[-1], int(config.get("out_channels", 12)), (3, 3, 3))
    return shapes


def _meta_model(config: Mapping[str, Any]):
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        return AutoencoderKLWan(**dict(config))


def convert_state_dict(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any] = WAN22_VAE_CONFIG
) -> dict[str, torch.Tensor]:
    """Rename an original Wan2.2 VAE state dict to ``AutoencoderKLWan`` names (tensors untouched).

    Args:
        state: original key -> tensor (``torch.load`` of ``Wan2.2_VAE.pth``).
        config: the ``AutoencoderKLWan`` config the result must fit (default: Wan2.2-TI2V-5B).

    Returns:
        diffusers key -> the same tensor objects, in diffusers module order.

    Raises:
        ConversionError: one error naming every source key that has no diffusers name (or whose
            name another key already took), every diffusers key left without a tensor, and every
            shape mismatch; a Wan 2.1 (non-residual) layout is called out as such.
    """
    expected = {k: tuple(v.shape) for k, v in _meta_model(config).state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state.items():
        new = diffusers_key(key)
        if new is None or new in out or new not in expected:
            unmapped.append(key)
            continue
        out[new] = tensor
    missing = [k for k in expected if k not in out]
    misshapen = [
        f"{k}: source {list(out[k].shape)}, expected {list(shape)}"
        for k, shape in expected.items()
        if k in out and tuple(out[k].shape) != shape
    ]
    if unmapped or missing or misshapen:
        parts = [f"{len(state)} source tensors do not convert to AutoencoderKLWan ({len(expected)} tensors):"]
        if any(_WAN21_RE.match(k) for k in unmapped):
            parts.append("  the keys look like a Wan 2.1 VAE (flat stages); this converter handles Wan 2.2 only")
        for label, items in (("unmapped source keys", unmapped), ("missing", missing), ("misshapen", misshapen)):
            if items:
                parts.append(f"  {len(items)} {label}:\n    " + "\n    ".join(items))
        raise ConversionError("\n".join(parts), unmapped=unmapped, missing=missing, misshapen=misshapen)
    return {k: out[k] for k in expected}


def _load_source(src: Path, trust_pickle: bool) -> dict:
    """``torch.load`` on CPU, memory-mapped when the file is in the zip format (no copy of the weights)."""
    try:
        try:
            state = torch.load(str(src), map_location="cpu", weights_only=not trust_pickle, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(str(src), map_location="cpu", weights_only=not trust_pickle)  # legacy format
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(
            f"{src} cannot be loaded as plain tensors (weights_only=True: {first}); if you trust the file, "
            f"rerun with --trust-pickle"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{src} is not a state dict of tensors")
    return state


def convert_wan_vae(
    src: str | Path,
    dest: str | Path,
    *,
    config: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    trust_pickle: bool = False,
) -> Path:
    """Convert ``Wan2.2_VAE.pth`` into a diffusers directory (``config.json`` +
    ``diffusion_pytorch_model.safetensors``) that ``AutoencoderKLWan.from_pretrained`` loads.

    The state dict is memory-mapped, renamed (:func:`convert_state_dict`), loaded strictly into a
    meta-device ``AutoencoderKLWan`` without copies and saved with ``save_pretrained``.

    Args:
        src: the original ``.pth`` (a plain state dict, or a dict holding one under ``state_dict``).
        dest: output directory (created), e.g. ``ROOT/Wan2.2-TI2V-5B/vae``.
        config: ``AutoencoderKLWan`` config; default :data:`WAN22_VAE_CONFIG` (CODECS.md §1.7).
        dtype: cast the tensors (default: keep the stored dtype).
        overwrite: replace an existing ``dest/config.json``.
        trust_pickle: load with ``weights_only=False`` (runs arbitrary pickle code: only for a file
            from a trusted source that ``weights_only=True`` refuses).

    Returns:
        ``dest``.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        FileExistsError: ``dest`` already holds a ``config.json`` and ``overwrite`` is False.
        ConversionError: see :func:`convert_state_dict`; also when ``src`` is not a state dict of
            tensors or needs ``trust_pickle``.
    """
    src, dest = Path(src), Path(dest)
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist")
    if (dest / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{dest / 'config.json'} exists; pass --overwrite to replace it")
    config = dict(WAN22_VAE_CONFIG if config is None else config)
    state = _load_source(src, trust_pickle)
    if len(state) != NUM_ORIGINAL_TENSORS and config == WAN22_VAE_CONFIG:
        logger.warning("%s holds %d tensors; the Wan2.2 VAE has %d", src, len(state), NUM_ORIGINAL_TENSORS)
    converted = convert_state_dict(state, config)
    if dtype is not None:
        converted = {k: v.to(dtype) for k, v in converted.items()}
    model = _meta_model(config)
    model.load_state_dict(converted, strict=True, assign=True)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest), safe_serialization=True)
    logger.info("converted %s (%d tensors) -> %s", src, len(converted), dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.convert_wan_vae SRC.pth DEST_DIR``: 0 on success, 2 (one message on stderr) on failure."""
    parser = argparse.ArgumentParser(
        prog="python -m engine.convert_wan_vae",
        description="Convert the original Wan2.2_VAE.pth into a diffusers AutoencoderKLWan directory.",
    )
    parser.add_argument("src", type=Path, help="Wan2.2_VAE.pth")
    parser.add_argument("dest", type=Path, help="output directory, e.g. ROOT/Wan2.2-TI2V-5B/vae")
    parser.add_argument("--config", type=Path, help="AutoencoderKLWan config.json to use (default: Wan2.2-TI2V-5B)")
    parser.add_argument("--dtype", choices=["keep", "fp32", "bf16"], default="keep", help="stored dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing conversion")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="load with weights_only=False (only for a trusted file that the safe loader refuses)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = None
    if args.config is not None:
        config = {k: v for k, v in json.loads(args.config.read_text()).items() if not k.startswith("_")}
    dtype = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    try:
        dest = convert_wan_vae(
            args.src, args.dest, config=config, dtype=dtype, overwrite=args.overwrite, trust_pickle=args.trust_pickle
        )
    except (OSError, ValueError) as exc:
        print(f"convert_wan_vae: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
