"""DeepSpeed's JSON config, derived from prunepipe's, plus an optional override file.

Pure functions without importing DeepSpeed, so the config schema can validate a
``train.deepspeed_config`` file (and that DeepSpeed is installed) before any work starts.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pipeline.config import TrainConfig

# Keys the project config decides: an override of one would make the engine's steps, the
# batches the loaders give or the optimizer differ from what DeepSpeed assumes.
OWNED_KEYS: dict[str, str] = {
    "train_batch_size": "data.batch_size x train.grad_accum x ranks",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "optimizer": "train.lr, train.momentum, ... (prunepipe's SGD is handed to DeepSpeed)",
    "scheduler": "train.schedule, train.warmup_epochs (the engine steps prunepipe's schedule itself)",
    # low-precision weights would make the module's parameters differ from the fp32 masters,
    # which method hooks and checkpoints rely on being equal; train.amp uses torch_autocast
    "fp16": "train.amp",
    "bf16": "train.amp",
    "torch_autocast": "train.amp",
}


def check_installed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError("train.backend = 'deepspeed': DeepSpeed is not installed "
                         "(DS_BUILD_OPS=0 pip install --no-build-isolation -r requirements-deepspeed.txt)")


def read_override(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``, checked: exists, is a JSON object, sets no key the project owns."""
    where = f"train.deepspeed_config = {str(path)!r}"
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{where}: does not exist")
    try:
        raw = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where}: not valid JSON: {err}".splitlines()[0]) from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must hold a JSON object")
    for key, owner in OWNED_KEYS.items():
        if key in raw:
            raise ValueError(f"{where}: key {key!r} comes from {owner}; set it there")
    stage = raw.get("zero_optimization", {}).get("stage") if isinstance(raw.get("zero_optimization"), dict) else None
    if stage is not None:
        raise ValueError(f"{where}: key 'zero_optimization.stage' comes from train.zero_stage; set it there")
    return raw


def derive(train: TrainConfig, micro_batch: int, amp: torch.dtype | None) -> dict[str, Any]:
    """The DeepSpeed config equivalent to prunepipe's DDP training with ``train``."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        # ZeRO refuses optimizers it has not tested unless told; torch's SGD is plain and fine
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # progress goes through prunepipe's reports, not DeepSpeed's log
        "wall_clock_breakdown": False,
    }
    if amp is not None:
        # autocast keeps fp32 weights, BN buffers and masters, as DDP's AMP does; DeepSpeed adds
        # the GradScaler for fp16 itself
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if amp is torch.bfloat16 else "float16"}
    return cfg


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, recursively for nested objects (e.g. ``zero_optimization``)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build(train: TrainConfig, micro_batch: int, amp: torch.dtype | None) -> dict[str, Any]:
    """Derived config, with ``train.deepspeed_config``'s keys merged over it."""
    cfg = derive(train, micro_batch, amp)
    if train.deepspeed_config is not None:
        cfg = merge(cfg, read_override(train.deepspeed_config))
    return cfg
