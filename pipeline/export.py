"""Export a pruned model to ONNX for a serving stack, check it, and time it in ONNX Runtime.

The file has a dynamic batch axis (``images`` ``(batch, 3, S, S)`` → ``logits`` ``(batch,
classes)``), is checked with ``onnx.checker`` and against PyTorch's logits on two batch sizes,
and is timed against the dense base architecture exported the same way: ONNX Runtime's CPU
provider, both sessions in one process, interleaved rounds (:func:`pipeline.measure.time_models`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import PrunepipeError
from pipeline.measure import SpeedResult, TimingConfig, time_models

OPSET = 17


class ExportError(PrunepipeError, RuntimeError):
    """An export whose file does not reproduce the PyTorch model, or cannot be written."""

    exit_code = 1  # the run failed; the input was not refused


def export_onnx(model: nn.Module, image_size: int, path: str | Path) -> Path:
    """``model`` (eval mode, CPU) → an ONNX file with a dynamic batch axis."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where a folder should be, no permission: one line, naming it
        raise ExportError(f"{path.parent}: cannot create the output folder ({err.strerror})") from None
    model = model.eval().cpu()
    with warnings.catch_warnings():
        # The TorchScript-based exporter (dynamo=False): the torch.export-based default needs
        # the extra onnxscript package, and a plain ResNet needs nothing it adds.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, 3, image_size, image_size),), str(path), dynamo=False,
                          input_names=["images"], output_names=["logits"], opset_version=OPSET,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    import onnx

    onnx.checker.check_model(str(path))
    return path


def session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session (``threads`` intra-op threads; None: ORT's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def max_logit_error(path: str | Path, model: nn.Module, image_size: int, batches: tuple[int, ...] = (1, 3)) -> float:
    """Largest |ONNX − PyTorch| logit over random batches of each size (several sizes: the batch axis must be dynamic)."""
    sess, gen = session(path), torch.Generator().manual_seed(0)
    worst = 0.0
    for n in batches:
        x = torch.randn(n, 3, image_size, image_size, generator=gen)
        with torch.no_grad():
            ref = model.eval()(x).numpy()
        got = sess.run(["logits"], {"images": x.numpy()})[0]
        if got.shape != ref.shape:
            raise ExportError(f"{path}: batch {n} gave logits of shape {got.shape}, PyTorch {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


class OrtModule(nn.Module):
    """An ONNX Runtime session behind ``nn.Module``'s call, so the timing helpers of
    :mod:`pipeline.measure` time it as they time PyTorch models."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.sess = session(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.sess.run(["logits"], {"images": x.numpy()})[0])


# the speed figures a registered version is tagged with, as onnx_<key>
ONNX_SPEED_KEYS = ("dense_img_s", "img_s", "speedup", "speedup_low", "speedup_high", "speed_reliable")


@dataclass(frozen=True)
class OnnxReport:
    path: Path
    max_abs_error: float
    speed: SpeedResult  # the exported model against the dense one, both in ONNX Runtime

    def metrics(self) -> dict[str, Any]:
        return {"onnx_max_abs_error": self.max_abs_error, **self.speed.metrics("onnx_", ONNX_SPEED_KEYS)}

    def summary(self) -> str:
        s = self.speed
        noisy = "" if s.reliable else "  (noisy: re-run alone)"
        return (f"ONNX: {self.path}  max |Δlogit| vs PyTorch {self.max_abs_error:.2e}\n"
                f"ONNX Runtime CPU: dense {s.dense_img_s:.0f} img/s, pruned {s.img_s:.0f} img/s, "
                f"speed-up {s.speedup:.2f}x [{s.speedup_low:.2f}-{s.speedup_high:.2f}]{noisy}")


def export_and_time(model: nn.Module, dense: nn.Module, image_size: int, out: str | Path, tolerance: float = 1e-3,
                    batch_size: int = 32, rounds: int = 12, threads: int | None = None) -> OnnxReport:
    """Export ``model`` to ``out``, check it within ``tolerance`` (absolute, on logits), and time
    it against ``dense`` (exported beside it as ``dense.onnx``) in ONNX Runtime on the CPU."""
    if not tolerance > 0:
        raise ValueError(f"tolerance = {tolerance}: must be > 0")
    out = Path(out)
    path = export_onnx(model, image_size, out)
    err = max_logit_error(path, model, image_size)
    if not err <= tolerance:
        raise ExportError(f"{path}: ONNX logits differ from PyTorch's by {err:.3g} (> tolerance {tolerance:g})")
    dense_path = export_onnx(dense, image_size, out.with_name(f"{out.stem}.dense.onnx"))
    _, speed = time_models([OrtModule(dense_path, threads), OrtModule(path, threads)], image_size,
                           TimingConfig(batch_size=batch_size, rounds=rounds), labels=("dense", "pruned"))
    return OnnxReport(path, err, speed)
