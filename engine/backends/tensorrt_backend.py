"""TensorRT backend: build an engine from the fixed-geometry ONNX export of the DiT and run it as the
runner's step (:meth:`TensorRTDiT.step` becomes :attr:`engine.runner.DiTRunner.forward`; the DiT
module is not called).

The ONNX file comes from ``python -m ops.export_onnx`` (one file per segment geometry and text
length: inputs ``x [L, in_channels]`` fp32 and ``coords [L, 9]`` fp32, output ``velocity
[L, out_channels]`` fp32; modality spans baked in). For the 15 B model export with
``--compute-dtype bf16``: the graph then carries bf16 weights and explicit casts, and the network is
built *strongly typed* so TensorRT keeps exactly those types (DIT.md §6) instead of choosing its own.

Requirements: an NVIDIA GPU, CUDA 12 and TensorRT >= 10 (``pip install tensorrt-cu12``; BF16 and
strongly typed networks need 10.x). Without the package every entry point raises
:class:`engine.backends.BackendUnavailableError` at once, naming what to install.

Status: written against the TensorRT 10 Python API (``Builder``, ``OnnxParser.parse_from_file`` for
external weight data, ``build_serialized_network``, ``execute_async_v3`` with tensor addresses) but
never executed — no GPU and no TensorRT were available where it was written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from engine.backends.base import BackendUnavailableError

logger = logging.getLogger(__name__)

__all__ = ["INSTALL_HINT", "TensorRTDiT", "build_engine", "require_tensorrt"]

INSTALL_HINT = (
    "install NVIDIA TensorRT >= 10 for CUDA 12 on a machine with an NVIDIA GPU "
    "(`pip install tensorrt-cu12`, which provides the `tensorrt` module), then export the DiT with "
    "`python -m ops.export_onnx` and pass the .onnx file to the backend"
)


def require_tensorrt():
    """Import and return the ``tensorrt`` module.

    Raises:
        BackendUnavailableError: ``tensorrt`` is not importable (the message names the package and
            how to install it).
    """
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: libnvinfer missing or built for another CUDA
        raise BackendUnavailableError(
            f"backend 'tensorrt' needs the Python package `tensorrt` (NVIDIA TensorRT), which is not "
            f"importable here ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
        ) from exc
    return tensorrt


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, workspace_gb: float = 16.0,
                 strongly_typed: bool = True) -> Path:
    """Parse ``onnx_path`` (its external weight file next to it) and write a serialized engine.

    Args:
        onnx_path: the exported fixed-geometry DiT.
        engine_path: where to write the plan.
        workspace_gb: builder workspace memory limit.
        strongly_typed: build with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (types as in the
            ONNX graph; needed for the bf16 export). Otherwise the network is fp32 with TF32 allowed.

    Raises:
        BackendUnavailableError: no ``tensorrt``.
        RuntimeError: the parser or the builder failed (parser errors are listed).
    """
    trt = require_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    log = _logger(trt)
    builder = trt.Builder(log)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data relative to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    logger.info("building TensorRT engine from %s (this takes minutes for the 15 B model)", onnx_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log)")
    engine_path.write_bytes(memoryview(serialized))
    return engine_path


_DTYPES = (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16),
           ("int32", torch.int32), ("int64", torch.int64), ("bool", torch.bool))


def _torch_dtype(trt, dtype) -> torch.dtype:
    for name, torch_dtype in _DTYPES:
        if getattr(trt, name, None) == dtype:
            return torch_dtype
    raise TypeError(f"TensorRT tensor dtype {dtype} has no torch equivalent here")


class TensorRTDiT:
    """A deserialized DiT engine: ``runner(x, coords) -> velocity`` on CUDA tensors.

    Args:
        engine_path: a plan written by :func:`build_engine`.
        device: the CUDA device to run on.

    Raises:
        BackendUnavailableError: no ``tensorrt``.
        RuntimeError: the plan cannot be deserialized.
    """

    def __init__(self, engine_path: str | Path, device: str | torch.device = "cuda"):
        trt = require_tensorrt()
        self.device = torch.device(device)
        self._runtime = trt.Runtime(_logger(trt))
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"could not deserialize TensorRT engine {engine_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.shapes = {n: tuple(self.engine.get_tensor_shape(n)) for n in names}
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def __call__(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Run the engine on ``x [L, in]`` and ``coords [L, 9]``; returns fp32 ``[L, out]``.

        Raises:
            ValueError: the inputs do not have the geometry the engine was built for.
        """
        feeds = dict(zip(self.inputs, (x, coords), strict=True))
        for name, tensor in feeds.items():
            if tuple(tensor.shape) != self.shapes[name]:
                raise ValueError(f"TensorRT engine input {name!r} expects shape {self.shapes[name]} (the "
                                 f"exported segment geometry), got {tuple(tensor.shape)}")
        feeds = {n: t.to(self.device, self.dtypes[n]).contiguous() for n, t in feeds.items()}
        outs = {n: torch.empty(self.shapes[n], dtype=self.dtypes[n], device=self.device) for n in self.outputs}
        for name, tensor in {**feeds, **outs}.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return outs[self.outputs[0]].float()

    def step(self, packed) -> torch.Tensor:
        """The runner step ``(packed: engine.packing.PackedInputs) -> fp32 [L, out]`` on this engine.

        Modality spans are baked into the engine; the text must be unpadded (export the unpadded
        length; run the runner without text buckets).

        Raises:
            NotImplementedError: the text is padded (``packed.num_padding > 0``): the engine has no
                key-padding mask.
            ValueError: another geometry than the exported one.
        """
        if packed.num_padding:
            raise NotImplementedError("the TensorRT backend has no key-padding mask; run it without text buckets")
        return self(packed.x, packed.coords)
