"""DeepSpeed (ZeRO stage 0, 1 or 2): DeepSpeed owns backward, step, loss scaling and clipping.

prunepipe's own SGD (its parameter groups and per-parameter learning rates) is handed to
``deepspeed.initialize``; the LR schedule is stepped by the engine after each optimizer step and
the method's hook (so a proximal step uses its own step's lr), exactly as under DDP.
Mixed precision is DeepSpeed's ``torch_autocast`` (fp32 weights, as DDP's AMP), see
:mod:`pipeline.backends.deepspeed_config`.

Two things ZeRO changes, and how this backend keeps the engine's contract:

- **Method hooks edit parameters in place** (SFP zeroes filters, ISTA shrinks BN γ). Under
  ZeRO-1/2 the optimizer steps an fp32 *master* copy, partitioned over the ranks, and copies
  it back into the module after every step: an edit of the module alone would be undone by the
  next step. :meth:`DeepSpeedBackend.params_edited` writes the module's values into this rank's
  fragment of every master (``param._hp_mapping``, the lp↔hp fragment map behind DeepSpeed's
  ``safe_set_full_fp32_param``) without any communication: every rank made the same edit, each
  writes its own fragment. With fp32 module weights (no ``bf16``/``fp16`` weights, see the
  config) the master equals the module's value, so copying all of it is exact.
- **Checkpoints**: the optimizer state is partitioned. :meth:`state_dict` gathers it per
  parameter with ``deepspeed.utils.safe_get_full_optimizer_state`` into torch's own SGD format,
  so a checkpoint is one file written by rank 0, loadable with ``weights_only=True``, and
  portable across backends and world sizes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.backends import broadcast_buffers
from pipeline.backends.deepspeed_config import build

if TYPE_CHECKING:
    from pipeline.config import TrainConfig
    from pipeline.distributed import DistInfo


def import_deepspeed():
    """``deepspeed``, on its CPU accelerator when there is no GPU (its auto-detection may pick none)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def _ensure_process_group(info: DistInfo) -> None:
    """DeepSpeed needs a process group and LOCAL_RANK even for one process (torchrun, the deepspeed
    launcher and Ray Train set both up already)."""
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


class DeepSpeedBackend:
    name = "deepspeed"

    def __init__(
        self, train: TrainConfig, info: DistInfo, micro_batch: int, amp: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> None:
        self.info, self.channels_last = info, channels_last
        self.config = build(train, micro_batch, amp)
        self.engine: Any = None
        self._module: nn.Module | None = None  # set once closed

    def wrap(self, model, optimizer, scheduler) -> None:
        deepspeed = import_deepspeed()
        _ensure_process_group(self.info)
        # Parameters stay in the default (contiguous) layout even when channels_last is asked for:
        # DeepSpeed flattens and byte-views every parameter (broadcast, ZeRO partitions), which a
        # channels_last conv weight's strides forbid ("self.stride(-1) must be 1 to view Float as
        # Byte", seen on an H100 and reproduced on CPU). The engine still feeds channels_last
        # images, and a convolution with a channels_last input computes in channels_last.
        model = model.to(self.info.device)
        # the lp parameters of each group, in order, before ZeRO swaps the groups' params for its
        # flat fp32 partitions (DeepSpeed drops empty groups the same way)
        self._groups = [list(g["params"]) for g in optimizer.param_groups if g["params"]]
        self._opt = optimizer
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=self.config)
        self.zero = self.engine.zero_optimization_stage() > 0
        if self.zero:
            self._link_optimizer_state()

    def _link_optimizer_state(self) -> None:
        """Create the optimizer state up front and link DeepSpeed's per-parameter views of it.

        DeepSpeed links a parameter's view of the partitioned optimizer state after the first
        step of the *first* parameter group, when the other groups' SGD state does not exist yet,
        and never again: ``safe_get_full_optimizer_state`` then fails for every other group. SGD's
        momentum buffer starts as the first gradient; a zero buffer gives exactly that
        (μ·0 + g), so creating it now changes no step.
        """
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        for group, lps in zip(self._opt.param_groups, self._groups, strict=True):
            (flat,) = group["params"]
            if group.get("momentum", 0):
                self._opt.state[flat].setdefault("momentum_buffer", torch.zeros_like(flat))
            lazy_init_hp_params_optimizer_state(lps, flat, self._opt.state)

    @property
    def module(self) -> nn.Module:
        return self._module if self._module is not None else self.engine.module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._opt

    @contextmanager
    def accumulate(self, boundary: bool) -> Iterator[None]:
        # the engine decides the boundary, not DeepSpeed's micro-step counter: the last
        # micro-batch of an epoch always steps, as under DDP
        self.engine.set_gradient_accumulation_boundary(boundary)
        yield

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.engine(images)

    def backward_step(self, loss: torch.Tensor, boundary: bool) -> None:
        self.engine.backward(loss)  # divides by gradient_accumulation_steps, scales fp16 losses
        self.engine.step()  # steps optimizer and LR schedule only at the boundary

    def _fragments(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(this rank's slice of the module parameter, its fp32 master fragment) pairs."""
        for lps in self._groups:
            for p in lps:
                frag = getattr(p, "_hp_mapping", None)
                if frag is None:
                    continue
                a = frag.lp_fragment_address
                yield p.detach().view(-1).narrow(0, a.start, a.numel), frag.get_hp_fragment()

    @torch.no_grad()
    def params_edited(self) -> None:
        if not self.zero:
            return  # stage 0: the optimizer steps the module's own parameters
        pairs = list(self._fragments())
        if pairs:
            lp, hp = zip(*pairs, strict=True)
            torch._foreach_copy_(list(hp), list(lp))  # one fused copy; fp32 to fp32, exact

    def sync_buffers(self) -> None:
        broadcast_buffers(self.module, self.info)

    def close(self) -> None:
        # removes ZeRO's gradient hooks from the parameters: the module lives on (cut, fine-tune
        # under a new engine), and a stale hook would feed a dead optimizer
        module = self.engine.module
        self.engine.destroy()
        self._module = module

    def _params(self) -> list[nn.Parameter]:
        return [p for lps in self._groups for p in lps]

    def _state_keys(self, group_index: int) -> list[str]:
        """Tensor state per parameter (SGD: momentum_buffer), the same on every rank."""
        flat = self._opt.param_groups[group_index]["params"][0]
        return sorted(k for k, v in self._opt.state[flat].items() if torch.is_tensor(v) and v.shape == flat.shape)

    def state_dict(self) -> dict[str, Any]:
        if not self.zero:
            return self._opt.state_dict()
        from deepspeed.utils import safe_get_full_optimizer_state

        state: dict[int, dict[str, torch.Tensor]] = {}
        groups, index = [], 0
        for gi, (group, lps) in enumerate(zip(self._opt.param_groups, self._groups, strict=True)):
            keys = self._state_keys(gi)
            for p in lps:
                if keys:
                    # a collective per tensor: every rank runs this loop in the same order
                    state[index] = {k: safe_get_full_optimizer_state(p, k).detach().cpu() for k in keys}
                index += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(index - len(lps), index))})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.zero:
            self._opt.load_state_dict(state)
            return
        from deepspeed.utils import safe_set_full_optimizer_state

        params = self._params()
        saved_groups = state["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(lps) for lps in self._groups]:
            raise ValueError("the checkpoint's optimizer has other parameter groups than this model's")
        for group, saved in zip(self._opt.param_groups, saved_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        for index, tensors in state["state"].items():
            p = params[int(index)]
            for key, value in tensors.items():
                # each rank writes its own fragment of the value: no communication
                safe_set_full_optimizer_state(p, value.to(p.device, torch.float32), key)
