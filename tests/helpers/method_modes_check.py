"""Run under `torchrun --standalone --nproc_per_node=2`: every registered method in every mode it
has, under real DDP (gloo). A mode is the method's default options, or the default with one
boolean option flipped, so a new method or a new switch is covered by being declared; a method
whose ``scopes`` include "all" also runs its default options at ``prune.scope: all``
(mode ``scope=all``: residual streams pruned too), so declaring the scope is what covers it.

``lifecycle OUT DATA``: prepare → several DDP steps through the engine's ``train_epoch`` →
keep_masks, for every method × mode; writes ``{"method[mode]": masks equal on every rank}``.
A mode that crashes DDP (a parameter left without gradient) fails the whole job.

``resume OUT DATA [METHOD ...]``: for every training-aware method × mode (and the one-shot
methods named), the recipe's ``run_trial`` uninterrupted, then again in a folder that holds only
the checkpoint of epoch ``KILL_AFTER`` of the pruning phase (training-aware) or of the fine-tune
(one-shot) — what a job killed mid-phase leaves — so it resumes there. Writes, per method × mode, whether the resumed run ended with the very masks and final
weights of the uninterrupted one.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import launch.recipe as recipe  # noqa: E402
from methods import SelectContext, get_method_class, method_names  # noqa: E402
from pipeline.config import DataConfig, load_config  # noqa: E402
from pipeline.data.loaders import build_loader, calibration_set  # noqa: E402
from pipeline.distributed import assert_same_on_all_ranks, init_distributed, shutdown_distributed  # noqa: E402
from pipeline.engine import train_epoch  # noqa: E402
from pipeline.surgery import find_groups  # noqa: E402
from tests.helpers.ddp_check import _First, ddp_backend  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# short windows so that AutoPruner's votes, α steps and stage changes all happen in a few steps
FAST: dict[str, dict] = {"autopruner": {"vote_window": 4, "alpha_window": 1}, "lossvar": {"delta": 0.05}}
PRUNE_EPOCHS, KILL_AFTER = 5, 2


SCOPE_ALL = "scope=all"  # the default options at prune.scope=all


def modes(name: str) -> dict[str, dict]:
    """``{"default": {}, "stagewise=False": {...}, ..., "scope=all": {}}``: the defaults, each
    bool flipped (at scope inner), and the defaults at scope all if the method declares it."""
    cls = get_method_class(name)
    out = {"default": {}}
    for key, field in cls.Options.model_fields.items():
        if field.annotation is bool:
            out[f"{key}={not field.default}"] = {key: not field.default}
    if "all" in cls.scopes:
        out[SCOPE_ALL] = {}
    return out


def scope_of(mode: str) -> str:
    return "all" if mode == SCOPE_ALL else "inner"


def _lifecycle(name: str, options: dict, info, data_root: str, steps: int = 6, scope: str = "inner") -> bool:
    cfg = DataConfig(root=data_root, image_size=16, batch_size=16, augment="none")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    groups = find_groups(model, 16, scope)
    method = get_method_class(name)(groups, 0.5, seed=0, image_size=16, options={**FAST.get(name, {}), **options})
    method.prepare(model)
    if method.training_aware:
        loader = _First(build_loader(cfg, "train", info.rank, info.world, info.device, seed=0), steps)
        method.on_train_start(model, steps_per_epoch=steps, epochs=1)
        backend = ddp_backend(model, info, lr_scales=method.lr_scales(model))
        train_epoch(backend, loader, info, method=method)
        backend.close()
        model = backend.module
    ctx = SelectContext(info=info, image_size=16)
    if method.calibration_samples():
        ctx.calib = calibration_set(cfg, 32, info.rank, info.world, info.device)
    masks = method.keep_masks(model, ctx)
    method.finalize(model, masks)
    try:
        assert_same_on_all_ranks(masks, info)
    except Exception:  # noqa: BLE001 - the verdict is what the test asserts
        return False
    return True


def _trial(name: str, options: dict, data_root: str, out: Path, keep_checkpoint: Path | None = None,
           scope: str = "inner"):
    """``run_trial`` in ``out``; returns (masks, final weights). With ``keep_checkpoint``, the
    checkpoint of pruning epoch ``KILL_AFTER`` is copied there the moment it is written: what a
    job killed right then leaves behind (the runs are deterministic, so a second, killed run
    would write the very same file)."""
    overrides = [
        f"data.root={data_root}", "data.image_size=16", "data.batch_size=16", "data.augment=none",
        "data.num_workers=0", f"prune.method={name}", f"prune.epochs={PRUNE_EPOCHS}", "prune.prune_ratio=0.5",
        f"train.budget_epochs={PRUNE_EPOCHS + 1}", "train.bn_recalib_batches=1", "measure.rounds=2",
        "measure.warmup=0", "measure.attempts=1", "registry.enabled=false", f"output_dir={out}",
        f"prune.scope={scope}",
    ]
    overrides += [f"prune.options.{name}.{k}={json.dumps(v)}" for k, v in {**FAST.get(name, {}), **options}.items()]
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    masks: dict = {}
    build, save = recipe.build_method, recipe.save_checkpoint

    def recording_build(cfg_, groups):
        method = build(cfg_, groups)
        keep = method.keep_masks

        def keep_masks(model, ctx=None):
            masks.update({k: v.int().tolist() for k, v in keep(model, ctx).items()})
            return {k: torch.tensor(v, dtype=torch.bool) for k, v in masks.items()}

        method.keep_masks = keep_masks
        return method

    def copying_save(path, payload, info):
        save(path, payload, info)
        kill_phase = "prune" if get_method_class(name).training_aware else "finetune"
        if keep_checkpoint is not None and info.is_main and payload["phase"] == kill_phase \
                and payload["epoch"] == KILL_AFTER:
            keep_checkpoint.mkdir(parents=True)
            shutil.copy(path, keep_checkpoint / Path(path).name)

    recipe.build_method, recipe.save_checkpoint = recording_build, copying_save
    try:
        final = recipe.run_trial(cfg, report=lambda m: None)
    finally:
        recipe.build_method, recipe.save_checkpoint = build, save
    weights = load_file(str(Path(final["model_dir"]) / "model.safetensors"))
    return masks, weights


def _resume(name: str, options: dict, data_root: str, work: Path, scope: str = "inner") -> dict:
    whole = _trial(name, options, data_root, work / "whole", keep_checkpoint=work / "killed", scope=scope)
    dist.barrier()  # the copied checkpoint is there for every rank
    resumed = _trial(name, options, data_root, work / "killed", scope=scope)
    same_weights = whole[1].keys() == resumed[1].keys() and all(torch.equal(whole[1][k], resumed[1][k])
                                                                for k in whole[1])
    if not get_method_class(name).training_aware:
        # resumed after the cut: the decision is not made again, the cut weights carry it
        return {"masks": not resumed[0], "weights": same_weights}
    return {"masks": whole[0] == resumed[0], "weights": same_weights}


def main(job: str, out: str, data_root: str, names: list[str]) -> None:
    info = init_distributed()
    named, names = bool(names), names or method_names()
    result: dict = {}
    work = Path(out).parent / "runs"
    if info.is_main:
        shutil.rmtree(work, ignore_errors=True)  # a resumed run must find only its own checkpoint
        work.mkdir(parents=True)
    dist.barrier()
    for name in names:
        if job == "resume" and not get_method_class(name).training_aware and not named:
            continue
        for mode, options in modes(name).items():
            key = f"{name}[{mode}]"
            if job == "lifecycle":
                result[key] = _lifecycle(name, options, info, data_root, scope=scope_of(mode))
            else:
                result[key] = _resume(name, options, data_root, work / key.replace("=", "-"), scope=scope_of(mode))
    if info.is_main:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
