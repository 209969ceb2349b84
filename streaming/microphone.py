"""The client's microphone: voice activity (silero-vad) and the audio that drives lip-sync.

:class:`Microphone` reads an incoming aiortc audio track. Every frame is converted once by a
stateful PyAV resampler to 48 kHz float32, its channels averaged to mono, and kept in a ring
buffer (the lip-sync audio); a stateful soxr stream turns that into 16 kHz for silero-vad,
which scores 512-sample windows (32 ms) in a worker thread. A hysteresis on the scores gives
the *speaking* state and the voiced spans.

Audio positions are sample indices at 48 kHz on the microphone's own timeline (samples
received so far). Lip-sync consumes the audio of a *run* strictly in order through
:meth:`take_audio`, so the avatar repeats the user's audio without gaps, repeats or stretched
pauses. A run begins with a voiced span (the silence before it is skipped, keeping
``preroll_ms``), carries on through pauses shorter than ``run_gap_ms``, and ends once the
voice has been silent that long and its last voiced audio (plus the pre-roll) was taken.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any

import av
import numpy as np
import soxr
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from streaming.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

MIC_SAMPLE_RATE_HZ = 48_000
VAD_SAMPLE_RATE_HZ = 16_000
VAD_WINDOW_SAMPLES = 512  # silero-vad's window at 16 kHz (32 ms)
_MIC_PER_VAD = MIC_SAMPLE_RATE_HZ // VAD_SAMPLE_RATE_HZ


def load_vad_model() -> Any:
    """Load silero-vad's TorchScript model (shipped inside the package).

    Importing ``silero_vad`` calls ``torch.set_num_threads(1)`` for the whole process; the
    thread count is restored so that an engine running on CPU keeps its threads.
    """
    import torch

    threads = torch.get_num_threads()
    from silero_vad import load_silero_vad

    torch.set_num_threads(threads)
    return load_silero_vad()


class SileroScorer:
    """Speech probability per 512-sample 16 kHz window; one stateful model per stream."""

    def __init__(self, model: Any | None = None) -> None:
        self._model = model if model is not None else load_vad_model()
        self._model.reset_states()

    def __call__(self, windows: np.ndarray) -> list[float]:
        import torch

        # The model is tiny: one intra-op thread is ~10x faster than two (thread hand-offs
        # dominate). The setting is per calling thread, so the engine's threads keep theirs.
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        with torch.inference_mode():
            return [float(self._model(torch.from_numpy(window), VAD_SAMPLE_RATE_HZ).item()) for window in windows]


class _Ring:
    """Fixed-size ring of float32 samples addressed by absolute sample index."""

    def __init__(self, capacity: int) -> None:
        self._data = np.zeros(capacity, dtype=np.float32)
        self.capacity = capacity
        self.end = 0  # absolute index after the last written sample

    @property
    def start(self) -> int:
        return max(0, self.end - self.capacity)

    def write(self, samples: np.ndarray) -> None:
        samples = samples[-self.capacity :]
        pos = self.end % self.capacity
        first = min(samples.size, self.capacity - pos)
        self._data[pos : pos + first] = samples[:first]
        self._data[: samples.size - first] = samples[first:]
        self.end += samples.size

    def read(self, begin: int, count: int) -> np.ndarray:
        """``count`` samples from absolute index ``begin``; zeros where nothing is stored."""
        out = np.zeros(count, dtype=np.float32)
        pos, hi = max(begin, self.start), min(begin + count, self.end)
        while pos < hi:  # at most two pieces, split where the ring wraps
            src = pos % self.capacity
            size = min(hi - pos, self.capacity - src)
            out[pos - begin : pos - begin + size] = self._data[src : src + size]
            pos += size
        return out


class Microphone:
    """Voice activity and lip-sync audio of one client's microphone track.

    Args:
        threshold: speech probability that starts (or continues) voice.
        release_threshold: probability below which a window counts as silence.
        hangover_ms: silence needed before the user counts as no longer speaking.
        preroll_ms: audio kept before the first voiced window of a span.
        min_speech_ms: voiced time needed before a span counts as speech.
        run_gap_ms: silence that ends a lip-sync run; shorter pauses are played as they were.
        history_s: seconds of audio kept.
        scorer_factory: builds the per-stream scorer (tests inject a fake one).
        on_change: called on the event loop when the speaking state changes.
    """

    def __init__(
        self,
        *,
        threshold: float = 0.5,
        release_threshold: float = 0.35,
        hangover_ms: float = 400.0,
        preroll_ms: float = 200.0,
        min_speech_ms: float = 96.0,
        run_gap_ms: float = 1500.0,
        history_s: float = 30.0,
        scorer_factory: Callable[[], Callable[[np.ndarray], list[float]]] = SileroScorer,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.release_threshold = release_threshold
        self.hangover_samples = round(hangover_ms / 1000 * MIC_SAMPLE_RATE_HZ)
        self.preroll_samples = round(preroll_ms / 1000 * MIC_SAMPLE_RATE_HZ)
        self.min_speech_samples = round(min_speech_ms / 1000 * MIC_SAMPLE_RATE_HZ)
        self.run_gap_samples = round(run_gap_ms / 1000 * MIC_SAMPLE_RATE_HZ)
        self.on_change = on_change
        self._scorer_factory = scorer_factory
        self._scorer: Callable[[np.ndarray], list[float]] | None = None
        self._ring = _Ring(round(history_s * MIC_SAMPLE_RATE_HZ))
        # Channels are kept and averaged below: FFmpeg's stereo->mono matrix adds 3 dB.
        self._resampler = av.AudioResampler(format="fltp", rate=MIC_SAMPLE_RATE_HZ)
        self._to_vad = soxr.ResampleStream(MIC_SAMPLE_RATE_HZ, VAD_SAMPLE_RATE_HZ, 1, dtype="float32")
        self._vad_pending = np.zeros(0, dtype=np.float32)
        self._vad_pos = 0  # 16 kHz index of the next window
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vad")
        self._task: asyncio.Task[None] | None = None

        self.speaking = False
        self.spans: list[tuple[int, int]] = []  # finished voiced spans [start, end) at 48 kHz
        self._span_start: int | None = None  # first voiced sample of a run not yet confirmed/ended
        self._voiced_samples = 0
        self._last_voiced_end = 0
        self._read_pos = 0  # next sample lip-sync takes
        self.run_active = False
        self.run_id = 0  # increments with each new lip-sync run
        self.ended = False
        self.frames_received = 0
        self.probabilities: list[float] = []  # recent window scores (last 10 s), for diagnostics

    # ----------------------------------------------------------------------------- wiring

    @property
    def history_s(self) -> float:
        """Seconds of microphone audio kept (at ``MIC_SAMPLE_RATE_HZ``; older audio is overwritten)."""
        return self._ring.capacity / MIC_SAMPLE_RATE_HZ

    def attach(self, track: MediaStreamTrack) -> None:
        """Start consuming ``track`` in a task owned by this object."""
        if self._task is not None:
            raise RuntimeError("microphone already has a track")
        self._task = asyncio.get_running_loop().create_task(self._consume(track), name="microphone")

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _consume(self, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        if self._scorer is None:
            self._scorer = await loop.run_in_executor(self._executor, self._scorer_factory)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                break
            windows = self.push_frame(frame)
            if windows is not None:
                scores = await loop.run_in_executor(self._executor, self._scorer, windows)
                self.push_scores(scores)
        self.ended = True
        self._set_speaking(False, self._ring.end)

    # ----------------------------------------------------------------------------- input
    def push_frame(self, frame: av.AudioFrame) -> np.ndarray | None:
        """Store one incoming frame; returns the complete VAD windows ``[n, 512]`` now due."""
        self.frames_received += 1
        parts = [out.to_ndarray().mean(axis=0) for out in self._resampler.resample(frame)]
        if not parts:
            return None
        samples = np.concatenate(parts).astype(np.float32, copy=False)
        return self.push_samples(samples)

    def push_samples(self, samples: np.ndarray) -> np.ndarray | None:
        """Store 48 kHz mono float32 samples; returns the VAD windows now due (or ``None``)."""
        self._ring.write(samples)
        vad = self._to_vad.resample_chunk(samples)
        self._vad_pending = np.concatenate([self._vad_pending, vad])
        count = self._vad_pending.size // VAD_WINDOW_SAMPLES
        if count == 0:
            return None
        windows = self._vad_pending[: count * VAD_WINDOW_SAMPLES].reshape(count, VAD_WINDOW_SAMPLES).copy()
        self._vad_pending = self._vad_pending[count * VAD_WINDOW_SAMPLES :]
        return windows

    def push_scores(self, scores: list[float]) -> None:
        """Apply the speech probabilities of the next windows (in order)."""
        for prob in scores:
            start = self._vad_pos * _MIC_PER_VAD
            self._vad_pos += VAD_WINDOW_SAMPLES
            end = self._vad_pos * _MIC_PER_VAD
            self.probabilities.append(prob)
            voiced = prob >= (self.release_threshold if self._span_start is not None else self.threshold)
            if voiced:
                if self._span_start is None:
                    self._span_start = start
                    self._voiced_samples = 0
                self._voiced_samples += end - start
                self._last_voiced_end = end
                if not self.speaking and self._voiced_samples >= self.min_speech_samples:
                    self._set_speaking(True, end)
            elif self._span_start is not None and end - self._last_voiced_end >= self.hangover_samples:
                if self.speaking:
                    self._set_speaking(False, end)
                self._span_start = None
        keep = 10 * VAD_SAMPLE_RATE_HZ // VAD_WINDOW_SAMPLES
        if len(self.probabilities) > 2 * keep:
            del self.probabilities[:-keep]

    def _set_speaking(self, speaking: bool, position: int) -> None:
        if speaking == self.speaking:
            return
        self.speaking = speaking
        if speaking:
            assert self._span_start is not None
            if not self.run_active:  # a new run: skip the silence before it
                self.run_active = True
                self.run_id += 1
                self._read_pos = max(self._read_pos, self._ring.start, self._span_start - self.preroll_samples)
        else:
            span_start = self._span_start if self._span_start is not None else position
            self.spans.append((span_start, self._last_voiced_end))
        if self.on_change is not None:
            self.on_change(speaking)

    # ----------------------------------------------------------------------------- lip-sync
    @property
    def received_s(self) -> float:
        return self._ring.end / MIC_SAMPLE_RATE_HZ

    def voiced_spans_s(self) -> list[tuple[float, float]]:
        """Finished voiced spans ``(start_s, end_s)`` on the microphone timeline."""
        return [(a / MIC_SAMPLE_RATE_HZ, b / MIC_SAMPLE_RATE_HZ) for a, b in self.spans]

    @property
    def run_closing(self) -> bool:
        """The run's voice has been silent for ``run_gap_ms``: only its voiced tail is left."""
        if not self.run_active or self.speaking:
            return False
        return self.ended or self._ring.end - self._last_voiced_end >= self.run_gap_samples

    def available_s(self) -> float:
        """Seconds of the current run received but not yet taken (0 outside a run)."""
        self._maybe_end_run()
        if not self.run_active:
            return 0.0
        self._read_pos = max(self._read_pos, self._ring.start)
        return max(0, self._ring.end - self._read_pos) / MIC_SAMPLE_RATE_HZ

    def voiced_remaining_s(self) -> float:
        """Seconds from the read position to the end of the last voiced audio (plus pre-roll)."""
        return max(0, self._last_voiced_end + self.preroll_samples - self._read_pos) / MIC_SAMPLE_RATE_HZ

    def take_audio(self, seconds: float) -> np.ndarray:
        """The next ``seconds`` of the run (48 kHz mono float32), zero-padded past what arrived."""
        count = round(seconds * MIC_SAMPLE_RATE_HZ)
        begin = max(self._read_pos, self._ring.start)
        out = self._ring.read(begin, count)
        self._read_pos = min(begin + count, self._ring.end)
        self._maybe_end_run()
        return out

    def discard_pending(self) -> None:
        """Skip all audio received so far (interrupt): lip-sync continues from live audio."""
        self._read_pos = self._ring.end
        if not self.speaking:
            self.run_active = False

    def end_run(self) -> None:
        """End the current run now (its remaining audio is skipped when the next one starts)."""
        self.run_active = False

    def _maybe_end_run(self) -> None:
        if self.run_closing and self._read_pos >= self._last_voiced_end + self.preroll_samples:
            self.run_active = False
