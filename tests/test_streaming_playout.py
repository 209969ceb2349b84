"""PlayoutBuffer: one A/V timeline, exact frame/chunk counts, underrun, clear, played time."""

from __future__ import annotations

import numpy as np
import pytest

from engine.api import SegmentKind
from streaming.playout import PlayoutBuffer, frames_to_ms, resample_audio

W, H = 32, 16


def frames(count: int, first: int = 0) -> np.ndarray:
    """Frames whose pixel value is their index (mod 256), to tell them apart."""
    values = (np.arange(first, first + count) % 256).astype(np.uint8)
    return np.broadcast_to(values[:, None, None, None], (count, H, W, 3)).copy()


def ramp_audio(count_frames: int, sample_rate: int = 48_000) -> np.ndarray:
    n = count_frames * sample_rate // 25
    return (np.arange(n, dtype=np.float32) / n).astype(np.float32)


def make_buffer(**kwargs) -> tuple[PlayoutBuffer, list[tuple[str, int]]]:
    log: list[tuple[str, int]] = []
    buf = PlayoutBuffer(
        width=W,
        height=H,
        on_segment_start=lambda seg: log.append(("start", seg.start_frame)),
        on_segment_end=lambda seg: log.append(("end", seg.start_frame)),
        **kwargs,
    )
    return buf, log


def play(buf: PlayoutBuffer, first_frame: int, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Pull ``count`` frames and their two audio chunks each, audio first as on the wire."""
    video, audio = [], []
    for index in range(first_frame, first_frame + count):
        audio.append(buf.pull_audio_chunk(2 * index))
        video.append(buf.pull_video_frame(index))
        audio.append(buf.pull_audio_chunk(2 * index + 1))
    return video, audio


def assert_declicked_silence(chunks: list[np.ndarray], last_sample: float) -> None:
    """Silence after audio stopped: the first 10 ms ramp from the last sample sent down to 0."""
    first = chunks[0]
    assert abs(first[0] - last_sample) < 0.01 * max(1.0, abs(last_sample))
    assert np.all(np.abs(np.diff(first)) < 0.01) and not first[480:].any()
    assert not any(c.any() for c in chunks[1:])


def test_segment_plays_exactly_its_frames_and_audio() -> None:
    buf, log = make_buffer()
    audio = ramp_audio(49)
    seg = buf.append(frames(49), audio, 48_000, kind=SegmentKind.SPEAK, utterance_id="u")
    assert (seg.start_frame, seg.end_frame) == (0, 49)
    assert buf.depth_ms == pytest.approx(1960.0)
    video, chunks = play(buf, 0, 49)
    assert [int(f[0, 0, 0]) for f in video] == list(range(49))
    assert all(c.shape == (960,) for c in chunks) and len(chunks) == 98
    np.testing.assert_array_equal(np.concatenate(chunks), audio)
    assert log == [("start", 0)]  # ends only when the frame after its last one is due
    play(buf, 49, 1)
    assert log == [("start", 0), ("end", 0)]
    assert seg.played_frames == 49 and frames_to_ms(seg.played_frames) == 1960
    assert buf.underruns == 1  # frame 49 had nothing queued


def test_segments_are_contiguous_and_callbacks_ordered_end_before_start() -> None:
    buf, log = make_buffer()
    a = buf.append(frames(5), ramp_audio(5), 48_000, kind=SegmentKind.IDLE)
    b = buf.append(frames(7, first=5), ramp_audio(7), 48_000, kind=SegmentKind.SPEAK)
    assert (a.start_frame, b.start_frame, buf.end_frame) == (0, 5, 12)
    video, _ = play(buf, 0, 12)
    assert [int(f[0, 0, 0]) for f in video] == list(range(12))
    assert log == [("start", 0), ("end", 0), ("start", 5)]
    assert buf.underruns == 0


def test_audio_is_resampled_to_exactly_the_video_duration() -> None:
    for rate in (16_000, 44_100, 48_000, 24_000):
        clip = np.sin(np.linspace(0, 100, round(49 / 25 * rate))).astype(np.float32)
        out = resample_audio(clip, rate, 48_000, 49 * 1920)
        assert out.shape == (49 * 1920,) and out.dtype == np.float32
    # too short: zero-padded; too long: trimmed
    assert resample_audio(np.ones(100, np.float32), 48_000, 48_000, 200)[100:].max() == 0
    assert resample_audio(np.ones(300, np.float32), 48_000, 48_000, 200).shape == (200,)
    # a 44.1 kHz tone keeps its frequency
    t = np.arange(44_100) / 44_100
    tone = resample_audio(np.sin(2 * np.pi * 1000 * t).astype(np.float32), 44_100, 48_000, 48_000)
    peak_hz = np.argmax(np.abs(np.fft.rfft(tone))) * 48_000 / tone.size
    assert abs(peak_hz - 1000) <= 2


def test_underrun_holds_last_frame_sends_silence_and_next_segment_starts_at_head() -> None:
    buf, log = make_buffer()
    buf.append(frames(3), np.ones(3 * 1920, np.float32), 48_000, kind=SegmentKind.IDLE)
    play(buf, 0, 3)
    video, audio = play(buf, 3, 4)  # nothing queued
    assert all(int(f[0, 0, 0]) == 2 for f in video)  # the last frame, held
    assert_declicked_silence(audio, last_sample=1.0)
    assert buf.underruns == 1 and buf.underrun_frames == 4 and buf.underrunning
    seg = buf.append(frames(2, first=100), np.ones(2 * 1920, np.float32), 48_000, kind=SegmentKind.IDLE)
    assert seg.start_frame == 7  # at the head, not back at frame 3
    video, audio = play(buf, 7, 2)
    assert [int(f[0, 0, 0]) for f in video] == [100, 101]
    assert all(c.all() for c in audio)
    assert not buf.underrunning


def test_no_underrun_counted_before_the_first_segment() -> None:
    hold = np.full((H, W, 3), 7, np.uint8)
    buf, _ = make_buffer(hold_frame=hold)
    video, audio = play(buf, 0, 5)
    assert all(int(f[0, 0, 0]) == 7 for f in video)
    assert buf.underruns == 0
    seg = buf.append(frames(2), np.zeros(2 * 1920, np.float32), 48_000, kind=SegmentKind.IDLE)
    assert seg.start_frame == 5


def test_clear_cuts_at_the_next_frame_boundary() -> None:
    buf, log = make_buffer()
    first = buf.append(frames(10), ramp_audio(10), 48_000, kind=SegmentKind.SPEAK, utterance_id="u")
    buf.append(frames(10, first=10), ramp_audio(10), 48_000, kind=SegmentKind.SPEAK, utterance_id="u")
    play(buf, 0, 4)
    # audio has started frame 4 (first chunk) but video has not
    chunk_a = buf.pull_audio_chunk(8)
    cut, dropped = buf.clear()
    assert cut is first and cut.cut and cut.num_frames == 5
    assert len(dropped) == 1 and dropped[0].dropped
    # the second half of frame 4 still plays, in sync with its video frame
    chunk_b = buf.pull_audio_chunk(9)
    frame_4 = buf.pull_video_frame(4)
    np.testing.assert_array_equal(np.concatenate([chunk_a, chunk_b]), first.audio[4 * 1920 : 5 * 1920])
    assert int(frame_4[0, 0, 0]) == 4
    video, audio = play(buf, 5, 2)
    assert all(int(f[0, 0, 0]) == 4 for f in video)
    assert_declicked_silence(audio, last_sample=float(first.audio[-1]))
    assert first.played_frames == 5 and buf.depth_ms == 0
    assert ("end", 0) in log


def test_drop_unstarted_tail_only_drops_matching_unstarted_segments() -> None:
    buf, _ = make_buffer()
    buf.append(frames(4), ramp_audio(4), 48_000, kind=SegmentKind.IDLE)
    buf.append(frames(4), ramp_audio(4), 48_000, kind=SegmentKind.SPEAK)
    buf.append(frames(4), ramp_audio(4), 48_000, kind=SegmentKind.IDLE)
    buf.append(frames(4), ramp_audio(4), 48_000, kind=SegmentKind.IDLE)
    play(buf, 0, 1)
    dropped = buf.drop_unstarted_tail(lambda seg: seg.kind is SegmentKind.IDLE)
    assert [seg.start_frame for seg in dropped] == [12, 8]
    assert buf.end_frame == 8
    new = buf.append(frames(3), ramp_audio(3), 48_000, kind=SegmentKind.SPEAK)
    assert new.start_frame == 8
    # the playing idle segment is never dropped
    buf2, _ = make_buffer()
    buf2.append(frames(4), ramp_audio(4), 48_000, kind=SegmentKind.IDLE)
    play(buf2, 0, 1)
    assert buf2.drop_unstarted_tail(lambda seg: True) == []


def test_played_segments_are_released_and_a_silent_reader_does_not_pin_memory() -> None:
    buf, _ = make_buffer(max_reader_lag_frames=5)
    for _ in range(4):
        buf.append(frames(10), ramp_audio(10), 48_000, kind=SegmentKind.IDLE)
    for index in range(31):  # video only, as for a peer that takes no audio
        buf.pull_video_frame(index)
    assert [seg.start_frame for seg in buf.segments()] == [20, 30]


def test_frames_to_ms() -> None:
    assert frames_to_ms(0) == 0
    assert frames_to_ms(1) == 40
    assert frames_to_ms(49) == 1960


# ------------------------------------------------------------------ segments that arrive in chunks
def tone(count_frames: int, sample_rate: int) -> np.ndarray:
    """A 440 Hz tone plus a ramp: resampling edge effects would show at any chunk boundary."""
    n = round(count_frames / 25 * sample_rate)
    t = np.arange(n) / sample_rate
    return (0.5 * np.sin(2 * np.pi * 440 * t) + 0.3 * t / t[-1]).astype(np.float32)


def chunk_bounds(total: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(total, a + size)) for a in range(0, total, size)]


@pytest.mark.parametrize("rate", [48_000, 44_100])
def test_writer_gives_the_same_timeline_as_one_append(rate: int) -> None:
    """Chunks of 1 and then 4 frames (the Wan VAE's windows) at 44.1 kHz end as the same frames
    and the same samples as appending the whole segment: one stateful resampler, no seam."""
    from streaming.playout import SegmentWriter

    total = 21
    video, audio = frames(total), tone(total, rate)
    whole, _ = make_buffer()
    whole.append(video, audio, rate, kind=SegmentKind.SPEAK)
    streamed, log = make_buffer()
    writer = SegmentWriter(streamed, rate, total, kind=SegmentKind.SPEAK)
    ranges = [(0, 1)] + [(a + 1, b + 1) for a, b in chunk_bounds(total - 1, 4)]  # 1, 4, 4, ... frames
    placed, started = [], 0
    for a, b in ranges:
        sa, sb = round(a / 25 * rate), round(b / 25 * rate)
        started += len(writer.write(video[a:b], audio[sa:sb], last=b == total))
        placed.append(writer.frames_placed)
    assert started == 1
    seg, ref = writer.pieces[0], next(whole.segments())
    assert len(writer.pieces) == 1 and seg.complete and writer.closed
    assert np.array_equal(seg.frames, ref.frames)
    np.testing.assert_allclose(seg.audio, ref.audio, atol=1e-6)
    # a frame joins with its audio: at 44.1 kHz the resampler holds ~11 ms back, one frame behind
    if rate == 48_000:
        assert placed == [b for _, b in ranges]
    else:
        assert [b - p for p, (_, b) in zip(placed, ranges, strict=True)] == [1] * (len(ranges) - 1) + [0]
    assert streamed.end_frame == whole.end_frame == total


def test_writer_frames_play_while_the_rest_arrives() -> None:
    from streaming.playout import SegmentWriter

    buf, log = make_buffer()
    writer = SegmentWriter(buf, 48_000, 12, kind=SegmentKind.SPEAK)
    writer.write(frames(4), ramp_audio(4), last=False)
    assert buf.end_frame == 4 and buf.depth_frames == 4
    video, _ = play(buf, 0, 3)
    assert [int(f[0, 0, 0]) for f in video] == [0, 1, 2] and log == [("start", 0)]
    writer.write(frames(8, first=4), ramp_audio(8), last=True)
    video, _ = play(buf, 3, 9)
    assert [int(f[0, 0, 0]) for f in video] == list(range(3, 12))
    assert len(writer.pieces) == 1 and buf.underruns == 0


def test_underrun_inside_a_streamed_segment_pauses_and_loses_nothing() -> None:
    """The head passes the last frame that arrived: the rest starts at the head as a new piece
    (a pause with the last frame held), every frame still plays once, in order."""
    from streaming.playout import SegmentWriter

    buf, log = make_buffer()
    writer = SegmentWriter(buf, 48_000, 10, kind=SegmentKind.SPEAK, utterance_id="u")
    writer.write(frames(4), ramp_audio(4), last=False)
    video, _ = play(buf, 0, 6)  # frames 4 and 5 of the timeline are an underrun
    assert buf.underruns == 1 and [int(f[0, 0, 0]) for f in video] == [0, 1, 2, 3, 3, 3]
    pieces = writer.write(frames(6, first=4), ramp_audio(6), last=True)
    assert len(pieces) == 1 and pieces[0].start_frame == 6 and pieces[0].utterance_id == "u"
    first = writer.pieces[0]
    assert first.complete and first.ended and int(first.continuation.last_frame[0, 0, 0]) == 3
    video, _ = play(buf, 6, 6)
    assert [int(f[0, 0, 0]) for f in video] == [4, 5, 6, 7, 8, 9]
    assert sum(p.num_frames for p in writer.pieces) == 10


def test_interrupt_stops_a_writer_and_keeps_the_cut() -> None:
    from streaming.playout import SegmentWriter

    buf, _ = make_buffer()
    writer = SegmentWriter(buf, 48_000, 20, kind=SegmentKind.SPEAK)
    writer.write(frames(8), ramp_audio(8), last=False)
    play(buf, 0, 3)
    cut, dropped = buf.clear()
    assert cut is writer.pieces[0] and cut.num_frames == 3 and not dropped
    assert writer.write(frames(12, first=8), ramp_audio(12), last=True) == []
    assert writer.closed and buf.end_frame == 3 and cut.num_frames == 3
    assert writer.close() is None  # cut by the buffer: the caller's continuation stands


def test_writer_rejects_chunks_that_do_not_tile() -> None:
    from streaming.playout import SegmentWriter

    buf, _ = make_buffer()
    writer = SegmentWriter(buf, 48_000, 5, kind=SegmentKind.IDLE)
    with pytest.raises(ValueError, match="do not fit"):
        writer.write(frames(6), ramp_audio(6), last=False)
    with pytest.raises(ValueError, match="do not fit"):
        writer.write(frames(3), ramp_audio(3), last=True)


def test_streamed_segment_is_cross_faded_with_the_one_before_as_a_whole_one() -> None:
    from streaming.playout import SegmentWriter

    first, second = tone(10, 44_100), -tone(12, 44_100)
    whole, _ = make_buffer()
    whole.append(frames(10), first, 44_100, kind=SegmentKind.IDLE)
    whole.append(frames(12, 10), second, 44_100, kind=SegmentKind.SPEAK)
    streamed, _ = make_buffer()
    streamed.append(frames(10), first, 44_100, kind=SegmentKind.IDLE)
    writer = SegmentWriter(streamed, 44_100, 12, kind=SegmentKind.SPEAK)
    for a, b in chunk_bounds(12, 5):
        writer.write(frames(b - a, 10 + a), second[a * 1764 : b * 1764], last=b == 12)
    for ref, got in zip(whole.segments(), streamed.segments(), strict=True):
        assert np.array_equal(ref.frames, got.frames) and ref.start_frame == got.start_frame
        np.testing.assert_allclose(got.audio, ref.audio, atol=1e-6)
    assert list(streamed.segments())[1].crossfaded_from is list(streamed.segments())[0]


def test_a_second_reader_gets_the_same_media_and_counts_nothing_twice() -> None:
    """A peer connection and the media pump both read one buffer (a WebSocket session with a
    live output): each gets the same frames and chunks (declicks included), and the counters,
    underruns and taps see every timeline index once."""
    tapped: list[int] = []
    one, _ = make_buffer()
    two, _ = make_buffer()
    two.video_taps.append(lambda index, frame: tapped.append(index))
    for buf in (one, two):
        buf.append(frames(10), ramp_audio(10), 48_000, kind=SegmentKind.SPEAK, utterance_id="a")
        buf.append(frames(10, first=100), ramp_audio(10), 48_000, kind=SegmentKind.SPEAK, utterance_id="b")
    alone_video, alone_audio = play(one, 0, 25)  # 20 frames, then 5 of underrun
    for index in range(25):  # two readers, the second just behind the first
        for _reader in range(2):
            chunks = [two.pull_audio_chunk(2 * index), two.pull_audio_chunk(2 * index + 1)]
            frame = two.pull_video_frame(index)
            np.testing.assert_array_equal(frame, alone_video[index])
            np.testing.assert_array_equal(chunks[0], alone_audio[2 * index])
            np.testing.assert_array_equal(chunks[1], alone_audio[2 * index + 1])
    assert two.video_frames_pulled == one.video_frames_pulled == 25
    assert two.audio_chunks_pulled == one.audio_chunks_pulled == 50
    assert (two.underruns, two.underrun_frames, two.declicks) == (one.underruns, one.underrun_frames, one.declicks)
    assert one.underrun_frames == 5
    assert alone_audio[40][0] > 0.9 and not alone_audio[40][480:].any()  # the ramp into the underrun's silence
    assert tapped == list(range(25))
