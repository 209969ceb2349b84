"""The whole model stack from a checkpoint root (CHECKPOINTS.md §1): validate, load, or write a preview.

* :func:`resolve_stack` checks a root before anything is loaded and names every file that will be
  read; :func:`load_stack` then loads the base DiT, the optional SR DiT, T5Gemma, the Wan2.2 VAE,
  the Oobleck VAE and the Turbo decoder into :class:`engine.offline.ClipModels` (offline clips);
  :func:`engine.factory.build_full_engine` wraps the same pieces into the streaming
  :class:`engine.pipeline.MagiHumanEngine` (``avatar-server serve --engine full``).
* :func:`write_preview_stack` writes a root in exactly the released layout holding the preview-size
  models with seeded, untrained weights, and :func:`preview_models` builds the same models in memory.
  Tests load the written root through the real loading code, end to end.

Files read, per piece (CHECKPOINTS.md §1-§4, CODECS.md §1.7, §2.5, §3.4, §4):

==================  ==========================================================  =====================
piece               files                                                       dtype after loading
==================  ==========================================================  =====================
base DiT            ``<variant>/model.safetensors.index.json`` + shards (.zst)  module dtypes (DIT.md)
SR DiT              ``540p_sr/`` or ``1080p_sr/`` (1080p: local attention)      module dtypes
text encoder        ``t5gemma-9b-9b-ul2/`` (config, tokenizer, weights)         ``dtype``
video VAE           ``Wan2.2-TI2V-5B/vae/`` or ``Wan2.2-TI2V-5B-Diffusers/vae/``  ``dtype``
                    (diffusers ``AutoencoderKLWan``; or those folders holding
                    ``config.json`` directly)
audio VAE           ``stable-audio-open-1.0/vae/`` (diffusers ``AutoencoderOobleck``)  fp32 always (§3.2)
Turbo decoder       ``turbo_vae/*.json`` + ``turbo_vae/*.ckpt``                 ``dtype``
==================  ==========================================================  =====================

Deviations from the reference loader: the video VAE is read in diffusers format, not from
``Wan2.2_VAE.pth`` (a root holding only that file is refused with the one-time conversion command,
:mod:`engine.convert_wan_vae`); the audio VAE is read from the diffusers ``vae/`` folder, not from
the stable-audio-tools ``model.safetensors``; every problem of the root is reported in one
:class:`engine.checkpoint.StackError` before any weight is read or any device memory is taken.

The preview text encoder is saved with a ``tokenizers`` byte-level tokenizer whose ids equal
:class:`engine.codecs.text_encoder.ByteTokenizer` (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, byte ``b``
-> ``b + 3``, a BOS prepended), so ``AutoTokenizer`` loads it like the real one and the loaded
encoder reproduces ``T5GemmaTextEncoder.preview`` exactly. A written preview root carries a
``preview.json`` marker; :func:`load_stack` logs that such a stack is untrained.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint import (
    AUDIO_VAE_DIR,
    CODEC_PIECES,
    TEXT_ENCODER_DIR,
    TURBO_VAE_CKPT,
    TURBO_VAE_DIR,
    TURBO_VAE_JSON,
    VARIANTS,
    VIDEO_VAE_DIRS,
    StackError,
    StackLayout,
    check_stack_dir,
    save_dit_checkpoint,
)
from engine.config import LOCAL_ATTN_LAYERS_1080P, DiTConfig, preview_config
from engine.dit import DiTModel, seeded_dit
from engine.offline import ClipModels

logger = logging.getLogger(__name__)

__all__ = [
    "PREVIEW_MARKER",
    "PREVIEW_TURBO_CONFIG",
    "SR_VARIANTS",
    "StackFiles",
    "find_video_vae",
    "load_stack",
    "preview_dit",
    "preview_models",
    "preview_tokenizer",
    "preview_turbo",
    "resolve_stack",
    "write_preview_stack",
]

BASE_VARIANTS = ("distill", "base")
SR_VARIANTS = ("540p_sr", "1080p_sr")
WAN_ORIGINAL_FILE = "Wan2.2_VAE.pth"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
PREVIEW_MARKER = "preview.json"

PREVIEW_TURBO_CONFIG: dict = {
    "_class_name": "TurboVAED",
    "in_channels": 3,
    "latent_channels": 48,
    "out_channels": 3,
    "decoder_block_out_channels": [2, 2, 4, 4],
    "decoder_layers_per_block": [1, 1, 1, 1, 1],
    "decoder_spatio_temporal_scaling": [False, True, True, True],
    "decoder_spatio_only": [False, True, False, False],
    "decoder_is_dw_conv": [False, False, False, False, False],
    "patch_size": 2,
    "patch_size_t": 1,
    "use_unpatchify": True,
    "first_chunk_size": 7,
    "step_size": 7,
    "spatial_compression_ratio": 16,
    "temporal_compression_ratio": 4,
    "decoder_causal": False,
    "resnet_norm_eps": 1e-6,
    "scaling_factor": 1.0,
}
"""Turbo decoder config in the key format of the shipped JSON (CODECS.md §2.1): the real layout
(un-patchify tail, ×16 spatial / ×4 temporal, windows of 7) at tiny widths (up-blocks 4, 4, 2, 2):
25 frames of 448x256 decode in ~1 s on 2 CPU cores."""

# Each preview DiT directory gets its own weights, so a test can tell which directory was loaded.
_PREVIEW_SEED_OFFSETS = {"distill": 0, "base": 1, "540p_sr": 2, "1080p_sr": 3}


# --------------------------------------------------------------------------- resolving a root


@dataclass
class StackFiles:
    """Everything :func:`load_stack` will read, after :func:`resolve_stack` checked it.

    ``dits``: variant -> DiT directory (base variant first, then the SR variant if any);
    ``text_encoder``: HF directory; ``video_vae`` / ``audio_vae``: diffusers model folders
    (``config.json`` + weights); ``turbo_config`` / ``turbo_checkpoint``: None without Turbo;
    ``preview``: the root carries the :data:`PREVIEW_MARKER` of :func:`write_preview_stack`.
    """

    root: Path
    variant: str
    sr: str | None
    dits: dict[str, Path]
    text_encoder: Path
    video_vae: Path
    audio_vae: Path
    turbo_config: Path | None
    turbo_checkpoint: Path | None
    layout: StackLayout | None = None
    preview: bool = False


def _nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _diffusers_weights_problem(folder: Path) -> str | None:
    """None if ``folder`` holds diffusers weights (single file or an index with every shard)."""
    if _nonempty(folder / f"{DIFFUSERS_WEIGHTS}.safetensors"):
        return None
    index = folder / f"{DIFFUSERS_WEIGHTS}.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            return f"{index} is not a valid safetensors index ({exc!r})"
        absent = [s for s in shards if not _nonempty(folder / s)]
        return f"{index.name} names missing or empty shards {absent[:5]}" if absent else None
    return f"{folder} has config.json but no {DIFFUSERS_WEIGHTS}.safetensors"


def find_video_vae(root: str | Path) -> tuple[Path | None, str | None]:
    """Locate the diffusers ``AutoencoderKLWan`` folder of a root (CODECS.md §1.7).

    Looked for, in order: ``Wan2.2-TI2V-5B/vae``, ``Wan2.2-TI2V-5B-Diffusers/vae``, then those two
    folders themselves holding ``config.json``.

    Returns:
        ``(folder, None)`` when usable, else ``(None, problem)``. When only the original
        ``Wan2.2_VAE.pth`` is there, the problem gives the conversion command
        (``python -m engine.convert_wan_vae SRC DEST``).
    """
    root = Path(root)
    candidates = [root / d / "vae" for d in VIDEO_VAE_DIRS] + [root / d for d in VIDEO_VAE_DIRS]
    problem = None
    for folder in candidates:
        if _nonempty(folder / "config.json"):
            problem = _diffusers_weights_problem(folder)
            if problem is None:
                return folder, None
    if problem is not None:
        return None, problem
    for d in VIDEO_VAE_DIRS:
        original = root / d / WAN_ORIGINAL_FILE
        if _nonempty(original):
            return None, (
                f"{original} is the original Wan2.2 VAE checkpoint; this server reads the diffusers format. "
                f"Convert it once with `python -m engine.convert_wan_vae {original} {original.parent / 'vae'}` "
                f"(or fetch Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/ with `avatar-server download {root}`)"
            )
    return None, (
        f"{root / VIDEO_VAE_DIRS[0] / 'vae'} is missing (diffusers AutoencoderKLWan: config.json + "
        f"{DIFFUSERS_WEIGHTS}.safetensors, from Wan-AI/Wan2.2-TI2V-5B-Diffusers)"
    )


def resolve_stack(
    root: str | Path, *, variant: str = "distill", sr: str | None = None, use_turbo: bool = True
) -> StackFiles:
    """Check a checkpoint root for :func:`load_stack` and name every file it will read.

    Reads only directory listings, JSON files and safetensors headers (the DiT directories are
    validated against their model config by :func:`engine.checkpoint.check_stack_dir`).

    Args:
        root: checkpoint root (CHECKPOINTS.md §1).
        variant: base DiT, ``distill`` or ``base``.
        sr: SR DiT, ``540p_sr`` or ``1080p_sr``, or None.
        use_turbo: require ``turbo_vae/``.

    Returns:
        :class:`StackFiles`.

    Raises:
        ValueError: ``variant`` or ``sr`` is not one of the names above.
        StackError: one error listing every absent or partial piece (a missing shard, a missing
            Turbo checkpoint, no video VAE, a Wan2.2_VAE.pth that needs converting, an audio VAE
            without the diffusers ``vae/`` folder, ...).
    """
    root = Path(root)
    if variant not in BASE_VARIANTS:
        raise ValueError(f"variant {variant!r} must be one of {list(BASE_VARIANTS)}")
    if sr is not None and sr not in SR_VARIANTS:
        raise ValueError(f"sr {sr!r} must be one of {list(SR_VARIANTS)} or None")
    variants = [variant] + ([sr] if sr else [])
    require = [p for p in CODEC_PIECES if p != "video_vae" and (use_turbo or p != "turbo_vae")]

    problems: list[str] = []
    report, hint = None, None
    layout = None
    try:
        layout = check_stack_dir(root, variants, require=require)
    except StackError as exc:
        if not root.is_dir():
            raise
        report = str(exc)
        head, _, last = report.rpartition("\n")
        if last.startswith("(") and head:  # keep check_stack_dir's closing hint at the end
            report, hint = head, last
    video_vae, video_problem = find_video_vae(root)
    if video_problem:
        problems.append(f"- video_vae: {video_problem}")
    audio_dir = root / AUDIO_VAE_DIR
    audio_vae = audio_dir / "vae"
    if audio_dir.is_dir() and not _nonempty(audio_vae / "config.json") and _nonempty(audio_dir / "model.safetensors"):
        problems.append(
            f"- audio_vae: {audio_vae} is missing; this server reads the diffusers AutoencoderOobleck folder "
            f"(vae/ of stabilityai/stable-audio-open-1.0), not the stable-audio-tools model.safetensors"
        )
    if report is not None or problems:
        heading = report or f"checkpoint root {root} is not usable for {variants}:"
        raise StackError("\n".join([heading, *problems] + ([hint] if hint else [])))
    assert layout is not None
    turbo = layout.pieces["turbo_vae"].files if use_turbo else {}
    return StackFiles(
        root=root,
        variant=variant,
        sr=sr,
        dits={v: root / v for v in variants},
        text_encoder=root / TEXT_ENCODER_DIR,
        video_vae=video_vae,
        audio_vae=audio_vae,
        turbo_config=turbo.get("config"),
        turbo_checkpoint=turbo.get("checkpoint"),
        layout=layout,
        preview=(root / PREVIEW_MARKER).is_file(),
    )


# --------------------------------------------------------------------------- loading


def _turbo_from_files(config: Path, checkpoint: Path, device: torch.device, dtype: torch.dtype):
    from engine.codecs.turbo_vae import TurboVAED, load_turbo_checkpoint

    module = load_turbo_checkpoint(TurboVAED.from_config(config), checkpoint)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_stack(
    root: str | Path,
    *,
    variant: str = "distill",
    sr: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    use_turbo: bool = True,
    keep_audio_clean: bool = False,
    text_device: str | torch.device | None = None,
    progress: bool = True,
) -> ClipModels:
    """Validate, then load the model stack of a checkpoint root for offline clips.

    Args:
        root: checkpoint root (CHECKPOINTS.md §1).
        variant: base DiT directory, ``distill`` (8 steps, no CFG) or ``base`` (32 steps, CFG).
        sr: ``540p_sr`` / ``1080p_sr`` to load an SR DiT too (``1080p_sr`` gets local attention,
            DIT.md §1.3), or None.
        device: ``cpu`` or ``cuda[:N]``; every model goes there (weights straight from disk).
        dtype: DiT compute dtype and weight dtype of T5Gemma, the Wan2.2 VAE and the Turbo decoder
            (bf16 upstream; fp32 is much faster on CPUs without bf16 units). The DiT keeps its
            module dtypes (bf16 block linears, fp32 elsewhere); the audio VAE is always fp32.
        use_turbo: load ``turbo_vae/`` and decode video with it (the reference default); False
            decodes with the Wan2.2 VAE.
        keep_audio_clean: the streaming deviation (A2V audio not re-noised); False = reference.
        text_device: device of T5Gemma (default ``device``; ``cpu`` saves ~18 GB of GPU memory).
        progress: tqdm bars while loading the DiT (only shown when stderr is a terminal).

    Returns:
        :class:`engine.offline.ClipModels` with ``compute_dtype = dtype``.

    Raises:
        StackError: see :func:`resolve_stack`; raised before any weight is read.
        ValueError: unknown ``variant`` / ``sr``.
        RuntimeError: a CUDA device was asked for and CUDA is not available (checked before loading).
    """
    from engine.checkpoint import load_dit
    from engine.codecs.audio_vae import OobleckAudioVAE
    from engine.codecs.text_encoder import T5GemmaTextEncoder
    from engine.codecs.video_vae import WanVideoVAE

    files = resolve_stack(root, variant=variant, sr=sr, use_turbo=use_turbo)
    device = torch.device(device)
    text_device = torch.device(text_device) if text_device is not None else device
    for d in {device, text_device}:
        if d.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {d} requested but CUDA is not available")
    if files.preview:
        logger.warning("%s is a preview stack: untrained, preview-size models (output is noise by design)", files.root)
    started = time.perf_counter()
    dit = load_dit(files.dits[variant], variant=variant, device=device, progress=progress)
    sr_dit = load_dit(files.dits[sr], variant=sr, device=device, progress=progress) if sr else None
    text_encoder = T5GemmaTextEncoder.from_pretrained(files.text_encoder, dtype=dtype, device=text_device)
    video_vae = WanVideoVAE.from_pretrained(files.video_vae, dtype=dtype, device=device)
    audio_vae = OobleckAudioVAE.from_pretrained(files.audio_vae, device=device)
    turbo = None
    if use_turbo:
        turbo = _turbo_from_files(files.turbo_config, files.turbo_checkpoint, device, dtype)
    logger.info(
        "loaded stack %s (%s%s%s) on %s in %.1f s", files.root, variant, f" + {sr}" if sr else "",
        " + turbo" if use_turbo else "", device, time.perf_counter() - started,
    )
    return ClipModels(
        dit=dit,
        text_encoder=text_encoder,
        video_vae=video_vae,
        audio_vae=audio_vae,
        sr_dit=sr_dit,
        turbo_decoder=turbo,
        device=str(device),
        compute_dtype=dtype,
        keep_audio_clean=keep_audio_clean,
    )


# --------------------------------------------------------------------------- preview stack


def _variant_config(variant: str) -> DiTConfig:
    config = preview_config()
    if variant == "1080p_sr":  # same rule as engine.checkpoint for scaled models (DIT.md §1.3)
        config = config.with_local_attention(tuple(i for i in LOCAL_ATTN_LAYERS_1080P if i < config.num_layers))
    return config


def preview_dit(variant: str = "distill", seed: int = 0) -> DiTModel:
    """The preview DiT of one variant directory: :func:`engine.config.preview_config` with seeded
    weights (:func:`engine.dit.init_seeded` with ``seed`` + a per-variant offset), eval mode, CPU.

    Raises:
        ValueError: unknown variant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown DiT variant {variant!r}; known: {list(VARIANTS)}")
    return seeded_dit(_variant_config(variant), seed + _PREVIEW_SEED_OFFSETS[variant])


def preview_turbo(seed: int = 0):
    """:class:`engine.codecs.turbo_vae.TurboVAED` of :data:`PREVIEW_TURBO_CONFIG`, default init
    under ``torch.manual_seed(seed)``, fp32, eval mode."""
    from engine.codecs.turbo_vae import TurboVAED

    torch.manual_seed(seed)
    return TurboVAED.from_config(dict(PREVIEW_TURBO_CONFIG)).eval().requires_grad_(False)


def preview_tokenizer():
    """A ``transformers`` fast tokenizer whose ids equal :class:`~engine.codecs.text_encoder.ByteTokenizer`.

    Byte-level pre-tokenisation without regex splitting maps each UTF-8 byte to one symbol; the
    vocabulary gives byte ``b`` the id ``b + 3`` after ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, no
    merges; the post-processor prepends ``<bos>``. ``save_pretrained`` writes ``tokenizer.json``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # GPT-2 byte-to-symbol table: printable bytes map to themselves, the rest to U+0100 onwards.
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{symbols[b]: b + 3 for b in range(256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def preview_models(
    *,
    seed: int = 0,
    variant: str = "distill",
    sr: str | None = None,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | None = None,
    use_turbo: bool = True,
    keep_audio_clean: bool = False,
) -> ClipModels:
    """The preview stack in memory: the same models :func:`write_preview_stack` writes for ``seed``.

    Untrained: the output is noise by design; shapes, rates and every code path are the real ones.

    Args:
        seed: weight seed.
        variant: ``distill`` or ``base`` (only the weights' seed differs; the sampler follows it).
        sr: ``540p_sr`` / ``1080p_sr`` for an SR DiT (a preview DiT of that variant), or None.
        device: target device.
        compute_dtype: DiT compute dtype; default fp32 on CPU, bf16 on CUDA. Codecs stay fp32.
        use_turbo: include the preview Turbo decoder.
        keep_audio_clean: see :class:`engine.offline.ClipModels`.

    Raises:
        ValueError: unknown ``variant`` / ``sr``.
    """
    from engine.codecs.audio_vae import OobleckAudioVAE
    from engine.codecs.text_encoder import T5GemmaTextEncoder
    from engine.codecs.video_vae import WanVideoVAE

    if variant not in BASE_VARIANTS:
        raise ValueError(f"variant {variant!r} must be one of {list(BASE_VARIANTS)}")
    if sr is not None and sr not in SR_VARIANTS:
        raise ValueError(f"sr {sr!r} must be one of {list(SR_VARIANTS)} or None")
    device = torch.device(device)
    if compute_dtype is None:
        compute_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    dit = preview_dit(variant, seed).to(device)
    sr_dit = preview_dit(sr, seed).to(device) if sr else None
    text = T5GemmaTextEncoder.preview(seed=seed, hidden_size=dit.config.text_in_channels)
    text.model.to(device)
    return ClipModels(
        dit=dit,
        text_encoder=text,
        video_vae=WanVideoVAE.preview(seed=seed).to(device),
        audio_vae=OobleckAudioVAE.preview(seed=seed),
        sr_dit=sr_dit,
        turbo_decoder=preview_turbo(seed).to(device) if use_turbo else None,
        device=str(device),
        compute_dtype=compute_dtype,
        keep_audio_clean=keep_audio_clean,
    )


def write_preview_stack(
    root: str | Path,
    *,
    seed: int = 0,
    compress: bool = False,
    variants: Iterable[str] = ("distill",),
) -> Path:
    """Write a checkpoint root in the released layout (CHECKPOINTS.md §1) with preview-size models.

    Written (all seeded with ``seed``, equal to :func:`preview_models`):

    * ``<variant>/``: DiT shards (about 4 per directory) + ``model.safetensors.index.json`` through
      :func:`engine.checkpoint.save_dit_checkpoint` (``.safetensors.zst`` with ``compress``), and
      ``config.json`` holding ``{"model_config": preview_config()}``;
    * ``turbo_vae/TurboV3-Wan22-TinyShallow_7_7.json`` (:data:`PREVIEW_TURBO_CONFIG`) and
      ``checkpoint-340000.ckpt`` (``torch.save`` of ``{"ema_state_dict": {"module.decoder.…": …}}``);
    * ``t5gemma-9b-9b-ul2/``: ``T5GemmaEncoderModel.save_pretrained`` + :func:`preview_tokenizer`;
    * ``stable-audio-open-1.0/vae/`` (``AutoencoderOobleck.save_pretrained``) + ``model_config.json``;
    * ``Wan2.2-TI2V-5B/vae/`` (``AutoencoderKLWan.save_pretrained``);
    * ``preview.json``: the marker naming the seed.

    Args:
        root: target directory (created; existing checkpoint files in it raise).
        seed: weight seed.
        compress: zstd-compress the DiT shards.
        variants: DiT directories to write (any of ``base``, ``distill``, ``540p_sr``, ``1080p_sr``).

    Returns:
        ``root``.

    Raises:
        ValueError: unknown variant.
        FileExistsError: a DiT directory already holds checkpoint files.
    """
    from engine.codecs.audio_vae import OUTPUT_SAMPLE_RATE, OobleckAudioVAE
    from engine.codecs.text_encoder import T5GemmaTextEncoder
    from engine.codecs.video_vae import WanVideoVAE

    root = Path(root)
    variants = list(dict.fromkeys(variants))
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"unknown or no DiT variants {bad or variants}; known: {list(VARIANTS)}")
    root.mkdir(parents=True, exist_ok=True)

    for variant in variants:
        state = preview_dit(variant, seed).state_dict()
        total = sum(t.nbytes for t in state.values())
        save_dit_checkpoint(state, root / variant, max_shard_bytes=total // 3 + 1, compress=compress)
        (root / variant / "config.json").write_text(
            json.dumps({"model_config": preview_config().to_dict(), "preview": True, "seed": seed}, indent=2) + "\n"
        )

    turbo_dir = root / TURBO_VAE_DIR
    turbo_dir.mkdir(exist_ok=True)
    (turbo_dir / TURBO_VAE_JSON).write_text(json.dumps(PREVIEW_TURBO_CONFIG, indent=2) + "\n")
    turbo_state = {f"module.{k}": v for k, v in preview_turbo(seed).state_dict().items()}
    torch.save({"ema_state_dict": turbo_state, "step": 0}, turbo_dir / TURBO_VAE_CKPT)

    text_dir = root / TEXT_ENCODER_DIR
    text = T5GemmaTextEncoder.preview(seed=seed, hidden_size=preview_config().text_in_channels)
    text.model.save_pretrained(str(text_dir))
    preview_tokenizer().save_pretrained(str(text_dir))

    audio_dir = root / AUDIO_VAE_DIR
    OobleckAudioVAE.preview(seed=seed).vae.save_pretrained(str(audio_dir / "vae"))
    (audio_dir / "model_config.json").write_text(
        json.dumps({"model_type": "preview", "sample_rate": OUTPUT_SAMPLE_RATE,
                    "note": "preview stack: the weights are in vae/ (diffusers format)"}, indent=2) + "\n"
    )

    WanVideoVAE.preview(seed=seed).vae.save_pretrained(str(root / VIDEO_VAE_DIRS[0] / "vae"))

    (root / PREVIEW_MARKER).write_text(
        json.dumps({"seed": seed, "variants": variants,
                    "note": "untrained preview-size models in the released layout (engine.stack.write_preview_stack)"},
                   indent=2) + "\n"
    )
    logger.info("wrote preview stack %s (%s)", root, ", ".join(variants))
    return root
