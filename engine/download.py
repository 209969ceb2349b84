"""Fetch the model stack (CHECKPOINTS.md §1) from the Hugging Face Hub on demand.

``download_stack(dest)`` fills ``dest`` with exactly the tree :func:`engine.checkpoint.check_stack_dir`
expects, through ``huggingface_hub.snapshot_download(local_dir=..., allow_patterns=...)``:

==================================  ====================================  ===========================
Hub repository                      files                                 placed in
==================================  ====================================  ===========================
``GAIR/daVinci-MagiHuman``          ``<variant>/*`` and ``turbo_vae/*``   ``dest/<variant>/``, ``dest/turbo_vae/``
``google/t5gemma-9b-9b-ul2``        config, tokenizer, weight shards      ``dest/t5gemma-9b-9b-ul2/``
``stabilityai/stable-audio-open-1.0`` ``vae/*``, ``model_config.json``    ``dest/stable-audio-open-1.0/``
``Wan-AI/Wan2.2-TI2V-5B-Diffusers`` ``vae/*`` (diffusers AutoencoderKLWan) ``dest/Wan2.2-TI2V-5B/vae/``
==================================  ====================================  ===========================

Failing fast: with ``HF_HUB_OFFLINE`` set (read at call time, so setting it after
``huggingface_hub`` was imported still counts) nothing touches the network; otherwise each
repository is first looked up with ``HfApi.repo_info(timeout=timeout_s)``. ``snapshot_download``
itself passes no timeout to that lookup and, on a connection error, silently falls back to
whatever is in ``local_dir``; the probe turns a DNS failure, refused connection
(``httpx2.ConnectError`` in huggingface_hub 2.x) or a silent endpoint (``httpx2.TimeoutException``
after ``timeout_s``) into a :class:`DownloadError` at once. Its message lists every repository,
the folders to take from it and where to put them, with ``hf download`` commands and the
expected tree, so the stack can be fetched elsewhere and copied in.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from engine.checkpoint import (
    AUDIO_VAE_DIR,
    INDEX_NAME,
    TEXT_ENCODER_DIR,
    TURBO_VAE_CKPT,
    TURBO_VAE_DIR,
    TURBO_VAE_JSON,
    VARIANTS,
    VIDEO_VAE_DIRS,
    StackError,
    check_stack_dir,
)

logger = logging.getLogger(__name__)

__all__ = ["DIT_REPO", "DownloadError", "HubSource", "describe_stack", "download_stack", "main_download", "stack_sources"]

DIT_REPO = "GAIR/daVinci-MagiHuman"
TEXT_ENCODER_REPO = "google/t5gemma-9b-9b-ul2"
AUDIO_VAE_REPO = "stabilityai/stable-audio-open-1.0"
VIDEO_VAE_REPO = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
DEFAULT_TIMEOUT_S = 5.0


class DownloadError(RuntimeError):
    """The stack could not be fetched; the message says what to download and where to put it."""


@dataclass(frozen=True)
class HubSource:
    """One repository to fetch: ``allow_patterns`` (fnmatch, ``*`` crosses ``/``) into
    ``dest / subdir`` (``""`` = ``dest`` itself); ``gated`` repos need an accepted license + token."""

    repo_id: str
    subdir: str
    allow_patterns: tuple[str, ...]
    gated: bool = False


def _check_variants(variants: Iterable[str]) -> tuple[str, ...]:
    variants = tuple(dict.fromkeys(variants))
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"unknown or no DiT variants {bad or list(variants)}; choose from {list(VARIANTS)}")
    return variants


def stack_sources(variants: Iterable[str] = ("distill",)) -> list[HubSource]:
    """The repositories, file patterns and target folders for ``variants`` (CHECKPOINTS.md §1, §4)."""
    variants = _check_variants(variants)
    return [
        HubSource(DIT_REPO, "", tuple(f"{v}/*" for v in variants) + (f"{TURBO_VAE_DIR}/*",)),
        HubSource(
            TEXT_ENCODER_REPO, TEXT_ENCODER_DIR, ("*.json", "*.safetensors", "tokenizer*", "*.model"), gated=True
        ),
        HubSource(AUDIO_VAE_REPO, AUDIO_VAE_DIR, ("vae/*", "model_config.json"), gated=True),
        HubSource(VIDEO_VAE_REPO, VIDEO_VAE_DIRS[0], ("vae/*",)),
    ]


def describe_stack(dest: str | Path, variants: Iterable[str] = ("distill",)) -> str:
    """Human instructions: every repository, its folders/files, the target folder, ``hf download``
    commands and the expected directory tree under ``dest``."""
    dest = Path(dest)
    variants = _check_variants(variants)
    sources = stack_sources(variants)
    lines = [f"Fetch these from the Hugging Face Hub and place them under {dest}:"]
    for s in sources:
        target = dest / s.subdir if s.subdir else dest
        what = ", ".join(p.removesuffix("*") if p.endswith("/*") else p for p in s.allow_patterns)
        gated = "  (gated: accept the license on its Hub page, then `hf auth login` or HF_TOKEN)" if s.gated else ""
        lines.append(f"  {s.repo_id:<36} {what}  ->  {target}/{gated}")
    lines.append("e.g. on a machine with Hub access (then copy the tree over):")
    for s in sources:
        target = dest / s.subdir if s.subdir else dest
        include = " ".join(f"'{p}'" for p in s.allow_patterns)
        lines.append(f"  hf download {s.repo_id} --include {include} --local-dir {target}")
    dit_rows = [f"{v}/" for v in variants]
    tree = [
        *(f"{name:<26}# {INDEX_NAME} + model-000XX-of-000NN.safetensors[.zst]" for name in dit_rows),
        f"{TURBO_VAE_DIR + '/':<26}# {TURBO_VAE_JSON}, {TURBO_VAE_CKPT}",
        f"{TEXT_ENCODER_DIR + '/':<26}# config.json, tokenizer files, model-*.safetensors + index",
        f"{AUDIO_VAE_DIR + '/':<26}# model_config.json, vae/config.json, vae/diffusion_pytorch_model.safetensors",
        f"{VIDEO_VAE_DIRS[0] + '/':<26}# vae/config.json, vae/diffusion_pytorch_model.safetensors",
    ]
    lines.append("Expected tree:")
    lines.append(f"  {dest}/")
    lines.extend(f"  {'└──' if i == len(tree) - 1 else '├──'} {row}" for i, row in enumerate(tree))
    return "\n".join(lines)


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _fail(reason: str, dest: Path, variants: tuple[str, ...], found: str | None = None) -> DownloadError:
    message = f"cannot download the model stack: {reason}.\n{describe_stack(dest, variants)}"
    if found:
        message += f"\nWhat {dest} holds now: {found}"
    return DownloadError(message)


def download_stack(
    dest: str | Path,
    *,
    variants: Iterable[str] = ("distill",),
    revision: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    endpoint: str | None = None,
) -> Path:
    """Download the DiT ``variants``, the Turbo decoder and the three external models into ``dest``.

    Args:
        dest: checkpoint root (created); files already there and up to date are not fetched again.
        variants: DiT folders of ``GAIR/daVinci-MagiHuman`` (``base``, ``distill``, ``540p_sr``,
            ``1080p_sr``); ``turbo_vae/`` is always fetched.
        revision: branch, tag or commit of ``GAIR/daVinci-MagiHuman`` (the external models use
            their default branch).
        timeout_s: seconds the reachability probe waits for each repository's metadata.
        endpoint: Hub URL (default: ``HF_ENDPOINT`` / huggingface.co).

    Returns:
        ``dest`` as an absolute path, after :func:`engine.checkpoint.check_stack_dir` accepted it.

    Raises:
        DownloadError: ``HF_HUB_OFFLINE`` is set and ``dest`` is not already complete; the Hub
            cannot be reached within ``timeout_s``; a repository or revision is missing or gated;
            a download fails; or the result does not pass ``check_stack_dir``. The message names
            every repository, the folders to take and where to put them.
        ValueError: unknown variant.
    """
    variants = _check_variants(variants)
    dest = Path(dest).expanduser().resolve()
    sources = stack_sources(variants)

    if _offline():
        if not dest.is_dir():
            raise _fail(f"HF_HUB_OFFLINE is set and {dest} does not exist", dest, variants)
        try:
            check_stack_dir(dest, variants)
        except StackError as exc:
            raise _fail(f"HF_HUB_OFFLINE is set and {dest} is incomplete", dest, variants, str(exc)) from None
        logger.info("HF_HUB_OFFLINE is set; %s already holds the complete stack", dest)
        return dest

    api = HfApi(endpoint=endpoint)
    commits: dict[str, str | None] = {}
    for s in sources:
        rev = revision if s.repo_id == DIT_REPO else None
        try:
            commits[s.repo_id] = api.repo_info(s.repo_id, revision=rev, timeout=timeout_s).sha
        except RevisionNotFoundError:
            raise DownloadError(f"revision {rev!r} of {s.repo_id} does not exist on the Hub") from None
        except GatedRepoError:
            raise _fail(f"{s.repo_id} is gated and this account has no access", dest, variants) from None
        except RepositoryNotFoundError:
            raise _fail(f"{s.repo_id} was not found (or needs a token)", dest, variants) from None
        except Exception as exc:  # connection errors differ between hub versions
            raise _fail(
                f"the Hub cannot be reached ({type(exc).__name__}: {exc}; timeout {timeout_s:g} s)", dest, variants
            ) from exc

    dest.mkdir(parents=True, exist_ok=True)
    for s in sources:
        target = dest / s.subdir if s.subdir else dest
        started = time.perf_counter()
        logger.info("downloading %s %s -> %s", s.repo_id, list(s.allow_patterns), target)
        try:
            snapshot_download(
                s.repo_id,
                revision=commits[s.repo_id],
                local_dir=target,
                allow_patterns=list(s.allow_patterns),
                endpoint=endpoint,
            )
        except Exception as exc:  # report any failure with the manual instructions
            raise _fail(f"downloading {s.repo_id} failed ({type(exc).__name__}: {exc})", dest, variants) from exc
        logger.info("downloaded %s in %.0f s", s.repo_id, time.perf_counter() - started)

    try:
        check_stack_dir(dest, variants)
    except StackError as exc:
        raise _fail("the download finished but the stack is incomplete", dest, variants, str(exc)) from None
    return dest


def main_download(dest: str, variants: list[str]) -> int:
    """CLI body of ``avatar-server download DIR``: 0 on success, 2 (message on stderr) on failure."""
    try:
        path = download_stack(dest, variants=variants)
    except (DownloadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"model stack ready in {path}")
    return 0
