"""The MagiHuman segment pipeline: text/audio + identity in, decoded audio+video segment out.

Per segment (PIPELINE.md §1 step 3, §16), inside a ``torch.Generator`` seeded with the
request's seed:

1. noise: audio ``randn [1, A, 64]`` (or, in lip-sync mode, the Oobleck encoding of the
   user's audio, §13), then video ``randn [1, 48, T, h, w]`` (§4);
2. the prompt through the text encoder (fp16-rounded, padded to 640, §5);
3. the distilled 8-step loop (§10.3, §12) with the image latent of the identity (first segment)
   or of the previous segment's last frame (continuation) written into latent frame 0 (§7);
4. decode audio (Oobleck + 441/512 resample, §15.2), then video (Wan2.2 VAE or Turbo decoder,
   §15.1) window by window; with ``on_chunk`` each window's frames and their audio are handed out
   (:class:`~engine.api.SegmentChunk`) as soon as the window is decoded, so the first frames can
   play before the segment is whole (issue 17).

Deliberate, named differences from the reference (all options, reference behaviour available):

* ``keep_audio_clean=True``: in lip-sync mode the provided audio latent is not re-noised by the
  distilled step (the reference re-noises it, PIPELINE.md §17.6); and the segment's audio is the
  user's own waveform, not a decode of the latent.
* the segment's audio is trimmed to the video duration ``F / 25`` s (5 s: 125 frames, 5.00 s
  instead of the reference's 5.04 s file) so consecutive segments tile one timeline.
* frame 0 of a continuation segment is the previous segment's last frame (§7 conditioning),
  so it is dropped from the output, together with the first ``1/25`` s of audio.
* the prompt's cost is bounded (issue 18): the text encoder sees at most
  :data:`~engine.codecs.text_encoder.TEXT_TARGET_LENGTH` (640) token ids, the DiT at most
  ``max_text_tokens`` text rows. Longer prompts are truncated, never refused (an idle segment must
  still be produced); the reference encodes the whole prompt and then keeps 640 rows, so only
  prompts over 640 tokens differ (their kept rows miss the tail's context). Callers that want to
  refuse instead compare :meth:`MagiHumanEngine.count_text_tokens` with ``max_text_tokens``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from engine.api import (
    VIDEO_FPS,
    CancelledError,
    ChunkCallback,
    Continuation,
    EngineInputError,
    Identity,
    Segment,
    SegmentChunk,
    SegmentKind,
    SegmentRequest,
    audio_sample_offset,
)
from engine.codecs.image import frames_to_uint8
from engine.codecs.text_encoder import TEXT_TARGET_LENGTH
from engine.dit import DiTModel
from engine.geometry import SegmentGeometry, check_resolution
from engine.graphs import GraphLoop, StepNoise, check_static_config, draw_step_noise
from engine.runner import DiTRunner
from engine.sampler import DISTILL, SamplerConfig, generator_noise, sample

logger = logging.getLogger(__name__)

AUDIO_LATENT_CHANNELS = 64
MAX_SEGMENT_SECONDS = 10.0


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
        sr_dit, sr_size: the super-resolution DiT and its output size ``(width, height)`` in pixels
            (multiples of 32), given together or not at all (:meth:`super_resolve`).
        max_text_tokens: text tokens the DiT sees at most (None: the reference's 640, PIPELINE.md §5);
            the attribute is always an int.
        text_buckets: text lengths the DiT's text is padded up to (static shapes, :mod:`engine.runner`);
            None: no padding.
        graph_loop: run the distilled loop with static inputs (:class:`engine.graphs.GraphLoop`), captured
            as one CUDA graph per shape where the backend allows it (issue 17); cancel then acts per
            segment, not per step. None (default): on for a CUDA device, off elsewhere.

    Attributes:
        runner, sr_runner: the :class:`engine.runner.DiTRunner` of the DiT and of the SR DiT (or None).
        graph_loop: the :class:`engine.graphs.GraphLoop` of ``runner``, or None when off.
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
        text_buckets: tuple[int, ...] | None = None,
        graph_loop: bool | None = None,
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
        self.max_text_tokens = TEXT_TARGET_LENGTH if max_text_tokens is None else int(max_text_tokens)
        self.max_prompt_tokens = TEXT_TARGET_LENGTH  # token ids the text encoder sees at most
        if not 0 < self.max_text_tokens <= TEXT_TARGET_LENGTH:
            raise ValueError(f"max_text_tokens {max_text_tokens} outside [1, {TEXT_TARGET_LENGTH}]")
        self.runner = DiTRunner(dit, compute_dtype=compute_dtype, coords_style="v2", text_buckets=text_buckets)
        self.sr_runner = None if sr_dit is None else DiTRunner(
            sr_dit, compute_dtype=compute_dtype, coords_style="v1", text_buckets=text_buckets)
        if (sr_dit is None) != (sr_size is None):
            raise ValueError("sr_dit and sr_size must be given together")
        if sr_size is not None:
            check_resolution(*sr_size)
        self.sr_width, self.sr_height = sr_size if sr_size is not None else (None, None)
        use_graph_loop = self.device.type == "cuda" if graph_loop is None else bool(graph_loop)
        self.graph_loop = GraphLoop(self.runner) if use_graph_loop else None
        self._lock = threading.Lock()

    # -- warm start -----------------------------------------------------------------------
    def text_rows_options(self) -> tuple[int, ...]:
        """Every text length the DiT can be called with: the runner's buckets (up to
        :attr:`max_text_tokens`), or every length 1..max without buckets (unbounded shapes)."""
        buckets = self.runner.text_buckets
        if buckets:
            return tuple(b for b in buckets if b <= self.max_text_tokens)
        return tuple(range(1, self.max_text_tokens + 1))

    @torch.inference_mode()
    def warm_up(self, segment_seconds, *, super_resolution: bool = True, lipsync: bool = True) -> dict:
        """Run the DiT once on every (segment length x text bucket) shape it can be asked for, so that
        ``torch.compile`` compiles (or loads from its cache, :func:`engine.factory.create_engine`'s
        ``compile_cache_dir``) and CUDA graphs are captured before the first session (issue 17).

        A server calls this once after building the engine, with the segment lengths its planner can
        ask for, and stays not-ready until it returns. Blocking; run it off the event loop. Each
        shape gets one call (two when :attr:`DiTRunner.before_call` is set: CUDA-graph trees record
        on the second); with :attr:`graph_loop` the DiT's shapes instead run the whole static loop of a
        speak segment once, which captures its CUDA graph where allowed. Inputs are zeros (only the
        shapes matter). A lip-sync segment of the same length has one audio latent fewer (its audio is
        encoded, ``floor(25 s)``) and keeps its audio clean: with ``lipsync`` those shapes are warmed
        too (as a lip-sync loop); a shorter microphone segment still captures at its second use.

        Args:
            segment_seconds: requested segment lengths in seconds (each ``0 < s <= max_segment_seconds``).
            super_resolution: also warm the SR DiT's shapes when one is loaded.
            lipsync: also warm the lip-sync shape of each length (base DiT only).

        Returns:
            ``{"shapes": [{"model": "dit"|"sr_dit", "kind": "speak"|"lipsync", "seconds", "audio_latents",
            "text_rows", "seq_len", "first_call_s", "graph_loop"}, ...], "total_s": float}``
            (``graph_loop``: the whole loop ran).

        Raises:
            EngineInputError: a length outside ``(0, max_segment_seconds]``.
            ValueError: no text buckets (every text length would be its own shape; refuse rather than
                run ``max_text_tokens`` shapes).
        """
        if not self.runner.text_buckets:
            raise ValueError("warm_up needs text buckets (text_buckets='auto'); without them the shapes are unbounded")
        lengths = sorted({float(s) for s in segment_seconds})
        for seconds in lengths:
            if not 0 < seconds <= self.max_segment_seconds:
                raise EngineInputError(f"segment_seconds {seconds} outside (0, {self.max_segment_seconds}]")
        jobs = [("dit", self.runner, self.width, self.height)]
        if super_resolution and self.sr_runner is not None:
            jobs.append(("sr_dit", self.sr_runner, self.sr_width, self.sr_height))
        shapes, started = [], time.perf_counter()
        with self._lock:
            for model, runner, width, height in jobs:
                cfg = runner.config
                features = torch.zeros(TEXT_TARGET_LENGTH, cfg.text_in_channels, device=self.device)
                for seconds in lengths:
                    speak = SegmentGeometry.for_seconds(seconds, width, height, self.fps)
                    kinds = [("speak", speak)]
                    if lipsync and model == "dit" and speak.audio_latents > 1:
                        kinds.append(("lipsync", SegmentGeometry.for_audio_latents(speak.audio_latents - 1,
                                                                                   width, height)))
                    for kind, geo in kinds:
                        video = torch.zeros(geo.latent_shape(cfg.latent_channels), device=self.device)
                        audio = torch.zeros(1, geo.audio_latents, cfg.audio_in_channels, device=self.device)
                        for rows in self.text_rows_options():
                            inputs = runner.prepare(video.shape, geo.audio_latents, features, rows,
                                                    device=self.device)
                            t0 = time.perf_counter()
                            whole_loop = model == "dit" and self._warm_graph_loop(inputs, video, audio,
                                                                                  a2v=kind == "lipsync")
                            if not whole_loop:
                                for _ in range(2 if runner.before_call is not None else 1):
                                    runner.velocity(inputs, video, audio)
                            if self.device.type == "cuda":
                                torch.cuda.synchronize(self.device)
                            shapes.append({"model": model, "kind": kind, "seconds": seconds,
                                           "audio_latents": geo.audio_latents, "text_rows": rows,
                                           "seq_len": inputs.length, "first_call_s": time.perf_counter() - t0,
                                           "graph_loop": whole_loop})
        total = time.perf_counter() - started
        logger.info("warmed %d DiT shapes in %.1f s", len(shapes), total)
        return {"shapes": shapes, "total_s": total}

    def _static_loop_config(self, config: SamplerConfig) -> bool:
        """The graph loop is on and runs ``config`` (a distilled one)."""
        if self.graph_loop is None:
            return False
        try:
            check_static_config(config)
        except ValueError:
            return False
        return True

    def _warm_graph_loop(self, inputs, video: torch.Tensor, audio: torch.Tensor, *, a2v: bool = False) -> bool:
        """Run (and capture, where allowed) the static loop of a speak (``a2v``: lip-sync) segment on
        ``inputs``; False when the graph loop is off or does not run the engine's sampler."""
        config = dataclasses.replace(self.sampler, a2v=a2v, keep_audio_clean=self.keep_audio_clean)
        if not self._static_loop_config(config):
            return False
        steps = config.num_steps
        noise = StepNoise(video.new_zeros((steps, *video.shape)), audio.new_zeros((steps, *audio.shape)))
        image_latent = video.new_zeros((*video.shape[:2], 1, *video.shape[3:]))
        self.graph_loop.run(inputs, video, audio, config, noise, image_latent=image_latent, capture_now=True)
        return True

    def _denoise(self, inputs, video: torch.Tensor, audio: torch.Tensor, config: SamplerConfig,
                 image_latent: torch.Tensor, gen: torch.Generator, cancel,
                 timings: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The base stage's denoising loop (PIPELINE.md §10.3, §12): the graph loop for a distilled config
        when :attr:`graph_loop` is on (noise drawn up front from ``gen``, cancel checked before the loop
        only), else :func:`engine.sampler.sample` (cancel checked before every step). ``timings["dit"]``
        gets the wall seconds (a graph replay is timed as launched, not synchronised).

        Raises:
            CancelledError: ``cancel`` was set before the loop (graph loop) or before a step.
        """
        if not self._static_loop_config(config):
            return sample(self.runner.velocity_fn(inputs, timings, "dit"), video, audio, config,
                          image_latent=image_latent, noise_fn=generator_noise(gen), cancel=cancel)
        if cancel is not None and cancel.is_set():
            raise CancelledError("cancelled before denoising")
        noise = draw_step_noise(gen, video, audio, config.num_steps)
        t0 = time.perf_counter()
        video, audio = self.graph_loop.run(inputs, video, audio, config, noise, image_latent=image_latent)
        timings["dit"] = timings.get("dit", 0.0) + time.perf_counter() - t0
        return video, audio

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

    def count_text_tokens(self, text: str) -> int:
        """Tokens of ``text`` with the engine's own tokenizer (BOS included): what the text encoder
        would see untruncated. Compare with :attr:`max_text_tokens` (the DiT's limit) to refuse text
        that the engine would truncate (see the module doc).

        Raises:
            EngineInputError: ``text`` is not a string.
        """
        try:
            return self.text_encoder.count_tokens(text)
        except ValueError as exc:
            raise EngineInputError(f"prompt: {exc}") from exc

    def _encode_text(self, prompt: str) -> tuple[torch.Tensor, int]:
        """The prompt's text context (PIPELINE.md §5): fp32 ``[640, C]`` on the engine's device and the
        number of rows the DiT sees, ``min(n_tokens, max_text_tokens)``; the encoder sees at most
        :attr:`max_prompt_tokens` token ids (bounded cost, module doc)."""
        features, num_text = self.text_encoder.encode(prompt, max_input_tokens=self.max_prompt_tokens)
        return features.to(self.device), min(num_text, self.max_text_tokens)

    @torch.inference_mode()
    def generate(self, request: SegmentRequest, cancel: threading.Event | None = None,
                 on_chunk: ChunkCallback | None = None) -> Segment:
        """Generate one segment (see module doc). Blocking; run it in a worker thread.

        ``on_chunk`` (optional) gets each decoder window's frames with their audio as a
        :class:`~engine.api.SegmentChunk` as soon as the window is decoded (the audio is decoded
        before the video for that; :meth:`engine.api.SegmentEngine.generate`).

        Raises:
            EngineInputError: a request field is out of range.
            CancelledError: ``cancel`` was set; checked before every denoising step (before the whole
                loop with :attr:`graph_loop`), before the decode and between the decoder's windows.
        """
        self._check(request)
        with self._lock:
            return self._generate(request, cancel, on_chunk)

    def _generate(self, request: SegmentRequest, cancel, on_chunk: ChunkCallback | None = None) -> Segment:
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
        geo = SegmentGeometry.for_audio_latents(audio.shape[1], self.width, self.height)
        video = torch.randn(geo.latent_shape(self.dit.config.latent_channels), generator=gen, device=self.device)

        # 2. text (PIPELINE.md §5)
        t0 = time.perf_counter()
        features, num_text = self._encode_text(request.prompt)
        timings["text"] = time.perf_counter() - t0

        # 3. distilled loop with image conditioning (§7, §10.3)
        prev = request.continue_from
        image_latent = self._conditioning_latent(request)
        config = dataclasses.replace(self.sampler, a2v=lipsync, keep_audio_clean=self.keep_audio_clean)
        inputs = self.runner.prepare(video.shape, audio.shape[1], features, num_text, device=self.device)
        video, audio = self._denoise(inputs, video, audio, config, image_latent.to(self.device), gen, cancel,
                                     timings)
        if cancel is not None and cancel.is_set():
            raise CancelledError("cancelled before decoding")

        # 4. decode (§15): the audio first (cheap next to the video), so that every video window
        # can stream out with its audio as soon as it is decoded (issue 17)
        t0 = time.perf_counter()
        if lipsync:
            waveform, rate = np.asarray(request.audio, dtype=np.float32), int(request.audio_sample_rate)
        else:
            stereo, rate = self.audio_vae.decode(audio)
            waveform = np.asarray(stereo, dtype=np.float32).mean(axis=1)
        timings["decode_audio"] = time.perf_counter() - t0

        # one timeline: drop the duplicated conditioning frame of a continuation, trim audio to video
        decoded = 4 * int(video.shape[2]) - 3  # F = 4T - 3 (PIPELINE.md §3)
        skip = 1 if prev is not None and decoded > 1 else 0
        if skip:
            waveform = waveform[int(round(rate / self.fps)):]
        num_frames = decoded - skip
        waveform = fit_length(waveform, audio_sample_offset(num_frames, self.fps, rate))

        def stream(first: int, window: np.ndarray) -> None:
            """Hand decoded frames ``[first, first + n)`` (before the skip) out as one chunk."""
            kept = window[max(0, skip - first):]
            start = max(0, first - skip)
            if on_chunk is None or kept.shape[0] == 0:
                return
            end = start + kept.shape[0]
            timings.setdefault("first_chunk", time.perf_counter() - t_start)
            on_chunk(SegmentChunk(
                frames=kept,
                audio=waveform[audio_sample_offset(start, self.fps, rate):audio_sample_offset(end, self.fps, rate)],
                sample_rate=rate, fps=self.fps, start_frame=start, total_frames=num_frames))

        t0 = time.perf_counter()
        frames = self._decode_frames(video, cancel, on_window=stream)[skip:]
        timings["decode_video"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        last = np.ascontiguousarray(frames[-1])
        continuation = Continuation(last_frame=last, last_frame_latent=self.video_vae.encode_image(last).float(),
                                    video_latent=video, audio_latent=audio)
        timings["encode_last_frame"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        return Segment(frames=frames, audio=waveform, sample_rate=rate, fps=self.fps,
                       continuation=continuation, timings_s=timings, request=request)

    def _decode_frames(self, latent: torch.Tensor, cancel: threading.Event | None,
                       on_window: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
        """Decode ``float32 [1, 48, T, h, w]`` to ``uint8 [4T - 3, 16h, 16w, 3]`` window by window when the
        decoder has ``decode_chunks`` (the Turbo decoder's windows, CODECS.md §2.4; the Wan VAE's latent
        frames), else in one call. ``cancel`` is checked after every window, so a preempted job gives the
        worker back within one window; ``on_window(first, frames)`` gets each window's uint8 frames (``first``:
        index of its first frame) before the next window is decoded. The windows concatenate to the result.

        Raises:
            CancelledError: ``cancel`` was set between two windows.
        """
        chunks_fn = getattr(self.video_decoder, "decode_chunks", None)
        if chunks_fn is None:
            frames = self.video_decoder.decode_to_uint8(latent)
            if on_window is not None:
                on_window(0, frames)
            return frames
        windows: list[np.ndarray] = []
        done = 0
        for chunk in chunks_fn(latent):
            window = frames_to_uint8(chunk)  # per frame, so per window = on the whole
            windows.append(window)
            if cancel is not None and cancel.is_set():
                raise CancelledError(f"cancelled while decoding, after {done + window.shape[0]} frames")
            if on_window is not None:
                on_window(done, window)
            done += window.shape[0]
        return windows[0] if len(windows) == 1 else np.concatenate(windows)

    # -- latent super-resolution of a buffered segment ------------------------------------
    @property
    def can_super_resolve(self) -> bool:
        """An SR DiT is loaded (:meth:`super_resolve` works; ``sr_width``/``sr_height`` are set)."""
        return self.sr_dit is not None

    @torch.inference_mode()
    def super_resolve(self, segment: Segment, cancel: threading.Event | None = None) -> Segment:
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
            raise EngineInputError("segment has no request or latents to super-resolve")
        with self._lock:
            return self._super_resolve(segment, request, cancel)


    def _super_resolve(self, segment: Segment, request: SegmentRequest, cancel) -> Segment:
        from engine.codecs.image import preprocess_image
        from engine.sampler import SR, prepare_sr_inputs

        start = time.perf_counter()
        timings: dict[str, float] = {}
        gen = torch.Generator(device=self.device).manual_seed(int(request.seed) + 1_000_003)
        state = segment.continuation
        sr_geo = SegmentGeometry.for_audio_latents(state.audio_latent.shape[1], self.sr_width, self.sr_height)
        h_sr, w_sr = sr_geo.latent_height, sr_geo.latent_width
        sr_video, sr_audio = prepare_sr_inputs(state.video_latent.to(self.device), state.audio_latent.to(self.device),
                                               h_sr, w_sr, generator_noise(gen))
        prev = request.continue_from
        source = prev.last_frame if prev is not None else request.identity.image
        image_latent = self.video_vae.encode_image(preprocess_image(source, self.sr_width, self.sr_height)).float()
        features, num_text = self._encode_text(request.prompt)
        inputs = self.sr_runner.prepare(sr_video.shape, sr_audio.shape[1], features, num_text, device=self.device)
        video, _ = sample(self.sr_runner.velocity_fn(inputs, timings, "sr_dit"), sr_video, sr_audio, SR,
                          image_latent=image_latent.to(self.device), noise_fn=generator_noise(gen), cancel=cancel)
        if cancel is not None and cancel.is_set():
            raise CancelledError("cancelled before decoding the super-resolved segment")
        t0 = time.perf_counter()
        frames = self._decode_frames(video, cancel)
        timings["sr_decode_video"] = time.perf_counter() - t0
        if prev is not None and frames.shape[0] > 1:
            frames = frames[1:]
        if frames.shape[0] != segment.num_frames:
            raise RuntimeError(f"super-resolved segment has {frames.shape[0]} frames, expected {segment.num_frames}")
        timings["sr_total"] = time.perf_counter() - start
        return dataclasses.replace(segment, frames=frames, super_resolved=True,
                                   timings_s={**segment.timings_s, **timings})


def fit_length(waveform: np.ndarray, num_samples: int) -> np.ndarray:
    """Trim or zero-pad a mono waveform ``[N]`` to exactly ``num_samples``."""
    if waveform.shape[0] >= num_samples:
        return np.ascontiguousarray(waveform[:num_samples])
    return np.concatenate([waveform, np.zeros(num_samples - waveform.shape[0], dtype=waveform.dtype)])
