"""The trial recipe, top to bottom: setup → pruning phase → select → cut → measure → fine-tune
→ save and register. It runs standalone, under ``torchrun`` and inside a Ray Train worker.

Every rank runs the same steps; rank 0 alone writes checkpoints, the model folder and the
MLflow run. A checkpoint after every epoch lets a restarted trial (a dead worker, a preempted
node) resume where it stopped instead of starting over.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from methods import SelectContext, get_method_class
from pipeline import registry
from pipeline.config import Config, ConfigError, config_to_dict, flatten
from pipeline.data.loaders import build_loader, calibration_set
from pipeline.distributed import (
    DistInfo,
    assert_same_on_all_ranks,
    barrier,
    broadcast_object,
    gather_to_main,
    init_distributed,
)
from pipeline.engine import (
    amp_dtype,
    cosine_schedule,
    evaluate,
    load_checkpoint,
    make_optimizer,
    recalibrate_bn,
    save_checkpoint,
    train_epoch,
    unwrap,
    use_channels_last,
    wrap_ddp,
)
from pipeline.measure import compare
from pipeline.models import build_model
from pipeline.plots import width_plot
from pipeline.spec import build_from_spec, make_spec, save_pruned
from pipeline.surgery import apply_masks, find_groups, prune_model

Reporter = Callable[[dict[str, Any]], None]


def _print_report(info: DistInfo) -> Reporter:
    def report(metrics: dict[str, Any]) -> None:
        if info.is_main:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
            print(f"[prunepipe] {json.dumps(shown)}", flush=True)

    return report


class _TrialLog:
    """MLflow logging of one trial, on rank 0 only (a no-op elsewhere or when disabled)."""

    def __init__(self, cfg: Config, info: DistInfo, run_name: str) -> None:
        self.active = info.is_main and cfg.registry.enabled
        self.run_id: str | None = None
        if not self.active:
            return
        registry.connect(cfg.registry)
        run = registry.mlflow.start_run(run_name=run_name, tags={"prunepipe.method": cfg.prune.method})
        self.run_id = run.info.run_id
        registry.log_params(flatten(config_to_dict(cfg)))

    def metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.active:
            registry.log_metrics(metrics, step=step)

    def finish(self, model_dir: Path, plot: Path | None) -> None:
        if not self.active:
            return
        registry.mlflow.log_artifacts(str(model_dir), artifact_path="model")
        if plot is not None:
            registry.mlflow.log_artifact(str(plot), artifact_path="plots")
        registry.mlflow.end_run()


def _measure(dense: nn.Module, pruned: nn.Module, cfg: Config, info: DistInfo) -> dict[str, float]:
    """Rank 0 times dense and pruned side by side while the other ranks wait."""
    result = None
    if info.is_main:
        threads = torch.get_num_threads()
        # Ray pins a 1-CPU worker to one thread; timing uses the configured or all cores for both
        torch.set_num_threads(cfg.measure.threads or os.cpu_count() or 1)
        try:
            result = compare(
                copy.deepcopy(dense),
                copy.deepcopy(unwrap(pruned)),
                cfg.data.image_size,
                batch_size=cfg.measure.batch_size,
                warmup=cfg.measure.warmup,
                rounds=cfg.measure.rounds,
                max_spread=cfg.measure.max_spread,
                attempts=cfg.measure.attempts,
                fold_bn=cfg.measure.fold_bn,
                device=info.device,
                amp_dtype=amp_dtype(cfg.train.amp, info.device),
                channels_last=use_channels_last(cfg.train.channels_last, info.device),
            )
        finally:
            torch.set_num_threads(threads)
    barrier(info)
    return broadcast_object(result, info)


def report_bad_samples(loader, info: DistInfo, out: Path, log: _TrialLog | None = None, shown: int = 10) -> int:
    """Gather the bad samples every rank skipped since the last call; rank 0 prints the first
    few, appends all of them to ``out/bad_samples.tsv`` and logs that file to MLflow."""
    errors = getattr(loader, "errors", None)
    mine = errors.take() if errors is not None else []
    records = [r for rank_records in gather_to_main(mine, info) for r in rank_records]
    if not records or not info.is_main:
        return len(records)
    for r in records[:shown]:
        print(f"[prunepipe] skipped bad sample: {r.line()}", flush=True)
    if len(records) > shown:
        print(f"[prunepipe] ... and {len(records) - shown} more bad samples, listed in {out / 'bad_samples.tsv'}",
              flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bad_samples.tsv", "a") as f:
        for r in records:
            f.write(f"{r.shard}\t{r.key}\t{r.reason}\n")
    if log is not None and log.active:
        registry.mlflow.log_artifact(str(out / "bad_samples.tsv"), artifact_path="data")
    return len(records)


def _train_phase(
    model: nn.Module,
    epochs: range,
    total_epochs: int,
    cfg: Config,
    info: DistInfo,
    loaders: tuple,
    on_epoch: Callable[[int, nn.Module, torch.optim.Optimizer, dict[str, float]], None],
    method=None,
    optimizer_state: dict | None = None,
    desc: str = "train",
    log: _TrialLog | None = None,
) -> None:
    """Train ``epochs`` (a range, so a resumed phase starts mid-way) and call ``on_epoch`` after each."""
    train_loader, _ = loaders
    cl = use_channels_last(cfg.train.channels_last, info.device)
    ddp = wrap_ddp(model, info, channels_last=cl)
    sgd = {"momentum": cfg.train.momentum, "nesterov": cfg.train.nesterov, "weight_decay": cfg.train.weight_decay}
    if method is not None:
        sgd.update(method.optimizer_overrides())
    opt = make_optimizer(ddp, cfg.train.lr, lr_scales=method.lr_scales(model) if method is not None else None, **sgd)
    steps = max(1, len(train_loader)) * total_epochs
    sched = cosine_schedule(opt, steps, cfg.train.warmup_epochs * len(train_loader))
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    for _ in range(epochs.start * len(train_loader)):
        sched.step()  # fast-forward the schedule of a resumed phase
    for epoch in epochs:
        train_loader.set_epoch(epoch)
        stats = train_epoch(
            ddp,
            train_loader,
            opt,
            sched,
            info,
            method=method,
            amp=amp_dtype(cfg.train.amp, info.device),
            label_smoothing=cfg.train.label_smoothing,
            channels_last=cl,
            desc=f"{desc} {epoch + 1}/{total_epochs}",
        )
        report_bad_samples(train_loader, info, Path(cfg.output_dir), log)
        on_epoch(epoch, unwrap(ddp), opt, stats)


def run_trial(cfg: Config, report: Reporter | None = None, run_name: str | None = None) -> dict[str, Any]:
    """Prune one model as ``cfg`` says; returns the final metrics (the same on every rank)."""
    t_start, started_at = time.perf_counter(), time.time()
    info = init_distributed()
    report = report or _print_report(info)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    out = Path(cfg.output_dir)
    ckpt_path = out / "checkpoint.pt"
    size = cfg.data.image_size

    # --- setup -------------------------------------------------------------------------------
    loaders = (
        build_loader(cfg.data, "train", info.rank, info.world, info.device, cfg.seed),
        build_loader(cfg.data, "val", info.rank, info.world, info.device, cfg.seed),
    )
    num_classes = loaders[0].num_classes
    model = build_model(cfg.model.arch, num_classes, cfg.model.weights)
    dense = copy.deepcopy(model).eval()
    groups = find_groups(model, size, cfg.prune.scope)
    method = get_method_class(cfg.prune.method)(
        groups, cfg.prune.prune_ratio, cfg.prune.round_to, cfg.prune.options.get(cfg.prune.method), seed=cfg.seed,
        image_size=size,
    )
    log = _TrialLog(cfg, info, run_name or cfg.name)
    resume = load_checkpoint(ckpt_path)
    prune_epochs = cfg.prune.epochs if method.training_aware else 0
    ft_epochs = cfg.train.epochs
    if cfg.train.budget_epochs is not None:
        if prune_epochs >= cfg.train.budget_epochs:
            raise ConfigError(f"train.budget_epochs = {cfg.train.budget_epochs}: must exceed prune.epochs = {prune_epochs}")
        ft_epochs = cfg.train.budget_epochs - prune_epochs
    total_epochs = prune_epochs + ft_epochs
    model.to(info.device)

    def eval_now(net: nn.Module) -> dict[str, float]:
        metrics = evaluate(net, loaders[1], info, amp_dtype(cfg.train.amp, info.device))
        report_bad_samples(loaders[1], info, out, log)
        return metrics

    if resume is not None and resume["phase"] == "finetune":
        # resumed after the cut: rebuild the pruned architecture from its spec
        model = build_from_spec(json.loads(resume["spec"])).to(info.device)
        model.load_state_dict(resume["model"])
        summary = json.loads(resume["summary"])
        masks = None
    else:
        summary = {f"dense_{k}": v for k, v in eval_now(model).items()}
        # --- pruning phase (training-aware methods) ----------------------------------------
        method.prepare(model)  # gates, attention layers, rescaling: before DDP and before resuming
        first = 0
        if resume is not None and resume["phase"] == "prune":
            model.load_state_dict(resume["model"])
            method.load_state(resume["method"])
            first = int(resume["epoch"])
        elif prune_epochs:
            method.on_train_start(model, steps_per_epoch=len(loaders[0]), epochs=prune_epochs)

        def after_prune_epoch(epoch: int, net: nn.Module, opt, stats) -> None:
            method.on_epoch_end(net, epoch)
            metrics = {"epoch": epoch + 1, "phase": "prune", **stats, **eval_now(net)}
            log.metrics(metrics, step=epoch + 1)
            report(metrics)
            save_checkpoint(
                ckpt_path,
                {"phase": "prune", "epoch": epoch + 1, "model": net.state_dict(), "optimizer": opt.state_dict(),
                 "method": method.state()},
                info,
            )

        if prune_epochs and first < prune_epochs:
            _train_phase(model, range(first, prune_epochs), prune_epochs, cfg, info, loaders, after_prune_epoch,
                         method=method, optimizer_state=resume.get("optimizer") if resume else None, desc="prune",
                         log=log)

        # --- select and cut --------------------------------------------------------------------
        ctx = SelectContext(info=info, image_size=size)
        if method.calibration_samples():
            ctx.calib = calibration_set(cfg.data, method.calibration_samples(), info.rank, info.world, info.device)
        masks = method.keep_masks(model, ctx)
        assert_same_on_all_ranks(masks, info)
        method.finalize(model, masks)  # back to the plain architecture, constants folded
        summary.update({f"method_{k}": v for k, v in method.summary().items() if isinstance(v, int | float)})
        apply_masks(model, groups, masks)
        prune_model(model, groups, masks, size)
        summary.update({f"pruned_{k}": v for k, v in eval_now(model).items()})  # before any fine-tune
        if cfg.train.bn_recalib_batches:
            # the surviving channels see other inputs now: fresh BN statistics, no gradient step
            recalibrate_bn(model, loaders[0], info, max_batches=cfg.train.bn_recalib_batches)
            summary.update({f"recal_{k}": v for k, v in eval_now(model).items()})
        summary.update(_measure(dense, model, cfg, info))
        report({"epoch": prune_epochs, "phase": "cut", **summary})

    spec = make_spec(model, cfg.model.arch, num_classes, image_size=size)

    # --- fine-tune ---------------------------------------------------------------------------
    last_metrics: dict[str, Any] = {}

    def after_finetune_epoch(epoch: int, net: nn.Module, opt, stats) -> None:
        metrics = {"epoch": prune_epochs + epoch + 1, "phase": "finetune", **stats, **eval_now(net), **summary}
        log.metrics({k: v for k, v in metrics.items() if not k.startswith(("dense_", "pruned_"))}, step=metrics["epoch"])
        last_metrics.update(metrics)
        if epoch + 1 < ft_epochs:
            # the last epoch is reported after the model is saved: a scheduler that stops the
            # trial on that report must not lose the model
            report(metrics)
        save_checkpoint(
            ckpt_path,
            {"phase": "finetune", "epoch": epoch + 1, "model": net.state_dict(), "optimizer": opt.state_dict(),
             "spec": json.dumps(spec), "summary": json.dumps(summary)},
            info,
        )

    first_ft = int(resume["epoch"]) if resume is not None and resume["phase"] == "finetune" else 0
    if first_ft < ft_epochs:
        _train_phase(model, range(first_ft, ft_epochs), ft_epochs, cfg, info, loaders,
                     after_finetune_epoch, optimizer_state=resume.get("optimizer") if first_ft else None,
                     desc="finetune", log=log)

    # --- save and register -------------------------------------------------------------------
    final = {**summary, **last_metrics, **eval_now(model), "epochs": total_epochs,
             "wall_s": time.perf_counter() - t_start, "started_at": started_at}
    final["method"], final["prune_ratio"] = cfg.prune.method, cfg.prune.prune_ratio
    model_dir = out / "model"
    plot = None
    if info.is_main:
        spec.update(config=config_to_dict(cfg), metrics={k: v for k, v in final.items() if not isinstance(v, str)},
                    method_summary=method.summary())
        save_pruned(unwrap(model), model_dir, spec)
        if masks is not None:
            dense_w = {g.name: g.size for g in groups}
            kept_w = {g.name: int(masks[g.name].sum()) for g in groups}
            plot = width_plot(dense_w, kept_w, f"{cfg.model.arch} · {cfg.prune.method} · ratio {cfg.prune.prune_ratio:.2f}",
                              out / "widths.png")
        log.metrics({k: v for k, v in final.items() if not k.startswith("dense_") or k == "dense_val_top1"})
        log.finish(model_dir, plot)
    final["model_dir"] = str(model_dir)
    final["run_id"] = broadcast_object(log.run_id, info)
    barrier(info)
    final.update(epoch=total_epochs, phase="final", final=1, ended_at=time.time())
    report(final)
    return final


def baseline_path(cfg: Config) -> Path:
    """Where the dense baseline of this model/data/budget lives; the key makes reruns reuse it."""
    import hashlib

    key = json.dumps([cfg.model.arch, cfg.model.weights, str(Path(cfg.data.root).resolve()), cfg.data.image_size,
                      cfg.data.augment, cfg.baseline.epochs, cfg.baseline.lr, cfg.baseline.warmup_epochs, cfg.seed])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cfg.output_dir) / "baseline" / f"{cfg.model.arch}-{digest}.safetensors"


def run_pretrain(cfg: Config, report: Reporter | None = None) -> Path:
    """Train the dense model for ``baseline.epochs`` so every trial starts from the same weights."""
    from safetensors.torch import save_file

    info = init_distributed()
    report = report or _print_report(info)
    torch.manual_seed(cfg.seed)
    loaders = (
        build_loader(cfg.data, "train", info.rank, info.world, info.device, cfg.seed),
        build_loader(cfg.data, "val", info.rank, info.world, info.device, cfg.seed),
    )
    model = build_model(cfg.model.arch, loaders[0].num_classes, cfg.model.weights).to(info.device)
    cfg_b = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"lr": cfg.baseline.lr, "warmup_epochs": cfg.baseline.warmup_epochs})})

    def after_epoch(epoch: int, net: nn.Module, opt, stats) -> None:
        report({"epoch": epoch + 1, "phase": "baseline", **stats,
                **evaluate(net, loaders[1], info, amp_dtype(cfg.train.amp, info.device))})

    _train_phase(model, range(cfg.baseline.epochs), cfg.baseline.epochs, cfg_b, info, loaders, after_epoch,
                 desc="baseline")
    path = baseline_path(cfg)
    if info.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}, str(tmp))
        os.replace(tmp, path)
    barrier(info)
    return path
