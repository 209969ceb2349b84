"""The avatar as a Pipecat service (``pip install -e ".[pipecat]"``).

:class:`AvatarService` connects to an avatar server as a client (the WebSocket protocol of
docs/PROTOCOL.md through :class:`clients.client.AvatarClient`, media over WebRTC), opens a
session with a reference image and an appearance prompt, and stands in a Pipecat pipeline in
one of two modes:

``speech`` (where a TTS service stands: ``llm -> avatar -> transport.output()``)
    The model speaks the words itself. The LLM's text frames (``LLMTextFrame``) of one
    response are sent as ``speak`` chunks of one utterance, ``LLMFullResponseEndFrame`` sends
    ``speak.end``; a ``TTSSpeakFrame`` is one utterance of its own. The avatar's audio comes
    back as ``TTSAudioRawFrame`` (mono int16 at the session's ``sample_rate``, 20 ms each) and
    its video as ``OutputImageRawFrame`` (RGB, every frame, idle ones included), in the order
    they arrive from the server's WebRTC tracks, which the server keeps in sync. Audio is
    passed on from ``speak.started`` until ``played_ms`` of the utterance (``speak.ended`` or
    ``interrupted``) has been passed on, framed by ``TTSStartedFrame``/``TTSStoppedFrame``; the
    output transport derives ``BotStartedSpeakingFrame``/``BotStoppedSpeakingFrame`` from it.

``lipsync`` (after another TTS: ``llm -> tts -> avatar -> transport.output()``)
    The TTS's ``TTSAudioRawFrame`` are resampled to 48 kHz mono (a stateful PyAV resampler)
    and sent to the server as the session's microphone (:class:`clients.media.PushAudioTrack`,
    real-time paced); the server lip-syncs to them and sends the same audio back with the
    video. The returned audio is passed on while the server's ``state`` is ``speaking``.

Interruption. Pipecat's ``InterruptionFrame`` sends ``interrupt`` (lipsync: the queued
microphone audio is dropped too) and stops the avatar's audio at once. What the user heard
goes into the conversation context as Pipecat's word-timestamp TTS services do it: each word
is pushed as a ``TTSTextFrame`` behind the audio frames that carry it, so the assistant
aggregator after the output transport holds exactly the words played before the
interruption. The server does not report word times; a word's start is estimated from the
utterance's text at :attr:`AvatarService.words_per_second` (the server plans its segments at
2.5 words/s, ``streaming/text.py``). The server's own account, ``interrupted`` with
``played_ms``, is kept in :attr:`AvatarService.interruptions` and reported by the
``on_avatar_interrupted`` event handler ``(service, utterance_id, played_ms, heard_text)``.
In lipsync mode the other TTS's ``TTSTextFrame`` are held back and released when the returned
audio has reached the point where they were fed.

Transport. :class:`BufferedSmallWebRTCTransport` is Pipecat's ``SmallWebRTCTransport`` with
one chunk of audio queued ahead in its output track: the stock one leaves its writer 10 ms to
hand over each next chunk, and inserts 10 ms of silence whenever a busy event loop misses that
(docs/PIPECAT.md, "Gaps in the transport's audio").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import av
import numpy as np

from avatar_server import protocol
from clients.client import AvatarClient
from clients.media import MIC_SAMPLE_RATE_HZ, PushAudioTrack, audio_frame_to_mono

try:
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        ErrorFrame,
        Frame,
        InterruptionFrame,
        LLMFullResponseEndFrame,
        LLMFullResponseStartFrame,
        LLMTextFrame,
        OutputAudioRawFrame,
        OutputImageRawFrame,
        StartFrame,
        TextFrame,
        TTSAudioRawFrame,
        TTSSpeakFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
        TTSTextFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection
    from pipecat.services.ai_service import AIService
    from pipecat.services.settings import ServiceSettings
    from pipecat.transports.smallwebrtc.transport import SmallWebRTCOutputTransport, SmallWebRTCTransport
    from pipecat.utils.text.base_text_aggregator import TextType
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the optional extra
    raise ImportError(f'clients.pipecat_avatar needs Pipecat: pip install -e ".[pipecat]" ({exc})') from exc

logger = logging.getLogger(__name__)

WORDS_PER_SECOND = 2.5  # the server's planning rate (streaming/text.py WORDS_PER_SECOND)
DEFAULT_AUDIO_PREROLL_MS = 100
LIPSYNC_TAIL_S = 0.3  # returned audio still passed on after the state leaves speaking


@dataclass
class Interruption:
    """The server's account of an interrupted utterance: ``played_ms`` of its audio were
    played; ``heard_text`` is the words that start within them (estimated word times)."""

    utterance_id: str
    played_ms: int
    heard_text: str


@dataclass
class _Utterance:
    """One utterance of speech mode: its text so far and how much of it went downstream."""

    utterance_id: str
    text: str = ""
    ended: bool = False  # speak.end sent
    started: bool = False  # speak.started received
    pushed_samples: int = 0  # audio passed on
    budget_samples: int | None = None  # played_ms of speak.ended/interrupted, in samples
    words_pushed: int = 0
    interrupted: bool = False

    def words(self) -> list[str]:
        """Complete words: all of them once the text is over, else all but a trailing partial one."""
        parts = self.text.split()
        if not self.ended and parts and not self.text[-1:].isspace():
            parts = parts[:-1]
        return parts


@dataclass
class _HeldText:
    """A TTS's text frame (lipsync mode), released once the returned audio reaches ``at_samples``."""

    at_samples: int
    frame: Any = field(repr=False)


class AvatarService(AIService):
    """The avatar server in a Pipecat pipeline (module docstring: modes, frames, interruption).

    Args:
        url: the avatar server (``http://host:port/``).
        image: reference image, PNG/JPEG/WebP bytes.
        prompt: appearance text.
        mode: ``speech`` (stands where a TTS stands) or ``lipsync`` (after a TTS).
        language: language of the text in speech mode, e.g. ``English`` (goes into the prompt).
        token: session token (``POST /v1/tokens``) for a server with an api key.
        host_addresses: ICE host candidates of the avatar connection (see
            :class:`clients.client.AvatarClient`; the default for a loopback server is
            127.0.0.1, which applies process-wide, transports included).
        words_per_second: speaking rate used to time the ``TTSTextFrame`` of each word.
        audio_preroll_ms: audio (and the video with it) held at the start of each speech
            before any is passed on, so that network jitter does not starve the output
            transport (see :meth:`_pump`); it adds as much latency.
        timeout_s: how long to wait for the session and the WebRTC connection at start.
        **kwargs: passed to Pipecat's ``AIService``.
    """

    DEFAULT_AUDIO_PREROLL_MS = DEFAULT_AUDIO_PREROLL_MS

    def __init__(
        self,
        *,
        url: str,
        image: bytes,
        prompt: str = "",
        mode: Literal["speech", "lipsync"] = "speech",
        language: str | None = None,
        token: str | None = None,
        host_addresses: Sequence[str] | None = None,
        words_per_second: float = WORDS_PER_SECOND,
        audio_preroll_ms: int = DEFAULT_AUDIO_PREROLL_MS,
        timeout_s: float = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(settings=ServiceSettings(model=None), **kwargs)
        if mode not in ("speech", "lipsync"):
            raise ValueError(f"mode: {mode!r} is not one of speech, lipsync")
        if words_per_second <= 0:
            raise ValueError(f"words_per_second: must be positive, got {words_per_second:g}")
        self.url = url
        self.image = image
        self.prompt = prompt
        self.mode = mode
        self.language = language
        self.token = token
        self.host_addresses = host_addresses
        self.words_per_second = words_per_second
        if audio_preroll_ms < 0:
            raise ValueError(f"audio_preroll_ms: must not be negative, got {audio_preroll_ms}")
        self.audio_preroll_ms = audio_preroll_ms
        self.timeout_s = timeout_s
        self.client: AvatarClient | None = None
        self.session: protocol.SessionReady | None = None
        self.interruptions: list[Interruption] = []
        self.ready = asyncio.Event()  # set once the session and its media are up
        self._sample_rate_hz = MIC_SAMPLE_RATE_HZ
        self._out: asyncio.Queue[tuple[int, Frame | tuple[str, tuple[Any, ...]]]] = asyncio.Queue()
        self._epoch = 0  # interruptions so far
        self._pump_task: asyncio.Task[None] | None = None
        # speech mode
        self._utterances: dict[str, _Utterance] = {}
        self._current: _Utterance | None = None  # receiving text
        self._playing: _Utterance | None = None  # its audio is passed on
        self._count = 0
        self._pending_interrupt: list[_Utterance] = []  # interrupted, the server not yet told
        # lipsync mode
        self._mic: PushAudioTrack | None = None
        self._resampler: av.AudioResampler | None = None
        self._fed_samples = 0  # TTS samples sent as the microphone, in total
        self._returned_samples = 0  # returned audio passed on, in total
        self._held: list[_HeldText] = []
        self._lipsync_speaking = False
        # Interrupted: the server goes on lip-syncing the audio it already has, so the returned
        # audio stays muted until its state has left speaking and new TTS audio was fed since.
        self._lipsync_muted = False
        self._lipsync_quiet_since_mute = False
        self._fed_since_mute = False
        self._lipsync_stop_s: float | None = None
        self._register_event_handler("on_avatar_interrupted")

    @property
    def microphone(self) -> PushAudioTrack | None:
        """Lipsync mode: the track that carries the TTS's audio to the server (else ``None``)."""
        return self._mic

    # ------------------------------------------------------------------------------ lifecycle
    async def start(self, frame: StartFrame) -> None:
        """Open the session and its media (``session.start``, ``webrtc.offer``).

        Raises:
            clients.client.RefusedError: the server refused the session or the offer.
            OSError, TimeoutError: the server cannot be reached or did not answer in time.
        """
        await super().start(frame)
        self._pump_task = self.create_task(self._pump(), name="avatar-pump")
        client = AvatarClient(
            self.url,
            token=self.token,
            keep_audio=False,
            host_addresses=self.host_addresses,
            on_video_frame=self._on_video_frame,
            on_audio_frame=self._on_audio_frame,
            on_message=self._on_message,
        )
        self.client = client
        await client.connect()
        self.session = await client.start_session(
            self.image,
            self.prompt,
            mode="lipsync" if self.mode == "lipsync" else None,
            timeout_s=self.timeout_s,
        )
        self._sample_rate_hz = self.session.sample_rate
        if self.mode == "lipsync":
            self._mic = PushAudioTrack(MIC_SAMPLE_RATE_HZ)
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=MIC_SAMPLE_RATE_HZ)
        await client.start_media(microphone=self._mic, timeout_s=self.timeout_s)
        self.ready.set()

    async def stop(self, frame: EndFrame) -> None:
        """End the session (the WebSocket closes, then the peer connection)."""
        await super().stop(frame)
        await self._close()

    async def cancel(self, frame: CancelFrame) -> None:
        """End the session at once."""
        await super().cancel(frame)
        await self._close()

    async def _close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
            self.client = None
        if self._pump_task is not None:
            await self.cancel_task(self._pump_task)
            self._pump_task = None

    async def _pump(self) -> None:
        """Push what the media and message callbacks queued, in arrival order. From each
        ``TTSStartedFrame`` the frames are held until ``audio_preroll_ms`` of audio is in hand
        (or the speech ends), then released at once: the output transport plays audio at real
        time and fills any gap with silence, so without this head start every late packet of
        the avatar's stream would become a gap in the bot's speech."""
        held: list[tuple[int, Frame | tuple[str, tuple[Any, ...]]]] = []
        held_samples = 0
        holding = False
        while True:
            epoch, item = await self._out.get()
            if isinstance(item, TTSStartedFrame):
                await self._release(held)
                held, held_samples, holding = [], 0, self.audio_preroll_ms > 0
                await self.push_frame(item)
                continue
            if holding:
                held.append((epoch, item))
                if isinstance(item, TTSAudioRawFrame):
                    held_samples += len(item.audio) // 2
                if held_samples * 1000 >= self.audio_preroll_ms * self._sample_rate_hz or isinstance(
                    item, TTSStoppedFrame
                ):
                    await self._release(held)
                    held, holding = [], False
                continue
            await self._release([(epoch, item)])

    async def _release(self, items: list[tuple[int, Frame | tuple[str, tuple[Any, ...]]]]) -> None:
        for epoch, item in items:
            if epoch != self._epoch and isinstance(item, (TTSAudioRawFrame, TTSTextFrame)):
                continue  # speech of before an interruption
            if isinstance(item, tuple):
                name, args = item
                await self._call_event_handler(name, *args)
            else:
                await self.push_frame(item)

    # ------------------------------------------------------------------------------ frames in
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Text (speech mode) or TTS audio (lipsync mode) in; interruptions; the rest passes on."""
        if isinstance(frame, InterruptionFrame) and direction == FrameDirection.DOWNSTREAM:
            # before anything awaits: the pump drops what it holds of the old speech, and no
            # audio that arrives meanwhile is queued behind the interruption
            self._epoch += 1
            self._stop_passing_on()
            self._drop_queued_audio()
        await super().process_frame(frame, direction)
        if direction != FrameDirection.DOWNSTREAM or isinstance(frame, (StartFrame, EndFrame, CancelFrame)):
            await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame):
            await self._interrupt()
            await self.push_frame(frame, direction)
        elif self.mode == "speech":
            await self._process_speech(frame)
        else:
            await self._process_lipsync(frame)

    async def _process_speech(self, frame: Frame) -> None:
        if isinstance(frame, LLMFullResponseStartFrame):
            self._current = None  # the utterance starts with the first text
            await self.push_frame(frame)
        elif isinstance(frame, TTSSpeakFrame):  # an utterance of its own, even inside a response
            ongoing, self._current = self._current, None
            if frame.text:
                await self._speak(frame.text)
                await self._speak_end()
            self._current = ongoing
        elif isinstance(frame, LLMTextFrame) or type(frame) is TextFrame:
            if frame.text:
                await self._speak(frame.text)
        elif isinstance(frame, LLMFullResponseEndFrame):
            await self._speak_end()
            await self.push_frame(frame)
        else:
            await self.push_frame(frame)

    async def _speak(self, text: str) -> None:
        if self.client is None:
            return
        if self._current is None:
            self._count += 1
            self._current = _Utterance(f"pc{self._count}")
            self._utterances[self._current.utterance_id] = self._current
        self._current.text += text
        await self.client.speak_chunk(self._current.utterance_id, text, language=self.language)

    async def _speak_end(self) -> None:
        utterance, self._current = self._current, None
        if utterance is None or self.client is None:
            return
        utterance.ended = True
        await self.client.speak_end(utterance.utterance_id)

    async def _process_lipsync(self, frame: Frame) -> None:
        if isinstance(frame, TTSAudioRawFrame):
            self._feed_microphone(frame)
        elif isinstance(frame, TTSTextFrame):
            self._held.append(_HeldText(self._fed_samples, frame))
        elif isinstance(frame, (TTSStartedFrame, TTSStoppedFrame)):
            pass  # the avatar's own started/stopped frames frame the returned audio
        else:
            await self.push_frame(frame)

    def _feed_microphone(self, frame: TTSAudioRawFrame) -> None:
        assert self._mic is not None and self._resampler is not None
        pcm = np.frombuffer(frame.audio, dtype=np.int16).reshape(1, -1)
        layout = "mono" if frame.num_channels == 1 else "stereo"
        source = av.AudioFrame.from_ndarray(pcm, format="s16", layout=layout)
        source.sample_rate = frame.sample_rate
        for out in self._resampler.resample(source):
            samples = out.to_ndarray().reshape(-1).astype(np.int16)
            self._mic.push(samples)
            self._fed_samples += samples.size
            self._fed_since_mute = True

    def _stop_passing_on(self) -> None:
        """Pipecat interrupted the bot: no more of the avatar's audio is passed on (nothing
        awaits here, so no audio callback runs in between)."""
        if self.mode == "speech":
            self._pending_interrupt = [u for u in self._utterances.values() if not u.interrupted]
            for utterance in self._pending_interrupt:
                utterance.interrupted = True
            # No TTSStoppedFrame: the output transport ends the bot's speech on the interruption
            # itself (a stop frame behind it would flush audio it has just dropped).
            self._playing = None
            self._current = None
        else:
            if self._mic is not None:
                self._mic.clear()
            self._held.clear()
            self._lipsync_muted = True
            self._lipsync_quiet_since_mute = self._fed_since_mute = False
            self._lipsync_speaking = False
            self._lipsync_stop_s = None

    async def _interrupt(self) -> None:
        """Tell the server (speech mode: only if an utterance was under way)."""
        pending, self._pending_interrupt = self._pending_interrupt, []
        if self.client is not None and (self.mode == "lipsync" or pending):
            await self.client.interrupt()

    def _emit(self, item: Frame | tuple[str, tuple[Any, ...]]) -> None:
        """Queue a frame (or an event: name, arguments) for the pump."""
        self._out.put_nowait((self._epoch, item))

    def _drop_queued_audio(self) -> None:
        kept = []
        while not self._out.empty():
            epoch, item = self._out.get_nowait()
            if not isinstance(item, (TTSAudioRawFrame, TTSTextFrame)):
                kept.append((epoch, item))
        for entry in kept:
            self._out.put_nowait(entry)

    # ------------------------------------------------------------------------------ from the server
    def _on_message(self, message: Any) -> None:
        if isinstance(message, protocol.SpeakStarted):
            utterance = self._utterances.get(message.utterance_id)
            if utterance is not None and not utterance.interrupted:
                utterance.started = True
                self._playing = utterance
                self._emit(TTSStartedFrame(context_id=utterance.utterance_id))
        elif isinstance(message, (protocol.SpeakEnded, protocol.Interrupted)):
            self._utterance_over(message)
        elif isinstance(message, protocol.State) and self.mode == "lipsync":
            self._lipsync_state(message.state)
        elif isinstance(message, protocol.ErrorMessage):
            logger.warning("avatar server error %s: %s", message.code, message.message)
            self._emit(ErrorFrame(error=f"avatar server: {message.code}: {message.message}"))

    def _utterance_over(self, message: protocol.SpeakEnded | protocol.Interrupted) -> None:
        if message.utterance_id is None:
            return
        utterance = self._utterances.get(message.utterance_id)
        if utterance is None:
            return
        if isinstance(message, protocol.Interrupted):
            heard = self._words_within(utterance, message.played_ms / 1000)
            record = Interruption(utterance.utterance_id, message.played_ms, " ".join(heard))
            self.interruptions.append(record)
            self._emit(("on_avatar_interrupted", (record.utterance_id, record.played_ms, record.heard_text)))
        if self._playing is utterance:
            utterance.budget_samples = message.played_ms * self._sample_rate_hz // 1000
            if utterance.pushed_samples >= utterance.budget_samples:
                self._finish(utterance)
        else:
            del self._utterances[utterance.utterance_id]

    def _words_within(self, utterance: _Utterance, seconds: float) -> list[str]:
        """The words whose estimated start lies before ``seconds`` of the utterance's audio."""
        words = utterance.text.split()
        return words[: min(len(words), int(seconds * self.words_per_second) + (1 if seconds > 0 else 0))]

    def _finish(self, utterance: _Utterance) -> None:
        """All audio of ``utterance`` that was played is passed on: the rest of its words (when
        it ended by itself), then ``TTSStoppedFrame``."""
        if not utterance.interrupted:
            for word in utterance.words()[utterance.words_pushed :]:
                self._emit(self._word_frame(word, utterance))
        self._emit(TTSStoppedFrame(context_id=utterance.utterance_id))
        self._playing = None
        self._utterances.pop(utterance.utterance_id, None)

    def _word_frame(self, word: str, utterance: _Utterance) -> TTSTextFrame:
        utterance.words_pushed += 1
        return TTSTextFrame(text=word, text_type=TextType.WORD, context_id=utterance.utterance_id)

    def _lipsync_state(self, state: str) -> None:
        if self._lipsync_muted:
            if state != "speaking":
                self._lipsync_quiet_since_mute = True
                return
            if not (self._lipsync_quiet_since_mute and self._fed_since_mute):
                return  # still the interrupted answer
            self._lipsync_muted = False
        if state == "speaking":
            self._lipsync_stop_s = None
            if not self._lipsync_speaking:
                self._lipsync_speaking = True
                self._emit(TTSStartedFrame())
        elif self._lipsync_speaking and self._lipsync_stop_s is None:
            self._lipsync_stop_s = asyncio.get_running_loop().time() + LIPSYNC_TAIL_S

    def _on_video_frame(self, frame: av.VideoFrame) -> None:
        rgb = frame.to_ndarray(format="rgb24")
        self._emit(OutputImageRawFrame(image=rgb.tobytes(), size=(frame.width, frame.height), format="RGB"))

    def _on_audio_frame(self, frame: av.AudioFrame) -> None:
        if self.mode == "speech":
            self._speech_audio(frame)
        else:
            self._lipsync_audio(frame)

    def _audio_frame(self, frame: av.AudioFrame, count: int | None = None) -> TTSAudioRawFrame:
        mono = audio_frame_to_mono(frame)
        if count is not None:
            mono = mono[:count]
        pcm = (np.clip(mono, -1.0, 1.0) * 32767.0).astype(np.int16)
        return TTSAudioRawFrame(audio=pcm.tobytes(), sample_rate=frame.sample_rate, num_channels=1)

    def _speech_audio(self, frame: av.AudioFrame) -> None:
        utterance = self._playing
        if utterance is None:
            return  # idle audio between utterances is not the bot speaking
        count = frame.samples
        if utterance.budget_samples is not None:
            count = min(count, utterance.budget_samples - utterance.pushed_samples)
        if count > 0:
            self._emit(self._audio_frame(frame, count))
            utterance.pushed_samples += count
            # the words that start within the audio passed on so far
            heard_s = utterance.pushed_samples / frame.sample_rate
            words = utterance.words()
            due = min(len(words), int(heard_s * self.words_per_second) + 1)
            while utterance.words_pushed < due:
                self._emit(self._word_frame(words[utterance.words_pushed], utterance))
        if utterance.budget_samples is not None and utterance.pushed_samples >= utterance.budget_samples:
            self._finish(utterance)

    def _lipsync_audio(self, frame: av.AudioFrame) -> None:
        if self._lipsync_muted or not self._lipsync_speaking:
            return
        if self._lipsync_stop_s is not None and asyncio.get_running_loop().time() >= self._lipsync_stop_s:
            self._lipsync_speaking = False
            self._lipsync_stop_s = None
            for held in self._held:
                self._emit(held.frame)
            self._held.clear()
            self._emit(TTSStoppedFrame())
            return
        self._emit(self._audio_frame(frame))
        self._returned_samples += frame.samples * MIC_SAMPLE_RATE_HZ // frame.sample_rate
        while self._held and self._held[0].at_samples <= self._returned_samples:
            self._emit(self._held.pop(0).frame)


class _BufferedOutputTransport(SmallWebRTCOutputTransport):
    """SmallWebRTC output whose audio writes return once the chunk before is played."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ahead: tuple[Any, asyncio.Future[Any]] | None = None  # (track, its last chunk played)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        """Queue ``frame.audio`` (int16 at the output rate, a whole number of 10 ms) on the
        output track and wait until the chunk written before it has been played; the first
        chunk, and one after a new track, return at once. A Pipecat without the attributes
        this relies on gets the stock write."""
        client = self._client
        track = getattr(client, "_audio_output_track", None)
        can_send = getattr(client, "_can_send", None)
        if track is None or can_send is None or not hasattr(track, "add_audio_bytes"):
            return await super().write_audio_frame(frame)
        if not can_send():
            return False
        played = track.add_audio_bytes(frame.audio)
        before, self._ahead = self._ahead, (track, played)
        if before is not None and before[0] is track:
            await before[1]
        return True


class BufferedSmallWebRTCTransport(SmallWebRTCTransport):
    """Pipecat's ``SmallWebRTCTransport`` (same arguments) with one audio chunk queued ahead.

    Pipecat 1.14's output track (``RawAudioTrack``) is handed one chunk of
    ``audio_out_10ms_chunks`` x 10 ms at a time and the writer waits until the chunk has been
    played, so the next one must be written within the 10 ms between the track's last two
    reads; when the event loop is late for that, the track sends 10 ms of silence and the rest
    of the speech 10 ms later, however much audio waits upstream. Here the writer waits for
    the chunk before the one it wrote instead: the track holds one more chunk (40 ms at the
    default 4), which is the writer's slack, and as much more audio still plays after an
    interruption. ``BotStoppedSpeakingFrame`` comes one chunk before the end of the audio.
    Measured, docs/PIPECAT.md.
    """

    def output(self) -> SmallWebRTCOutputTransport:
        """The output processor (created once), buffered as the class says."""
        if self._output is None:
            self._output = _BufferedOutputTransport(self._client, self._params, name=self._output_name)
        return self._output
