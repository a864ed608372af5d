import subprocess
import sys

import pytest

from launch.checks import check_config
from pipeline.config import ConfigError, build_config, load_config, parse_override
from tests.conftest import DEMO, ROOT


def test_shipped_configs_validate():
    for path in (ROOT / "configs").glob("*.yaml"):
        cfg = load_config(path)
        assert 0 <= cfg.prune.prune_ratio < 1


@pytest.mark.parametrize(
    "override, needle",
    [
        ("prune.prune_ratio=1.2", "prune.prune_ratio"),
        ("train.epochs=-1", "train.epochs"),
        ("train.epochs=many", "train.epochs"),
        ("prune.ratio=0.3", "prune.ratio: unknown key"),
        ("model.arch=vgg16", "model.arch"),
        ("prune.method=magic", "prune.method"),
        ("prune.options.bogus={a: 1}", "prune.options.bogus: unknown method"),
        ("prune.options.random={colour: 1}", "prune.options.random.colour: unknown key"),
        ("data.backend=dali9", "data.backend"),
        ("prune.scope=everything", "prune.scope"),
        ("train.backend=horovod", "train.backend = 'horovod': allowed values are ddp, deepspeed"),
        ("train.zero_stage=3", "train.zero_stage"),
        ("train.zero_stage=2", "train.zero_stage = 2: needs train.backend=deepspeed"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("data.image_size=2000", "data.image_size"),  # beyond what a pruned model's spec may hold
        ("search.space={prune.method: {grid: [l1, magic]}}", "search.space: prune.method: unknown method 'magic'"),
        ("search.space={prune.options.lossvar.colour: {choice: [1]}}", "lossvar has no option 'colour'"),
        ("search.space={prune.options.lossvar.delta: {choice: [-1]}}", "prune.options.lossvar.delta"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    # the core schema (load_config), then the launcher's method checks (check_config): both before work
    with pytest.raises(ConfigError) as err:
        check_config(load_config(DEMO, [override]))
    msg = str(err.value)
    assert needle in msg
    assert "\n" not in msg  # one line


def test_overrides_are_typed_and_applied():
    cfg = load_config(DEMO, ["prune.prune_ratio=0.25", "search.num_workers=3", "prune.method=random"])
    assert cfg.prune.prune_ratio == 0.25 and isinstance(cfg.prune.prune_ratio, float)
    assert cfg.search.num_workers == 3
    assert cfg.prune.method == "random"
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


@pytest.mark.parametrize("text, value", [("on", "on"), ("off", "off"), ("auto", "auto"), ("true", "on"),
                                         ("false", "off")])
def test_on_off_reads_as_written_although_yaml_makes_it_a_boolean(text, value):
    assert load_config(DEMO, [f"train.channels_last={text}"]).train.channels_last == value


def test_search_space_keys_must_exist():
    with pytest.raises(ConfigError, match="search.space"):
        build_config({"search": {"space": {"prune.nonsense": {"choice": [1, 2]}}}})
    with pytest.raises(ConfigError, match="exactly one"):
        build_config({"search": {"space": {"prune.prune_ratio": {"choice": [0.1], "uniform": [0.1, 0.2]}}}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_reports_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "prune", str(DEMO), "prune.prune_ratio=1.2", f"output_dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunepipe: error: prune.prune_ratio")
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing was written: it stopped before any work


def test_core_config_leaves_methods_to_the_launcher():
    # pipeline.config knows no method: a name it cannot know passes the schema, and the
    # launcher's check_config (which the CLI and the search run before any work) stops it
    cfg = load_config(DEMO, ["prune.method=magic"])
    with pytest.raises(ConfigError, match="prune.method"):
        check_config(cfg)


@pytest.mark.parametrize(
    "content, needle",
    [
        (None, "does not exist"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"gradient_accumulation_steps": 4}', "'gradient_accumulation_steps' comes from train.grad_accum"),
        ('{"bf16": {"enabled": true}}', "'bf16' comes from train.amp"),
        ('{"zero_optimization": {"stage": 3}}', "'zero_optimization.stage' comes from train.zero_stage"),
    ],
)
def test_deepspeed_override_file_is_checked(tmp_path, content, needle):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["train.backend=deepspeed", f"train.deepspeed_config={path}"])
    msg = str(err.value)
    assert msg.startswith("train.deepspeed_config") and needle in msg and "\n" not in msg


def test_deepspeed_config_needs_the_deepspeed_backend(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("{}")
    with pytest.raises(ConfigError, match="train.deepspeed_config: needs train.backend=deepspeed"):
        load_config(DEMO, [f"train.deepspeed_config={path}"])


def test_epoch_budget_is_checked_with_the_config_not_inside_the_trial():
    """``train.budget_epochs`` must exceed a training-aware method's ``prune.epochs``: refused by
    the validation every command runs first (before loaders, model or MLflow run exist); a
    one-shot method has no pruning epochs, so the same budget is fine for it."""
    from launch.checks import check_config
    from pipeline.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="train.budget_epochs"):
        check_config(build_config({"prune": {"method": "sfp", "epochs": 3}, "train": {"budget_epochs": 3}}))
    check_config(build_config({"prune": {"method": "l1", "epochs": 3}, "train": {"budget_epochs": 3}}))


@pytest.mark.parametrize("method", ["autopruner", "abp", "ista"])
def test_methods_that_need_inner_groups_refuse_scope_all_before_any_work(method):
    with pytest.raises(ConfigError, match=f"prune.method = {method} works with prune.scope = inner, not all"):
        check_config(load_config(DEMO, [f"prune.method={method}", "prune.scope=all"]))
    check_config(load_config(DEMO, ["prune.method=sfp", "prune.scope=all"]))  # sfp thins residual streams too


def test_a_search_may_not_draw_a_method_with_a_scope_it_cannot_use():
    cfg = load_config(DEMO, ["prune.scope=all"])  # the demo's space draws autopruner, abp and ista too
    with pytest.raises(ConfigError, match="search.space: prune.method = autopruner works with prune.scope = inner"):
        check_config(cfg, for_search=True)
    check_config(cfg)  # one trial of its prune.method (l1) is fine
    spaced = load_config(DEMO, ["search.space={prune.method: {choice: [l1, ista]}, prune.scope: {choice: [inner, all]}}"])
    with pytest.raises(ConfigError, match="prune.method = ista works with prune.scope = inner, not all"):
        check_config(spaced, for_search=True)


def test_search_with_missing_data_is_one_line_before_ray_starts(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "search", str(DEMO), f"data.root={tmp_path / 'none'}",
         f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"prunepipe: error: data.root = {str(tmp_path / 'none')!r}: not a folder"]
    assert not (tmp_path / "out" / "baseline").exists()  # no dense baseline was trained first
