"""The trial recipe, top to bottom: setup → prune → cut → measure → fine-tune → save.

``run_trial`` reads as that list: each phase is one function of the :class:`Trial` it carries
along, and :class:`Resume` alone reads the checkpoint and says where to start. The recipe sits
above the methods and the core it composes (torchtune keeps its recipes the same way): it is
the one place that knows a method by its configured name. It runs standalone, under
``torchrun`` or the ``deepspeed`` launcher, and inside a Ray Train worker, on either training
backend (``train.backend``) without knowing which.

Every rank runs the same steps; rank 0 alone writes checkpoints, the model folder and the
MLflow run. A checkpoint after every epoch lets a restarted trial (a dead worker, a preempted
node) resume where it stopped instead of starting over. MLflow is imported only when the
registry is enabled, so a ``registry.enabled=false`` trial needs neither MLflow nor Ray.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from launch.checks import check_config, make_allocator, method_class, trial_epochs
from launch.outputs import (
    CHECKPOINT,
    check_fingerprint,
    fingerprint_json,
    prepare_output,
)
from launch.speed_target import latency_counts
from launch.trial_log import TrialLog as _TrialLog  # the name launch.search and tests import
from methods import Budget, Method, SelectContext
from pipeline.blocks import block_count, block_scores, choose_blocks, identity_blocks, remove_blocks
from pipeline.config import Config, ConfigError, config_to_dict, format_error
from pipeline.data.contract import BatchLoader
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
    TrainPhase,
    amp_dtype,
    evaluate,
    load_checkpoint,
    optimizer_steps,
    recalibrate_bn,
    round_to_warning,
    save_checkpoint,
    use_channels_last,
)
from pipeline.measure import SPEED_KEYS, TimingConfig, compare
from pipeline.models import build_model
from pipeline.plots import width_plot
from pipeline.spec import build_from_spec, make_spec, save_pruned
from pipeline.surgery import ChannelGroup, apply_masks, find_groups, prune_model

Reporter = Callable[[dict[str, Any]], None]
# the calibration images that score the blocks (prune.blocks): lossvar's default set, so that a
# trial that also runs the loss allocator draws it once
BLOCK_CALIB_SAMPLES = 256


# --- logging --------------------------------------------------------------------------------------
def _print_report(info: DistInfo) -> Reporter:
    def report(metrics: dict[str, Any]) -> None:
        if info.is_main:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
            print(f"[prunepipe] {json.dumps(shown)}", flush=True)

    return report


def report_bad_samples(loader: BatchLoader, info: DistInfo, out: Path, log: _TrialLog | None = None, shown: int = 10) -> int:
    """Gather the bad samples every rank skipped since the last call; rank 0 prints the first
    few, appends all of them to ``out/bad_samples.tsv`` and logs that file to MLflow."""
    mine = loader.errors.take()
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
    if log is not None:
        log.artifact(out / "bad_samples.tsv", "data")
    return len(records)


# --- the trial and where it starts ----------------------------------------------------------------
@dataclass
class Trial:
    """What the phases of one trial share."""

    cfg: Config
    info: DistInfo
    report: Reporter
    log: _TrialLog
    train_loader: BatchLoader
    val_loader: BatchLoader
    model: nn.Module
    dense: nn.Module
    groups: list[ChannelGroup]
    method: Method
    prune_epochs: int
    ft_epochs: int
    t_start: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.time)
    summary: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] | None = None  # None when resumed after the cut
    last_metrics: dict[str, Any] = field(default_factory=dict)
    allocation: dict[str, Any] = field(default_factory=dict)  # what the width allocator reports
    blocks: dict[str, Any] = field(default_factory=dict)  # the blocks removed and their loss rise
    _calib: dict[int, list] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def select_context(self, samples: int) -> SelectContext:
        """What a decision may use: the rank layout and, when ``samples`` > 0, this rank's share
        of the fixed calibration set of that size (drawn once per size with the run's seed)."""
        cfg, info = self.cfg, self.info
        ctx = SelectContext(info=info, image_size=cfg.data.image_size)
        if samples:
            if samples not in self._calib:
                self._calib[samples] = calibration_set(cfg.data, samples, info.rank, info.world, info.device,
                                                       seed=cfg.seed)
            ctx.calib = self._calib[samples]
        return ctx

    def evaluate(self, net: nn.Module | None = None) -> dict[str, float]:
        metrics = evaluate(net if net is not None else self.model, self.val_loader, self.info,
                           amp_dtype(self.cfg.train.amp, self.info.device))
        report_bad_samples(self.val_loader, self.info, self.out, self.log)
        return metrics

    def phase(self, name: str, first_epoch: int, total_epochs: int, optimizer_state: dict[str, Any] | None,
              method: Method | None = None) -> TrainPhase:
        """The optimizer, schedule and backend of phase ``name`` ("prune" or "finetune"), with
        that phase's own settings (``train.prune_phase`` for the pruning phase)."""
        return TrainPhase(self.model, self.cfg.train.for_phase(name), self.info, self.train_loader,
                          self.cfg.data.batch_size, total_epochs, first_epoch=first_epoch, method=method,
                          optimizer_state=optimizer_state, desc=name)

    def epoch_done(self, net: nn.Module, stats: dict[str, float]) -> dict[str, float]:
        """After a training epoch: the bad samples it skipped reported, its stats and ``net``'s evaluation."""
        report_bad_samples(self.train_loader, self.info, self.out, self.log)
        return {**stats, **self.evaluate(net)}

    def checkpoint(self, phase: str, epoch: int, net: nn.Module, optimizer: dict[str, Any], **extra: Any) -> None:
        """Rank 0 writes where a restarted trial resumes: phase ``phase`` after ``epoch`` epochs."""
        save_checkpoint(self.checkpoint_path, {"phase": phase, "epoch": epoch, "model": net.state_dict(),
                                               "optimizer": optimizer, "fingerprint": fingerprint_json(self.cfg),
                                               **extra}, self.info)


@dataclass
class Resume:
    """Where a trial starts, read from its checkpoint: afresh, after ``epoch`` pruning epochs
    (phase "prune"), or after ``epoch`` fine-tune epochs of the cut model (phase "finetune")."""

    phase: str | None = None
    epoch: int = 0
    state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path, cfg: Config) -> Resume:
        """The checkpoint at ``path``, if any, refused (ConfigError) unless written under
        settings that shape the model the same way as ``cfg`` (launch/outputs.py)."""
        state = load_checkpoint(path)
        if state is None:
            return cls()
        check_fingerprint(state.get("fingerprint"), cfg, path)
        return cls(phase=state["phase"], epoch=int(state["epoch"]), state=state)

    def first_epoch(self, phase: str) -> int:
        return self.epoch if self.phase == phase else 0

    def optimizer_state(self, phase: str) -> dict[str, Any] | None:
        return self.state.get("optimizer") if self.phase == phase else None

    def restore_pruning(self, model: nn.Module, method: Method) -> bool:
        """Mid-pruning: the prepared model's weights and the method's state; False if not resuming it."""
        if self.phase != "prune":
            return False
        model.load_state_dict(self.state["model"])
        method.load_state(self.state["method"])
        return True

    def restore_cut(self, trial: Trial) -> None:
        """After the cut: rebuild the pruned architecture from its spec, with its weights and summary."""
        trial.model = build_from_spec(json.loads(self.state["spec"])).to(trial.info.device)
        trial.model.load_state_dict(self.state["model"])
        trial.summary = json.loads(self.state["summary"])


# --- the phases ---------------------------------------------------------------------------------
def setup(cfg: Config, info: DistInfo, report: Reporter | None, run_name: str | None) -> Trial:
    """Loaders, model, channel groups, the method, the MLflow run (``cfg`` checked, the process group joined)."""
    t_start, started_at = time.perf_counter(), time.time()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    size = cfg.data.image_size
    train_loader = build_loader(cfg.data, "train", info.rank, info.world, info.device, cfg.seed)
    val_loader = build_loader(cfg.data, "val", info.rank, info.world, info.device, cfg.seed)
    if info.is_main and (note := round_to_warning(cfg.prune.round_to, info.device)):
        print(f"[prunepipe] warning: {note}", flush=True)
    model = build_model(cfg.model.arch, train_loader.num_classes, cfg.model.weights)
    dense = copy.deepcopy(model).eval()
    groups = find_groups(model, size, cfg.prune.scope)
    method = build_method(cfg, groups)
    prune_epochs, ft_epochs = trial_epochs(cfg, type(method))
    log = _TrialLog(cfg, info, run_name or cfg.name)
    return Trial(cfg, info, report or _print_report(info), log, train_loader, val_loader, model.to(info.device), dense,
                 groups, method, prune_epochs, ft_epochs, t_start=t_start, started_at=started_at)


def build_method(cfg: Config, groups: list[ChannelGroup]) -> Method:
    """The configured method; it validates its own options (one-line ConfigError if they are bad)."""
    name = cfg.prune.method
    cls = method_class(name, "prune.method")
    try:
        return cls(groups, cfg.prune.prune_ratio, cfg.prune.round_to, cfg.prune.options.get(name), seed=cfg.seed,
                   image_size=cfg.data.image_size)
    except ValidationError as err:
        raise ConfigError(format_error(err, prefix=f"prune.options.{name}.")) from None


def drop_blocks(trial: Trial) -> None:
    """``prune.blocks``: the identity-shortcut blocks whose bypass raises the calibration loss
    least become the identity, before any width is chosen; the channel groups and the method are
    then those of the model without them. Deterministic, as :func:`allocate` is."""
    cfg, model = trial.cfg, trial.model
    candidates = identity_blocks(model)
    count = block_count(cfg.prune.blocks, len(candidates), cfg.model.arch)
    if not count:
        return
    scores = block_scores(model, candidates, trial.select_context(BLOCK_CALIB_SAMPLES).calib, trial.info)
    chosen = choose_blocks(scores, count)
    remove_blocks(model, chosen)
    trial.groups = find_groups(model, cfg.data.image_size, cfg.prune.scope)
    trial.method = build_method(cfg, trial.groups)
    trial.summary["blocks_removed"] = len(chosen)
    trial.blocks = {"removed_blocks": chosen, "block_loss_rise": {n: scores[n] for n in chosen}}
    if trial.info.is_main:
        print(f"[prunepipe] blocks removed ({len(chosen)} of {len(candidates)}, lowest loss rise first): "
              f"{', '.join(chosen)}", flush=True)


def allocate(trial: Trial, resume: Resume) -> None:
    """Kept channels per group from the width allocator (``prune.allocate``), decided on the
    model before the pruning phase and given to the method, which fills each group to its count.
    The ``latency`` allocator times probe models to meet ``prune.target_speedup``
    (launch/speed_target.py); a trial resumed mid-pruning takes the counts its checkpoint kept,
    since timings taken again would not decide exactly the same."""
    cfg, method = trial.cfg, trial.method
    if resume.phase == "prune" and "counts" in resume.state:
        method.set_counts({k: int(v) for k, v in resume.state["counts"].items()})
        trial.allocation = json.loads(resume.state["allocation"])
    else:
        allocator = make_allocator(cfg, method)
        ctx = trial.select_context(allocator.calibration_samples())
        budget = Budget(cfg.prune.prune_ratio, cfg.prune.round_to, cfg.prune.target_speedup)
        if allocator.name == "latency":
            counts, said = latency_counts(cfg, trial.info, trial.model, trial.dense, trial.groups, method, allocator,
                                          budget, ctx, timing_protocol(cfg, trial.info.device),
                                          trial.train_loader.num_classes)
        else:
            counts, said = allocator.allocate(trial.model, trial.groups, budget, ctx), allocator.summary()
        assert_same_on_all_ranks({k: torch.tensor([v]) for k, v in counts.items()}, trial.info)
        method.set_counts(counts)
        trial.allocation = {"allocator": allocator.name, **said}
    # the target and how it was met are the trial's own figures, beside its measured speed-up
    trial.summary.update({k: v for k, v in trial.allocation.items() if k.startswith("target_")})


def prune(trial: Trial, resume: Resume) -> None:
    """The pruning phase of a training-aware method (nothing to train for a one-shot one)."""
    method, model = trial.method, trial.model
    method.prepare(model)  # gates, attention layers, rescaling: before the backend and before resuming
    if not resume.restore_pruning(model, method) and trial.prune_epochs:
        method.on_train_start(model, steps_per_epoch=optimizer_steps(len(trial.train_loader), trial.cfg.train.grad_accum),
                              epochs=trial.prune_epochs)
    first = resume.first_epoch("prune")
    if first >= trial.prune_epochs:
        return
    with trial.phase("prune", first, trial.prune_epochs, resume.optimizer_state("prune"), method) as phase:
        for epoch in range(first, trial.prune_epochs):
            metrics = {"epoch": epoch + 1, "phase": "prune", **trial.epoch_done(phase.module, phase.train_epoch(epoch))}
            trial.log.metrics(metrics, step=epoch + 1)
            trial.report(metrics)
            trial.checkpoint("prune", epoch + 1, phase.module, phase.state_dict(), method=method.state(),
                             counts=dict(method.counts), allocation=json.dumps(trial.allocation))
    trial.model = phase.module


def cut(trial: Trial) -> None:
    """Keep-masks (agreed on every rank) → plain architecture → physical removal → fresh BN statistics."""
    cfg, info, method, model = trial.cfg, trial.info, trial.method, trial.model
    ctx = trial.select_context(method.calibration_samples())
    if trial.prune_epochs:
        # the model as the pruning phase left it (SFP: soft-masked, the accuracy its paper reports)
        trial.summary.update({f"masked_{k}": v for k, v in trial.evaluate().items()})
    masks = method.keep_masks(model, ctx)
    assert_same_on_all_ranks(masks, info)
    method.finalize(model, masks)  # back to the plain architecture, constants folded
    decided = {**method.summary(), **trial.allocation}  # lossvar's δ and probes: its allocator's
    trial.summary.update({f"method_{k}": v for k, v in decided.items()
                          if isinstance(v, int | float) and not k.startswith("target_")})
    apply_masks(model, trial.groups, masks)
    prune_model(model, trial.groups, masks, cfg.data.image_size)
    trial.masks = masks
    trial.summary.update({f"pruned_{k}": v for k, v in trial.evaluate().items()})  # before any fine-tune
    if cfg.train.bn_recalib_batches:
        # the surviving channels see other inputs now: fresh BN statistics, no gradient step
        recalibrate_bn(model, trial.train_loader, info, max_batches=cfg.train.bn_recalib_batches)
        trial.summary.update({f"recal_{k}": v for k, v in trial.evaluate().items()})


def timing_protocol(cfg: Config, device: torch.device) -> TimingConfig:
    """How a trial on ``device`` times its models: with every core (or measure.threads), whatever
    a Ray worker's own thread count, in the precision and memory format the model trained with."""
    return TimingConfig.from_config(cfg.measure, device, amp_dtype(cfg.train.amp, device),
                                    use_channels_last(cfg.train.channels_last, device))


def measure(trial: Trial) -> None:
    """Rank 0 times dense and pruned side by side while the other ranks wait; report the cut.
    ``measure.compile: both`` times them compiled too, kept beside the eager figures."""
    cfg, info = trial.cfg, trial.info
    result = None
    if info.is_main:
        protocol = timing_protocol(cfg, info.device)
        result = compare(copy.deepcopy(trial.dense), copy.deepcopy(trial.model), cfg.data.image_size, protocol)
        if cfg.measure.compile == "both":
            compiled = compare(copy.deepcopy(trial.dense), copy.deepcopy(trial.model), cfg.data.image_size,
                               protocol.replace(compile=True))
            result.update({f"compiled_{k}": compiled[k] for k in SPEED_KEYS})
    barrier(info)
    trial.summary.update(broadcast_object(result, info))
    trial.report({"epoch": trial.prune_epochs, "phase": "cut", **trial.summary})


def finetune(trial: Trial, resume: Resume) -> None:
    """Fine-tune the cut model, a checkpoint per epoch; the last epoch is reported by :func:`save`."""
    spec = make_spec(trial.model, trial.cfg.model.arch, trial.train_loader.num_classes,
                     image_size=trial.cfg.data.image_size)
    first = resume.first_epoch("finetune")
    if first >= trial.ft_epochs:
        return
    with trial.phase("finetune", first, trial.ft_epochs, resume.optimizer_state("finetune")) as phase:
        for epoch in range(first, trial.ft_epochs):
            metrics = {"epoch": trial.prune_epochs + epoch + 1, "phase": "finetune",
                       **trial.epoch_done(phase.module, phase.train_epoch(epoch)), **trial.summary}
            trial.log.metrics({k: v for k, v in metrics.items() if not k.startswith(("dense_", "pruned_"))},
                              step=metrics["epoch"])
            trial.last_metrics.update(metrics)
            if epoch + 1 < trial.ft_epochs:
                # the last epoch is reported after the model is saved (:func:`save`): a scheduler
                # that stops the trial on that report must not lose the model
                trial.report(metrics)
            trial.checkpoint("finetune", epoch + 1, phase.module, phase.state_dict(), spec=json.dumps(spec),
                             summary=json.dumps(trial.summary))
    trial.model = phase.module


def save(trial: Trial) -> dict[str, Any]:
    """Rank 0 saves spec + safetensors, the width plot and the MLflow run; every rank returns the metrics."""
    cfg, info, model = trial.cfg, trial.info, trial.model
    total_epochs = trial.prune_epochs + trial.ft_epochs
    final = {**trial.summary, **trial.last_metrics, **trial.evaluate(), "epochs": total_epochs,
             "wall_s": time.perf_counter() - trial.t_start, "started_at": trial.started_at}
    final["method"], final["prune_ratio"] = cfg.prune.method, cfg.prune.prune_ratio
    if cfg.prune.target_speedup is not None:
        final["target_speedup"] = cfg.prune.target_speedup
    model_dir = trial.out / "model"
    if info.is_main:
        spec = make_spec(model, cfg.model.arch, trial.train_loader.num_classes, image_size=cfg.data.image_size)
        spec.update(config=config_to_dict(cfg), metrics={k: v for k, v in final.items() if not isinstance(v, str)},
                    method_summary={**trial.method.summary(), **trial.allocation, **trial.blocks})
        save_pruned(model, model_dir, spec)
        plot = None
        if trial.masks is not None:
            dense_w = {g.name: g.size for g in trial.groups}
            kept_w = {g.name: int(trial.masks[g.name].sum()) for g in trial.groups}
            budget = (f"target {cfg.prune.target_speedup:.2f}x" if cfg.prune.target_speedup is not None
                      else f"ratio {cfg.prune.prune_ratio:.2f}")
            plot = width_plot(dense_w, kept_w, f"{cfg.model.arch} · {cfg.prune.method} · {budget}",
                              trial.out / "widths.png")
        # at the last epoch's step, logged after it: MLflow's "latest" value is then this final
        # evaluation (without a step it went to step 0 and the UI showed the last epoch's figure)
        trial.log.metrics({k: v for k, v in final.items() if not k.startswith("dense_") or k == "dense_val_top1"},
                          step=total_epochs)
        trial.log.finish(model_dir, plot)
    final["model_dir"] = str(model_dir)
    final["run_id"] = broadcast_object(trial.log.run_id, info)
    barrier(info)
    final.update(epoch=total_epochs, phase="final", final=1, ended_at=time.time())
    trial.report(final)
    return final


def run_trial(cfg: Config, report: Reporter | None = None, run_name: str | None = None,
              restart: bool = False) -> dict[str, Any]:
    """Prune one model as ``cfg`` says; returns the final metrics (the same on every rank).
    ``restart`` discards an earlier run's checkpoint in ``output_dir`` instead of resuming it."""
    check_config(cfg)  # the boundary: the CLI, a Ray worker and a test all come through here
    info = init_distributed()
    prepare_output(cfg, info, restart)
    resume = Resume.read(Path(cfg.output_dir) / CHECKPOINT, cfg)  # other settings: ConfigError
    trial = setup(cfg, info, report, run_name)
    try:
        if resume.phase == "finetune":
            resume.restore_cut(trial)
        else:
            trial.summary = {f"dense_{k}": v for k, v in trial.evaluate().items()}
            drop_blocks(trial)
            allocate(trial, resume)
            prune(trial, resume)
            cut(trial)
            measure(trial)
        finetune(trial, resume)
        return save(trial)
    except (KeyboardInterrupt, SystemExit):
        trial.log.end("KILLED")  # Ctrl-C, or SIGTERM turned into SystemExit by the CLI
        raise
    except BaseException:
        trial.log.end("FAILED")
        raise


# --- the dense baseline ---------------------------------------------------------------------------
def baseline_path(cfg: Config) -> Path:
    """Where the dense baseline of this model/data/budget lives; the key makes reruns reuse it."""
    import hashlib

    key = json.dumps([cfg.model.arch, cfg.model.weights, str(Path(cfg.data.root).resolve()), cfg.data.image_size,
                      cfg.data.augment, cfg.baseline.epochs, cfg.baseline.lr, cfg.baseline.warmup_epochs, cfg.seed])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cfg.output_dir) / "baseline" / f"{cfg.model.arch}-{digest}.safetensors"


def run_pretrain(cfg: Config, report: Reporter | None = None) -> Path:
    """Train the dense model for ``baseline.epochs`` so every trial starts from the same weights
    (``cfg`` checked by the caller: the CLI, or the search before its trials)."""
    from safetensors.torch import save_file

    info = init_distributed()
    report = report or _print_report(info)
    torch.manual_seed(cfg.seed)
    train_loader = build_loader(cfg.data, "train", info.rank, info.world, info.device, cfg.seed)
    val_loader = build_loader(cfg.data, "val", info.rank, info.world, info.device, cfg.seed)
    model = build_model(cfg.model.arch, train_loader.num_classes, cfg.model.weights).to(info.device)
    train_b = cfg.train.model_copy(update={"lr": cfg.baseline.lr, "warmup_epochs": cfg.baseline.warmup_epochs})
    amp = amp_dtype(cfg.train.amp, info.device)
    with TrainPhase(model, train_b, info, train_loader, cfg.data.batch_size, cfg.baseline.epochs,
                    desc="baseline") as phase:
        for epoch in range(cfg.baseline.epochs):
            stats = phase.train_epoch(epoch)
            report({"epoch": epoch + 1, "phase": "baseline", **stats,
                    **evaluate(phase.module, val_loader, info, amp)})
    model = phase.module
    path = baseline_path(cfg)
    if info.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, path)
    barrier(info)
    return path
