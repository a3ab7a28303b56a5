"""Accelerated CPU runtime for the image encoders (ONNX Runtime or OpenVINO), built from the
loaded weights.

``SegmenterConfig.encoder_runtime``:

* ``torch`` (default): PyTorch eager, as loaded;
* ``onnx``: the SAM image encoder and the matching encoder are exported to ONNX (fp32) at first
  use, from the very modules :mod:`matcher_core.models` loaded, and run by ONNX Runtime (graph
  optimisations: Conv+BatchNorm folding, fused GELU / LayerNorm / attention ...). Outputs match
  PyTorch to float rounding (``tests/test_runtime.py`` states the tolerance);
* ``onnx_int8``: the same graph with dynamically quantised int8 weights for its MatMuls (ONNX
  Runtime's ``quantize_dynamic``); faster on some CPUs, with a measured drift (``BENCHMARKS.md``);
* ``openvino``: the same fp32 ONNX graph compiled by OpenVINO for the CPU, in fp32 (outputs
  match PyTorch to float rounding, like ``onnx``; 2x ONNX Runtime on ``vit_b`` here);
* ``openvino_bf16``: OpenVINO computing in bfloat16 where the CPU has it (AVX512-BF16, AMX;
  elsewhere OpenVINO stays in fp32): 2x ``openvino`` here, with a measured drift
  (``BENCHMARKS.md``).

Exports are cached in ``model_dir/onnx/`` (OpenVINO's compiled blobs in ``model_dir/openvino/``) under a name keyed by the checkpoint's identity (path,
size and modification time of the weights file, or the timm model name for timm's own weights),
the input size, and the torch / onnxruntime versions; they are written atomically (temp file +
rename), so concurrent workers never read half a file.

Only the CPU benefits: on CUDA the runtime setting is ignored (PyTorch runs the encoders).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import ENCODER_RUNTIMES

log = logging.getLogger(__name__)

RUNTIMES = ENCODER_RUNTIMES
OPSET = 17


def _versions() -> str:
    import onnxruntime

    return f"torch{torch.__version__}-ort{onnxruntime.__version__}"


def checkpoint_identity(path: str | Path | None, fallback: str) -> str:
    """Identity of a weights file (resolved path, size, mtime), or ``fallback`` when none."""
    if path is None:
        return fallback
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def cache_path(directory: Path, name: str, identity: str, input_shape: tuple[int, ...]) -> Path:
    key = f"{identity}|{input_shape}|{_versions()}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return directory / "onnx" / f"{name}-{digest}.onnx"


def export(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export ``module(example)`` to ``path`` (batch axis dynamic) unless it exists; atomic."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    log.warning("exporting %s to ONNX (once; cached at %s)", type(module).__name__, path)
    try:
        with torch.no_grad():
            torch.onnx.export(
                module.eval(),
                (example,),
                str(tmp),
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def quantise(source: Path) -> Path:
    """int8 dynamic quantisation of ``source``'s MatMul weights (cached next to it)."""
    target = source.with_name(source.stem + "-int8.onnx")
    if target.exists():
        return target
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        quantize_dynamic(
            str(source), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"]
        )
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


class OnnxModule(nn.Module):
    """An exported module run by ONNX Runtime on the CPU: ``forward(x) -> tensor`` like the
    original (input moved to the CPU as float32, output returned on the input's device)."""

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run(["output"], {"input": array})
        return torch.from_numpy(np.asarray(out)).to(x.device)


class OpenVinoModule(nn.Module):
    """An exported ONNX graph compiled by OpenVINO for the CPU, called like :class:`OnnxModule`.

    ``precision`` is OpenVINO's ``INFERENCE_PRECISION_HINT``: ``f32``, or ``bf16`` (used where
    the CPU computes bfloat16 natively). Compiled blobs are cached in ``cache_dir``. One infer
    request per calling thread: a request is not safe to share, the compiled model is.
    """

    def __init__(
        self, path: Path, precision: str, cache_dir: Path, threads: int | None = None
    ) -> None:
        super().__init__()
        import openvino

        core = openvino.Core()
        core.set_property({"CACHE_DIR": str(cache_dir)})
        if precision == "bf16" and not cpu_has_bfloat16(core):
            log.warning("this CPU computes no bfloat16; OpenVINO runs the encoders in fp32")
            precision = "f32"
        self.path = path
        self.precision = precision
        self.compiled = core.compile_model(
            str(path),
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": precision,
                "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
                "PERFORMANCE_HINT": "LATENCY",
            },
        )
        self._requests = threading.local()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = request.infer({0: array})[0]
        # A copy: the request reuses its output buffer on the next call.
        return torch.from_numpy(np.array(out)).to(x.device)


OPENVINO_PRECISION = {"openvino": "f32", "openvino_bf16": "bf16"}


def cpu_has_bfloat16(core) -> bool:
    """Whether OpenVINO's CPU plugin computes bfloat16 natively here (AVX512-BF16, AMX)."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def build(
    module: nn.Module,
    example: torch.Tensor,
    directory: Path,
    name: str,
    identity: str,
    runtime: str,
) -> OnnxModule | OpenVinoModule:
    """The ``runtime`` version of ``module`` for inputs shaped like ``example`` (any batch)."""
    if runtime not in RUNTIMES[1:]:
        raise ValueError(f"unknown encoder runtime {runtime!r}; choose one of {RUNTIMES}")
    path = export(module, example, cache_path(directory, name, identity, tuple(example.shape[1:])))
    if runtime in OPENVINO_PRECISION:
        return OpenVinoModule(path, OPENVINO_PRECISION[runtime], directory / "openvino")
    if runtime == "onnx_int8":
        path = quantise(path)
    return OnnxModule(path)


class SamEncoderOnnx(nn.Module):
    """Stands in for ``sam.image_encoder``: keeps its ``img_size`` (read by ``Sam.preprocess``)
    and runs the exported graph."""

    def __init__(self, onnx: OnnxModule | OpenVinoModule, img_size: int):
        super().__init__()
        self.onnx = onnx
        self.img_size = img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.onnx(x)


def accelerate_sam(sam: nn.Module, directory: Path, identity: str, runtime: str) -> nn.Module:
    """Replace ``sam.image_encoder`` by its ONNX Runtime version (in place; returns ``sam``).

    The PyTorch encoder is kept as ``sam.torch_image_encoder`` (tests compare the two)."""
    if runtime == "torch":
        return sam
    encoder = sam.image_encoder
    size = encoder.img_size
    example = torch.zeros(1, 3, size, size)
    onnx = build(encoder.cpu(), example, directory, "sam-encoder", identity, runtime)
    sam.torch_image_encoder = encoder
    sam.image_encoder = SamEncoderOnnx(onnx, size)
    return sam


class _Grid(nn.Module):
    def __init__(self, grid: Callable[[torch.Tensor], torch.Tensor], owner: nn.Module):
        super().__init__()
        self.owner = owner
        self._grid = grid

    def forward(self, x):
        return self._grid(x)


def accelerate_patch_encoder(patch_encoder, directory: Path, identity: str, runtime: str) -> None:
    """Run ``patch_encoder.grid`` (the network part of :class:`~matcher_core.features.PatchEncoder`)
    through ONNX Runtime (in place)."""
    if runtime == "torch":
        return
    size = patch_encoder.input_size
    example = torch.zeros(1, 3, size, size)
    patch_encoder.model.cpu()
    onnx = build(
        _Grid(patch_encoder.grid, patch_encoder.model),
        example,
        directory,
        "patch-encoder",
        identity,
        runtime,
    )
    patch_encoder.grid = onnx
