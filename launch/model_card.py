"""The model card: what a registered version is, in Markdown, as its MLflow description.

Built from the pruned model's ``spec.json`` (architecture, the trial's full config, its final
metrics) and, where the search re-measured the speed alone, from the search's row. MLflow's UI
renders a version's description as Markdown on the version page. It sits in the launch layer
because it says which setting decided the widths, and only the method knows that
(:meth:`methods.Method.budget_knob`); it is built when the search registers its best trial.
"""

from __future__ import annotations

from typing import Any

WIDTHS_ARTIFACT = "plots/widths.png"  # where the trial logs its per-stage widths plot
CONFIG_ARTIFACT = "config/trial.yaml"  # where the trial logs its full resolved config


def _pct(v: Any) -> str:
    return f"{v:.1%}" if isinstance(v, int | float) else "n/a"


def _num(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, int | float) else "n/a"


def _mega(v: Any, fmt: str) -> str:
    return f"{v / 1e6:{fmt}} M" if isinstance(v, int | float) else "n/a"


def _knobs(prune: dict[str, Any]) -> str:
    """The trial's prune settings, led by the one that decided the widths as the method
    describes it. The uniform ``prune_ratio`` is left out where a budget of the method's own
    (one of its options) decided them: the method ignored it, and listing it would mislead."""
    from methods import budget_knob  # torch: only when a card is built, not when `sync` replays a trial

    method = prune.get("method", "?")
    options = (prune.get("options") or {}).get(method) or {}
    knob = budget_knob(method, prune)
    rest = [f"scope={prune.get('scope')}", f"round_to={prune.get('round_to')}"]
    rest += [f"{k}={v}" for k, v in sorted(options.items()) if k != knob.option]
    return f"{knob.setting}={knob.value} decided the widths; " + ", ".join(rest)


def build_card(spec: dict[str, Any], run_id: str | None = None, measured: dict[str, Any] | None = None) -> str:
    """Markdown card for one pruned model. ``measured`` (a search row) overrides the spec's
    metrics, e.g. a speed-up re-measured alone after the trials."""
    if not isinstance(spec.get("arch"), str):
        raise ValueError("spec.arch: a model card needs the base architecture")
    cfg = spec.get("config") or {}
    m = {**(spec.get("metrics") or {}), **{k: v for k, v in (measured or {}).items() if isinstance(v, int | float)}}
    prune, data, train = cfg.get("prune") or {}, cfg.get("data") or {}, cfg.get("train") or {}
    size = spec.get("image_size", data.get("image_size"))
    reliable = m.get("speed_reliable")
    speed = (f"{_num(m.get('speedup'), '.2f')}x (interquartile range {_num(m.get('speedup_low'), '.2f')}–"
             f"{_num(m.get('speedup_high'), '.2f')}; {_num(m.get('img_s'), '.0f')} vs dense "
             f"{_num(m.get('dense_img_s'), '.0f')} img/s)")
    if reliable == 0:
        speed += " — **noisy: another job shared the machine; re-measure alone (`prunepipe bench`)**"
    if (measured or {}).get("remeasured"):
        speed += ", re-measured alone after the search"
    lines = [
        # plain text first: the registry's versions table previews a description's first line raw
        f"{spec['arch']} pruned with {prune.get('method', '?')}: top-1 {_pct(m.get('val_top1'))} "
        f"(dense {_pct(m.get('dense_val_top1'))}), MACs −{_pct(m.get('macs_reduction'))}, "
        f"{_num(m.get('speedup'), '.2f')}x measured",
        "",
        "| | pruned | dense |",
        "|---|---|---|",
        f"| top-1 | {_pct(m.get('val_top1'))} | {_pct(m.get('dense_val_top1'))} |",
        f"| top-5 | {_pct(m.get('val_top5'))} | {_pct(m.get('dense_val_top5'))} |",
        f"| MACs | {_mega(m.get('macs'), '.1f')} | {_mega(m.get('dense_macs'), '.1f')} |",
        f"| params | {_mega(m.get('params'), '.3f')} | {_mega(m.get('dense_params'), '.3f')} |",
        "",
        f"- **Base architecture**: torchvision `{spec['arch']}`, {spec.get('num_classes')} classes, input {size}×{size}",
        f"- **Method and knobs**: `{prune.get('method', '?')}` ({_knobs(prune)}); "
        f"{train.get('epochs', '?')} fine-tune epochs, backend {train.get('backend', '?')}",
        f"- **Data**: `{data.get('root', '?')}` ({data.get('backend', '?')} loader; see the run's dataset input)",
        f"- **Reduction**: MACs −{_pct(m.get('macs_reduction'))}, params −{_pct(m.get('params_reduction'))}",
        f"- **Measured speed-up**: {speed}; efficiency {_num(m.get('speedup_efficiency'), '.2f')} "
        "(1.0 = every MAC removed became speed)",
        f"- **Per-stage widths**: run artifact `{WIDTHS_ARTIFACT}`" + (f" of run `{run_id}`" if run_id else ""),
        "",
        "**Reproduce** (the trial's full resolved config is a run artifact):",
        "",
        "```",
        f"mlflow artifacts download -r {run_id or 'RUN_ID'} -a {CONFIG_ARTIFACT} -d .",
        f"prunepipe prune {CONFIG_ARTIFACT}",
        "```",
        "",
        "Load: `mlflow.pyfunc.load_model(\"models:/NAME@ALIAS\")` (float32 images `(N, 3, H, W)` → logits), "
        "`prunepipe show models:/NAME@ALIAS`, or `prunepipe export models:/NAME@ALIAS --format onnx`.",
    ]
    return "\n".join(lines)
