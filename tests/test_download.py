"""Weights on demand (engine/download.py, CHECKPOINTS.md §1).

What these catch: a download that hangs or waits for long timeouts when the Hub is unreachable
(offline env, refused connection, silent endpoint), an error that does not say what to fetch and
where to put it, and wrong repositories / patterns / target folders handed to snapshot_download.
No test touches the network.
"""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest
from huggingface_hub import constants

import engine.download as dl
from engine.config import preview_config
from engine.dit import DiTModel, init_seeded
from tests.test_checkpoint import make_stack

REPOS = (
    "GAIR/daVinci-MagiHuman",
    "google/t5gemma-9b-9b-ul2",
    "stabilityai/stable-audio-open-1.0",
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
)
FOLDERS = ("distill/", "turbo_vae/", "t5gemma-9b-9b-ul2/", "stable-audio-open-1.0/", "Wan2.2-TI2V-5B/", "vae/")


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def no_hub(monkeypatch):
    """Any Hub call fails the test."""

    def boom(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(dl, "snapshot_download", boom)
    monkeypatch.setattr(dl.HfApi, "repo_info", boom)


def assert_instructions(message: str, dest) -> None:
    for repo in REPOS:
        assert repo in message, repo
    for folder in FOLDERS:
        assert folder in message, folder
    assert str(dest) in message
    assert "hf download GAIR/daVinci-MagiHuman --include 'distill/*' 'turbo_vae/*'" in message


def test_offline_fails_at_once_with_instructions(tmp_path, monkeypatch, no_hub):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(dl.DownloadError) as err:
        dl.download_stack(tmp_path / "ckpt")
    assert time.perf_counter() - started < 5
    assert "HF_HUB_OFFLINE" in str(err.value)
    assert_instructions(str(err.value), tmp_path / "ckpt")


def test_offline_with_complete_stack_returns_it(tmp_path, monkeypatch, no_hub):
    model = DiTModel(preview_config())
    init_seeded(model, 3)
    make_stack(tmp_path, model.state_dict())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dl.download_stack(tmp_path, variants=["distill"]) == tmp_path.resolve()
    with pytest.raises(dl.DownloadError, match=r"base: .* is missing"):
        dl.download_stack(tmp_path, variants=["base"])


def test_refused_connection_fails_fast(tmp_path, online):
    with socket.socket() as s:  # a port with no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    with pytest.raises(dl.DownloadError) as err:
        dl.download_stack(tmp_path, endpoint=f"http://127.0.0.1:{port}", timeout_s=2)
    assert time.perf_counter() - started < 5
    assert "cannot be reached" in str(err.value)
    assert_instructions(str(err.value), tmp_path)


def test_silent_endpoint_times_out(tmp_path, online):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held, stop = [], threading.Event()

    def accept():  # accept and never answer
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        started = time.perf_counter()
        with pytest.raises(dl.DownloadError, match="Timeout"):
            dl.download_stack(tmp_path, endpoint=f"http://127.0.0.1:{server.getsockname()[1]}", timeout_s=1)
        assert time.perf_counter() - started < 5
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_snapshot_download_wiring(tmp_path, monkeypatch, online):
    model = DiTModel(preview_config())
    init_seeded(model, 3)
    make_stack(tmp_path, model.state_dict())  # what a successful download leaves behind
    calls, probes = [], []

    def fake_repo_info(self, repo_id, *, revision=None, timeout=None, **kwargs):
        probes.append((repo_id, revision, timeout))
        return SimpleNamespace(sha=f"sha-of-{repo_id}")

    def fake_snapshot(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(kwargs["local_dir"])

    monkeypatch.setattr(dl.HfApi, "repo_info", fake_repo_info)
    monkeypatch.setattr(dl, "snapshot_download", fake_snapshot)
    assert dl.download_stack(tmp_path, variants=["distill"], revision="v1") == tmp_path.resolve()
    assert probes[0] == ("GAIR/daVinci-MagiHuman", "v1", dl.DEFAULT_TIMEOUT_S)
    assert [p[1] for p in probes[1:]] == [None, None, None]
    got = {repo: (kw["local_dir"], kw["allow_patterns"], kw["revision"]) for repo, kw in calls}
    root = tmp_path.resolve()
    assert got == {
        "GAIR/daVinci-MagiHuman": (root, ["distill/*", "turbo_vae/*"], "sha-of-GAIR/daVinci-MagiHuman"),
        "google/t5gemma-9b-9b-ul2": (
            root / "t5gemma-9b-9b-ul2",
            ["*.json", "*.safetensors", "tokenizer*", "*.model"],
            "sha-of-google/t5gemma-9b-9b-ul2",
        ),
        "stabilityai/stable-audio-open-1.0": (
            root / "stable-audio-open-1.0",
            ["vae/*", "model_config.json"],
            "sha-of-stabilityai/stable-audio-open-1.0",
        ),
        "Wan-AI/Wan2.2-TI2V-5B-Diffusers": (
            root / "Wan2.2-TI2V-5B", ["vae/*"], "sha-of-Wan-AI/Wan2.2-TI2V-5B-Diffusers"
        ),
    }
    assert dl.main_download(str(tmp_path), ["distill"]) == 0

    # A download that leaves a partial tree is reported, not returned.
    (tmp_path / "turbo_vae" / "checkpoint-340000.ckpt").unlink()
    with pytest.raises(dl.DownloadError, match="stack is incomplete"):
        dl.download_stack(tmp_path)


def test_main_download_returns_2(tmp_path, monkeypatch, capsys, no_hub):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dl.main_download(str(tmp_path), ["distill", "1080p_sr"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot download the model stack" in err and "1080p_sr/" in err
    assert dl.main_download(str(tmp_path), ["720p"]) == 2
    assert "unknown or no DiT variants" in capsys.readouterr().err


def test_sources_cover_requested_variants():
    sources = dl.stack_sources(["base", "540p_sr"])
    assert [s.repo_id for s in sources] == list(REPOS)
    assert sources[0].allow_patterns == ("base/*", "540p_sr/*", "turbo_vae/*")
    with pytest.raises(ValueError):
        dl.stack_sources([])
