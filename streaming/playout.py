"""The playout buffer: generated segments on one media timeline, read frame by frame.

Segments are queued back to back on a timeline counted in video frames (25 fps). Each frame
``k`` owns the audio samples ``[k * 1920, (k + 1) * 1920)`` at 48 kHz, i.e. the 20 ms audio
chunks ``2k`` and ``2k + 1``; a segment always starts on a frame boundary. The video track
pulls frame ``k`` and the audio track pulls chunk ``j`` when the shared media clock says they
are due, so the audio and video of one segment leave together.

Two readers pull independently; the *head* is the first frame that the leading reader has not
started yet. A segment begins (``on_segment_start``) when its first frame is pulled and ends
(``on_segment_end``) when the frame after its last one is pulled; those callbacks drive
``speak.started`` and ``speak.ended``. When the head runs past the last queued frame the buffer *underruns*: video
repeats the last frame, audio is silence, and :attr:`PlayoutBuffer.underruns` counts it.
A segment appended after an underrun starts at the head, never in the past.

**Joins are cross-faded** so that no click is heard where one segment's audio ends and the
next one's begins (each segment is generated on its own, so their waveforms do not meet): when
a segment is appended right after one whose last ``crossfade_ms / 2`` of audio have not been
pulled yet, the ``crossfade_ms`` around the join are a raised-cosine cross-fade of the two,
each extended across the join by its mirror image. Where that cannot be done (audio after an
underrun or an interrupt, silence after audio), the first pulled chunk after the
discontinuity gets a *de-click* ramp: the jump from the last sample sent decays to zero over
``crossfade_ms``.

**Output size.** Frames of another size than ``width x height`` (segments not re-rendered
by super-resolution) are resized bilinearly as they are pulled, so the outgoing video never
changes size.

**Segments that arrive in chunks** (issue 17: the engine hands out each decoder window as soon
as it is decoded) are written by a :class:`SegmentWriter`: its frames join the timeline chunk by
chunk, so the first ones can play while the rest is decoded. Its audio goes through one stateful
soxr resampler (the same samples as a one-shot resample of the whole clip) and a frame joins only
with its audio. If the head passes the end of what has arrived (an underrun inside the segment),
the rest continues as a new piece (:class:`QueuedSegment`) at the head: a pause, never lost or
skipped frames.

**Taps** (``video_taps``, ``audio_taps``) see every frame and chunk as it is pulled (the
session recorder, latency probes), with its timeline index.

Everything here runs on the event loop; nothing blocks.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soxr

from engine.api import Continuation, SegmentKind
from streaming.frames import fit_frame

RECENT_PULLS = 64  # frames / audio chunks kept for a second reader of the same index (>1 s of audio chunks)

PLAYOUT_FPS = 25
PLAYOUT_SAMPLE_RATE_HZ = 48_000
AUDIO_CHUNK_SAMPLES = 960  # 20 ms at 48 kHz, one Opus frame


def resample_audio(audio: np.ndarray, from_hz: int, to_hz: int, num_samples: int | None = None) -> np.ndarray:
    """Resample a whole mono float32 clip with soxr, then trim or zero-pad it to ``num_samples``.

    A segment is an independent clip, so one-shot resampling per segment is exact; no per-chunk
    arithmetic is involved.
    """
    clip = np.asarray(audio, dtype=np.float32).reshape(-1)
    if from_hz != to_hz and clip.size:
        clip = soxr.resample(clip, from_hz, to_hz, quality="HQ").astype(np.float32, copy=False)
    if num_samples is None:
        return clip
    out = np.zeros(num_samples, dtype=np.float32)
    count = min(num_samples, clip.size)
    out[:count] = clip[:count]
    return out


@dataclass(eq=False)
class QueuedSegment:
    """One segment on the playout timeline.

    Attributes:
        frames: uint8 ``[F, H, W, 3]`` frames (shortened by :meth:`PlayoutBuffer.clear`).
        audio: float32 mono samples at the buffer's rate, exactly ``F`` frames long.
        kind: what the segment shows.
        start_frame: timeline index of its first frame.
        utterance_id: the utterance it speaks, if any.
        continuation: what a following segment continues from.
        tag: free slot for the caller.
        played_frames: frames the head has passed so far.
        started, ended: whether the start/end callbacks have fired.
        cut: shortened by :meth:`PlayoutBuffer.clear`.
        dropped: removed before it played.
        source: the engine's :class:`~engine.api.Segment` it came from (for super-resolution).
        super_resolved: ``frames`` come from the super-resolution stage.
        complete: no more frames will join it (False while a :class:`SegmentWriter` still writes it).
    """

    frames: np.ndarray
    audio: np.ndarray
    kind: SegmentKind
    start_frame: int
    utterance_id: str | None = None
    continuation: Continuation | None = None
    tag: Any = None
    played_frames: int = 0
    started: bool = False
    ended: bool = False
    cut: bool = False
    dropped: bool = False
    source: Any = field(default=None, repr=False)
    super_resolved: bool = False
    complete: bool = True
    fps: int = field(default=PLAYOUT_FPS, repr=False)
    # cross-fade bookkeeping: the segment this one's head was faded with, and this one's tail
    # as generated (restored when the segment faded into it is dropped)
    crossfaded_from: QueuedSegment | None = field(default=None, repr=False)
    tail_original: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def end_frame(self) -> int:
        return self.start_frame + self.num_frames

    @property
    def duration_ms(self) -> float:
        return 1000.0 * self.num_frames / self.fps

    @property
    def played_ms(self) -> float:
        return 1000.0 * self.played_frames / self.fps


SegmentCallback = Callable[[QueuedSegment], None]


class PlayoutBuffer:
    """Queue of segments on one A/V timeline (see the module docstring).

    Args:
        width, height: frame size in pixels (for the hold frame before the first segment).
        fps: video frame rate.
        sample_rate_hz: audio rate of the outgoing track.
        chunk_samples: samples per audio pull (20 ms at 48 kHz).
        hold_frame: uint8 ``[H, W, 3]`` shown before the first segment (default black).
        on_segment_start, on_segment_end: called on the event loop when the head enters or
            leaves a segment.
        on_underrun: called once at the start of each underrun.
        max_reader_lag_frames: a reader further behind the head than this no longer holds
            segments in memory (e.g. a peer that only receives video).
        crossfade_ms: length of the cross-fade at a join (and of the de-click ramp).
    """

    def __init__(
        self,
        *,
        width: int,
        height: int,
        fps: int = PLAYOUT_FPS,
        sample_rate_hz: int = PLAYOUT_SAMPLE_RATE_HZ,
        chunk_samples: int = AUDIO_CHUNK_SAMPLES,
        hold_frame: np.ndarray | None = None,
        on_segment_start: SegmentCallback | None = None,
        on_segment_end: SegmentCallback | None = None,
        on_underrun: Callable[[], None] | None = None,
        max_reader_lag_frames: int = 25,
        crossfade_ms: float = 10.0,
    ) -> None:
        if sample_rate_hz % fps or (sample_rate_hz // fps) % chunk_samples:
            raise ValueError(
                f"{sample_rate_hz} Hz / {fps} fps must be a whole number of {chunk_samples}-sample chunks"
            )
        self.width = width
        self.height = height
        self.fps = fps
        self.sample_rate_hz = sample_rate_hz
        self.chunk_samples = chunk_samples
        self.samples_per_frame = sample_rate_hz // fps
        self.chunks_per_frame = self.samples_per_frame // chunk_samples
        self.on_segment_start = on_segment_start
        self.on_segment_end = on_segment_end
        self.on_underrun = on_underrun
        self.max_reader_lag_frames = max_reader_lag_frames

        self._segments: collections.deque[QueuedSegment] = collections.deque()
        self._end_frame = 0
        self._video_next = 0
        self._audio_next = 0
        if hold_frame is None:
            hold_frame = np.zeros((height, width, 3), dtype=np.uint8)
        self._last_frame = fit_frame(hold_frame, width, height)
        self._silence = np.zeros(chunk_samples, dtype=np.float32)
        self._played_any = False
        self._in_underrun = False
        self._gap_expected = False  # an interrupt emptied the buffer: its gap is no underrun
        half = round(crossfade_ms / 2000 * sample_rate_hz)
        self._fade_half = min(half, chunk_samples)
        ramp = (np.arange(2 * self._fade_half, dtype=np.float64) + 0.5) / max(1, 2 * self._fade_half)
        self._fade_in = (0.5 - 0.5 * np.cos(np.pi * ramp)).astype(np.float32)  # 0 -> 1, raised cosine
        self._last_sample = 0.0  # last audio sample pulled
        self._last_source: QueuedSegment | None = None  # segment of the last chunk pulled (None: silence)

        # What the leading reader got for the last indices: a second reader of the same track
        # kind (the media pump beside a peer connection) gets the very same frame or chunk, and
        # counters, underruns, declicks and taps see each timeline index once.
        self._recent_video: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._recent_audio: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self.video_taps: list[Callable[[int, np.ndarray], None]] = []
        self.audio_taps: list[Callable[[int, np.ndarray], None]] = []
        self.underruns = 0
        self.underrun_frames = 0
        self.video_frames_pulled = 0
        self.audio_chunks_pulled = 0
        self.frames_dropped = 0  # queued frames removed before they played (interrupt, overtaking)
        self.declicks = 0

    # ----------------------------------------------------------------------------- timeline
    @property
    def head_frame(self) -> int:
        """First frame that the leading reader has not started: where new content may begin."""
        return max(self._video_next, -(-self._audio_next // self.chunks_per_frame))

    @property
    def end_frame(self) -> int:
        """Timeline index just after the last queued frame."""
        return self._end_frame

    @property
    def depth_frames(self) -> int:
        return max(0, self._end_frame - self.head_frame)

    @property
    def depth_ms(self) -> float:
        """Media time queued ahead of the head, in milliseconds."""
        return 1000.0 * self.depth_frames / self.fps

    @property
    def underrunning(self) -> bool:
        return self._in_underrun

    @property
    def last_frame(self) -> np.ndarray:
        """The frame most recently pulled (or the hold frame)."""
        return self._last_frame

    def segments(self) -> Iterator[QueuedSegment]:
        """Segments still held: playing, queued, or played but not yet passed by both readers."""
        return iter(tuple(self._segments))

    def queued(self) -> list[QueuedSegment]:
        """Segments that have not started playing."""
        return [seg for seg in self._segments if not seg.started]

    # ----------------------------------------------------------------------------- writing
    def append(
        self,
        frames: np.ndarray,
        audio: np.ndarray,
        audio_sample_rate_hz: int,
        *,
        kind: SegmentKind,
        utterance_id: str | None = None,
        continuation: Continuation | None = None,
        tag: Any = None,
        source: Any = None,
    ) -> QueuedSegment:
        """Queue a segment after the last one (or at the head after an underrun).

        ``audio`` (mono float32 at ``audio_sample_rate_hz``) is resampled to the buffer's rate
        and trimmed or padded to exactly the video's duration, and cross-faded with the
        previous segment's audio where they meet.
        """
        if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[3] != 3:
            raise ValueError(f"frames: expected uint8 [F>0, H, W, 3], got shape {frames.shape}")
        num_samples = frames.shape[0] * self.samples_per_frame
        audio_out = resample_audio(audio, audio_sample_rate_hz, self.sample_rate_hz, num_samples)
        return self._insert(frames, audio_out, kind=kind, utterance_id=utterance_id, continuation=continuation,
                            tag=tag, source=source)

    def _insert(
        self,
        frames: np.ndarray,
        audio_out: np.ndarray,
        *,
        kind: SegmentKind,
        utterance_id: str | None = None,
        continuation: Continuation | None = None,
        tag: Any = None,
        source: Any = None,
        complete: bool = True,
    ) -> QueuedSegment:
        """Queue ``frames`` with ``audio_out`` (at the buffer's rate, ``F * samples_per_frame``) as is."""
        segment = QueuedSegment(
            frames=frames,
            audio=audio_out,
            kind=kind,
            start_frame=max(self._end_frame, self.head_frame),
            utterance_id=utterance_id,
            continuation=continuation,
            tag=tag,
            source=source,
            complete=complete,
            fps=self.fps,
        )
        if self._segments:
            self._crossfade(self._segments[-1], segment)
        self._segments.append(segment)
        self._end_frame = segment.end_frame
        return segment

    def _grow(self, segment: QueuedSegment, frames: np.ndarray, audio_out: np.ndarray) -> None:
        """Make ``frames``/``audio_out`` (longer views of the same store) the content of the last
        queued ``segment`` (:class:`SegmentWriter`).

        Raises:
            RuntimeError: ``segment`` is complete or not the last queued one.
        """
        if segment.complete or not self._segments or self._segments[-1] is not segment:
            raise RuntimeError("only the last queued, open segment can grow")
        segment.frames, segment.audio = frames, audio_out
        self._end_frame = segment.end_frame

    def _crossfade(self, prev: QueuedSegment, new: QueuedSegment) -> None:
        """Cross-fade the join of ``prev`` and ``new`` if ``prev``'s tail is not pulled yet."""
        half = self._fade_half
        prev_end = prev.end_frame * self.samples_per_frame
        if (
            half == 0
            or new.start_frame != prev.end_frame
            or prev.audio.size < half
            or new.audio.size < half
            or self._audio_next * self.chunk_samples > prev_end - half
        ):
            return
        if prev.tail_original is None:
            prev.tail_original = prev.audio[-half:].copy()
        old = prev.tail_original
        head = new.audio[:half].copy()
        fade_in = self._fade_in
        # before the join: prev fades out against new's head mirrored back in time; after it:
        # prev's tail mirrored forward fades out against new's head
        prev.audio[-half:] = old * (1 - fade_in[:half]) + head[::-1] * fade_in[:half]
        new.audio[:half] = old[::-1] * (1 - fade_in[half:]) + head * fade_in[half:]
        new.crossfaded_from = prev

    def _restore_tail(self, dropped: QueuedSegment) -> None:
        """Undo the cross-fade into ``dropped`` on the segment before it (not yet pulled)."""
        prev = dropped.crossfaded_from
        if prev is None or prev.tail_original is None or prev.dropped:
            return
        half = prev.tail_original.size
        if self._audio_next * self.chunk_samples <= prev.end_frame * self.samples_per_frame - half:
            prev.audio[-half:] = prev.tail_original

    def clear(self, at_frame: int | None = None) -> tuple[QueuedSegment | None, list[QueuedSegment]]:
        """Drop everything from timeline frame ``at_frame`` on (default, and at the earliest:
        the next frame boundary, as for an interrupt).

        The segment that ``at_frame`` falls in is cut there; later segments are removed.
        Returns ``(cut_segment_or_None, dropped_segments)``. The silence that follows an
        interrupt until new content arrives is not counted as an underrun.
        """
        cut = self.head_frame if at_frame is None else max(self.head_frame, at_frame)
        if at_frame is None:
            self._gap_expected = True
        kept: collections.deque[QueuedSegment] = collections.deque()
        playing: QueuedSegment | None = None
        dropped: list[QueuedSegment] = []
        for seg in self._segments:
            if seg.end_frame <= cut:
                kept.append(seg)
            elif seg.start_frame < cut:
                keep = cut - seg.start_frame
                self.frames_dropped += seg.num_frames - keep
                seg.frames = seg.frames[:keep]
                seg.audio = seg.audio[: keep * self.samples_per_frame]
                seg.tail_original = None  # its tail is elsewhere now
                seg.cut = True
                seg.complete = True  # a writer still writing it stops
                kept.append(seg)
                playing = seg
            else:
                seg.dropped = True
                seg.complete = True
                self.frames_dropped += seg.num_frames
                dropped.append(seg)
        self._segments = kept
        for seg in dropped:
            self._restore_tail(seg)
        self._end_frame = min(self._end_frame, cut)
        return playing, dropped

    def drop_unstarted_tail(self, predicate: Callable[[QueuedSegment], bool]) -> list[QueuedSegment]:
        """Remove queued segments from the end while they have not started and match ``predicate``.

        Used to let speech overtake idle segments that are queued but not yet playing.
        Returns the removed segments, last first.
        """
        dropped: list[QueuedSegment] = []
        head = self.head_frame
        while self._segments:
            seg = self._segments[-1]
            if seg.started or seg.start_frame < head or not predicate(seg):
                break
            self._segments.pop()
            seg.dropped = True
            seg.complete = True
            self.frames_dropped += seg.num_frames
            self._restore_tail(seg)
            dropped.append(seg)
        if dropped:
            self._end_frame = self._segments[-1].end_frame if self._segments else 0
        return dropped

    # ----------------------------------------------------------------------------- reading
    def pull_video_frame(self, index: int) -> np.ndarray:
        """Frame at timeline index ``index`` (the last frame again on underrun).

        An index already pulled (by another reader) returns what the first reader got, with no
        side effect (``video_frames_pulled``, underruns and taps count each index once)."""
        if index < self._video_next:
            again = self._recent_video.get(index)
            if again is not None:
                return again
            segment = self._find(index)  # a reader further behind than the recent frames
            return fit_frame(segment.frames[index - segment.start_frame], self.width, self.height) \
                if segment is not None else self._last_frame
        self._video_next = index + 1
        self.video_frames_pulled += 1
        segment = self._find(index)
        if segment is not None:
            self._last_frame = fit_frame(segment.frames[index - segment.start_frame], self.width, self.height)
            self._in_underrun = self._gap_expected = False
        elif self._played_any and not self._gap_expected:
            self.underrun_frames += 1
            if not self._in_underrun:
                self._in_underrun = True
                self.underruns += 1
                if self.on_underrun is not None:
                    self.on_underrun()
        frame = self._last_frame
        self._recent_video[index] = frame
        while len(self._recent_video) > RECENT_PULLS:
            self._recent_video.popitem(last=False)
        for tap in self.video_taps:
            tap(index, frame)
        self._advance()
        return frame

    def pull_audio_chunk(self, index: int) -> np.ndarray:
        """Audio chunk ``index`` (``chunk_samples`` float32 samples; silence on underrun).

        An index already pulled (by another reader) returns what the first reader got, declick
        included, with no side effect (as :meth:`pull_video_frame`)."""
        if index < self._audio_next:
            again = self._recent_audio.get(index)
            if again is not None:
                return again
            segment = self._find(index // self.chunks_per_frame)
            if segment is None:
                return self._silence
            offset = (index - segment.start_frame * self.chunks_per_frame) * self.chunk_samples
            return segment.audio[offset : offset + self.chunk_samples]
        self._audio_next = index + 1
        self.audio_chunks_pulled += 1
        segment = self._find(index // self.chunks_per_frame)
        chunk = self._silence
        if segment is not None:
            offset = (index - segment.start_frame * self.chunks_per_frame) * self.chunk_samples
            chunk = segment.audio[offset : offset + self.chunk_samples]
        if segment is not self._last_source:
            faded = segment is not None and segment.crossfaded_from is self._last_source is not None
            if not faded:
                chunk = self._declick(chunk)
            self._last_source = segment
        self._last_sample = float(chunk[-1]) if chunk.size else 0.0
        self._recent_audio[index] = chunk
        while len(self._recent_audio) > RECENT_PULLS:
            self._recent_audio.popitem(last=False)
        for tap in self.audio_taps:
            tap(index, chunk)
        self._advance()
        return chunk

    def _declick(self, chunk: np.ndarray) -> np.ndarray:
        """``chunk`` with the jump from the last sample sent ramped away (a fresh array)."""
        jump = self._last_sample - (float(chunk[0]) if chunk.size else 0.0)
        if abs(jump) < 1e-4 or chunk.size == 0:
            return chunk
        self.declicks += 1
        count = min(chunk.size, self._fade_in.size)
        out = chunk.astype(np.float32, copy=True)
        out[:count] += jump * (1 - self._fade_in[:count])
        return out

    def _find(self, frame_index: int) -> QueuedSegment | None:
        for seg in self._segments:
            if seg.start_frame <= frame_index < seg.end_frame:
                return seg
            if seg.start_frame > frame_index:
                break
        return None

    def _advance(self) -> None:
        head = self.head_frame
        started: list[QueuedSegment] = []
        ended: list[QueuedSegment] = []
        for seg in self._segments:
            if seg.start_frame >= head:
                break
            seg.played_frames = min(head, seg.end_frame) - seg.start_frame
            if not seg.started:
                seg.started = True
                self._played_any = True
                started.append(seg)
            # A segment has ended once the frame after its last one is due, i.e. its last
            # frame has been on screen for a full frame period.
            if seg.end_frame < head and not seg.ended:
                seg.ended = True
                ended.append(seg)
        both_done = min(self._video_next, self._audio_next // self.chunks_per_frame)
        tail = max(both_done, head - self.max_reader_lag_frames)
        while self._segments and self._segments[0].ended and self._segments[0].end_frame <= tail:
            self._segments.popleft()
        # Ends before starts: at a boundary the next segment starts as the previous one ends.
        for seg in ended:
            if self.on_segment_end is not None:
                self.on_segment_end(seg)
        for seg in started:
            if self.on_segment_start is not None:
                self.on_segment_start(seg)


class SegmentWriter:
    """Writes one segment that arrives in chunks onto a :class:`PlayoutBuffer` (module docstring).

    The chunks' frames go into one store of ``total_frames`` frames; the queued pieces
    (:attr:`pieces`) are views of it, so a frame is copied once. Each chunk's audio (mono float32 at
    ``audio_sample_rate_hz``) goes through one stateful soxr resampler (``HQ``, as
    :func:`resample_audio`); a frame joins the timeline once its ``samples_per_frame`` output
    samples are there (the resampler holds back about 11 ms), all remaining frames with the last
    chunk (the audio then trimmed or zero-padded to exactly ``total_frames`` frames, as
    :meth:`PlayoutBuffer.append` does). Runs on the event loop.

    Args:
        buffer: the playout buffer.
        audio_sample_rate_hz: rate of the chunks' audio in Hz.
        total_frames: frames of the whole segment (``SegmentChunk.total_frames``), ``> 0``.
        kind, utterance_id, tag: as :meth:`PlayoutBuffer.append`, for every piece.

    Attributes:
        pieces: the segment's pieces on the timeline, in order (one unless the head overtook it).
        frames_received: frames written so far.
        closed: no more chunks are taken (last chunk written, :meth:`close` called, or its last
            piece was cut or dropped from the buffer).

    Raises:
        ValueError: ``total_frames`` or ``audio_sample_rate_hz`` not positive.
    """

    def __init__(
        self,
        buffer: PlayoutBuffer,
        audio_sample_rate_hz: int,
        total_frames: int,
        *,
        kind: SegmentKind,
        utterance_id: str | None = None,
        tag: Any = None,
    ) -> None:
        if total_frames <= 0 or audio_sample_rate_hz <= 0:
            raise ValueError(f"total_frames {total_frames} and audio_sample_rate_hz {audio_sample_rate_hz} must be > 0")
        self.buffer = buffer
        self.total_frames = total_frames
        self.kind, self.utterance_id, self.tag = kind, utterance_id, tag
        self.pieces: list[QueuedSegment] = []
        self.frames_received = 0
        self.closed = False
        self._resampler = None
        if audio_sample_rate_hz != buffer.sample_rate_hz:
            self._resampler = soxr.ResampleStream(audio_sample_rate_hz, buffer.sample_rate_hz, 1,
                                                  dtype="float32", quality="HQ")
        self._frames: np.ndarray | None = None  # uint8 [total_frames, H, W, 3], allocated with the first chunk
        self._audio = np.zeros(total_frames * buffer.samples_per_frame, dtype=np.float32)
        self._audio_samples = 0  # resampled samples in _audio
        self._placed = 0  # frames handed to pieces
        self._piece_start = 0  # store index of the last piece's first frame

    @property
    def frames_placed(self) -> int:
        """Frames on the timeline so far (received ones wait for their audio)."""
        return self._placed

    def write(self, frames: np.ndarray, audio: np.ndarray, *, last: bool) -> list[QueuedSegment]:
        """Add the next chunk: uint8 ``[n, H, W, 3]`` frames and their mono audio; ``last``: it ends the
        segment. Returns the pieces it started (the first chunk starts the first one). Ignored once
        :attr:`closed`.

        Raises:
            ValueError: bad shapes, more than ``total_frames`` frames, or ``last`` short of them.
        """
        if self.closed or self._closed_by_buffer():
            self.closed = True
            return []
        if frames.ndim != 4 or frames.shape[3] != 3:
            raise ValueError(f"frames: expected uint8 [n, H, W, 3], got shape {frames.shape}")
        count = int(frames.shape[0])
        end = self.frames_received + count
        if end > self.total_frames or (last and end != self.total_frames):
            raise ValueError(f"chunk frames [{self.frames_received}, {end}) do not fit a segment of {self.total_frames}")
        if self._frames is None:
            self._frames = np.empty((self.total_frames, *frames.shape[1:]), dtype=np.uint8)
        elif frames.shape[1:] != self._frames.shape[1:]:
            raise ValueError(f"frames: chunk of shape {frames.shape[1:]}, segment of {self._frames.shape[1:]}")
        self._frames[self.frames_received : end] = frames
        self.frames_received = end
        clip = np.asarray(audio, dtype=np.float32).reshape(-1)
        if self._resampler is not None:
            clip = self._resampler.resample_chunk(clip, last=last)
        take = min(clip.size, self._audio.size - self._audio_samples)
        self._audio[self._audio_samples : self._audio_samples + take] = clip[:take]
        self._audio_samples += take
        if last:
            self.closed = True
            ready = self.total_frames  # the rest of the audio is zero padding
        else:
            ready = min(end, self._audio_samples // self.buffer.samples_per_frame)
        started = self._place(ready)
        if last and self.pieces:
            self.pieces[-1].complete = True
        return started

    def close(self) -> QueuedSegment | None:
        """Take no more chunks (the job was cancelled or failed): frames still waiting for their
        audio are dropped and the last piece is complete as it is. Returns that piece, or None when
        nothing was placed or it was cut or dropped from the buffer meanwhile."""
        self.closed = True
        if not self.pieces:
            return None
        piece = self.pieces[-1]
        piece.complete = True
        return None if piece.dropped or piece.cut else piece

    def _closed_by_buffer(self) -> bool:
        return bool(self.pieces) and (self.pieces[-1].dropped or self.pieces[-1].cut)

    def _place(self, ready: int) -> list[QueuedSegment]:
        if ready <= self._placed:
            return []
        assert self._frames is not None
        spf = self.buffer.samples_per_frame
        piece = self.pieces[-1] if self.pieces else None
        if piece is not None and self.buffer.head_frame <= piece.end_frame:
            self._placed = ready
            start = self._piece_start
            self.buffer._grow(piece, self._frames[start:ready], self._audio[start * spf : ready * spf])
            return []
        # first piece, or the head passed the last one's end (underrun inside the segment): a new
        # piece at the head
        if piece is not None:
            piece.complete = True
            piece.continuation = Continuation(last_frame=np.array(piece.frames[-1]))
        start, self._piece_start, self._placed = self._placed, self._placed, ready
        new = self.buffer._insert(
            self._frames[start:ready], self._audio[start * spf : ready * spf],
            kind=self.kind, utterance_id=self.utterance_id, tag=self.tag, complete=False,
        )
        self.pieces.append(new)
        return [new]


def frames_to_ms(frames: int, fps: int = PLAYOUT_FPS) -> int:
    """Whole milliseconds of ``frames`` video frames."""
    return int(math.floor(1000 * frames / fps + 0.5))
