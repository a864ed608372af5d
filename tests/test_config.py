import re
import subprocess
import sys

import pytest
import torch

from launch.checks import check_config
from methods import Method, register_method
from methods.base import _REGISTRY
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


class _InnerOnly(Method):
    """A method of the tests' own whose layers need one consumer per group (scope inner only)."""

    name = "test-inner-only"
    scopes = ("inner",)
    allocators = ("uniform",)

    def scores(self, model, ctx=None):
        return {g.name: torch.ones(g.size) for g in self.groups}


@pytest.fixture
def inner_only():
    cls = register_method(_InnerOnly)
    yield cls.name
    _REGISTRY.pop(cls.name)  # other tests list the registered methods


def test_a_method_that_needs_inner_groups_refuses_scope_all_before_any_work(inner_only):
    with pytest.raises(ConfigError, match=f"prune.method = {inner_only} works with prune.scope = inner, not all"):
        check_config(load_config(DEMO, [f"prune.method={inner_only}", "prune.scope=all"]))


@pytest.mark.parametrize("method", ["l1", "sfp", "autopruner", "abp", "ista", "lossvar"])
def test_every_seed_method_thins_the_residual_streams(method):
    check_config(load_config(DEMO, [f"prune.method={method}", "prune.scope=all"]))


def test_a_search_may_not_draw_a_method_with_a_scope_it_cannot_use(inner_only):
    spaced = load_config(DEMO, [f"search.space={{prune.method: {{choice: [l1, {inner_only}]}}, "
                                "prune.scope: {choice: [inner, all]}}"])
    with pytest.raises(ConfigError, match=f"search.space: prune.method = {inner_only} works with prune.scope = inner"):
        check_config(spaced, for_search=True)
    check_config(spaced)  # one trial of its prune.method (l1) is fine


@pytest.mark.parametrize("overrides, says", [
    (["prune.allocate=speed"], "prune.allocate: unknown width allocator 'speed'; allowed: latency, loss, uniform"),
    (["prune.method=lossvar", "prune.allocate=uniform"],
     "prune.method = lossvar works with prune.allocate = loss or latency, not uniform"),
    # only the latency allocator budgets a latency: a ratio allocator would ignore the target
    (["prune.target_speedup=1.5", "prune.allocate=uniform"],
     "prune.target_speedup needs prune.allocate = latency (or unset), not uniform"),
    (["prune.target_speedup=1.5", "prune.method=lossvar", "prune.allocate=loss"],
     "prune.target_speedup needs prune.allocate = latency (or unset), not loss"),
    (["prune.allocate=latency", "prune.allocator_options={max_choices: 1}"], "prune.allocator_options.max_choices"),
    (["prune.allocate=loss", "prune.allocator_options={delta: -1}"], "prune.allocator_options.delta"),
    (["prune.allocate=loss", "prune.allocator_options={nope: 1}"], "prune.allocator_options.nope"),
])
def test_an_allocator_a_method_cannot_use_is_one_line_before_any_work(overrides, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        check_config(load_config(DEMO, ["search.space={}", *overrides]))


def test_a_search_may_not_draw_a_method_with_an_allocator_it_cannot_fill(inner_only):
    spaced = load_config(DEMO, ["search.space={prune.method: {choice: [l1, lossvar]}, "
                                "prune.allocate: {choice: [uniform, loss]}}"])
    with pytest.raises(ConfigError, match="search.space: prune.method = lossvar works with prune.allocate = loss "
                                          "or latency, not uniform"):
        check_config(spaced, for_search=True)
    fine = load_config(DEMO, ["search.space={prune.method: {choice: [l1, sfp]}, prune.allocate: {choice: [uniform, loss]}}"])
    check_config(fine, for_search=True)
    with pytest.raises(ConfigError, match=f"prune.method = {inner_only} works with prune.allocate = uniform, not loss"):
        check_config(load_config(DEMO, ["search.space={}", f"prune.method={inner_only}", "prune.allocate=loss"]))


@pytest.mark.parametrize("value", ["1", "0.5", "-2", "101"])
def test_a_speed_target_at_or_below_one_or_absurd_is_one_line(value):
    with pytest.raises(ConfigError, match=re.escape("prune.target_speedup")):
        load_config(DEMO, [f"prune.target_speedup={value}"])


def test_a_speed_target_chooses_the_latency_allocator_for_every_method():
    from launch.checks import allocator_for
    from methods import get_method_class

    for name in ("l1", "sfp", "lossvar", "autopruner", "abp", "ista"):
        cfg = check_config(load_config(DEMO, ["search.space={}", f"prune.method={name}", "prune.target_speedup=1.5"]))
        assert allocator_for(cfg, get_method_class(name)).name == "latency", name
    # a search drawing targets may not also draw a ratio allocator
    spaced = load_config(DEMO, ["search.space={prune.target_speedup: {uniform: [1.3, 2.0]}, "
                                "prune.allocate: {choice: [latency, uniform]}}"])
    with pytest.raises(ConfigError, match="search.space: prune.target_speedup needs prune.allocate = latency"):
        check_config(spaced, for_search=True)


@pytest.mark.parametrize("value, says", [("2.5", "a count of blocks"), ("-1", "greater than or equal to 0"),
                                         ("true", "not a boolean"), ("many", "prune.blocks")])
def test_a_bad_block_count_is_one_line(value, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(DEMO, [f"prune.blocks={value}"])


def test_search_with_missing_data_is_one_line_before_ray_starts(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "search", str(DEMO), f"data.root={tmp_path / 'none'}",
         f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"prunepipe: error: data.root = {str(tmp_path / 'none')!r}: not a folder"]
    assert not (tmp_path / "out" / "baseline").exists()  # no dense baseline was trained first


def test_a_block_count_beyond_the_architectures_identity_blocks_is_one_line():
    with pytest.raises(ConfigError, match="prune.blocks = 6: resnet18 has only 5 blocks that can be removed"):
        check_config(load_config(DEMO, ["search.space={}", "prune.blocks=6"]))
    check_config(load_config(DEMO, ["search.space={}", "prune.blocks=5"]))
    spaced = load_config(DEMO, ["search.space={prune.blocks: {choice: [0, 2, 7]}}"])
    with pytest.raises(ConfigError, match="search.space: prune.blocks = 7"):
        check_config(spaced, for_search=True)


def test_the_imagenet_search_draws_every_seed_method_at_scope_all_and_block_counts():
    from pipeline.config import sampler_values

    cfg = load_config(ROOT / "configs" / "imagenet_resnet101.yaml", ["model.weights=null"])
    assert cfg.prune.scope == "all" and cfg.model.arch == "resnet101"
    assert {"sfp", "autopruner", "lossvar", "abp", "ista"} <= set(sampler_values(cfg.search.space["prune.method"]))
    assert max(sampler_values(cfg.search.space["prune.blocks"])) > 0
    check_config(cfg, for_search=True)  # every (method, scope, blocks) pair it may draw
