"""``avatar-server generate`` end to end on CPU (avatar_server/offline_cli.py).

Runs the parsed command through :func:`run_generate` on the preview stack (written to disk in the
released layout, or built in memory) and opens the MP4 with PyAV: an h264 stream of ``F = 4T - 3``
frames at the requested size and an AAC stream of exactly ``1764 * A`` samples at 44.1 kHz
(PIPELINE.md §3, §15). Clips are 1 s (A = 26, T = 7, F = 25; A2V: A = 25) at 448x256; the SR run
uses 0.2 s (A = 6, T = 2, F = 5) because its 896x512 stage and decode cost ~4x the base stage on CPU. Input errors must exit with 2 and one
``error:`` line before anything is loaded.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import av
import pytest

from avatar_server.offline_cli import DIT_VARIANTS, build_parser, read_audio, run_download, run_generate
from engine.stack import write_preview_stack

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
SAMPLES_PER_LATENT = 1764  # 44.1 kHz samples per audio latent (PIPELINE.md §15.2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    return write_preview_stack(tmp_path_factory.mktemp("stack"), seed=1, variants=["distill", "540p_sr"])


@pytest.fixture
def media() -> Path:
    if not MEDIA.is_dir():
        pytest.skip(f"shared media not found at {MEDIA}")
    return MEDIA


def generate(*argv: str) -> int:
    args = build_parser().parse_args(["generate", *argv])
    return run_generate(args)


def probe(path: Path) -> dict:
    """Codec names, sizes, frame count and the audio duration as muxed (samples at its rate)."""
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        info = {
            "video_codec": video.codec_context.name,
            "size": (video.codec_context.width, video.codec_context.height),
            "audio_codec": audio.codec_context.name,
            "sample_rate": audio.codec_context.sample_rate,
            "channels": audio.codec_context.channels,
            "audio_samples": audio.duration * audio.time_base * audio.codec_context.sample_rate,
        }
        info["frames"] = sum(1 for _ in container.decode(video))
    with av.open(str(path)) as container:
        info["decoded_samples"] = sum(frame.samples for frame in container.decode(audio=0))
    return info


def assert_clip(path: Path, size: tuple[int, int], frames: int, audio_latents: int) -> None:
    info = probe(path)
    assert info["video_codec"] == "h264" and info["size"] == size and info["frames"] == frames
    assert info["audio_codec"] == "aac" and info["sample_rate"] == 44_100 and info["channels"] == 2
    expected = SAMPLES_PER_LATENT * audio_latents
    assert info["audio_samples"] == Fraction(expected)  # muxed duration: exactly A / 25 s
    assert expected <= info["decoded_samples"] < expected + 2048  # AAC pads the last frame


def test_t2v_256p_from_stack_dir(stack, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("A woman speaks to the camera.\n", encoding="utf-8")
    out = tmp_path / "t2v.mp4"
    assert generate("--prompt-file", str(prompt), "--seconds", "1", "--checkpoint-dir", str(stack),
                    "--device", "cpu", "--out", str(out)) == 0
    assert f"wrote {out}: 25 frames 448x256" in capsys.readouterr().out
    assert_clip(out, (448, 256), frames=25, audio_latents=26)  # 1 s: A = 26, T = 7, F = 25


def test_ti2v_preview_in_memory(media, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "ti2v.mp4"
    assert generate("--prompt", "A man talks.", "--image", str(media / "portrait.png"), "--seconds", "1",
                    "--device", "cpu", "--out", str(out)) == 0
    assert "PREVIEW stack" in caplog.text  # no --checkpoint-dir: untrained models, said so
    assert_clip(out, (448, 256), frames=25, audio_latents=26)


def test_a2v_from_stack_dir(stack, media, tmp_path):
    out = tmp_path / "a2v.mp4"
    assert generate("--prompt", "A man talks.", "--audio", str(media / "english.wav"), "--seconds", "1",
                    "--checkpoint-dir", str(stack), "--device", "cpu", "--out", str(out)) == 0
    # the first 1 s of the 44.1 kHz speech is 51,200 samples at 51.2 kHz -> A = 25 latents, T = 7, F = 25
    assert_clip(out, (448, 256), frames=25, audio_latents=25)


def test_540p_sr_from_stack_dir(stack, media, tmp_path):
    out = tmp_path / "sr.mp4"
    # the Wan2.2 VAE decodes the 2 latent frames as they are; the Turbo decoder would pad them to its
    # 7-latent window (25 frames at 896x512), the slowest part of this test on CPU
    assert generate("--prompt", "hello", "--image", str(media / "portrait.png"), "--resolution", "540p",
                    "--seconds", "0.2", "--video-decoder", "wan", "--checkpoint-dir", str(stack), "--device", "cpu",
                    "--out", str(out)) == 0
    assert_clip(out, (896, 512), frames=5, audio_latents=6)  # 0.2 s: A = 6, T = 2, F = 5


def test_read_audio_mono_at_native_rate(media):
    wave, rate = read_audio(media / "english.wav")
    assert rate == 44_100 and wave.ndim == 1 and wave.dtype.name == "float32" and 2.7 < wave.size / rate < 2.8
    stereo, rate = read_audio(media / "jfk.flac")  # stereo file, down-mixed
    assert rate == 44_100 and stereo.ndim == 1 and abs(stereo.size / rate - 11.0) < 0.01


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--resolution", "540p"], "--resolution 540p needs the SR model 540p_sr/"),
        (["--seconds", "0"], "--seconds 0 is outside (0, 20]"),
        (["--seconds", "21"], "--seconds 21 is outside (0, 20]"),
        (["--image", "/nonexistent.png"], "--image /nonexistent.png: no such file"),
        (["--audio", "/nonexistent.wav"], "--audio /nonexistent.wav: no such file"),
        (["--prompt-file", "/nonexistent.txt"], "--prompt-file /nonexistent.txt: cannot read"),
    ],
)
def test_bad_input_exits_2_before_loading(tmp_path, stack, capsys, monkeypatch, argv, message):
    import engine.stack

    def boom(*args, **kwargs):
        raise AssertionError("models were loaded despite bad input")

    monkeypatch.setattr(engine.stack, "load_stack", boom)
    monkeypatch.setattr(engine.stack, "preview_models", boom)
    no_sr = tmp_path / "no_sr"  # the stack without 540p_sr/
    no_sr.mkdir()
    for entry in stack.iterdir():
        if entry.name != "540p_sr":
            (no_sr / entry.name).symlink_to(entry)
    prompt = [] if "--prompt-file" in argv else ["--prompt", "hi"]
    code = generate(*prompt, "--seconds", "1", "--checkpoint-dir", str(no_sr), "--device", "cpu",
                    "--out", str(tmp_path / "x.mp4"), *argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and err.startswith("avatar-server generate: error:")
    assert len(err.splitlines()) == 1 and not (tmp_path / "x.mp4").exists()


def test_incomplete_stack_exits_2(tmp_path, stack, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "distill").symlink_to(stack / "distill")
    code = generate("--prompt", "hi", "--seconds", "1", "--checkpoint-dir", str(partial), "--device", "cpu",
                    "--out", str(tmp_path / "x.mp4"))
    err = capsys.readouterr().err
    assert code == 2 and "turbo_vae" in err and "video_vae" in err and "text_encoder" in err


def test_download_command_offline(tmp_path, capsys, monkeypatch):
    from engine.checkpoint import VARIANTS

    assert DIT_VARIANTS == VARIANTS
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(["download", str(tmp_path / "ckpt"), "--variant", "base", "--variant", "540p_sr"])
    assert args.variant == ["base", "540p_sr"]
    assert run_download(args) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE is set" in err and "base/" in err and "540p_sr/" in err
