"""The MagiHuman segment pipeline: text/audio + identity in, decoded audio+video segment out.

Per segment (PIPELINE.md §1 step 3, §16), inside a ``torch.Generator`` seeded with the
request's seed:

1. noise: audio ``randn [1, A, 64]`` (or, in lip-sync mode, the Oobleck encoding of the
   user's audio, §13), then video ``randn [1, 48, T, h, w]`` (§4);
2. the prompt through the text encoder (fp16-rounded, padded to 640, §5);
3. the distilled 8-step loop (§10.3, §12) with the image latent of the identity (first segment)
   or of the previous segment's last frame (continuation) written into latent frame 0 (§7);
4. decode video (Wan2.2 VAE or Turbo decoder, §15.1) and audio (Oobleck + 441/512 resample,
   §15.2).

Deliberate, named differences from the reference (all options, reference behaviour available):

* ``keep_audio_clean=True``: in lip-sync mode the provided audio latent is not re-noised by the
  distilled step (the reference re-noises it, PIPELINE.md §17.6); and the segment's audio is the
  user's own waveform, not a decode of the latent.
* the segment's audio is trimmed to the video duration ``F / 25`` s (5 s: 125 frames, 5.00 s
  instead of the reference's 5.04 s file) so consecutive segments tile one timeline.
* frame 0 of a continuation segment is the previous segment's last frame (§7 conditioning),
  so it is dropped from the output, together with the first ``1/25`` s of audio.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.api import (
    PREVIEW_NOTICE,
    VIDEO_FPS,
    CancelledError,
    Continuation,
    EngineInputError,
    Identity,
    Segment,
    SegmentKind,
    SegmentRequest,
)
from engine.codecs.image import frames_to_uint8
from engine.dit import DiTModel, init_seeded
from engine.packing import pack, unpack
from engine.sampler import DISTILL, SamplerConfig, generator_noise, sample

logger = logging.getLogger(__name__)

AUDIO_LATENT_CHANNELS = 64
MAX_SEGMENT_SECONDS = 10.0


@dataclass(frozen=True)
class Geometry:
    """Latent geometry of one segment (PIPELINE.md §3).

    Attributes:
        audio_latents: ``A`` (25 per second + 1 for generated audio).
        latent_frames: ``T = (A - 1) // 4 + 1``.
        frames: decoded frames ``F = 4 T - 3``.
        latent_height, latent_width: ``h = H / 16``, ``w = W / 16``.
    """

    audio_latents: int
    latent_frames: int
    frames: int
    latent_height: int
    latent_width: int

    @classmethod
    def for_audio_latents(cls, audio_latents: int, width: int, height: int) -> Geometry:
        latent_frames = (audio_latents - 1) // 4 + 1
        return cls(audio_latents, latent_frames, 4 * latent_frames - 3, height // 16, width // 16)


def check_resolution(width: int, height: int) -> None:
    """Raise :class:`EngineInputError` unless both sides are positive multiples of 32 (PIPELINE.md §3)."""
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % 32:
            raise EngineInputError(f"{name} {value} must be a positive multiple of 32")


class MagiHumanEngine:
    """A :class:`engine.api.SegmentEngine` running the MagiHuman DiT with its codecs.

    Args:
        dit: the DiT (any preset), in eval mode on ``device``.
        text_encoder: ``encode(prompt) -> (features fp32 [640, C], n_tokens)``.
        video_vae: Wan2.2 VAE wrapper (``encode_image``, ``decode_to_uint8``).
        audio_vae: Oobleck wrapper (``encode``, ``decode``).
        width, height: output size in pixels (multiples of 32).
        device: torch device of the DiT and codecs.
        compute_dtype: DiT block compute dtype (``torch.bfloat16`` reference numerics,
            ``torch.float32`` fp32 path for CPUs without bf16 matrix units).
        sampler: sampling configuration (default: distilled, 8 steps, no CFG).
        keep_audio_clean: lip-sync mode keeps the provided audio clean (see module doc).
        video_decoder: optional faster decoder with ``decode_to_uint8`` (the Turbo VAE);
            default ``video_vae``.
        name: engine name for logs and metrics.
        notice: what the user should know about this engine's picture (``SegmentEngine.notice``);
            :data:`engine.api.PREVIEW_NOTICE` for the preview preset, None for real weights.
    """

    fps = VIDEO_FPS

    def __init__(
        self,
        dit: DiTModel,
        text_encoder,
        video_vae,
        audio_vae,
        *,
        width: int,
        height: int,
        device: str | torch.device = "cpu",
        compute_dtype: torch.dtype = torch.bfloat16,
        sampler: SamplerConfig = DISTILL,
        keep_audio_clean: bool = True,
        video_decoder=None,
        max_segment_seconds: float = MAX_SEGMENT_SECONDS,
        name: str = "magihuman",
        notice: str | None = None,
        sr_dit: DiTModel | None = None,
        sr_size: tuple[int, int] | None = None,
        max_text_tokens: int | None = None,
    ):
        check_resolution(width, height)
        self.dit, self.text_encoder, self.video_vae, self.audio_vae = dit, text_encoder, video_vae, audio_vae
        self.video_decoder = video_decoder or video_vae
        self.width, self.height = width, height
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.sampler = sampler
        self.keep_audio_clean = keep_audio_clean
        self.max_segment_seconds = max_segment_seconds
        self.sample_rate = int(getattr(audio_vae, "output_sample_rate", 44_100))
        self.name = name
        self.notice = notice
        self.sr_dit = sr_dit
        self.before_dit_call = None  # e.g. engine.backends.compile.mark_step for CUDA graphs
        self.max_text_tokens = max_text_tokens  # None: the reference's 640 (PIPELINE.md §5)
        if (sr_dit is None) != (sr_size is None):
            raise ValueError("sr_dit and sr_size must be given together")
        if sr_size is not None:
            check_resolution(*sr_size)
        self.sr_width, self.sr_height = sr_size if sr_size is not None else (None, None)
        self._lock = threading.Lock()

    # -- identity -------------------------------------------------------------------------
    @torch.inference_mode()
    def prepare_identity(self, image: np.ndarray, appearance: str) -> Identity:
        """Centre-crop and resize the reference image to the output size and encode it
        (PIPELINE.md §7). ``image``: uint8 ``[H, W, 3]`` RGB.

        Raises:
            EngineInputError: not a non-empty uint8 ``[H, W, 3]`` array.
        """
        from engine.codecs.image import preprocess_image

        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
            raise EngineInputError("image must be a non-empty RGB array [H, W, 3]")
        resized = preprocess_image(image.astype(np.uint8, copy=False), self.width, self.height)
        latent = self.video_vae.encode_image(resized).float().to(self.device)
        return Identity(image=resized, latent=latent, appearance=appearance)

    # -- generation -----------------------------------------------------------------------
    def _check(self, request: SegmentRequest) -> None:
        if not 0 < request.seconds <= self.max_segment_seconds:
            raise EngineInputError(
                f"seconds {request.seconds} outside (0, {self.max_segment_seconds}] for engine {self.name}")
        if round(self.fps * request.seconds) < 1:
            raise EngineInputError(f"seconds {request.seconds} is shorter than one frame (1/{self.fps} s)")
        if request.kind == SegmentKind.LIPSYNC:
            if request.audio is None or np.asarray(request.audio).ndim != 1:
                raise EngineInputError("audio must be a mono float32 waveform [N] in lipsync mode")
            if request.audio_sample_rate < 8000:
                raise EngineInputError(f"audio_sample_rate {request.audio_sample_rate} Hz below 8000 Hz")
        if request.identity.latent is None:
            raise EngineInputError("identity has no latent; call prepare_identity first")

    def _conditioning_latent(self, request: SegmentRequest) -> torch.Tensor:
        """Latent written into frame 0 (PIPELINE.md §7): the previous segment's last frame (its
        latent, or the frame itself encoded now when only ``last_frame`` is given, e.g. the frame
        on screen at an interrupt), else the identity image."""
        prev = request.continue_from
        if prev is None:
            return request.identity.latent
        if prev.last_frame_latent is not None:
            return prev.last_frame_latent
        frame = np.asarray(prev.last_frame)
        if frame.shape != (self.height, self.width, 3):
            raise EngineInputError(
                f"continue_from.last_frame shape {frame.shape} must be ({self.height}, {self.width}, 3)")
        return self.video_vae.encode_image(np.ascontiguousarray(frame, dtype=np.uint8)).float().to(self.device)

    def _velocity_fn(self, text_features: torch.Tensor, num_text: int, timings: dict):
        cfg = self.dit.config

        def velocity(video, audio, timestep, conditional):
            start = time.perf_counter()
            if self.before_dit_call is not None:
                self.before_dit_call()
            packed = pack(video, audio, text_features, num_text=num_text, in_channels=cfg.in_channels)
            out = self.dit(packed.x, packed.coords, packed.modality, spans=packed.spans,
                           local_ranges=packed.local_ranges, compute_dtype=self.compute_dtype)
            v_video, v_audio = unpack(out, packed, cfg.audio_in_channels)
            timings["dit"] = timings.get("dit", 0.0) + time.perf_counter() - start
            return v_video, v_audio

        return velocity

    @torch.inference_mode()
    def generate(self, request: SegmentRequest, cancel: threading.Event | None = None) -> Segment:
        """Generate one segment (see module doc). Blocking; run it in a worker thread.

        Raises:
            EngineInputError: a request field is out of range.
            CancelledError: ``cancel`` was set; checked before every denoising step, before the
                decode and between the decoder's windows.
        """
        self._check(request)
        with self._lock:
            return self._generate(request, cancel)

    def _generate(self, request: SegmentRequest, cancel) -> Segment:
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        gen = torch.Generator(device=self.device).manual_seed(int(request.seed))
        lipsync = request.kind == SegmentKind.LIPSYNC

        # 1. initial latents, in the reference's draw order (PIPELINE.md §4)
        if lipsync:
            t0 = time.perf_counter()
            waveform = np.asarray(request.audio, dtype=np.float32)
            max_samples = int(round(request.seconds * request.audio_sample_rate))
            waveform = waveform[:max_samples]
            audio = self.audio_vae.encode(waveform, request.audio_sample_rate, generator=gen).to(self.device)
            timings["encode_audio"] = time.perf_counter() - t0
            if audio.shape[1] < 1:
                raise EngineInputError(f"audio of {len(waveform)} samples is shorter than one latent (1/25 s)")
        else:
            num_audio = round(self.fps * request.seconds) + 1
            audio = torch.randn(1, num_audio, AUDIO_LATENT_CHANNELS, generator=gen, device=self.device)
        geo = Geometry.for_audio_latents(audio.shape[1], self.width, self.height)
        c = self.dit.config.latent_channels
        video = torch.randn(1, c, geo.latent_frames, geo.latent_height, geo.latent_width,
                            generator=gen, device=self.device)

        # 2. text (PIPELINE.md §5)
        t0 = time.perf_counter()
        features, num_text = self.text_encoder.encode(request.prompt)
        features = features.to(self.device)
        if self.max_text_tokens is not None:
            num_text = min(num_text, self.max_text_tokens)
        timings["text"] = time.perf_counter() - t0

        # 3. distilled loop with image conditioning (§7, §10.3)
        prev = request.continue_from
        image_latent = self._conditioning_latent(request)
        config = dataclasses.replace(self.sampler, a2v=lipsync, keep_audio_clean=self.keep_audio_clean)
        video, audio = sample(self._velocity_fn(features, num_text, timings), video, audio, config,
                              image_latent=image_latent.to(self.device), noise_fn=generator_noise(gen),
                              cancel=cancel)
        if cancel is not None and cancel.is_set():
            raise CancelledError("cancelled before decoding")

        # 4. decode (§15)
        t0 = time.perf_counter()
        frames = self._decode_frames(video, cancel)
        timings["decode_video"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if lipsync:
            waveform, rate = np.asarray(request.audio, dtype=np.float32), int(request.audio_sample_rate)
        else:
            stereo, rate = self.audio_vae.decode(audio)
            waveform = np.asarray(stereo, dtype=np.float32).mean(axis=1)
        timings["decode_audio"] = time.perf_counter() - t0

        # one timeline: drop the duplicated conditioning frame of a continuation, trim audio to video
        if prev is not None and frames.shape[0] > 1:
            frames = frames[1:]
            waveform = waveform[int(round(rate / self.fps)):]
        waveform = fit_length(waveform, int(round(frames.shape[0] / self.fps * rate)))

        t0 = time.perf_counter()
        last = np.ascontiguousarray(frames[-1])
        continuation = Continuation(last_frame=last, last_frame_latent=self.video_vae.encode_image(last).float(),
                                    video_latent=video, audio_latent=audio)
        timings["encode_last_frame"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        return Segment(frames=frames, audio=waveform, sample_rate=rate, fps=self.fps,
                       continuation=continuation, timings_s=timings, request=request)

    def _decode_frames(self, latent: torch.Tensor, cancel: threading.Event | None) -> np.ndarray:
        """Decode ``float32 [1, 48, T, h, w]`` to ``uint8 [4T - 3, 16h, 16w, 3]``, checking ``cancel``
        between the decoder's windows when it decodes in windows (the Turbo decoder's ``decode_chunks``,
        CODECS.md §2.4), so a preempted job gives the worker back within one window.

        Raises:
            CancelledError: ``cancel`` was set between two windows.
        """
        chunks_fn = getattr(self.video_decoder, "decode_chunks", None)
        if chunks_fn is None:
            return self.video_decoder.decode_to_uint8(latent)
        chunks = []
        for chunk in chunks_fn(latent):
            chunks.append(chunk)
            if cancel is not None and cancel.is_set():
                raise CancelledError(f"cancelled while decoding, after {sum(c.shape[2] for c in chunks)} frames")
        return frames_to_uint8(torch.cat(chunks, dim=2))

    # -- latent super-resolution of a buffered segment ------------------------------------
    @torch.inference_mode()
    def upgrade(self, segment: Segment, cancel: threading.Event | None = None) -> Segment:
        """Re-render ``segment`` at ``sr_width x sr_height`` through the latent SR stage
        (PIPELINE.md §14: trilinear upsample, re-noise at S[220], fixed 70 %-noise audio context,
        5 UniPC steps of the SR DiT with coords v1, image latent re-encoded at SR size).

        The audio, duration, frame count and continuation are unchanged; only ``frames`` (now
        ``[F, sr_height, sr_width, 3]``) and ``super_resolved`` differ.

        Raises:
            EngineInputError: no SR model loaded, or the segment lacks its latents/request.
            CancelledError: ``cancel`` was set (checked before every step, before the decode and
                between the decoder's windows).
        """
        if self.sr_dit is None:
            raise EngineInputError("no super-resolution model is loaded (sr_dit)")
        request, state = segment.request, segment.continuation
        if request is None or state.video_latent is None or state.audio_latent is None:
            raise EngineInputError("segment has no request or latents to upgrade")
        with self._lock:
            return self._upgrade(segment, request, cancel)

    def _upgrade(self, segment: Segment, request: SegmentRequest, cancel) -> Segment:
        from engine.codecs.image import preprocess_image
        from engine.sampler import SR, prepare_sr_inputs

        start = time.perf_counter()
        timings: dict[str, float] = {}
        gen = torch.Generator(device=self.device).manual_seed(int(request.seed) + 1_000_003)
        state = segment.continuation
        h_sr, w_sr = self.sr_height // 16, self.sr_width // 16
        sr_video, sr_audio = prepare_sr_inputs(state.video_latent.to(self.device), state.audio_latent.to(self.device),
                                               h_sr, w_sr, generator_noise(gen))
        prev = request.continue_from
        source = prev.last_frame if prev is not None else request.identity.image
        image_latent = self.video_vae.encode_image(preprocess_image(source, self.sr_width, self.sr_height)).float()
        features, num_text = self.text_encoder.encode(request.prompt)
        if self.max_text_tokens is not None:
            num_text = min(num_text, self.max_text_tokens)
        cfg = self.sr_dit.config

        def velocity(video, audio, timestep, conditional):
            t0 = time.perf_counter()
            packed = pack(video, audio, features.to(self.device), num_text=num_text, in_channels=cfg.in_channels,
                          coords_style="v1")
            out = self.sr_dit(packed.x, packed.coords, packed.modality, spans=packed.spans,
                              local_ranges=packed.local_ranges, compute_dtype=self.compute_dtype)
            timings["sr_dit"] = timings.get("sr_dit", 0.0) + time.perf_counter() - t0
            return unpack(out, packed, cfg.audio_in_channels)

        video, _ = sample(velocity, sr_video, sr_audio, SR, image_latent=image_latent.to(self.device),
                          noise_fn=generator_noise(gen), cancel=cancel)
        if cancel is not None and cancel.is_set():
            raise CancelledError("cancelled before decoding the upgraded segment")
        t0 = time.perf_counter()
        frames = self._decode_frames(video, cancel)
        timings["sr_decode_video"] = time.perf_counter() - t0
        if prev is not None and frames.shape[0] > 1:
            frames = frames[1:]
        if frames.shape[0] != segment.num_frames:
            raise RuntimeError(f"upgraded segment has {frames.shape[0]} frames, expected {segment.num_frames}")
        timings["sr_total"] = time.perf_counter() - start
        return dataclasses.replace(segment, frames=frames, super_resolved=True,
                                   timings_s={**segment.timings_s, **timings})


def fit_length(waveform: np.ndarray, num_samples: int) -> np.ndarray:
    """Trim or zero-pad a mono waveform ``[N]`` to exactly ``num_samples``."""
    if waveform.shape[0] >= num_samples:
        return np.ascontiguousarray(waveform[:num_samples])
    return np.concatenate([waveform, np.zeros(num_samples - waveform.shape[0], dtype=waveform.dtype)])


PREVIEW_WIDTH, PREVIEW_HEIGHT = 224, 128
PREVIEW_TEXT_TOKENS = 256
"""The preview's byte tokenizer makes one token per UTF-8 byte (a 1,600-character enhanced prompt is
640 tokens after the reference's cap, where T5Gemma's tokenizer gives ~400); the preview keeps the
first 256 so that text does not dominate its sequence on a CPU. The real stack keeps 640."""

PREVIEW_AUDIO_MODEL_RATE_HZ = 12_800
"""Model rate of the preview's Oobleck VAE (hop 512, strides 2·2·4·4·8; still 25 latents/s). The
encoder's first stage is 128 channels wide at any size (2 x latent dim), so at the released 51.2 kHz
encoding the user's audio took about as long as the whole rest of a lip-sync segment on 2 CPU
cores; at 12.8 kHz it is a quarter of the work. The real stack keeps 51.2 kHz (hop 2048)."""


def build_preview_engine(*, seed: int = 0, device: str = "cpu", width: int = PREVIEW_WIDTH,
                         height: int = PREVIEW_HEIGHT, compute_dtype: torch.dtype | None = None,
                         sr: bool = False, backend: str = "eager") -> MagiHumanEngine:
    """The ``preview`` preset: the same classes at a small size with seeded, untrained weights.

    Its pictures and sounds are noise by design; the structure (shapes, rates, timing, the
    whole streaming path) is the real one. ``compute_dtype`` defaults to bf16 (the reference
    numerics, DIT.md §6; also the faster one on CPUs with bf16 dot-product units); the Oobleck
    encoder (lip-sync) runs in bf16 too, and its VAE at :data:`PREVIEW_AUDIO_MODEL_RATE_HZ`
    (12.8 kHz, hop 512) instead of 51.2 kHz (hop 2048): preview-only speed choices (the reference:
    fp32 at 51.2 kHz) that keep 25 audio latents per second. ``sr=True`` adds a seeded preview SR DiT
    that upgrades segments to twice the size (``2 width x 2 height``). ``backend`` selects the
    DiT execution path (:func:`engine.backends.apply_backend`: eager, fast, compile, fp8, ...).
    """
    from engine.codecs.audio_vae import OobleckAudioVAE
    from engine.codecs.text_encoder import T5GemmaTextEncoder
    from engine.codecs.video_vae import WanVideoVAE
    from engine.config import preview_config

    config = preview_config()
    text_encoder = T5GemmaTextEncoder.preview(seed=seed, hidden_size=config.text_in_channels)
    dit = DiTModel(config)
    init_seeded(dit, seed)
    dit.eval().to(device)
    if compute_dtype is None:
        compute_dtype = torch.bfloat16
    sr_dit = None
    if sr:
        sr_dit = DiTModel(config)
        init_seeded(sr_dit, seed + 1)
        sr_dit.eval().to(device)
    engine = MagiHumanEngine(
        dit, text_encoder, WanVideoVAE.preview(seed=seed).to(device),
        OobleckAudioVAE.preview(seed=seed, encode_dtype=torch.bfloat16, model_sample_rate=PREVIEW_AUDIO_MODEL_RATE_HZ),
        width=width, height=height, device=device, compute_dtype=compute_dtype, name="preview", notice=PREVIEW_NOTICE,
        sr_dit=sr_dit, sr_size=(2 * width, 2 * height) if sr else None, max_text_tokens=PREVIEW_TEXT_TOKENS,
    )
    return use_backend(engine, backend)


def use_backend(engine: MagiHumanEngine, backend: str) -> MagiHumanEngine:
    """Switch the engine's DiT(s) to ``backend`` (:func:`engine.backends.apply_backend`)."""
    if backend == "eager":
        return engine
    from engine.backends import apply_backend

    info = None
    for dit in (engine.dit, engine.sr_dit):
        if dit is not None:
            info = apply_backend(dit, backend, engine.device)
    if info is not None and info.compile_mode == "reduce-overhead":
        from engine.backends.compile import mark_step

        engine.before_dit_call = mark_step
    return engine


def build_engine(preset: str, *, checkpoint_dir: str | None = None, device: str = "cpu", seed: int = 0,
                 sr: bool = False, backend: str = "eager"):
    """Build a :class:`engine.api.SegmentEngine` by preset name.

    * ``preview``: :func:`build_preview_engine` (CPU friendly, seeded weights).
    * ``testpattern``: :class:`engine.testpattern.TestPatternEngine` (no model; flashes and
      clicks at known media times, for A/V sync measurements).
    * ``full``: the released model stack loaded from ``checkpoint_dir`` (issue: checkpoint
      loading); requires a GPU in practice.

    Raises:
        ValueError: unknown preset, or ``full`` without ``checkpoint_dir``.
    """
    if preset == "preview":
        return build_preview_engine(seed=seed, device=device, sr=sr, backend=backend)
    if preset == "testpattern":
        from engine.testpattern import TestPatternEngine

        return TestPatternEngine()
    if preset == "full":
        if not checkpoint_dir:
            raise ValueError("preset 'full' needs checkpoint_dir (the released daVinci-MagiHuman stack)")
        from engine.stack import build_full_engine

        return use_backend(build_full_engine(checkpoint_dir, device=device, sr=sr), backend)
    raise ValueError(f"unknown engine preset {preset!r}; known: preview, testpattern, full")
