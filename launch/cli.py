"""The ``prunepipe`` command line.

Every subcommand validates its inputs before any work and reports a problem as one line,
``prunepipe: error: ...``, with exit status 2: no traceback for a user's mistake.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from launch.signals import Terminated, bounded_exit
from pipeline.config import ConfigError, absolutize, check_tracking_uri, load_config
from pipeline.errors import PrunepipeError

# models:/NAME@ALIAS or models:/NAME/VERSION: checked here, before MLflow is asked
_MODEL_URI = re.compile(r"models:/[^/@]+(@[^/@]+|/[0-9]+)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. prune.prune_ratio=0.4")


def _read(args: argparse.Namespace):
    """The config file with its overrides, validated against the core schema, paths absolute."""
    return absolutize(load_config(args.config, args.overrides))


def _load(args: argparse.Namespace, for_search: bool = False):
    """The config, also checked for what only the recipe knows (method names and options; for a
    search, every method and scope it may draw), so a bad ``prune.method`` or option stops here,
    before any work. ``prune`` leaves this to ``run_trial``, which checks every trial it runs."""
    from launch.checks import check_config

    return check_config(_read(args), for_search=for_search)


def cmd_data(args: argparse.Namespace) -> int:
    from pipeline.data.convert import DatasetError, write_digits, write_synthetic

    if args.kind == "imagenet":
        from pipeline.data.imagenet import ConvertOptions, convert_imagenet

        result = convert_imagenet(ConvertOptions(
            src=args.src, out=args.out, per_shard=1024 if args.per_shard is None else args.per_shard,
            workers=args.workers, seed=args.seed, val_labels=args.val_labels, devkit=args.devkit,
            overwrite=args.overwrite, stats=args.stats, image_size=224 if args.image_size is None else args.image_size))
        print(result.summary())
        return 0
    given = [flag for flag, value in (("--src", args.src), ("--val-labels", args.val_labels), ("--devkit", args.devkit),
                                      ("--workers", args.workers), ("--overwrite", args.overwrite or None),
                                      ("--stats", args.stats or None)) if value is not None]
    if given:
        raise DatasetError(f"{given[0]}: only for `prunepipe data imagenet`")
    size = 32 if args.image_size is None else args.image_size
    per_shard = 256 if args.per_shard is None else args.per_shard
    if args.kind == "digits":
        path = write_digits(args.out, image_size=size, per_shard=per_shard, seed=args.seed)
    else:
        path = write_synthetic(args.out, num_classes=args.classes, image_size=size,
                               train_samples=args.train_samples, val_samples=args.val_samples,
                               per_shard=per_shard, seed=args.seed)
    print(f"wrote {path}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from launch.recipe import run_trial
    from pipeline.distributed import is_main_process

    final = run_trial(_read(args), restart=args.restart)  # checks the config before any work
    if is_main_process():
        print(f"pruned model: {final['model_dir']}  top-1 {final['val_top1']:.4f}  "
              f"MACs -{final['macs_reduction']:.1%}  {final['img_s']:.0f} img/s ({final['speedup']:.2f}x)")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from launch.outputs import check_writable
    from launch.recipe import run_pretrain

    cfg = _load(args)
    check_writable(cfg)
    print(f"baseline weights: {run_pretrain(cfg)}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from launch.outputs import check_writable
    from launch.search import ensure_baseline, format_table, run_search
    from pipeline.data.manifest import read_manifest

    cfg = _load(args, for_search=True)
    if not cfg.search.space:
        raise ConfigError("search.space: empty; name at least one key to search (see configs/demo.yaml)")
    if args.trust_state and not args.resume:
        raise ConfigError("--trust-state: only with --resume (it lets a resume load state others could have written)")
    if args.resume:
        from launch.resume import check

        check(cfg, args.trust_state)  # nothing to resume, or other settings: one line, before a baseline is trained
    if cfg.data.backend != "synthetic":
        read_manifest(cfg.data.root)  # here, as one line: inside Ray it is a worker's traceback
    check_writable(cfg)
    cfg = ensure_baseline(cfg, verbose=args.verbose)
    result = run_search(cfg, verbose=args.verbose, resume=args.resume, trust_state=args.trust_state)
    print()
    print(format_table(result["rows"], result["best"], result.get("why")))
    if result.get("plot"):
        print(f"Pareto plot: {result['plot']}")
    return 0 if result["best"] is not None else 1


def cmd_show(args: argparse.Namespace) -> int:
    from pipeline.measure import count_macs, count_params
    from pipeline.spec import stage_widths

    source = args.model
    model, spec = _load_any(source, args.tracking_uri)
    size = int(spec.get("image_size", 224))
    print(f"{source}: {spec['arch']}, {spec['num_classes']} classes, input {size}x{size}")
    print(f"MACs {count_macs(model, size) / 1e6:.2f} M   params {count_params(model) / 1e6:.3f} M")
    metrics = spec.get("metrics", {})
    if metrics:
        shown = ("val_top1", "dense_val_top1", "macs_reduction", "img_s", "speedup", "speedup_efficiency")
        print("   ".join(f"{k} {metrics[k]:.4g}" for k in shown if metrics.get(k) is not None))
    print(f"{'stage':<7} {'blocks':>6} {'out':>5}  inner widths per block")
    for row in stage_widths(spec):
        gone = f"  (removed: {', '.join(str(i) for i in row['removed'])})" if row.get("removed") else ""
        print(f"{row['stage']:<7} {row['blocks']:>6} {row['out']:>5}  {' '.join(row['inner'])}{gone}")
    removed = spec.get("removed_blocks", [])
    if removed:
        print(f"removed blocks ({len(removed)}): {', '.join(removed)}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from pipeline.promote import promote

    uri = args.tracking_uri
    tol = args.tolerance
    if args.config:
        cfg = absolutize(load_config(args.config))
        uri = uri or cfg.registry.tracking_uri
        tol = cfg.registry.promote_tolerance if tol is None else tol
    if uri is None:
        raise ConfigError("promote: give --tracking-uri or --config")
    _check_store(uri)
    decision = promote(args.name, uri, 0.005 if tol is None else tol)
    print(decision.message)
    return 0


def _check_store(uri: str) -> None:
    """A tracking URI MLflow can open, and for SQLite an existing file: a lookup must not
    create an empty database where a user mistyped the path."""
    try:
        check_tracking_uri(uri)
    except ValueError as err:
        raise ConfigError(f"--tracking-uri {uri}: {err}") from None
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"--tracking-uri {uri}: no MLflow store there")


def _load_registered(source: str, tracking_uri: str | None):
    """A ``models:/`` URI → (model, spec), from the store given (or $MLFLOW_TRACKING_URI)."""
    if not _MODEL_URI.fullmatch(source):
        raise ConfigError(f"{source!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError(f"{source}: give --tracking-uri (or set MLFLOW_TRACKING_URI) to say which registry")
    _check_store(uri)
    from pipeline import registry

    return registry.load_registered(source, uri)


def _load_any(source: str, tracking_uri: str | None):
    """A pruned-model folder or a ``models:/`` URI → (model, spec)."""
    from pipeline.spec import load_pruned

    return _load_registered(source, tracking_uri) if source.startswith("models:/") else load_pruned(Path(source))


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from pipeline.bench import BenchModel, distinct_labels, format_rows, plot_speedups, run_bench
    from pipeline.models import build_model

    loaded = [(src, *_load_any(src, args.tracking_uri)) for src in args.models]
    first_spec = loaded[0][2]
    if args.dense == "auto":
        dense = build_model(first_spec["arch"], int(first_spec["num_classes"]))
        dense_label = f"dense {first_spec['arch']}"
    else:
        dense, _ = _load_any(args.dense, args.tracking_uri)
        dense_label = f"dense {args.dense}"
    size = args.image_size or int(first_spec.get("image_size", 224))
    if not 8 <= size <= 1024:
        raise ConfigError(f"--image-size {size}: allowed range is 8..1024")
    if any(b < 1 or b > 4096 for b in args.batch_sizes):
        raise ConfigError(f"--batch-sizes {args.batch_sizes}: each must be in 1..4096")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no GPU is visible here")
    labels = distinct_labels([src for src, _, _ in loaded])
    models = [BenchModel(dense_label, dense)] + [BenchModel(label, m) for label, (_, m, _) in zip(labels, loaded, strict=True)]
    try:
        rows = run_bench(models, size, args.batch_sizes, args.precision, [c == "on" for c in args.channels_last],
                         [c == "on" for c in args.compile], rounds=args.rounds, device=device,
                         fold_bn=not args.no_fold_bn)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    table = format_rows(rows)
    print(f"# {device}, {torch.get_num_threads()} threads, {size}x{size}, BN folded: {not args.no_fold_bn}, "
          f"{args.rounds} interleaved rounds per setting")
    print(table)
    if any(not r.reliable for r in rows):
        print("(noisy): the per-round speed-ups spread by more than 10 % (IQR), or other processes used more than "
              "15 % of the CPUs while timing: re-run alone")
    if args.out:
        Path(args.out).write_text(table + "\n")
    plot = plot_speedups(rows, args.plot) if args.plot else None
    if args.log_mlflow:
        _log_bench(args, table, plot)
    return 0


def _log_bench(args: argparse.Namespace, table: str, plot: Path | None) -> None:
    """Attach the table (and plot) to the run behind every registered version benchmarked."""
    import tempfile

    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.tracking_uri) if args.tracking_uri else MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.md"
        path.write_text(table + "\n")
        for src in args.models:
            if not src.startswith("models:/"):
                continue
            from pipeline import registry

            mv = registry.resolve_version(client, src, args.tracking_uri)
            client.log_artifact(mv.run_id, str(path), artifact_path="bench")
            if plot is not None:
                client.log_artifact(mv.run_id, str(plot), artifact_path="bench")
            print(f"logged to the run of {src} (run {mv.run_id})")


def cmd_latency_table(args: argparse.Namespace) -> int:
    """Build (or read back) the latency table of the config's model on this device, in the
    timing mode its trials measure in, and print what it holds and how long it took."""
    import torch

    from launch.recipe import timing_protocol
    from launch.speed_target import trial_table
    from pipeline.data.loaders import build_loader
    from pipeline.models import build_model

    cfg = _read(args)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    classes = build_loader(cfg.data, "val", 0, 1, device, cfg.seed).num_classes
    dense = build_model(cfg.model.arch, classes, cfg.model.weights).eval().to(device)
    table, path, built = trial_table(cfg, dense, timing_protocol(cfg, device), classes, rebuild=args.rebuild)
    print(table.summary())
    print(f"{'built and written to' if built else 'read from'} {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """ONNX with a dynamic batch, checked against PyTorch, timed in ONNX Runtime against dense;
    for a ``models:/`` URI also logged to the version's run and its numbers set as version tags."""
    from pipeline.export import export_and_time
    from pipeline.models import build_model

    if not args.tolerance > 0:
        raise ConfigError(f"--tolerance {args.tolerance}: must be > 0")
    # --out is the folder the .onnx files go into: an existing file there (or above it) stops
    # now, before the model is loaded, not as mkdir's traceback after it
    for folder in (Path(args.out), *Path(args.out).parents):
        if folder.exists():
            if not folder.is_dir():
                where = "is" if folder == Path(args.out) else f"lies under {str(folder)!r}, which is"
                raise ConfigError(f"--out {args.out!r} {where} a file, not a folder (--out names the folder "
                                  "the .onnx files are written into)")
            break
    model, spec = _load_any(args.model, args.tracking_uri)
    size = int(spec.get("image_size", 224))
    name = args.model.removeprefix("models:/").replace("/", "-").replace("@", "-") if args.model.startswith("models:/") \
        else Path(args.model).resolve().name
    out = Path(args.out) / f"{name}.onnx"
    dense = build_model(spec["arch"], int(spec["num_classes"]))
    report = export_and_time(model, dense, size, out, tolerance=args.tolerance, batch_size=args.batch_size,
                             rounds=args.rounds, threads=args.threads)  # ExportError: exit 1, one line
    print(report.summary())
    if args.model.startswith("models:/"):
        from mlflow.tracking import MlflowClient

        from pipeline import registry

        client = MlflowClient(args.tracking_uri) if args.tracking_uri else MlflowClient()
        mv = registry.resolve_version(client, args.model, args.tracking_uri)
        client.log_artifact(mv.run_id, str(report.path), artifact_path="export")
        for key, value in report.metrics().items():
            client.set_model_version_tag(mv.name, mv.version, key, f"{value:.6g}")
        print(f"logged export/{report.path.name} to the run of {mv.name} v{mv.version} (run {mv.run_id})")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Upload what trials kept in their journals while the MLflow store was unreachable."""
    from launch.sync import format_rows, sync_output

    if args.tracking_uri is not None:
        _check_store(args.tracking_uri)
    rows = sync_output(args.output_dir, args.tracking_uri)
    print(format_rows(rows) if rows else f"{args.output_dir}: nothing to sync (every journal is already in the store)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunepipe", description="Filter pruning for ResNet-class models: "
                                     "prune, search with Ray Tune, register with MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="write a dataset as WebDataset shards", description="Write WebDataset shards "
                       "(.jpg + .cls), their DALI index files and a dataset.json manifest.")
    p.add_argument("kind", choices=["digits", "synthetic", "imagenet"], help="digits: scikit-learn's real handwritten "
                   "digits; synthetic: random class-coloured images; imagenet: convert an ILSVRC-2012 folder (--src)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-size", type=int, default=None, help="image size recorded in the manifest "
                   "(default 32; imagenet: 224, the training crop)")
    p.add_argument("--classes", type=int, default=10, help="synthetic only")
    p.add_argument("--train-samples", type=int, default=512, help="synthetic only")
    p.add_argument("--val-samples", type=int, default=128, help="synthetic only")
    p.add_argument("--per-shard", type=int, default=None, help="samples per tar shard (default 256; imagenet: "
                   "at most 1024, shards of a split differ by at most one)")
    p.add_argument("--seed", type=int, default=0, help="split / shard-order seed")
    p.add_argument("--src", type=Path, default=None, help="imagenet: folder holding train/<wnid>/ and val/")
    p.add_argument("--val-labels", type=Path, default=None, help="imagenet, flat val/: the devkit's "
                   "ILSVRC2012_validation_ground_truth.txt, Kaggle's LOC_val_solution.csv or an ImageId,label CSV")
    p.add_argument("--devkit", type=Path, default=None, help="imagenet, flat val/: the ILSVRC2012_devkit_t12 folder "
                   "(ground truth + meta.mat); found in --src when there")
    p.add_argument("--workers", type=int, default=None, help="imagenet: worker processes (default: CPU count)")
    p.add_argument("--overwrite", action="store_true", help="imagenet: replace a conversion made with other "
                   "options in --out (by default a rerun continues an interrupted one)")
    p.add_argument("--stats", type=int, default=0, metavar="N", help="imagenet: compute mean/std from N seeded train "
                   "images (default 0: ImageNet's standard values)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("prune", help="run one pruning trial (standalone or under torchrun)",
                       description="Prune, measure and fine-tune one model; save it (spec + safetensors) in "
                       "output_dir/model and log the trial as an MLflow run (registry.enabled). Registering a "
                       "version is the search's: `prunepipe search` registers its winner. Runs the same under "
                       "`torchrun --nproc_per_node=N -m launch.cli prune ...`.")
    _add_config_args(p)
    p.add_argument("--restart", action="store_true", help="discard the checkpoint and results of an earlier run "
                   "in output_dir and start afresh (by default a rerun resumes it, and refuses one of other settings)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("pretrain", help="train the dense baseline", description="Train the dense model for "
                       "baseline.epochs and write its weights (safetensors).")
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("search", help="Ray Tune search over pruning settings",
                       description="Search search.space with Ray Tune (each trial a multi-worker DDP job), "
                       "print a table, register the best model as 'challenger'.")
    _add_config_args(p)
    p.add_argument("--verbose", action="store_true", help="show every worker's output and Ray's status box (by "
                   "default one line per trial event; the full logs are in each trial's logs/ folder and MLflow run)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search in output_dir/tune/NAME "
                   "(same config and overrides): finished trials are kept, unfinished ones resume from their last "
                   "epoch's checkpoint; by default a rerun starts a new search beside it")
    p.add_argument("--trust-state", action="store_true", help="with --resume: load the search's pickled state even "
                   "if another user owns it or its folder is group- or world-writable (a team's shared output_dir); "
                   "unpickling runs code, so only where you trust everyone who can write there")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("show", help="describe a pruned model", description="Load a pruned model from a folder or "
                       "a models:/name@alias URI and print its widths, MACs and params.")
    p.add_argument("model", help="a pruned-model folder, or models:/NAME@ALIAS, or models:/NAME/VERSION")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("bench", help="time dense and pruned models side by side",
                       description="Time a dense model and pruned ones (folders or models:/ URIs) in one run, "
                       "interleaved: images/s, speed-up with its interquartile range, latency p50/p90 at batch 1, "
                       "across batch sizes, precisions, channels_last and torch.compile.")
    p.add_argument("models", nargs="+", help="pruned-model folders or models:/NAME@ALIAS / models:/NAME/VERSION")
    p.add_argument("--dense", default="auto", help="the reference: 'auto' (the dense base architecture of the "
                   "first model) or a model folder / URI")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--image-size", type=int, default=None, help="default: the first model's spec")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32"])
    p.add_argument("--channels-last", nargs="+", choices=["off", "on"], default=["off"])
    p.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off"])
    p.add_argument("--rounds", type=int, default=12, choices=range(2, 1001), metavar="N")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-fold-bn", action="store_true", help="time BatchNorm as a separate op")
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    p.add_argument("--plot", default=None, help="write a speed-up vs MACs-reduction plot (PNG) here")
    p.add_argument("--log-mlflow", action="store_true", help="attach the table and plot to each models:/ version's run")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("latency-table", help="time the model's pieces on this device (the latency allocator's table)",
                       description="Time every piece of the config's architecture (each conv with the BatchNorm, "
                       "ReLU and residual add after it) at the widths pruning can give it, in the measure section's "
                       "batch, precision and memory format, and cache the table for the trials of this device.")
    _add_config_args(p)
    p.add_argument("--rebuild", action="store_true", help="time it again even if a valid cached table exists")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_latency_table)

    p = sub.add_parser("export", help="export a pruned model to ONNX and time it in ONNX Runtime",
                       description="Write MODEL as ONNX (dynamic batch), check its logits against PyTorch's, and "
                       "time it against the dense base architecture in ONNX Runtime on the CPU (interleaved rounds). "
                       "For a models:/ URI the file is logged to the version's run and its numbers set as version tags.")
    p.add_argument("model", help="a pruned-model folder, or models:/NAME@ALIAS, or models:/NAME/VERSION")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", default=".", help="folder for NAME.onnx and NAME.dense.onnx (default: here)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest |ONNX - PyTorch| logit allowed")
    p.add_argument("--batch-size", type=int, default=32, choices=range(1, 4097), metavar="N", help="timing batch")
    p.add_argument("--rounds", type=int, default=12, choices=range(2, 1001), metavar="N")
    p.add_argument("--threads", type=int, default=None, choices=range(1, 1025), metavar="N",
                   help="ONNX Runtime intra-op threads (default: its own choice)")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("promote", help="move 'champion' to the challenger if it earns it",
                       description="Promote the 'challenger' version to 'champion' when it is at least as accurate "
                       "within a tolerance and measured faster; otherwise say why not.")
    p.add_argument("name", help="registered model name")
    p.add_argument("--config", default=None, help="take the tracking URI and tolerance from this config")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--tolerance", type=float, default=None, help="top-1 drop allowed (default 0.005)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("sync", help="upload trials kept on disk while MLflow was unreachable",
                       description="Replay every trial journal under OUTPUT_DIR that has records the MLflow store "
                       "never got (params, metrics, the model, a registration): into the run it had, or a new one. "
                       "Idempotent: a second sync uploads nothing.")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a trial's or a search's output_dir")
    p.add_argument("--tracking-uri", default=None, help="upload there instead of the store each trial was "
                   "configured with")
    p.set_defaults(func=cmd_sync)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # The deepspeed launcher runs `python -m launch.cli --local_rank=N <subcommand> ...` (unless
    # --no_local_rank); it also sets LOCAL_RANK, which pipeline.distributed reads, so the flag
    # is accepted and only fills LOCAL_RANK where a launcher left it unset.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from pipeline.distributed import shutdown_distributed

    try:
        with bounded_exit():
            code = args.func(args)
    except KeyboardInterrupt:
        # one line, not a 19-frame traceback; the recipe has ended the MLflow run as KILLED
        print(f"prunepipe: interrupted (Ctrl-C) during `{args.command}`", file=sys.stderr)
        return 130
    except Terminated:
        print(f"prunepipe: terminated (SIGTERM) during `{args.command}`", file=sys.stderr)
        return 143
    except PrunepipeError as err:
        print(f"prunepipe: error: {err}", file=sys.stderr)
        code = err.exit_code
    # Only on a clean or user-error exit: with an unexpected error a collective may still be in
    # flight, where destroying the group can block; torchrun tears that job down anyway.
    shutdown_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())
