"""The one denoising path of the DiT: static inputs once per segment, the velocity once per step.

:class:`DiTRunner` wraps one :class:`engine.dit.DiTModel`. For each segment, :meth:`DiTRunner.prepare`
builds everything that stays fixed over the denoising loop (PIPELINE.md §8): rotary coordinates,
modality ids and spans, frame-local attention ranges, the packed text rows, and the ``x`` buffer
the video and audio tokens are written into at every step (:func:`engine.packing.packed_layout`).
:meth:`DiTRunner.velocity` then does pack -> DiT -> unpack for one step, and
:meth:`DiTRunner.velocity_fn` gives the sampler's :data:`engine.sampler.VelocityFn`.

The live engine (generation and super-resolution), offline clips, the parity checks, context
parallel (rank 0's steps split over the ranks, :func:`engine.context_parallel.distributed_step`) and
``ops/bench`` all call this class, so the benchmark measures the code that serves.

Static shapes (issue 17): with ``text_buckets`` the text is padded up to the smallest bucket that
holds it, and the DiT masks the padding out of attention (``valid_length``), so the output for a
bucketed prompt equals the unpadded one within float summation order and the number of distinct
sequence lengths reaching the DiT is bounded by (segment lengths x buckets): that bounds
``torch.compile`` recompiles, CUDA-graph captures and oneDNN's primitive cache.

Backends wrap the runner, not the DiT: what the runner calls per step is :attr:`DiTRunner.forward`
``(packed) -> fp32 [L, out_channels]``, by default a :class:`DiTStep` over the DiT; and
:attr:`DiTRunner.before_call` (e.g. :func:`engine.backends.compile.mark_step` for CUDA graphs) runs
before every call. :func:`engine.backends.apply_backend` ``(runner, name, device)`` replaces those two
and nothing else: a ``fast`` step passes its attention kernel with every DiT call, ``fp8`` and
``compile`` (scope ``layer``) call the backend's own copy of the module tree (sharing the DiT's
weight tensors), ``compile`` (scope ``model``) is ``torch.compile`` of the step, and ``tensorrt`` is
a step that runs the engine. The :class:`engine.dit.DiTModel` is never changed by a backend, so one
DiT can serve several runners with different backends, and :func:`engine.backends.reset_backend`
gives back the eager step.

The whole 8-step loop as one CUDA graph (issue 17) is :class:`engine.graphs.GraphLoop`, used by
:class:`engine.pipeline.MagiHumanEngine` when ``graph_loop`` is on (default on CUDA). What it rests on:
(1) no host work between the loop's device operations: the sigmas live on the device, the steps are
unrolled, the cancel event is checked before and after the loop only (cancel acts per segment);
(2) the noise of every step drawn up front into ``[steps, ...]`` buffers in the reference's order
(:func:`engine.graphs.draw_step_noise`, PIPELINE.md §4.3); (3) :meth:`DiTRunner.prepare` computes the
rotary table and the attention masks once per segment (``PackedInputs.rope``/``masks``), so the DiT call
no longer reads a value back to the host (it checked the rotary scale's finiteness at every call) and
the text-padding mask is data in a buffer, not ``valid_length`` baked into the captured slices; the
latents are copied into the static ``PackedInputs.x``; (4) one static segment and one graph per
(latent shape, audio tokens, text rows, steps, audio stepped, image), captured after a warm-up on a
side stream, every graph in one shared memory pool, replayed after copying the request's noise, image
latent, text rows, rotary table and mask into the static buffers (:meth:`engine.pipeline.MagiHumanEngine.warm_up`
captures each segment length x text bucket of a speak segment). On CPU the same buffers and loop run
eagerly; tests/test_graph_loop.py shows there that the loop equals :func:`engine.sampler.sample`
bit for bit (text, lip-sync) and dispatches no host-synchronising operation and no random draw.
Only a GPU can check: that the capture succeeds with each backend (``fast``, ``fp8``, ``compile``
without CUDA graphs of its own; ``reduce-overhead`` compile, TensorRT and context parallel are not
captured and run the static loop eagerly), that replays of several graphs in any order equal the eager
loop, and the time saved (``python -m ops.bench --graph-loop``); the CUDA tests of
tests/test_graph_loop.py and that benchmark do it.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence

import torch

from engine.backends.base import BackendInfo
from engine.dit import AttentionKernel, DiTModel, attention_masks
from engine.packing import (
    FRAME_RECEPTIVE_FIELD,
    CoordsStyle,
    PackedInputs,
    packed_layout,
    unpack,
    write_latents,
)
from engine.sampler import VelocityFn


def _device_of(module) -> torch.device:
    return next(module.parameters()).device


def bucket_for(num_text: int, buckets: Sequence[int] | None) -> int:
    """Text rows for ``num_text`` tokens: the smallest bucket ``>= num_text``; ``num_text`` itself
    without buckets or above the largest one (the engine caps its text at its largest bucket, so that
    happens only to direct callers such as the benchmark's longer texts)."""
    for bucket in sorted(buckets or ()):
        if bucket >= num_text:
            return bucket
    return num_text


def text_buckets_up_to(limit: int, candidates: Sequence[int] = (64, 128, 256, 384, 512, 640)) -> tuple[int, ...]:
    """The default buckets below ``limit`` plus ``limit`` itself (so every allowed length has one).

    Example: ``limit`` 640 -> (64, 128, 256, 384, 512, 640); 256 -> (64, 128, 256).
    """
    return tuple(sorted({b for b in candidates if b < limit} | {limit}))


def _takes_static_inputs(model) -> bool:
    """``model``'s call accepts ``rope`` and ``masks`` (:meth:`engine.dit.DiTModel.forward`)."""
    call = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        params = inspect.signature(call).parameters
    except (TypeError, ValueError):
        return False
    return "rope" in params and "masks" in params


class DiTStep:
    """The DiT call of one denoising step: ``(packed: PackedInputs) -> fp32 [L, out_channels]``.

    Calls ``model(packed.x, packed.coords, packed.modality, spans=..., local_ranges=...,
    compute_dtype=...)`` with the segment's precomputed ``rope`` and ``masks`` (:meth:`DiTRunner.prepare`)
    when ``model`` takes them (:attr:`takes_static_inputs`: no host sync in the call, issue 17), else with
    ``valid_length`` when the text is padded (:func:`engine.packing.packed_layout`); and with
    ``attention_kernel`` when one is given.

    Args:
        model: what is called, with :meth:`engine.dit.DiTModel.forward`'s signature: the runner's DiT
            (eager), a backend's copy of its module tree that shares its weight tensors (FP8 linears,
            compiled layers: :func:`engine.backends.base.shadow_module`), or a context-parallel
            :class:`engine.context_parallel.DistributedDiT`.
        compute_dtype: block compute dtype.
        attention_kernel: the attention kernel passed with every call (:data:`engine.dit.AttentionKernel`),
            or None for the DiT's default SDPA attention.

    Attributes:
        takes_static_inputs: ``model``'s call accepts ``rope`` and ``masks`` (a :class:`DiTModel` or a
            shadow of one; not :class:`engine.context_parallel.DistributedDiT`).
    """

    def __init__(self, model, compute_dtype: torch.dtype,
                 attention_kernel: AttentionKernel | None = None):
        self.model, self.compute_dtype, self.attention_kernel = model, compute_dtype, attention_kernel
        self.takes_static_inputs = _takes_static_inputs(model)

    def __call__(self, packed: PackedInputs) -> torch.Tensor:
        """fp32 ``[L, out_channels]`` for ``packed`` (``packed.x`` fp32 ``[L, in_channels]``)."""
        kwargs = {}
        if packed.rope is not None and packed.masks is not None and self.takes_static_inputs:
            kwargs["rope"], kwargs["masks"] = packed.rope, packed.masks
        elif packed.num_padding:
            kwargs["valid_length"] = packed.valid_length
        if self.attention_kernel is not None:
            kwargs["attention_kernel"] = self.attention_kernel
        return self.model(packed.x, packed.coords, packed.modality, spans=packed.spans,
                          local_ranges=packed.local_ranges, compute_dtype=self.compute_dtype, **kwargs)


class DiTRunner:
    """Pack -> DiT -> unpack for one DiT, with per-segment static inputs.

    Args:
        dit: the DiT, eval mode (a backend is applied to the runner, :func:`engine.backends.apply_backend`).
        compute_dtype: block compute dtype (``torch.bfloat16`` reference, ``torch.float32`` fp32 path).
        coords_style: ``v2`` (base/distill) or ``v1`` (SR), PIPELINE.md §8.4.
        text_buckets: text lengths the text is padded up to (None: no padding, every length its own
            shape).
        frame_receptive_field: local-attention window in latent frames (PIPELINE.md §8.5).

    Attributes:
        dit: the DiT (shared, never changed by a backend).
        forward: ``(packed: PackedInputs) -> fp32 [L, out_channels]``, the DiT call of one step: the
            eager :class:`DiTStep` over ``dit``, or what :func:`engine.backends.apply_backend` set.
        before_call: called before every DiT call, or None.
        backend: the :class:`engine.backends.BackendInfo` of ``forward`` (``eager`` at first).
        shapes: every ``(L, valid_length)`` that reached the DiT (a set; bounded by the buckets).
    """

    def __init__(self, dit: DiTModel, *, compute_dtype: torch.dtype = torch.bfloat16,
                 coords_style: CoordsStyle = "v2", text_buckets: Sequence[int] | None = None,
                 frame_receptive_field: int = FRAME_RECEPTIVE_FIELD):
        self.dit = dit
        self.compute_dtype = compute_dtype
        self.coords_style: CoordsStyle = coords_style
        self.text_buckets = tuple(sorted(text_buckets)) if text_buckets else None
        self.frame_receptive_field = frame_receptive_field
        self.forward: Callable[[PackedInputs], torch.Tensor] = self.eager_step()
        self.before_call: Callable[[], None] | None = None
        self.backend = BackendInfo(name="eager", device=str(_device_of(dit)))
        self.shapes: set[tuple[int, int]] = set()

    @property
    def config(self):
        """The DiT's :class:`engine.config.DiTConfig`."""
        return self.dit.config

    def text_rows(self, num_text: int) -> int:
        """Rows the text takes in the sequence (:func:`bucket_for` of the runner's buckets)."""
        return bucket_for(num_text, self.text_buckets)

    def prepare(self, latent_shape: Sequence[int], num_audio: int, text_features: torch.Tensor,
                num_text: int, *, device: torch.device | str | None = None) -> PackedInputs:
        """Static inputs of one segment (see :func:`engine.packing.packed_layout`).

        Args:
            latent_shape: video latent ``(1, C, T, h, w)`` or ``(C, T, h, w)``.
            num_audio: audio tokens ``A``.
            text_features: fp32 ``[640, C_text]`` (or ``[1, 640, C_text]``) text context.
            num_text: text tokens that carry the prompt (``<= 640``).
            device: device of the inputs (default the DiT's).

        The rotary table and the attention masks are computed here once (``packed.rope``,
        ``packed.masks``) and passed to every DiT call that accepts them (:attr:`takes_static_inputs`), so
        a step does no host synchronisation (issue 17).

        Raises:
            ValueError: ``num_text`` above the rows given, or coordinates with a non-finite rotary scale.
        """
        shape = tuple(latent_shape)[-4:]
        if device is None:
            device = _device_of(self.dit)
        cfg = self.dit.config
        packed = packed_layout(
            shape, num_audio, text_features, num_text=num_text, text_rows=self.text_rows(num_text),
            in_channels=cfg.in_channels, audio_channels=cfg.audio_in_channels, coords_style=self.coords_style,
            frame_receptive_field=self.frame_receptive_field, device=device,
        )
        with torch.no_grad():
            packed.rope = self.dit.adapter.rope(packed.coords)
        packed.masks = attention_masks(packed.length, packed.x.device,
                                       packed.local_ranges if cfg.local_attn_layers else None,
                                       packed.valid_length if packed.num_padding else None)
        return packed

    @property
    def takes_static_inputs(self) -> bool:
        """The step passes the precomputed ``rope``/``masks`` of :meth:`prepare` to the DiT (a
        :class:`DiTStep` over a module with :meth:`DiTModel.forward`'s signature, also under ``torch.compile``);
        False for TensorRT and context-parallel steps, which compute both themselves."""
        step = self.forward
        flag = getattr(step, "takes_static_inputs", None)
        if flag is None:  # torch.compile of a step keeps the original callable
            flag = getattr(getattr(step, "_torchdynamo_orig_callable", None), "takes_static_inputs", False)
        return bool(flag)

    def eager_step(self) -> DiTStep:
        """A new eager step: the DiT itself, default attention, the runner's compute dtype."""
        return DiTStep(self.dit, self.compute_dtype)

    def dit_forward(self, packed: PackedInputs) -> torch.Tensor:
        """The eager DiT call on ``packed`` (padding masked through ``valid_length``), whatever backend
        :attr:`forward` runs: the reference a backend's output is compared with."""
        return DiTStep(self.dit, self.compute_dtype)(packed)

    def velocity(self, packed: PackedInputs, video: torch.Tensor, audio: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: ``video`` fp32 ``[1, C, T, h, w]`` and ``audio`` fp32 ``[1, A, 64]`` -> their velocities
        (same shapes), PIPELINE.md §8-§9. Writes into ``packed.x``."""
        write_latents(packed, video, audio)
        if self.before_call is not None:
            self.before_call()
        self.shapes.add((packed.length, packed.valid_length))
        out = self.forward(packed)
        return unpack(out, packed, self.dit.config.audio_in_channels)

    def velocity_fn(self, contexts: PackedInputs | dict[bool, PackedInputs], timings: dict | None = None,
                    key: str = "dit") -> VelocityFn:
        """The sampler's velocity function over prepared inputs.

        Args:
            contexts: one :class:`PackedInputs` (every call), or ``{True: conditional, False:
                unconditional}`` for CFG (PIPELINE.md §11).
            timings: if given, ``timings[key]`` accumulates the wall seconds of every call.
            key: timing key.
        """
        def velocity(video, audio, timestep, conditional):
            start = time.perf_counter()
            packed = contexts if isinstance(contexts, PackedInputs) else contexts[conditional]
            result = self.velocity(packed, video, audio)
            if timings is not None:
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
            return result

        return velocity
