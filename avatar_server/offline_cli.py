"""``avatar-server generate`` (one offline clip to MP4) and ``avatar-server download`` (the model stack).

The two subcommands are defined here and wired into :mod:`avatar_server.cli` with
:func:`add_generate_parser` / :func:`run_generate` and :func:`add_download_parser` /
:func:`run_download`; ``python -m avatar_server.offline_cli generate ...`` runs them stand-alone.

``generate`` follows the reference ``run_offline`` (PIPELINE.md §1, §2.5, §13-§15): a prompt, an
optional reference image (TI2V) and an optional audio file (A2V, decoded with PyAV to mono float32 at
its own rate; the clip follows the audio when it is shorter than ``--seconds``), the base stage at
448x256, an SR stage for ``540p`` (896x512) or ``1080p`` (1920x1088), Turbo decoding, and an H.264 +
AAC MP4 (``crf`` 10, 25 fps, 44.1 kHz stereo, 1764 samples per audio latent). Without
``--checkpoint-dir`` the preview stack is built in memory (untrained, noise by design; its SR model is
a preview DiT too, so every path runs). Bad input exits with status 2 and one ``error:`` line on
stderr before any model is loaded.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "add_download_parser",
    "add_generate_parser",
    "build_parser",
    "main",
    "read_audio",
    "read_image",
    "run_download",
    "run_generate",
]

SR_MODEL_FOR = {"256p": None, "540p": "540p_sr", "1080p": "1080p_sr"}
DIT_VARIANTS = ("base", "distill", "540p_sr", "1080p_sr")  # = engine.checkpoint.VARIANTS (no torch import here)
MAX_IMAGE_PIXELS = 8192 * 8192
FPS = 25


class InputError(ValueError):
    """A command-line input that cannot be used; the message names the flag and the limit."""


# --------------------------------------------------------------------------- parsers


def add_generate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``generate`` to an ``add_subparsers()`` object; returns the sub-parser."""
    p = subparsers.add_parser(
        "generate",
        help="generate one clip offline and write an MP4",
        description="Generate one audio+video clip (T2V, TI2V with --image, A2V with --audio) "
        "and write it as H.264 + AAC MP4.",
    )
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the (enhanced) prompt text")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file")
    p.add_argument("--image", type=Path, help="reference image, PNG/JPEG/WebP (TI2V)")
    p.add_argument("--audio", type=Path, help="speech audio, WAV/FLAC/... (A2V: the clip is lip-synced to it)")
    p.add_argument("--seconds", type=float, default=4.0, help="clip length in seconds, (0, 20] (default 4)")
    p.add_argument("--resolution", choices=list(SR_MODEL_FOR), default="256p",
                   help="256p = 448x256; 540p = 896x512 and 1080p = 1920x1088 need an SR model (default 256p)")
    p.add_argument("--variant", choices=["distill", "base"], default="distill",
                   help="distill: 8 steps, no CFG; base: 32 steps with CFG (default distill)")
    p.add_argument("--seed", type=int, default=42, help="noise seed (default 42, as the reference)")
    p.add_argument("--checkpoint-dir", type=Path,
                   help="checkpoint root (CHECKPOINTS.md §1); default: the untrained preview stack, in memory")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="compute/codec dtype; auto = bf16 on cuda (reference), fp32 on cpu")
    p.add_argument("--video-decoder", choices=["turbo", "wan"], default="turbo",
                   help="turbo: the Turbo VAE decoder (reference default); wan: the Wan2.2 VAE")
    p.add_argument("--crf", type=int, default=10, help="libx264 CRF (default 10, as the reference)")
    p.add_argument("--out", type=Path, help="output MP4 (default clip_<seconds>s_<w>x<h>[_<sr_w>x<sr_h>].mp4)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def add_download_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``download`` to an ``add_subparsers()`` object; returns the sub-parser."""
    p = subparsers.add_parser(
        "download",
        help="download the model stack",
        description="Fetch the DiT variants, the Turbo decoder, T5Gemma, the Oobleck VAE and the Wan2.2 VAE "
        "from the Hugging Face Hub into DEST (CHECKPOINTS.md §1). Honours HF_HUB_OFFLINE and HF_TOKEN.",
    )
    p.add_argument("dest", type=Path, help="checkpoint root to fill")
    p.add_argument("--variant", action="append", choices=list(DIT_VARIANTS),
                   help="DiT folder to fetch (repeatable; default distill)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def build_parser() -> argparse.ArgumentParser:
    """Stand-alone parser with ``generate`` and ``download`` (``python -m avatar_server.offline_cli``)."""
    parser = argparse.ArgumentParser(prog="avatar-server", description="Offline clip generation and model download.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_download_parser(sub)
    return parser


# --------------------------------------------------------------------------- inputs


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to uint8 ``[H, W, 3]`` RGB with Pillow (size checked from the header first).

    Raises:
        InputError: missing file, not an image, or more than :data:`MAX_IMAGE_PIXELS` pixels.
    """
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"--image {path}: no such file")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InputError(f"--image {path}: {width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS}")
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InputError(f"--image {path}: not a readable image ({exc})") from None


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of a file with PyAV to mono float32 at its own sample rate.

    Channels are down-mixed by libswresample (as ``ffmpeg -ac 1``, the reference's loader).

    Returns:
        ``(waveform float32 [N], sample_rate_hz)``.

    Raises:
        InputError: missing file, no audio stream, undecodable, or empty.
    """
    import av

    if not path.is_file():
        raise InputError(f"--audio {path}: no such file")
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise InputError(f"--audio {path}: the file has no audio stream")
            stream = container.streams.audio[0]
            rate = int(stream.codec_context.sample_rate or stream.rate or 0)
            if rate <= 0:
                raise InputError(f"--audio {path}: unknown sample rate")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(stream):
                chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    except av.FFmpegError as exc:
        raise InputError(f"--audio {path}: cannot decode ({exc})") from None
    waveform = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    if waveform.size < rate // FPS:
        raise InputError(f"--audio {path}: {waveform.size} samples; at least 1/{FPS} s ({rate // FPS}) is needed")
    return waveform, rate


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        try:
            prompt = args.prompt_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--prompt-file {args.prompt_file}: cannot read ({exc})") from None
    else:
        prompt = args.prompt.strip()
    if not prompt:
        raise InputError("--prompt is empty")
    return prompt


def _default_out(seconds: float, sizes: tuple) -> Path:
    w, h, sw, sh = sizes
    name = f"clip_{seconds:g}s_{w}x{h}" + (f"_{sw}x{sh}" if sw else "")
    return Path(f"{name}.mp4")


def _configure_logging(level: str) -> None:
    """Configure the root logger once (no-op when the caller, e.g. avatar_server.cli, already did)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _error(message: str) -> int:
    print(f"avatar-server generate: error: {message}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------- commands


def run_generate(args: argparse.Namespace) -> int:
    """Body of ``avatar-server generate``.

    Returns:
        0 on success (the MP4 path and a summary on stdout); 2 with one ``error:`` line on stderr for
        unusable input: missing/undecodable prompt file, image or audio, ``--seconds`` outside
        (0, 20], ``--resolution 540p/1080p`` without the SR model in the checkpoint root, an
        incomplete checkpoint root (its full report), or CUDA asked for but unavailable.
    """
    import torch

    from engine.api import EngineInputError
    from engine.checkpoint import StackError
    from engine.offline import MAX_SECONDS, RESOLUTIONS, ClipRequest, generate_clip, validate_request

    _configure_logging(getattr(args, "log_level", "INFO"))
    started = time.perf_counter()
    try:
        prompt = _read_prompt(args)
        if not 0 < args.seconds <= MAX_SECONDS:
            raise InputError(f"--seconds {args.seconds:g} is outside (0, {MAX_SECONDS:g}]")
        if round(FPS * args.seconds) < 1:
            raise InputError(f"--seconds {args.seconds:g} is shorter than one frame (1/{FPS} s)")
        sizes = RESOLUTIONS[args.resolution]
        sr = SR_MODEL_FOR[args.resolution]
        image = read_image(args.image) if args.image is not None else None
        audio, audio_rate = read_audio(args.audio) if args.audio is not None else (None, 44_100)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda: CUDA is not available on this machine")
        if args.dtype == "auto":
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
        else:
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        root = args.checkpoint_dir
        if root is not None and not root.is_dir():
            raise InputError(f"--checkpoint-dir {root} does not exist (fetch the stack with `avatar-server download {root}`)")
        if root is not None and sr is not None and not (root / sr).is_dir():
            raise InputError(
                f"--resolution {args.resolution} needs the SR model {sr}/ in {root}, which is missing "
                f"(fetch it with `avatar-server download {root} --variant {sr}`)"
            )
    except InputError as exc:
        return _error(str(exc))

    if audio is not None and audio.size < args.seconds * audio_rate:
        logger.info("--audio is %.2f s long, shorter than --seconds %g: the clip follows the audio",
                    audio.size / audio_rate, args.seconds)
    use_turbo = args.video_decoder == "turbo"
    try:
        if root is None:
            logger.warning(
                "no --checkpoint-dir: using the PREVIEW stack built in memory (untrained, preview-size "
                "models; the output is noise by design)"
            )
            from engine.stack import preview_models

            models = preview_models(seed=0, variant=args.variant, sr=sr, device=device, compute_dtype=dtype,
                                    use_turbo=use_turbo)
        else:
            from engine.stack import load_stack

            models = load_stack(root, variant=args.variant, sr=sr, device=device, dtype=dtype, use_turbo=use_turbo,
                                progress=sys.stderr.isatty())
    except StackError as exc:
        return _error(str(exc))

    request = ClipRequest(
        prompt=prompt, seconds=args.seconds, width=sizes[0], height=sizes[1], sr_width=sizes[2],
        sr_height=sizes[3], image=image, audio=audio, audio_sample_rate=audio_rate, seed=args.seed,
        variant=args.variant,
    )
    try:
        validate_request(request, models)
        clip = generate_clip(models, request, progress=sys.stderr.isatty())
    except (EngineInputError, ValueError) as exc:
        return _error(str(exc))

    from engine.media import write_mp4

    out = args.out or _default_out(args.seconds, sizes)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_mp4(out, clip.frames, clip.audio, clip.sample_rate, fps=FPS, crf=args.crf)
    clip.timings_s["write_mp4"] = time.perf_counter() - t0
    frames, height, width = clip.frames.shape[:3]
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in clip.timings_s.items())
    print(
        f"wrote {out}: {frames} frames {width}x{height} at {FPS} fps, {clip.audio.shape[0] / clip.sample_rate:.2f} s "
        f"audio at {clip.sample_rate} Hz in {time.perf_counter() - started:.1f} s ({timings})"
    )
    return 0


def run_download(args: argparse.Namespace) -> int:
    """Body of ``avatar-server download DEST [--variant V ...]``: 0 on success, 2 on failure
    (:func:`engine.download.main_download`)."""
    from engine.download import main_download

    _configure_logging(getattr(args, "log_level", "INFO"))
    return main_download(str(args.dest), list(args.variant or ["distill"]))


def main(argv: list[str] | None = None) -> int:
    """``python -m avatar_server.offline_cli {generate,download} ...``."""
    args = build_parser().parse_args(argv)
    return run_generate(args) if args.command == "generate" else run_download(args)


if __name__ == "__main__":
    sys.exit(main())
