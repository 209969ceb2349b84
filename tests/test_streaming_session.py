"""SessionRunner: segment choice, continuation chain, events, interrupt, lip-sync, worker thread."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from engine.api import EngineInputError, SegmentKind, SegmentRequest
from engine.testpattern import TestPatternEngine, decode_counter
from streaming import events
from streaming.engine_client import EngineWorker
from streaming.session import LoopConfig, SessionInputError, SessionRunner


class RecordingEngine(TestPatternEngine):
    """Test pattern that records each request and the thread it ran in."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.requests: list[SegmentRequest] = []
        self.results: list = []
        self.threads: set[str] = set()
        self.fail_next = 0

    def generate(self, request, cancel=None, on_chunk=None):
        self.threads.add(threading.current_thread().name)
        if self.fail_next:
            self.fail_next -= 1
            raise EngineInputError("seconds: made-up failure")
        result = super().generate(request, cancel, on_chunk)
        self.requests.append(request)
        self.results.append(result)
        return result


class FakeMicrophone:
    """Voice state and audio of one lip-sync run under the test's control; the session gets
    it from ``attach_microphone`` (as :meth:`factory`), and hears voice changes through the
    ``on_change`` callback as from a real :class:`~streaming.microphone.Microphone`."""

    def __init__(self) -> None:
        self.on_change = None
        self.speaking = False
        self.run_active = False
        self.run_id = 1
        self.audio = np.zeros(0, np.float32)
        self.taken: list[np.ndarray] = []

    @property
    def run_closing(self) -> bool:
        return self.run_active and not self.speaking

    def available_s(self) -> float:
        return self.audio.size / 48_000 if self.run_active else 0.0

    def voiced_remaining_s(self) -> float:
        return self.available_s()

    def take_audio(self, seconds: float) -> np.ndarray:
        count = round(seconds * 48_000)
        out = np.zeros(count, np.float32)
        out[: min(count, self.audio.size)] = self.audio[:count]
        self.audio = self.audio[count:]
        self.taken.append(out)
        return out

    def end_run(self) -> None:
        self.run_active = False

    def factory(self, *, on_change) -> FakeMicrophone:
        self.on_change = on_change
        return self

    def attach(self, track) -> None:
        pass

    def voice_starts(self, audio: np.ndarray) -> None:
        """The VAD hears voice: a run begins with ``audio``, and the session is told."""
        self.audio = audio
        self.speaking = self.run_active = True
        self.on_change(True)

    def discard_pending(self) -> None:
        self.audio = np.zeros(0, np.float32)

    async def close(self) -> None:
        pass


async def make_runner(engine=None, *, microphone: FakeMicrophone | None = None, **config):
    """A session on ``engine`` (a new :class:`RecordingEngine` by default), its engine and its
    event log; ``microphone`` is attached as the client's audio track would be."""
    engine = engine or RecordingEngine()
    worker = EngineWorker(engine)
    identity = await worker.prepare_identity(np.full((720, 1280, 3), 90, np.uint8), "A calm person.")
    log: list = []
    cfg = {"playout_target_ms": 2000.0, **config}
    factory = {} if microphone is None else {"microphone_factory": microphone.factory}
    runner = SessionRunner(worker=worker, identity=identity, on_event=log.append, config=LoopConfig(**cfg), **factory)
    if microphone is not None:
        assert runner.attach_microphone(None) is microphone
    return runner, engine, log


async def play(runner: SessionRunner, count: int, *, timeout_s: float = 10.0) -> None:
    """Pull ``count`` frames (and their audio) as fast as the buffer has them."""
    buf = runner.buffer
    deadline = time.monotonic() + timeout_s
    for _ in range(count):
        while buf.depth_frames == 0:
            assert time.monotonic() < deadline, "buffer never refilled"
            await asyncio.sleep(0.002)
        index = buf.head_frame
        buf.pull_audio_chunk(2 * index)
        buf.pull_video_frame(index)
        buf.pull_audio_chunk(2 * index + 1)
        await asyncio.sleep(0)


async def play_until(runner: SessionRunner, log: list, predicate, *, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        for event in log:
            if predicate(event):
                return event
        assert time.monotonic() < deadline, f"no matching event in {log}"
        await play(runner, 1)


async def wait_until(predicate, *, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.01)


def of_type(log: list, kind: type) -> list:
    return [e for e in log if isinstance(e, kind)]


async def test_idle_segments_fill_and_each_continues_from_the_last() -> None:
    runner, engine, log = await make_runner()
    runner.start()
    try:
        await play(runner, 150)
    finally:
        await runner.close()
    kinds = {r.kind for r in engine.requests}
    assert kinds == {SegmentKind.IDLE}
    assert engine.requests[0].continue_from is None
    for previous, request in zip(engine.results, engine.requests[1:], strict=False):
        assert request.continue_from is previous.continuation
    seeds = [r.seed for r in engine.requests]
    assert seeds == sorted(set(seeds))
    assert "Dialogue:\n<No dialogue>" in engine.requests[0].prompt
    assert runner.buffer.underruns == 0
    assert of_type(log, events.FirstFrame)


async def test_generation_runs_on_one_worker_thread_shared_by_sessions() -> None:
    engine = RecordingEngine()
    worker = EngineWorker(engine)
    identity = await worker.prepare_identity(np.zeros((64, 64, 3), np.uint8), "")
    runners = [SessionRunner(worker=worker, identity=identity, on_event=lambda e: None) for _ in range(2)]
    for runner in runners:
        runner.start()
    await asyncio.gather(*(play(r, 60) for r in runners))
    for runner in runners:
        await runner.close()
    assert len(engine.threads) == 1
    assert threading.current_thread().name not in engine.threads


async def test_speak_in_chunks_starts_before_speak_end_and_reports_played_ms() -> None:
    runner, engine, log = await make_runner()
    runner.start()
    try:
        await play(runner, 5)
        runner.speak("u1", "Hello there, this is ", language="English")
        runner.speak("u1", "the first utterance of the test. It has ")
        await play_until(runner, log, lambda e: isinstance(e, events.SegmentGenerated) and e.kind is SegmentKind.SPEAK)
        assert not of_type(log, events.SpeakEnded)
        runner.speak("u1", "two sentences.")
        runner.speak_end("u1")
        ended = await play_until(runner, log, lambda e: isinstance(e, events.SpeakEnded))
    finally:
        await runner.close()
    speak_requests = [r for r in engine.requests if r.kind is SegmentKind.SPEAK]
    assert " ".join(r.text for r in speak_requests) == (
        "Hello there, this is the first utterance of the test. It has two sentences."
    )
    assert all("<The person, English>" in r.prompt and r.text in r.prompt for r in speak_requests)
    speak_frames = sum(res.num_frames for req, res in zip(engine.requests, engine.results, strict=True) if req.kind is SegmentKind.SPEAK)
    assert ended.utterance_id == "u1" and ended.played_ms == speak_frames * 40
    started = of_type(log, events.SpeakStarted)
    assert [e.utterance_id for e in started] == ["u1"] and log.index(started[0]) < log.index(ended)
    states = [e.state for e in of_type(log, events.StateChanged)]
    assert states[:2] == ["speaking", "idle"]


async def test_speech_overtakes_idle_that_is_queued_but_not_playing() -> None:
    runner, engine, log = await make_runner(playout_target_ms=8000.0)
    runner.start()
    try:
        await play(runner, 1)
        await wait_until(lambda: runner.buffer.depth_ms >= 6000)
        playing = next(iter(runner.buffer.segments()))
        assert len(runner.buffer.queued()) >= 2
        runner.speak("u1", "Short and sweet.")
        runner.speak_end("u1")
        await wait_until(lambda: any(s.kind is SegmentKind.SPEAK for s in runner.buffer.segments()))
        held = list(runner.buffer.segments())
        # its first chunk is in the buffer before generate returns (issue 17)
        await wait_until(lambda: any(r.kind is SegmentKind.SPEAK for r in engine.requests))
    finally:
        await runner.close()
    assert held[0] is playing and held[1].kind is SegmentKind.SPEAK
    assert held[1].start_frame == playing.end_frame
    speak_request = next(r for r in engine.requests if r.kind is SegmentKind.SPEAK)
    assert speak_request.continue_from is playing.continuation


async def test_interrupt_clears_and_reports_played_ms() -> None:
    runner, engine, log = await make_runner()
    runner.start()
    try:
        runner.speak("u1", "This is a long utterance that will be cut off in the middle by an interrupt. " * 3)
        runner.speak_end("u1")
        await play_until(runner, log, lambda e: isinstance(e, events.SpeakStarted))
        await play(runner, 10)
        speak_played = sum(s.played_frames for s in runner.buffer.segments() if s.kind is SegmentKind.SPEAK)
        result = runner.interrupt()
        assert result == [events.Interrupted("u1", speak_played * 40)]
        assert runner.buffer.depth_ms == 0
        runner.speak("u1", "late chunk")  # dropped quietly
        runner.speak_end("u1")
        await play(runner, 60)
    finally:
        await runner.close()
    assert not of_type(log, events.SpeakEnded)
    assert of_type(log, events.Interrupted) == result
    assert all(r.kind is SegmentKind.IDLE for r in engine.requests[-2:])
    assert runner.state == "idle"


async def test_interrupt_with_nothing_pending() -> None:
    runner, _, log = await make_runner()
    assert runner.interrupt() == [events.Interrupted(None, 0)]
    await runner.close()


async def test_input_errors() -> None:
    runner, _, _ = await make_runner(max_utterance_chars=20)
    with pytest.raises(SessionInputError):
        runner.speak("u0", "x" * 21)
    with pytest.raises(SessionInputError) as info:
        runner.speak_end("u0")  # a refused first chunk leaves no utterance behind
    assert info.value.code == "unknown_utterance"
    runner.speak("u1", "0123456789")
    with pytest.raises(SessionInputError) as info:
        runner.speak("u1", "01234567890")
    assert info.value.code == "utterance_too_long" and "max_utterance_chars = 20" in str(info.value)
    runner.speak_end("u1")
    with pytest.raises(SessionInputError) as info:
        runner.speak("u1", "more")
    assert info.value.code == "utterance_ended"
    with pytest.raises(SessionInputError) as info:
        runner.speak_end("nope")
    assert info.value.code == "unknown_utterance"
    await runner.close()


async def test_lipsync_segments_carry_the_microphone_audio() -> None:
    mic = FakeMicrophone()
    runner, engine, log = await make_runner(microphone=mic)
    runner.start()
    try:
        await play(runner, 3)
        mic.speaking = mic.run_active = True
        t = np.arange(3 * 48_000) / 48_000
        mic.audio = (0.4 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
        segment = await play_until(
            runner, log, lambda e: isinstance(e, events.SegmentGenerated) and e.kind is SegmentKind.LIPSYNC
        )
        mic.speaking = False
        await play(runner, 120)
    finally:
        await runner.close()
    lipsync = [(req, res) for req, res in zip(engine.requests, engine.results, strict=True) if req.kind is SegmentKind.LIPSYNC]
    first_req, first_res = lipsync[0]
    assert first_req.audio_sample_rate == 48_000 and first_req.audio is mic.taken[0]
    assert first_res.audio.size == first_req.audio.size == first_res.num_frames * 1920  # same duration
    np.testing.assert_allclose(first_res.audio, mic.taken[0], atol=1e-6)
    # the tail after the voice ended is played out as a shorter lip-sync segment, then the run ends
    assert [round(res.duration_s, 2) for _, res in lipsync] == [1.96, 1.0]
    assert segment.duration_s == pytest.approx(1.96) and not mic.run_active
    np.testing.assert_allclose(lipsync[1][1].audio, mic.taken[1], atol=1e-6)
    assert "speaking" in [e.state for e in of_type(log, events.StateChanged)]


async def test_listen_while_the_user_speaks_and_the_buffer_runs_low() -> None:
    mic = FakeMicrophone()
    mic.speaking = mic.run_active = True
    runner, engine, log = await make_runner(playout_target_ms=200.0, microphone=mic)
    runner.start()
    try:
        await play(runner, 60)
    finally:
        await runner.close()
    assert {r.kind for r in engine.requests} == {SegmentKind.LISTEN}
    assert runner.state == "listening"


async def test_engine_errors_are_reported_and_the_loop_goes_on() -> None:
    engine = RecordingEngine()
    engine.fail_next = 1
    runner, _, log = await make_runner(engine)
    runner.start()
    try:
        await play(runner, 30)
    finally:
        await runner.close()
    assert of_type(log, events.SessionError)[0].code == "engine_input"
    assert engine.requests


async def test_close_cancels_generation_in_flight() -> None:
    runner, _, _ = await make_runner(RecordingEngine(generate_delay_s=30.0))
    runner.start()
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await runner.close()
    assert time.monotonic() - started < 1.0
    runner.worker.close()


async def test_stats_are_a_typed_record_that_reads_as_the_protocol_mapping() -> None:
    runner, engine, _ = await make_runner()
    runner.start()
    try:
        await play(runner, 30)
        stats = runner.stats()
    finally:
        await runner.close()
    assert isinstance(stats, events.SessionStats)
    assert list(stats) == [
        "buffer_ms", "underruns", "segments", "rtf", "ttff_ms", "frames_sent", "frames_dropped", "gen_ms",
        "encode_ms", "av_offset_ms", "interrupt_ms", "queue", "upgraded", "width", "height", "mode",
        "barge_in", "recording",
    ]
    assert dict(stats) == stats.as_dict() and stats["segments"] == stats.segments == len(engine.requests)
    assert stats.frames_sent == 30 and stats.buffer_ms == round(runner.buffer.depth_ms)
    assert (stats.width, stats.height, stats.mode, stats.recording) == (224, 128, "lipsync", False)
    assert stats.encode_ms is None and stats.av_offset_ms is None  # no tracks
    with pytest.raises(KeyError):
        stats["nope"]


def frame_at(runner: SessionRunner, frame: int) -> np.ndarray:
    """The frame at timeline index ``frame`` (still held by the buffer)."""
    seg = next(s for s in runner.buffer.segments() if s.start_frame <= frame < s.end_frame)
    return seg.frames[frame - seg.start_frame]


async def test_a_segment_plays_while_the_engine_still_decodes_it() -> None:
    """Issue 17: the first chunk is in the playout buffer, and plays, before ``generate`` returns;
    the chunks add up to exactly the segment the engine returns."""
    engine = RecordingEngine(chunk_frames=5, chunk_delay_s=0.25)
    runner, engine, log = await make_runner(engine, idle_segment_seconds=1.0)
    runner.start()
    try:
        await wait_until(lambda: runner.buffer.end_frame > 0)
        assert runner.buffer.end_frame == 5 and engine.results == []
        assert runner.last_time_to_buffer_s is not None and runner.last_time_to_buffer_s < 0.25
        await play(runner, 3)
        assert of_type(log, events.FirstFrame) and engine.results == []  # on screen before the segment is whole
        await wait_until(lambda: len(engine.results) >= 1 and runner.segments_generated >= 1)
        first = next(iter(runner.buffer.segments()))
        await wait_until(lambda: len(engine.requests) >= 2, timeout_s=15.0)
    finally:
        await runner.close()
    result = engine.results[0]
    assert first.complete and first.num_frames == 25 and np.array_equal(first.frames, result.frames)
    assert first.continuation is result.continuation
    assert engine.requests[1].continue_from is result.continuation
    assert of_type(log, events.SegmentGenerated)[0].duration_s == pytest.approx(1.0)


async def test_idle_overtaken_while_streaming_keeps_one_continuous_timeline() -> None:
    """Speech arrives while an idle segment is streaming in: the idle job is cancelled, the frames
    already written stay (they may be on screen), and the speech segment continues from exactly
    the frame before it on the timeline."""
    engine = RecordingEngine(chunk_frames=5, chunk_delay_s=0.3)
    runner, engine, log = await make_runner(engine, idle_segment_seconds=2.0)
    runner.start()
    try:
        await wait_until(lambda: runner.buffer.end_frame >= 10)
        await play(runner, 2)
        idle = next(iter(runner.buffer.segments()))
        runner.speak("u1", "Hello there. This sentence has enough words to be spoken at once.")
        runner.speak_end("u1")
        await wait_until(lambda: any(s.kind is SegmentKind.SPEAK for s in runner.buffer.segments()), timeout_s=15.0)
        speech = next(s for s in runner.buffer.segments() if s.kind is SegmentKind.SPEAK)
        before = frame_at(runner, speech.start_frame - 1)
        await wait_until(lambda: any(r.kind is SegmentKind.SPEAK for r in engine.requests), timeout_s=15.0)
    finally:
        await runner.close()
    assert idle.kind is SegmentKind.IDLE and idle.complete and idle.num_frames < 50  # cut short, not whole
    assert not any(r.kind is SegmentKind.IDLE for r in engine.requests[:1])  # the idle job never finished
    request = next(r for r in engine.requests if r.kind is SegmentKind.SPEAK)
    assert np.array_equal(request.continue_from.last_frame, before)
    assert speech.start_frame == idle.end_frame
    assert decode_counter(speech.frames[0]) == decode_counter(before) + 1


async def test_interrupt_while_streaming_drops_the_rest_of_the_segment() -> None:
    engine = RecordingEngine(chunk_frames=5, chunk_delay_s=0.3)
    runner, engine, log = await make_runner(engine, segment_seconds=2.0)
    runner.start()
    try:
        runner.speak("u1", "A long sentence that streams in while it plays. " * 2)
        runner.speak_end("u1")
        await play_until(runner, log, lambda e: isinstance(e, events.SpeakStarted))
        await play(runner, 2)
        speech = next(s for s in runner.buffer.segments() if s.kind is SegmentKind.SPEAK)
        assert not speech.complete
        runner.interrupt()
        assert runner.buffer.depth_frames == 0 and speech.cut
        end = speech.end_frame
        await asyncio.sleep(0.7)  # chunks of the cancelled job would have come by now
        assert speech.end_frame == end
        assert all(s.kind is not SegmentKind.SPEAK for s in runner.buffer.segments() if s.start_frame >= end)
    finally:
        await runner.close()


class FailingMidStream(RecordingEngine):
    """Fails its first segment after two chunks have gone out (a decoder error mid-segment)."""

    def generate(self, request, cancel=None, on_chunk=None):
        if self.fail_next and on_chunk is not None:
            self.fail_next -= 1
            sent = []

            def relay(chunk) -> None:
                if len(sent) == 2:
                    raise RuntimeError("decoder failed")
                sent.append(chunk)
                on_chunk(chunk)

            return super().generate(request, cancel, relay)
        return super().generate(request, cancel, on_chunk)


async def test_engine_failure_mid_stream_keeps_what_played_and_continues_from_it() -> None:
    engine = FailingMidStream(chunk_frames=5)
    engine.fail_next = 1
    runner, engine, log = await make_runner(engine, idle_segment_seconds=1.0)
    runner.start()
    try:
        await wait_until(lambda: len(engine.requests) >= 1, timeout_s=15.0)
        first = next(iter(runner.buffer.segments()))
        second_request = engine.requests[0]
    finally:
        await runner.close()
    assert of_type(log, events.SessionError)[0].code == "engine_failed"
    assert first.complete and first.num_frames == 10 and first.start_frame == 0
    assert np.array_equal(second_request.continue_from.last_frame, first.frames[-1])
