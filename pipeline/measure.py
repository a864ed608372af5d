"""What a pruned model is worth: MACs, parameters and *measured* throughput.

MACs count multiply-accumulates of convs and linears (the convention of the ResNet paper's
"FLOPs": ResNet-50 = 4.1 G at 224²). Throughput is timed, never derived: the median of
repeated batches after a warm-up, dense and pruned measured side by side in one process so
that their ratio is fair on a noisy machine.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn


def count_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one image's forward pass (convs and linears)."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out):
        nonlocal total
        total += out.numel() // out.shape[0] * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(total)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Throughput:
    images_per_s: float
    batch_size: int
    repeats: int
    device: str
    precision: str


def measure_throughput(
    model: nn.Module,
    image_size: int,
    batch_size: int = 64,
    warmup: int = 3,
    repeats: int = 10,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Throughput:
    """Inference images/s: median over ``repeats`` timed batches after ``warmup`` batches."""
    device = torch.device(device)
    model = model.eval().to(device)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode(), autocast:
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    precision = str(amp_dtype).removeprefix("torch.") if amp_dtype is not None else "float32"
    return Throughput(batch_size / statistics.median(times), batch_size, repeats, device.type, precision)


def compare(
    dense: nn.Module,
    pruned: nn.Module,
    image_size: int,
    rounds: int = 3,
    **kwargs,
) -> dict[str, float]:
    """Dense vs pruned, measured alternately in ``rounds`` so drift hits both equally."""
    d_runs, p_runs = [], []
    for _ in range(rounds):
        d_runs.append(measure_throughput(dense, image_size, **kwargs).images_per_s)
        p_runs.append(measure_throughput(pruned, image_size, **kwargs).images_per_s)
    dense_ips, pruned_ips = statistics.median(d_runs), statistics.median(p_runs)
    dense_macs, pruned_macs = count_macs(dense, image_size), count_macs(pruned, image_size)
    dense_params, pruned_params = count_params(dense), count_params(pruned)
    measured_speedup = pruned_ips / dense_ips
    macs_speedup = dense_macs / pruned_macs
    return {
        "dense_macs": dense_macs,
        "macs": pruned_macs,
        "macs_reduction": 1 - pruned_macs / dense_macs,
        "dense_params": dense_params,
        "params": pruned_params,
        "params_reduction": 1 - pruned_params / dense_params,
        "dense_img_s": dense_ips,
        "img_s": pruned_ips,
        "speedup": measured_speedup,
        "macs_speedup": macs_speedup,
        # 1.0 = every MAC removed turned into speed; pruning tools are often far below
        "speedup_efficiency": measured_speedup / macs_speedup,
    }
