"""The ``prunepipe`` command line.

Every subcommand validates its inputs before any work and reports a problem as one line,
``prunepipe: error: ...``, with exit status 2: no traceback for a user's mistake.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import ConfigError, absolutize, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. prune.prune_ratio=0.4")


def _load(args: argparse.Namespace):
    """The validated config: the core schema, then what only the recipe knows (method names and
    options), so a bad ``prune.method`` or option stops here, before any work."""
    from launch.recipe import check_config

    return check_config(absolutize(load_config(args.config, args.overrides)))


def cmd_data(args: argparse.Namespace) -> int:
    from pipeline.data.convert import write_digits, write_synthetic

    if args.kind == "digits":
        path = write_digits(args.out, image_size=args.image_size, per_shard=args.per_shard, seed=args.seed)
    else:
        path = write_synthetic(args.out, num_classes=args.classes, image_size=args.image_size,
                               train_samples=args.train_samples, val_samples=args.val_samples,
                               per_shard=args.per_shard, seed=args.seed)
    print(f"wrote {path}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from launch.recipe import run_trial

    cfg = _load(args)
    final = run_trial(cfg)
    from pipeline.distributed import init_distributed

    if init_distributed().is_main:
        print(f"pruned model: {final['model_dir']}  top-1 {final['val_top1']:.4f}  "
              f"MACs -{final['macs_reduction']:.1%}  {final['img_s']:.0f} img/s ({final['speedup']:.2f}x)")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from launch.recipe import run_pretrain

    print(f"baseline weights: {run_pretrain(_load(args))}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from launch.search import ensure_baseline, format_table, run_search

    cfg = _load(args)
    if not cfg.search.space:
        raise ConfigError("search.space: empty; name at least one key to search (see configs/demo.yaml)")
    cfg = ensure_baseline(cfg)
    result = run_search(cfg)
    print()
    print(format_table(result["rows"], result["best"]))
    return 0 if result["best"] is not None else 1


def cmd_show(args: argparse.Namespace) -> int:
    from pipeline import registry
    from pipeline.measure import count_macs, count_params
    from pipeline.spec import load_pruned, stage_widths

    source = args.model
    folder = registry.download_model(source, args.tracking_uri) if source.startswith("models:/") else Path(source)
    model, spec = load_pruned(folder)
    size = int(spec.get("image_size", 224))
    print(f"{source}: {spec['arch']}, {spec['num_classes']} classes, input {size}x{size}")
    print(f"MACs {count_macs(model, size) / 1e6:.2f} M   params {count_params(model) / 1e6:.3f} M")
    metrics = spec.get("metrics", {})
    if metrics:
        shown = ("val_top1", "dense_val_top1", "macs_reduction", "img_s", "speedup", "speedup_efficiency")
        print("   ".join(f"{k} {metrics[k]:.4g}" for k in shown if k in metrics))
    print(f"{'stage':<7} {'blocks':>6} {'out':>5}  inner widths per block")
    for row in stage_widths(spec):
        print(f"{row['stage']:<7} {row['blocks']:>6} {row['out']:>5}  {' '.join(row['inner'])}")
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
    decision = promote(args.name, uri, 0.005 if tol is None else tol)
    print(decision.message)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunepipe", description="Filter pruning for ResNet-class models: "
                                     "prune, search with Ray Tune, register with MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="write a dataset as WebDataset shards", description="Write WebDataset shards "
                       "(.jpg + .cls) and a dataset.json manifest.")
    p.add_argument("kind", choices=["digits", "synthetic"], help="digits: scikit-learn's real handwritten digits; "
                   "synthetic: random class-coloured images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10, help="synthetic only")
    p.add_argument("--train-samples", type=int, default=512, help="synthetic only")
    p.add_argument("--val-samples", type=int, default=128, help="synthetic only")
    p.add_argument("--per-shard", type=int, default=256, help="samples per tar shard")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("prune", help="run one pruning trial (standalone or under torchrun)",
                       description="Prune, fine-tune, measure and register one model. Runs the same under "
                       "`torchrun --nproc_per_node=N -m launch.cli prune ...`.")
    _add_config_args(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("pretrain", help="train the dense baseline", description="Train the dense model for "
                       "baseline.epochs and write its weights (safetensors).")
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("search", help="Ray Tune search over pruning settings",
                       description="Search search.space with Ray Tune (each trial a multi-worker DDP job), "
                       "print a table, register the best model as 'challenger'.")
    _add_config_args(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("show", help="describe a pruned model", description="Load a pruned model from a folder or "
                       "a models:/name@alias URI and print its widths, MACs and params.")
    p.add_argument("model", help="a pruned-model folder, or models:/NAME@ALIAS, or models:/NAME/VERSION")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("promote", help="move 'champion' to the challenger if it earns it",
                       description="Promote the 'challenger' version to 'champion' when it is at least as accurate "
                       "within a tolerance and measured faster; otherwise say why not.")
    p.add_argument("name", help="registered model name")
    p.add_argument("--config", default=None, help="take the tracking URI and tolerance from this config")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--tolerance", type=float, default=None, help="top-1 drop allowed (default 0.005)")
    p.set_defaults(func=cmd_promote)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.data.convert import DatasetError
    from pipeline.models import WeightsError
    from pipeline.spec import SpecError

    user_errors: tuple[type[Exception], ...] = (ConfigError, DatasetError, SpecError, WeightsError)
    try:
        return args.func(args)
    except Exception as err:
        # the registry's errors, without importing MLflow here: a trial with registry.enabled=false
        # must run where MLflow is not installed, and only the registry module raises them
        registry = sys.modules.get("pipeline.registry")
        if registry is not None:
            user_errors += (registry.RegistryError,)
        if not isinstance(err, user_errors):
            raise
        print(f"prunepipe: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
