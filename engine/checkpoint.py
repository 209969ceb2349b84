"""DiT checkpoints: inspect headers, validate against the model, load with one host copy, write.

Layout (CHECKPOINTS.md §2.1): a DiT directory (``base/``, ``distill/``, ``540p_sr/``,
``1080p_sr/``) holds safetensors shards named by ``model.safetensors.index.json`` (only its
``weight_map`` is read), or a single ``model.safetensors``. For a shard ``P`` named in the index,
``P + ".zst"`` is used instead of ``P`` when it exists. Keys are the module state-dict names
without prefix, 331 for the full model (DIT_STATE_DICT.tsv, DIT.md §2.1).

How loading works (:func:`load_dit`):

1. :func:`inspect_checkpoint` reads only the safetensors headers: the 8-byte little-endian
   header length ``N`` and the ``N``-byte JSON header of every shard. For a ``.zst`` shard only
   the first ``8 + N`` bytes are decompressed (a streaming decompressor stopped early), which
   costs microseconds whatever the shard size.
2. :func:`validate_checkpoint` compares names, shapes and (floating) dtypes with the manifest of
   the model built on the meta device and raises one :class:`CheckpointError` listing every
   missing, unexpected and misshapen tensor. No tensor data has been read at this point.
3. Every tensor is read with plain ``readinto`` calls (no mmap) straight into a freshly
   allocated tensor of its stored dtype, cast to the module dtype (bf16 block linears, fp32 the
   rest) only when the two differ, moved to the target device and assigned into the meta
   model in place of the meta tensor. ``.zst`` shards are stream-decompressed in the same single
   pass (tensors sorted by file offset; no temporary file, no whole-shard buffer). Peak host
   memory is therefore one copy of the module weights plus one tensor in flight per worker
   (the largest full-model tensor is 1.68 GB in fp32). Measured on a 0.72 GB scaled model
   (tests/test_checkpoint.py): peak RSS increase 1.00x the checkpoint for plain shards, 1.02x
   for ``.zst``. ``safetensors.safe_open`` (0.8) was measured too: its tensors stay backed by
   the file mapping, so the load itself is nearly free and touching every weight afterwards
   costs the same 1.08x as this loader; but the first forward then pays the disk reads, the
   weights depend on the files staying in place, and ``.zst`` shards or dtype casts need a copy
   anyway. Reading eagerly into anonymous memory leaves the model fully resident when
   :func:`load_dit` returns, with the file data only in the page cache, outside the process.

Deviations from the reference loader (``load_state_dict(strict=False)``): a mismatch is an
error, not a printed warning (CHECKPOINTS.md §2.2 recommends this); ``adapter.rope.bands`` is
the only key allowed to be absent (it then keeps the DIT.md §4.5 formula values); a
single-file ``model.safetensors.zst`` is also accepted; ``.zst`` shards are decompressed
in-process with ``zstandard`` instead of an external ``zstd -d -c``.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import zstandard
from torch import nn
from tqdm.auto import tqdm

from engine.config import LOCAL_ATTN_LAYERS_1080P, DiTConfig, full_config
from engine.dit import DiTModel, FourierRope

logger = logging.getLogger(__name__)

__all__ = [
    "INDEX_NAME",
    "ROPE_BANDS_KEY",
    "SINGLE_FILE_NAME",
    "VARIANTS",
    "CheckpointError",
    "CheckpointInfo",
    "ShardInfo",
    "StackError",
    "StackLayout",
    "StackPiece",
    "TensorInfo",
    "check_stack_dir",
    "expected_manifest",
    "inspect_checkpoint",
    "load_dit",
    "load_manifest_tsv",
    "save_dit_checkpoint",
    "shard_file_name",
    "validate_checkpoint",
]

VARIANTS = ("base", "distill", "540p_sr", "1080p_sr")
"""The DiT directories of the released stack (CHECKPOINTS.md §1)."""

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
ZST_SUFFIX = ".zst"
ROPE_BANDS_KEY = "adapter.rope.bands"
OPTIONAL_KEYS = frozenset({ROPE_BANDS_KEY})
"""Keys that may be absent from a checkpoint: only the rotary bands buffer (DIT.md §4.5)."""

Shape = tuple[int, ...]
Manifest = dict[str, tuple[Shape, torch.dtype]]

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_READ_CHUNK_BYTES = 64 * 1024 * 1024  # progress granularity of one readinto
_ZSTD_MAX_WINDOW_BYTES = 1 << 31  # accept frames written with ``zstd --long=31``

# safetensors dtype codes (format spec) <-> torch dtypes.
_ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}
_LOADABLE_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})
"""Stored dtypes that cast losslessly enough into the module dtypes (fp8/int are rejected)."""


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded into the requested model.

    Raised before any tensor data is read. ``missing`` / ``unexpected`` / ``misshapen`` hold the
    tensor names of each kind (``misshapen`` also covers non-floating stored dtypes) so callers
    can act on them; the message lists them all.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        misshapen: Iterable[str] = (),
    ) -> None:
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.misshapen = list(misshapen)


class StackError(CheckpointError):
    """A checkpoint root (CHECKPOINTS.md §1) lacks a piece, or holds a partial one."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as stored: ``shape``, stored ``dtype``, the ``file`` read (``.zst`` or plain)
    and its byte range ``[begin, end)`` inside that file's data section (after the header)."""

    shape: Shape
    dtype: torch.dtype
    file: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardInfo:
    """One safetensors file of a checkpoint.

    ``name``: the name the index uses (always the uncompressed name); ``path``: the file read,
    ``name + ".zst"`` when ``compressed``; ``header_bytes``: ``8 + N``; ``data_bytes``:
    uncompressed data-section size (``-1`` when unknown: a ``.zst`` frame without content size);
    ``file_bytes``: on-disk size.
    """

    name: str
    path: Path
    compressed: bool
    header_bytes: int
    data_bytes: int
    file_bytes: int


@dataclass
class CheckpointInfo:
    """Header-only description of a DiT directory (:func:`inspect_checkpoint`).

    ``tensors``: name -> :class:`TensorInfo` for exactly the tensors the index assigns (or all of
    the single file's); ``total_bytes``: their summed uncompressed size; ``file_bytes``: the
    on-disk size of the shards read; ``config_json``: ``config.json`` of the directory if any.
    """

    path: Path
    index: Path | None
    shards: list[ShardInfo]
    tensors: dict[str, TensorInfo]
    total_bytes: int
    file_bytes: int
    config_json: Path | None = None

    def manifest(self) -> Manifest:
        """``name -> (shape, stored dtype)``."""
        return {k: (t.shape, t.dtype) for k, t in self.tensors.items()}


# --------------------------------------------------------------------------- manifests


def expected_manifest(config: DiTConfig) -> Manifest:
    """``name -> (shape, module dtype)`` of ``DiTModel(config)``, built on the meta device.

    For :func:`engine.config.full_config` this equals DIT_STATE_DICT.tsv (331 entries).
    """
    with torch.device("meta"):
        model = DiTModel(config)
    return _manifest_of(model)


def _manifest_of(model: nn.Module) -> Manifest:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}


def load_manifest_tsv(path: str | Path) -> Manifest:
    """Read a ``name<TAB>shape<TAB>dtype`` listing such as spec/DIT_STATE_DICT.tsv.

    ``shape`` is a JSON list (``[5120, 192]``), ``dtype`` a torch dtype name (``bfloat16``).
    The first line is the header ``name shape dtype``.

    Raises:
        ValueError: a malformed line (message gives the line number and the text).
    """
    manifest: Manifest = {}
    lines = Path(path).read_text().splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip() or (lineno == 1 and line.split("\t")[0] == "name"):
            continue
        parts = line.split("\t")
        try:
            name, shape_text, dtype_text = parts
            shape = tuple(int(d) for d in json.loads(shape_text))
            dtype = getattr(torch, dtype_text)
            if not isinstance(dtype, torch.dtype):
                raise TypeError(dtype_text)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}:{lineno}: expected 'name<TAB>[shape]<TAB>dtype', got {line!r}") from exc
        if name in manifest:
            raise ValueError(f"{path}:{lineno}: duplicate tensor name {name!r}")
        manifest[name] = (shape, dtype)
    return manifest


# --------------------------------------------------------------------------- headers


def shard_file_name(index: int, count: int) -> str:
    """HF shard name ``model-0000i-of-0000n.safetensors`` (1-based ``index``)."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def _read_exact(stream, n: int, what: str) -> bytes:
    """Read exactly ``n`` bytes from a file or zstd stream, or raise CheckpointError."""
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            raise CheckpointError(f"{what}: file ends after {got} of {n} bytes (truncated?)")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _zstd_reader(fh):
    dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW_BYTES)
    return dctx.stream_reader(fh, read_size=1 << 20, read_across_frames=True, closefd=False)


def _read_header(path: Path, compressed: bool) -> tuple[dict, int, int]:
    """Parse one safetensors header. Returns ``(header dict, 8 + N, data-section bytes or -1)``.

    Only the header is decompressed for ``.zst`` files; ``data_bytes`` then comes from the zstd
    frame's content-size field when the writer stored it, else ``-1``.
    """
    file_bytes = path.stat().st_size
    with open(path, "rb") as fh:
        try:
            if compressed:
                content_bytes = -1
                try:
                    content_bytes = zstandard.get_frame_parameters(fh.read(18)).content_size
                except zstandard.ZstdError as exc:
                    raise CheckpointError(f"{path}: not a zstd file ({exc})") from None
                fh.seek(0)
                stream = _zstd_reader(fh)
                if content_bytes in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
                    content_bytes = -1
            else:
                stream, content_bytes = fh, file_bytes
            (n,) = struct.unpack("<Q", _read_exact(stream, 8, f"{path}: safetensors header length"))
            if n > _MAX_HEADER_BYTES or (content_bytes >= 0 and 8 + n > content_bytes):
                raise CheckpointError(
                    f"{path}: safetensors header length {n} bytes exceeds the file "
                    f"({content_bytes} bytes) or the {_MAX_HEADER_BYTES}-byte limit; not a safetensors file?"
                )
            raw = _read_exact(stream, n, f"{path}: safetensors header")
            if compressed:
                stream.close()  # the source file stays open (closefd=False)
        except zstandard.ZstdError as exc:
            raise CheckpointError(f"{path}: zstd decompression failed in the header ({exc})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_bytes = content_bytes - 8 - n if content_bytes >= 0 else -1
    return header, 8 + n, data_bytes


def _parse_entries(header: dict, file: Path, data_bytes: int, problems: list[str]) -> dict[str, TensorInfo]:
    """Turn header entries into :class:`TensorInfo`, appending any inconsistency to ``problems``."""
    entries: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_TO_TORCH[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{file.name}: header entry {name!r} is malformed or has an unknown dtype: {meta!r}")
            continue
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or begin < 0 or end - begin != expected:
            problems.append(
                f"{file.name}: tensor {name!r} spans bytes [{begin}, {end}) but shape {list(shape)} "
                f"{meta['dtype']} needs {expected} bytes"
            )
            continue
        if data_bytes >= 0 and end > data_bytes:
            problems.append(
                f"{file.name}: tensor {name!r} ends at byte {end} of a {data_bytes}-byte data section (truncated?)"
            )
            continue
        entries[name] = TensorInfo(shape, dtype, file, begin, end)
    return entries


def _shard_path(directory: Path, name: str) -> tuple[Path, bool] | None:
    """Resolve an index entry: ``P.zst`` wins over ``P`` (CHECKPOINTS.md §2.1); None if neither."""
    plain = directory / name
    compressed = directory / (name + ZST_SUFFIX)
    if compressed.is_file():
        return compressed, True
    if plain.is_file():
        return plain, False
    return None


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Describe a DiT directory from its index and safetensors headers only.

    Args:
        path: the directory (``…/distill``).

    Returns:
        :class:`CheckpointInfo` with every tensor's name, shape, stored dtype and file.

    Raises:
        CheckpointError: the directory does not exist; it holds neither an index nor
            ``model.safetensors``; the index is malformed or names shard files that exist
            neither as ``P`` nor ``P.zst`` (all listed); a header is malformed or out of
            range; the index assigns a tensor to a shard whose header lacks it. One error
            lists every problem found.
    """
    directory = Path(path)
    if not directory.exists():
        raise CheckpointError(f"DiT checkpoint directory {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"DiT checkpoint path {directory} is not a directory")
    index_path = directory / INDEX_NAME
    config_json = directory / "config.json"
    config_json = config_json if config_json.is_file() else None

    weight_map: dict[str, str] | None = None
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise TypeError("weight_map must map tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc!r})") from None
        if not weight_map:
            raise CheckpointError(f"{index_path}: weight_map is empty")
        shard_names = list(dict.fromkeys(weight_map.values()))
    else:
        index_path = None
        single = _shard_path(directory, SINGLE_FILE_NAME)
        if single is None:
            present = sorted(p.name for p in directory.iterdir())[:12]
            raise CheckpointError(
                f"DiT checkpoint directory {directory} holds neither {INDEX_NAME} nor {SINGLE_FILE_NAME} "
                f"(nor {SINGLE_FILE_NAME}{ZST_SUFFIX}); it contains {present or 'nothing'}"
            )
        shard_names = [SINGLE_FILE_NAME]

    resolved: dict[str, tuple[Path, bool]] = {}
    absent = []
    for name in shard_names:
        hit = _shard_path(directory, name)
        if hit is None or Path(name).is_absolute() or ".." in Path(name).parts:
            count = sum(1 for v in (weight_map or {}).values() if v == name)
            absent.append(f"{name} ({count} tensors)")
        else:
            resolved[name] = hit
    if absent:
        raise CheckpointError(
            f"{index_path} names {len(absent)} of {len(shard_names)} shard files that exist neither as P "
            f"nor as P{ZST_SUFFIX} in {directory} (partial download?): " + ", ".join(absent)
        )

    problems: list[str] = []
    shards: list[ShardInfo] = []
    per_shard: dict[str, dict[str, TensorInfo]] = {}
    for name in shard_names:
        file, compressed = resolved[name]
        header, header_bytes, data_bytes = _read_header(file, compressed)
        per_shard[name] = _parse_entries(header, file, data_bytes, problems)
        shards.append(ShardInfo(name, file, compressed, header_bytes, data_bytes, file.stat().st_size))

    tensors: dict[str, TensorInfo] = {}
    if weight_map is None:
        tensors = per_shard[SINGLE_FILE_NAME]
    else:
        for tensor_name, shard_name in weight_map.items():
            entry = per_shard[shard_name].get(tensor_name)
            if entry is None:
                problems.append(f"index assigns {tensor_name!r} to {shard_name}, whose header lacks it")
            else:
                tensors[tensor_name] = entry
        ignored = sum(len(v) for v in per_shard.values()) - len(tensors)
        if ignored > 0:
            logger.debug("%s: %d tensors in shards are not in the weight_map and are ignored", directory, ignored)
    if problems:
        raise CheckpointError(f"DiT checkpoint {directory} is inconsistent:\n  " + "\n  ".join(problems))

    total_bytes = sum(t.nbytes for t in tensors.values())
    if index_path is not None:
        declared = (index.get("metadata") or {}).get("total_size")
        if isinstance(declared, int) and declared != total_bytes:
            logger.warning("%s: metadata.total_size %d != %d bytes of tensors", index_path, declared, total_bytes)
    return CheckpointInfo(
        path=directory,
        index=index_path,
        shards=shards,
        tensors=tensors,
        total_bytes=total_bytes,
        file_bytes=sum(s.file_bytes for s in shards),
        config_json=config_json,
    )


# --------------------------------------------------------------------------- validation

_LAYER_RE = re.compile(r"^block\.layers\.(\d+)\.")


def _guess_size(shapes: Mapping[str, Shape]) -> tuple[int | None, int | None]:
    """``(hidden size, num layers)`` suggested by tensor names/shapes, None where unknown."""
    hidden = None
    for key, dim in (
        ("adapter.video_embedder.weight", 0),
        ("final_norm_video.weight", 0),
        ("block.layers.4.attention.linear_proj.weight", 1),
        ("block.layers.0.attention.linear_proj.weight", 1),
    ):
        shape = shapes.get(key)
        if shape is not None and len(shape) > dim:
            hidden = shape[dim]
            break
    layers = [int(m.group(1)) for k in shapes if (m := _LAYER_RE.match(k))]
    return hidden, (max(layers) + 1 if layers else None)


def _size_hint(stored: Mapping[str, Shape], expected: Mapping[str, Shape]) -> str:
    got_h, got_l = _guess_size(stored)
    want_h, want_l = _guess_size(expected)
    if (got_h, got_l) == (want_h, want_l) or got_h is None:
        return ""
    return (
        f"this looks like a checkpoint of hidden size {got_h} with {got_l} layers, expected hidden "
        f"size {want_h} with {want_l} layers (wrong directory or wrong model config?)"
    )


def validate_checkpoint(
    info: CheckpointInfo,
    expected: Mapping[str, tuple[Shape, torch.dtype]],
    *,
    optional: Iterable[str] = OPTIONAL_KEYS,
    max_listed: int | None = None,
) -> None:
    """Check names, shapes and stored dtypes against ``expected`` (no tensor data is read).

    Args:
        info: from :func:`inspect_checkpoint`.
        expected: ``name -> (shape, module dtype)``, e.g. :func:`expected_manifest`.
        optional: names that may be absent (default: only ``adapter.rope.bands``).
        max_listed: list at most this many names per kind in the message (None: all of them;
            the exception's attributes always hold all).

    Raises:
        CheckpointError: one error naming every missing, unexpected and misshapen tensor
            (stored vs expected shape) and every tensor stored in a non-floating dtype; when
            the shapes suggest a model of another size the message says which.
    """
    optional = set(optional)
    missing = [k for k in expected if k not in info.tensors and k not in optional]
    unexpected = [k for k in info.tensors if k not in expected]
    misshapen, details = [], []
    for name, (shape, _) in expected.items():
        got = info.tensors.get(name)
        if got is None:
            continue
        if tuple(got.shape) != tuple(shape):
            misshapen.append(name)
            details.append(f"{name}: stored {list(got.shape)}, expected {list(shape)}")
        elif got.dtype not in _LOADABLE_DTYPES:
            misshapen.append(name)
            details.append(f"{name}: stored dtype {got.dtype} is not a floating dtype (F64/F32/F16/BF16)")
    if not (missing or unexpected or misshapen):
        return

    def listing(kind: str, items: list[str]) -> str:
        shown = items if max_listed is None else items[:max_listed]
        more = f" ... and {len(items) - len(shown)} more" if len(shown) < len(items) else ""
        return f"\n  {len(items)} {kind}:\n    " + "\n    ".join(shown) + more

    message = f"DiT checkpoint {info.path} does not match the model ({len(expected)} tensors expected):"
    if misshapen:
        message += listing("misshapen", details)
    if missing:
        message += listing("missing", missing)
    if unexpected:
        message += listing("unexpected", unexpected)
    hint = _size_hint({k: t.shape for k, t in info.tensors.items()}, {k: v[0] for k, v in expected.items()})
    if hint:
        message += "\n  " + hint
    raise CheckpointError(message, missing=missing, unexpected=unexpected, misshapen=misshapen)


# --------------------------------------------------------------------------- loading


def _config_for(directory: Path, config: DiTConfig | None, variant: str | None) -> DiTConfig:
    """Explicit config, else the directory's ``config.json`` model config, else ``full_config()``;
    then local attention for the 1080p SR variant (DIT.md §1.3)."""
    if config is None:
        config = full_config()
        path = directory / "config.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
            model_cfg = data.get("model_config", data) if isinstance(data, dict) else None
            if isinstance(model_cfg, dict) and {"hidden_size", "num_layers"} & set(model_cfg):
                try:
                    config = DiTConfig.from_dict(model_cfg)
                except (TypeError, ValueError) as exc:
                    raise CheckpointError(f"{path}: unusable model config ({exc})") from None
                logger.info("%s: using the model config of %s", directory, path.name)
    if variant is None and directory.name in VARIANTS:
        variant = directory.name
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown DiT variant {variant!r}; known: {list(VARIANTS)}")
    if variant == "1080p_sr" and not config.local_attn_layers:
        # DIT.md §1.3; a scaled-down model keeps the layers that exist.
        config = config.with_local_attention(tuple(i for i in LOCAL_ATTN_LAYERS_1080P if i < config.num_layers))
    return config


def _progress_enabled(progress: bool) -> bool:
    return bool(progress) and sys.stderr is not None and sys.stderr.isatty()


def _readinto_exact(stream, buf: memoryview, what: str, on_bytes: Callable[[int], None]) -> None:
    """Fill ``buf`` from ``stream`` in chunks of at most ``_READ_CHUNK_BYTES``."""
    pos, total = 0, len(buf)
    while pos < total:
        n = stream.readinto(buf[pos : min(total, pos + _READ_CHUNK_BYTES)])
        if not n:
            raise CheckpointError(f"{what}: file ends after {pos} of {total} bytes (truncated?)")
        pos += n
        on_bytes(n)


def _skip(stream, n: int, what: str) -> None:
    """Discard ``n`` bytes of a zstd stream (gaps between tensors, unused tensors)."""
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise CheckpointError(f"{what}: file ends inside a gap (truncated?)")
        n -= len(chunk)


def _load_shard(
    shard: ShardInfo,
    entries: list[tuple[str, TensorInfo]],
    target_dtype: Mapping[str, torch.dtype],
    device: torch.device,
    sink: Callable[[str, torch.Tensor], None],
    on_bytes: Callable[[int], None],
) -> None:
    """Read the ``entries`` of one shard in file order and hand each tensor to ``sink``.

    Each tensor is read into a new CPU tensor of its stored dtype, cast to ``target_dtype[name]``
    (on CPU, or after the copy when ``device`` is CUDA so the host does no cast work), and moved
    to ``device``. This is the only function that reads tensor data.

    Raises:
        CheckpointError: the file ends early or the zstd stream is corrupt (names the shard and
            the tensor).
    """
    entries = sorted(entries, key=lambda e: e[1].begin)
    with open(shard.path, "rb", buffering=0) as fh:
        stream = _zstd_reader(fh) if shard.compressed else fh
        pos = 0  # position in the uncompressed file
        name = "<header>"
        try:
            if shard.compressed:
                _skip(stream, shard.header_bytes, f"{shard.path}")
                pos = shard.header_bytes
            for name, info in entries:
                start = shard.header_bytes + info.begin
                if shard.compressed:
                    if start < pos:
                        raise CheckpointError(f"{shard.path}: tensor {name!r} overlaps the previous tensor")
                    _skip(stream, start - pos, f"{shard.path}")
                else:
                    fh.seek(start)
                buf = torch.empty(info.shape, dtype=info.dtype, device="cpu")
                if info.nbytes:
                    view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
                    _readinto_exact(stream, view, f"{shard.path}: tensor {name!r}", on_bytes)
                pos = start + info.nbytes
                dtype = target_dtype[name]
                if device.type == "cpu":
                    tensor = buf if buf.dtype == dtype else buf.to(dtype)
                else:
                    tensor = buf.to(device).to(dtype)
                del buf
                sink(name, tensor)
        except zstandard.ZstdError as exc:
            raise CheckpointError(f"{shard.path}: zstd decompression failed at tensor {name!r} ({exc})") from None
        finally:
            if shard.compressed:
                stream.close()


def _materialise(model: nn.Module) -> tuple[dict[str, torch.dtype], Callable[[str, torch.Tensor], None]]:
    """Module dtype per state-dict name, and a function that swaps a meta tensor for a real one."""
    owners: dict[str, tuple[nn.Module, str, bool]] = {}
    for name, _ in model.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        owners[name] = (model.get_submodule(prefix), leaf, True)
    for name, _ in model.named_buffers():
        prefix, _, leaf = name.rpartition(".")
        owners[name] = (model.get_submodule(prefix), leaf, False)
    dtypes = {k: v.dtype for k, v in model.state_dict(keep_vars=True).items()}
    lock = threading.Lock()

    def assign(name: str, tensor: torch.Tensor) -> None:
        module, leaf, is_param = owners[name]
        with lock:
            if is_param:
                module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
            else:
                module._buffers[leaf] = tensor

    return dtypes, assign


def load_dit(
    path: str | Path,
    config: DiTConfig | None = None,
    *,
    variant: str | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    workers: int = 2,
) -> DiTModel:
    """Load a DiT directory into a :class:`DiTModel` without a second copy of the weights.

    Args:
        path: DiT directory (CHECKPOINTS.md §2.1).
        config: architecture; default: ``config.json`` of the directory when it holds a model
            config (``model_config`` or top-level ``hidden_size``/``num_layers``), else
            :func:`engine.config.full_config`.
        variant: ``base``/``distill``/``540p_sr``/``1080p_sr``; default: the directory name if it
            is one of those. ``1080p_sr`` enables local attention (``config.with_local_attention()``,
            DIT.md §1.3; layers beyond ``num_layers`` dropped for scaled models) unless ``config``
            already names local layers.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"``); every tensor goes straight there.
        progress: tqdm bar over bytes (only shown when stderr is a terminal).
        workers: shards read concurrently (file reads and zstd release the GIL). Each worker
            may hold one stored-dtype tensor in flight (host memory).

    Returns:
        The model in eval mode on ``device``: parameters in the module dtypes of
        DIT_STATE_DICT.tsv (``requires_grad=False``), ``adapter.rope.bands`` fp32 from the file
        (upcast) or from the DIT.md §4.5 formula when the file lacks it.

    Raises:
        CheckpointError: see :func:`inspect_checkpoint` and :func:`validate_checkpoint`; all
            raised before any tensor data is read or device memory is allocated.
        RuntimeError: ``device`` is CUDA but CUDA is not available.
    """
    started = time.perf_counter()
    directory = Path(path)
    info = inspect_checkpoint(directory)
    config = _config_for(directory, config, variant)
    with torch.device("meta"):
        model = DiTModel(config)
    validate_checkpoint(info, _manifest_of(model))
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"load_dit: device {device} requested but CUDA is not available")

    dtypes, assign = _materialise(model)
    by_shard: dict[str, list[tuple[str, TensorInfo]]] = {s.name: [] for s in info.shards}
    shard_of = {s.path: s.name for s in info.shards}
    for name, t in info.tensors.items():
        by_shard[shard_of[t.file]].append((name, t))

    logger.info(
        "loading DiT %s: %d tensors, %.2f GB in %d shard(s)%s -> %s",
        directory, len(info.tensors), info.total_bytes / 1e9, len(info.shards),
        " (zstd)" if any(s.compressed for s in info.shards) else "", device,
    )
    bar = tqdm(
        total=info.total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
        desc=f"DiT {directory.name}", disable=not _progress_enabled(progress),
    )
    bar_lock = threading.Lock()

    def on_bytes(n: int) -> None:
        with bar_lock:
            bar.update(n)

    try:
        jobs = [(s, by_shard[s.name]) for s in info.shards if by_shard[s.name]]
        if workers <= 1 or len(jobs) <= 1:
            for shard, entries in jobs:
                _load_shard(shard, entries, dtypes, device, assign, on_bytes)
        else:
            with ThreadPoolExecutor(max_workers=min(workers, len(jobs)), thread_name_prefix="dit-load") as pool:
                futures = [pool.submit(_load_shard, s, e, dtypes, device, assign, on_bytes) for s, e in jobs]
                for future in futures:
                    future.result()
    finally:
        bar.close()

    rope = model.adapter.rope
    if ROPE_BANDS_KEY not in info.tensors:  # stored bands were cast to the fp32 buffer dtype above
        with torch.device("cpu"):
            rope.bands = FourierRope(config.head_dim).bands.to(device)
        logger.info("%s: %s not in the checkpoint; using the DIT.md §4.5 formula values", directory, ROPE_BANDS_KEY)
    left = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta]
    if left:  # cannot happen after validation; guards against a model/manifest mismatch
        raise CheckpointError(f"tensors not materialised after loading: {left}", missing=left)
    model.eval()
    elapsed = time.perf_counter() - started
    logger.info(
        "loaded DiT %s in %.1f s (%.2f GB/s)", directory, elapsed, info.total_bytes / 1e9 / max(elapsed, 1e-9)
    )
    return model


# --------------------------------------------------------------------------- writing


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]], compress: bool, level: int) -> None:
    """Write one safetensors file (header padded to 8 bytes, data in the given order), streaming
    each tensor's bytes (and through a zstd frame when ``compress``) with no in-memory copy."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        header[name] = {"dtype": _TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        out = fh
        if compress:
            cctx = zstandard.ZstdCompressor(level=level, threads=-1, write_content_size=True)
            out = cctx.stream_writer(fh, size=8 + len(raw) + offset, closefd=False)
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for _, t in tensors:
            if t.nbytes:
                out.write(_tensor_bytes(t))
        if compress:
            out.close()
    tmp.replace(path)


def save_dit_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    max_shard_bytes: int | None,
    compress: bool = False,
    level: int = 3,
    overwrite: bool = False,
) -> list[Path]:
    """Write a DiT directory in the released layout (CHECKPOINTS.md §2.1).

    Tensors are stored in their own dtype and in ``state_dict`` order, packed greedily into
    shards of at most ``max_shard_bytes`` of tensor data (a larger tensor gets a shard of its
    own), named ``model-0000i-of-0000n.safetensors``, plus ``model.safetensors.index.json`` with
    ``metadata.total_size`` (bytes of tensor data) and ``weight_map``.

    Args:
        state_dict: name -> tensor (any device; moved to CPU one at a time).
        path: target directory (created).
        max_shard_bytes: shard size limit in bytes; ``None`` writes the single-file fallback
            ``model.safetensors`` without an index.
        compress: store each shard as ``<name>.safetensors.zst`` (one zstd frame with the content
            size, compressed while streaming, so no uncompressed file is ever written); the index
            keeps the uncompressed names, as the loader expects.
        level: zstd level.
        overwrite: remove existing ``model*.safetensors*`` files and the index first. Without it
            existing files raise, since a stale ``P.zst`` would shadow a new ``P``.

    Returns:
        The files written (shards, then the index).

    Raises:
        FileExistsError: checkpoint files exist in ``path`` and ``overwrite`` is False.
        ValueError: an empty ``state_dict``, ``max_shard_bytes <= 0``, or an unsupported dtype.
    """
    directory = Path(path)
    if not state_dict:
        raise ValueError("save_dit_checkpoint: state_dict is empty")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    bad = [k for k, v in state_dict.items() if v.dtype not in _TORCH_TO_ST]
    if bad:
        raise ValueError(f"save_dit_checkpoint: unsupported dtypes for {bad[:5]}")
    directory.mkdir(parents=True, exist_ok=True)
    stale = sorted(p for p in directory.iterdir() if p.name.startswith("model") and ".safetensors" in p.name)
    if stale and not overwrite:
        raise FileExistsError(f"{directory} already holds checkpoint files {[p.name for p in stale[:5]]}")
    for p in stale:
        p.unlink()

    names = list(state_dict)
    if max_shard_bytes is None:
        groups = [names]
    else:
        groups, current, size = [], [], 0
        for name in names:
            nbytes = state_dict[name].nbytes
            if current and size + nbytes > max_shard_bytes:
                groups.append(current)
                current, size = [], 0
            current.append(name)
            size += nbytes
        groups.append(current)

    written: list[Path] = []
    weight_map: dict[str, str] = {}
    suffix = ZST_SUFFIX if compress else ""
    for i, group in enumerate(groups, start=1):
        file_name = SINGLE_FILE_NAME if max_shard_bytes is None else shard_file_name(i, len(groups))
        tensors = [(n, state_dict[n].detach().to("cpu").contiguous()) for n in group]
        target = directory / (file_name + suffix)
        _write_safetensors(target, tensors, compress, level)
        written.append(target)
        weight_map.update({n: file_name for n in group})
        del tensors
    if max_shard_bytes is not None:
        total = sum(state_dict[n].nbytes for n in names)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        index_path = directory / INDEX_NAME
        index_path.write_text(json.dumps(index, indent=2) + "\n")
        written.append(index_path)
    logger.info("wrote DiT checkpoint %s: %d file(s)%s", directory, len(written), " (zstd)" if compress else "")
    return written


# --------------------------------------------------------------------------- checkpoint root

TURBO_VAE_DIR = "turbo_vae"
TURBO_VAE_JSON = "TurboV3-Wan22-TinyShallow_7_7.json"
TURBO_VAE_CKPT = "checkpoint-340000.ckpt"
TEXT_ENCODER_DIR = "t5gemma-9b-9b-ul2"
AUDIO_VAE_DIR = "stable-audio-open-1.0"
VIDEO_VAE_DIRS = ("Wan2.2-TI2V-5B", "Wan2.2-TI2V-5B-Diffusers")
CODEC_PIECES = ("turbo_vae", "text_encoder", "audio_vae", "video_vae")


@dataclass
class StackPiece:
    """One entry of the checkpoint root: ``path`` (where it was looked for), ``present`` (the
    directory exists), ``files`` (the files that will be read), ``problem`` (None when usable)."""

    name: str
    path: Path
    present: bool
    files: dict[str, Path] = field(default_factory=dict)
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.present and self.problem is None


@dataclass
class StackLayout:
    """What :func:`check_stack_dir` found under a checkpoint root (CHECKPOINTS.md §1).

    ``pieces``: ``base``/``distill``/``540p_sr``/``1080p_sr`` and ``turbo_vae``,
    ``text_encoder``, ``audio_vae``, ``video_vae``; ``dit``: header info of each validated DiT
    directory (the requested variants).
    """

    root: Path
    pieces: dict[str, StackPiece]
    dit: dict[str, CheckpointInfo] = field(default_factory=dict)

    def summary(self) -> str:
        rows = []
        for piece in self.pieces.values():
            state = "ok" if piece.ok else ("absent" if not piece.present else f"PROBLEM: {piece.problem}")
            rows.append(f"{piece.name:<13} {state:<8} {piece.path}")
        return "\n".join(rows)


def _nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _single(directory: Path, preferred: str, pattern: str) -> Path | None:
    if _nonempty(directory / preferred):
        return directory / preferred
    hits = sorted(p for p in directory.glob(pattern) if _nonempty(p)) if directory.is_dir() else []
    return hits[0] if len(hits) == 1 else None


def _hf_weights(directory: Path, stem: str) -> tuple[dict[str, Path], str | None]:
    """``stem.safetensors`` or ``stem.safetensors.index.json`` with every shard present."""
    single = directory / f"{stem}.safetensors"
    index = directory / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            return {}, f"{index} is not a valid safetensors index ({exc!r})"
        absent = [s for s in shards if not _nonempty(directory / s)]
        if absent:
            return {}, f"{index.name} names {len(absent)} of {len(shards)} shards that are missing or empty: {absent[:5]}"
        return {"index": index}, None
    if _nonempty(single):
        return {"weights": single}, None
    return {}, f"no {single.name} or {index.name} in {directory}"


def _check_turbo(root: Path) -> StackPiece:
    d = root / TURBO_VAE_DIR
    piece = StackPiece("turbo_vae", d, d.is_dir())
    if not piece.present:
        return piece
    cfg, ckpt = _single(d, TURBO_VAE_JSON, "*.json"), _single(d, TURBO_VAE_CKPT, "*.ckpt")
    if cfg is None or ckpt is None:
        piece.problem = f"{d} needs {TURBO_VAE_JSON} and {TURBO_VAE_CKPT} (CHECKPOINTS.md §3)"
    else:
        piece.files = {"config": cfg, "checkpoint": ckpt}
    return piece


def _check_text(root: Path) -> StackPiece:
    d = root / TEXT_ENCODER_DIR
    piece = StackPiece("text_encoder", d, d.is_dir())
    if not piece.present:
        return piece
    files, problem = _hf_weights(d, "model")
    tokenizer = next((d / n for n in ("tokenizer.json", "tokenizer.model", "spiece.model") if _nonempty(d / n)), None)
    if problem is None and not _nonempty(d / "config.json"):
        problem = f"{d / 'config.json'} is missing"
    if problem is None and tokenizer is None:
        problem = f"no tokenizer (tokenizer.json / tokenizer.model) in {d}"
    piece.problem = problem
    if problem is None:
        piece.files = {"config": d / "config.json", "tokenizer": tokenizer, **files}
    return piece


def _check_audio(root: Path) -> StackPiece:
    d = root / AUDIO_VAE_DIR
    piece = StackPiece("audio_vae", d, d.is_dir())
    if not piece.present:
        return piece
    if _nonempty(d / "vae" / "config.json"):
        files, problem = _hf_weights(d / "vae", "diffusion_pytorch_model")
        files = {"vae_config": d / "vae" / "config.json", **files}
    elif _nonempty(d / "model.safetensors"):
        files, problem = {"weights": d / "model.safetensors"}, None
    else:
        files, problem = {}, f"{d} needs vae/ (diffusers Oobleck VAE) or model.safetensors"
    if problem is None and not _nonempty(d / "model_config.json"):
        problem = f"{d / 'model_config.json'} is missing"
    piece.problem = problem
    if problem is None:
        piece.files = {"model_config": d / "model_config.json", **files}
    return piece


def _check_video(root: Path) -> StackPiece:
    d = next((root / n for n in VIDEO_VAE_DIRS if (root / n).is_dir()), root / VIDEO_VAE_DIRS[0])
    piece = StackPiece("video_vae", d, d.is_dir())
    if not piece.present:
        return piece
    if _nonempty(d / "vae" / "config.json"):
        files, problem = _hf_weights(d / "vae", "diffusion_pytorch_model")
        files = {"vae_config": d / "vae" / "config.json", **files}
    elif _nonempty(d / "Wan2.2_VAE.pth"):
        files, problem = {"weights": d / "Wan2.2_VAE.pth"}, None
    else:
        files, problem = {}, f"{d} needs vae/ (diffusers AutoencoderKLWan) or Wan2.2_VAE.pth"
    piece.problem, piece.files = problem, files if problem is None else {}
    return piece


def _check_dit(root: Path, variant: str, config: DiTConfig | None, deep: bool) -> tuple[StackPiece, CheckpointInfo | None]:
    d = root / variant
    piece = StackPiece(variant, d, d.is_dir())
    if not piece.present:
        return piece, None
    if not deep:
        if not ((d / INDEX_NAME).is_file() or _shard_path(d, SINGLE_FILE_NAME)):
            piece.problem = f"no {INDEX_NAME} or {SINGLE_FILE_NAME}"
        return piece, None
    try:
        info = inspect_checkpoint(d)
        validate_checkpoint(info, expected_manifest(_config_for(d, config, variant)), max_listed=5)
    except ValueError as exc:  # CheckpointError, or a config.json the model config rejects
        piece.problem = str(exc)
        return piece, None
    piece.files = {s.name: s.path for s in info.shards}
    return piece, info


def check_stack_dir(
    root: str | Path,
    variants: Iterable[str] = ("distill",),
    *,
    config: DiTConfig | None = None,
    require: Iterable[str] = CODEC_PIECES,
) -> StackLayout:
    """Check a checkpoint root (CHECKPOINTS.md §1) before anything is loaded.

    Reads only directory listings, JSON indexes and safetensors headers (no tensor data, no
    device memory). Requested DiT variants are validated against the model manifest
    (``config``, else each directory's ``config.json``, else the full model); other variant
    directories are only reported.

    Args:
        root: the checkpoint root holding ``base/``, ``distill/``, ... .
        variants: DiT directories that must be present and valid.
        config: model architecture to validate the DiT directories against.
        require: other pieces that must be present: any of ``turbo_vae``, ``text_encoder``
            (``t5gemma-9b-9b-ul2/``), ``audio_vae`` (``stable-audio-open-1.0/``), ``video_vae``
            (``Wan2.2-TI2V-5B/`` with ``vae/`` or ``Wan2.2_VAE.pth``).

    Returns:
        :class:`StackLayout` describing every piece.

    Raises:
        StackError: the root does not exist, or a requested/required piece is absent or partial
            (one error listing each; a DiT of another size names the first mismatching tensors
            and the hidden size it appears to have).
        ValueError: unknown variant or piece name.
    """
    root = Path(root)
    variants, require = list(variants), list(require)
    unknown = [v for v in variants if v not in VARIANTS] + [r for r in require if r not in CODEC_PIECES]
    if unknown:
        raise ValueError(f"unknown stack pieces {unknown}; variants: {list(VARIANTS)}, others: {list(CODEC_PIECES)}")
    if not root.is_dir():
        raise StackError(f"checkpoint root {root} does not exist (run `avatar-server download {root}`)")
    layout = StackLayout(root, {})
    for variant in VARIANTS:
        piece, info = _check_dit(root, variant, config, deep=variant in variants)
        layout.pieces[variant] = piece
        if info is not None:
            layout.dit[variant] = info
    for check in (_check_turbo, _check_text, _check_audio, _check_video):
        piece = check(root)
        layout.pieces[piece.name] = piece

    problems = []
    for name in variants + require:
        piece = layout.pieces[name]
        if not piece.present:
            problems.append(f"{name}: {piece.path} is missing")
        elif piece.problem:
            problems.append(f"{name}: {piece.problem}")
    if problems:
        raise StackError(
            f"checkpoint root {root} is not usable for {variants}:\n- " + "\n- ".join(problems)
            + f"\n(fetch the missing pieces with `avatar-server download {root}`; layout: CHECKPOINTS.md §1)"
        )
    logger.debug("checkpoint root %s:\n%s", root, layout.summary())
    return layout
