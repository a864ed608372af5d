"""Whole residual blocks removed (pipeline/blocks.py): exactly the bypassed model, scored by the
calibration loss, saved and loaded through the spec, and cut further by width afterwards."""

import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors import safe_open
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from launch.cli import main
from methods import keep_count
from pipeline.blocks import (
    BlockError,
    block_count,
    block_scores,
    branch_zeroed,
    choose_blocks,
    identity_blocks,
    remove_blocks,
)
from pipeline.config import ARCHS, ConfigError
from pipeline.spec import SpecError, load_pruned, make_spec, save_pruned, stage_widths
from pipeline.surgery import apply_masks, filter_norms, find_groups, prune_model, structured_topk
from tests.lifecycle import randomise_bn

SIZE = 32


def _model(arch, classes=10, seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, num_classes=classes).eval()
    randomise_bn(model)
    return model


def _spread(names):
    """The first, a middle and the last of ``names``: blocks early, mid and late in the network."""
    return sorted({names[0], names[len(names) // 2], names[-1]}, key=names.index)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_blocks_are_exactly_the_blocks_without_downsample(arch):
    with torch.device("meta"):
        model = torchvision.models.get_model(arch, num_classes=10)
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, BasicBlock | Bottleneck)]
    offered = identity_blocks(model)
    assert offered == [n for n, m in blocks if m.downsample is None]  # network order
    for stage in ("layer2", "layer3", "layer4"):  # a stage's first block changes shape: never offered
        assert f"{stage}.0" not in offered
    # layer1.0 has a downsample in bottleneck nets (64 → 256); in resnet18/34 it is 64 → 64 at stride 1
    assert ("layer1.0" in offered) == (arch in ("resnet18", "resnet34"))
    assert len(offered) == len(blocks) - (3 if arch in ("resnet18", "resnet34") else 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_removing_blocks_gives_exactly_the_bypassed_model(arch):
    model = _model(arch)
    names = _spread(identity_blocks(model))
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        full = model(x)
        with branch_zeroed(model, names):
            bypassed = model(x)
        remove_blocks(model, names)
        removed = model(x)
    assert torch.isfinite(full).all() and not torch.equal(full, bypassed)  # the blocks did something
    assert torch.equal(removed, bypassed)
    assert all(isinstance(model.get_submodule(n), nn.Identity) for n in names)
    assert not any(k.startswith(tuple(n + "." for n in names)) for k in model.state_dict())


def test_remove_blocks_refuses_bad_names_and_changes_nothing():
    model = _model("resnet50")
    for bad, needle in [
        (["layer1.1", "layer2.0"], "'layer2.0' downsamples"),
        (["layer9.1"], "'layer9.1' is not a residual block"),
        (["layer1.1.conv1"], "is not a residual block"),
        (["fc"], "is not a residual block"),
        (["layer3.1", "layer3.1"], "'layer3.1' is listed twice"),
        ("layer3.1", "expected a list of block names"),
        ([3], "expected a list of block names"),
    ]:
        with pytest.raises(BlockError, match=needle) as err:
            remove_blocks(model, bad)
        assert "\n" not in str(err.value)
    assert isinstance(model.layer1[1], Bottleneck)  # the valid name before the bad one was not removed
    remove_blocks(model, ["layer3.1"])
    with pytest.raises(BlockError, match="'layer3.1' is already removed"):
        remove_blocks(model, ["layer3.1"])


def _calib(model, n_batches=3, batch=8, seed=1):
    """Calibration batches labelled with a confident version of the model's own predictions, so the
    base loss is near 0 and bypassing a block that matters can only raise it."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, 3, SIZE, SIZE, generator=g) for _ in range(n_batches)]
    with torch.no_grad():
        model.fc.weight.mul_(50.0 / model(xs[0]).abs().max())
        return [(x, model(x).argmax(1)) for x in xs]


def _loss(model, calib):
    with torch.no_grad():
        total = sum(F.cross_entropy(model(x), y, reduction="sum").double() for x, y in calib)
    return float(total) / sum(len(y) for _, y in calib)


@pytest.mark.parametrize("arch,silent", [("resnet18", "layer3.1"), ("resnet50", "layer2.2")])
def test_scores_are_loss_rises_and_a_silent_block_is_chosen_first(arch, silent):
    model = _model(arch)
    last_bn = model.get_submodule(silent).bn3 if arch == "resnet50" else model.get_submodule(silent).bn2
    with torch.no_grad():  # its branch outputs 0: bypassing it changes nothing
        last_bn.weight.zero_()
        last_bn.bias.zero_()
    calib = _calib(model)
    model.train()
    stats = model.layer1[0].bn1.running_mean.clone()
    scores = block_scores(model, None, calib)
    assert model.training and torch.equal(model.layer1[0].bn1.running_mean, stats)  # ran in eval mode
    assert list(scores) == identity_blocks(model)
    assert scores[silent] == 0.0
    assert all(v > 0 for k, v in scores.items() if k != silent), scores  # the premise of the next line
    assert choose_blocks(scores, 1) == [silent]
    # the staged shortcut gives what full forwards of the model without each block give
    model.eval()
    base = _loss(model, calib)
    for name, rise in scores.items():
        cut = remove_blocks(copy.deepcopy(model), [name])
        assert rise == pytest.approx(_loss(cut, calib) - base, rel=1e-5, abs=1e-7), name


def test_scores_of_a_forward_that_is_not_torchvisions_fall_back_to_full_forwards():
    class Wrapped(nn.Module):  # a different head: the stage decomposition does not match
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 2

    inner = _model("resnet18")
    model = Wrapped(inner).eval()
    calib = _calib(inner)
    scores = block_scores(model, ["inner.layer2.1", "inner.layer4.1"], calib)
    base = _loss(model, calib)
    for name, rise in scores.items():
        assert rise == pytest.approx(_loss(remove_blocks(copy.deepcopy(model), [name]), calib) - base, rel=1e-5)


def test_choose_blocks_lowest_rise_ties_in_network_order():
    scores = {"layer1.1": 0.5, "layer3.2": 0.1, "layer3.10": 0.1, "layer2.1": 0.1, "layer4.1": float("nan")}
    assert choose_blocks(scores, 0) == []
    assert choose_blocks(scores, 2) == ["layer2.1", "layer3.2"]  # of three tied at 0.1, the earliest two
    assert choose_blocks(scores, 4) == ["layer1.1", "layer2.1", "layer3.2", "layer3.10"]
    assert choose_blocks(scores, 5)[-1] == "layer4.1"
    for bad in (-1, 6, 1.5, True):
        with pytest.raises(BlockError, match="choose_blocks: n"):
            choose_blocks(scores, bad)


def test_block_count_from_the_config_value():
    assert block_count(0, 12) == 0
    assert block_count(0.0, 12) == 0
    assert block_count(3, 12) == 3
    assert block_count(12, 12) == 12
    assert block_count(2.0, 12) == 2
    assert block_count(0.25, 12) == 3
    assert block_count(0.29, 100) == 29  # rounded down, not by float error to 28
    assert block_count(0.1, 5) == 0
    for bad, needle in [(13, "resnet50 has only 12 blocks"), (-1, "0 or more"), (1.5, "whole number"),
                        (float("nan"), "fraction"), (float("inf"), "fraction"), (-0.5, "fraction"),
                        (True, "fraction"), ("2", "fraction"), (None, "fraction")]:
        with pytest.raises(ConfigError, match="prune.blocks = ") as err:
            block_count(bad, 12, "resnet50")
        assert needle in str(err.value) and "\n" not in str(err.value)


# --- the pruned-model format --------------------------------------------------------------------

def _saved(tmp_path, arch, names, classes=10):
    model = remove_blocks(_model(arch, classes), names)
    return model, save_pruned(model, tmp_path / arch, make_spec(model, arch, classes, image_size=SIZE))


@pytest.mark.parametrize("arch,names", [
    ("resnet18", ["layer1.0", "layer1.1", "layer4.1"]),  # all of layer1: the stage passes the stem on
    ("resnet50", ["layer3.5", "layer1.1"]),
    ("resnext50_32x4d", ["layer2.3"]),
])
def test_spec_round_trip_with_removed_blocks(tmp_path, arch, names):
    model, folder = _saved(tmp_path, arch, names)
    spec = json.loads((folder / "spec.json").read_text())
    assert spec["removed_blocks"] == sorted(names)  # network order (here the same as sorted)
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if k.startswith(tuple(n + "." for n in names))]  # noqa: SIM118
    loaded, spec = load_pruned(folder)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert all(isinstance(loaded.get_submodule(n), nn.Identity) for n in names)
    dense = _model(arch)
    rows = stage_widths(spec)
    for row in rows:
        stage = getattr(dense, row["stage"])
        gone = [int(b.split(".")[1]) for b in names if b.startswith(row["stage"] + ".")]
        assert row["removed"] == sorted(gone) and row["blocks"] == len(stage) - len(gone) == len(row["inner"])
        last = [m for m in stage[-1].modules() if isinstance(m, nn.Conv2d)][-1]  # no downsample: 2+ blocks
        assert row["out"] == last.out_channels  # a removed block leaves the residual width as it was


def test_a_spec_without_removed_blocks_is_unchanged(tmp_path):
    model = _model("resnet18")
    assert "removed_blocks" not in make_spec(model, "resnet18", 10)


def test_tampered_removed_blocks_are_refused_in_one_line(tmp_path):
    _, folder = _saved(tmp_path, "resnet50", ["layer3.1", "layer3.2"])
    spec = json.loads((folder / "spec.json").read_text())
    without_key = {k: v for k, v in spec.items() if k != "removed_blocks"}
    for bad, needle in [
        ({**spec, "removed_blocks": ["layer3.1", "layer9.2"]}, r"spec.removed_blocks\[1\]: 'layer9.2' is not a residual"),
        ({**spec, "removed_blocks": ["layer3.0"]}, r"spec.removed_blocks\[0\]: 'layer3.0' downsamples"),
        ({**spec, "removed_blocks": ["layer3.1", "layer3.1"]}, "'layer3.1' is listed twice"),
        ({**spec, "removed_blocks": "layer3.1"}, "spec.removed_blocks: expected a list"),
        ({**spec, "removed_blocks": [3]}, "spec.removed_blocks: expected a list"),
        ({**spec, "removed_blocks": [["layer3.1"]]}, "spec.removed_blocks: expected a list"),
        ({**spec, "removed_blocks": ["layer3.1"]}, "layer names do not match resnet50 without layer3.1"),
        ({**spec, "removed_blocks": ["layer3.1", "layer3.2", "layer3.3"]}, "layer names do not match"),
        (without_key, "spec.layers: layer names do not match resnet50"),
    ]:
        (folder / "spec.json").write_text(json.dumps(bad))
        with pytest.raises(SpecError, match=needle) as err:
            load_pruned(folder)
        assert "\n" not in str(err.value)
    # the file still holds the blocks' tensors of a model that kept them: refused by the header check
    full = _model("resnet50")
    save_pruned(full, tmp_path / "full", make_spec(full, "resnet50", 10, image_size=SIZE))
    (tmp_path / "full" / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(SpecError, match="spec"):
        load_pruned(tmp_path / "full")


def test_blocks_removed_then_widths_cut(tmp_path):
    model = _model("resnet50")
    remove_blocks(model, ["layer2.2", "layer3.4"])
    groups = find_groups(model, SIZE, scope="all")
    assert not [g for g in groups if any(m.startswith(("layer2.2.", "layer3.4.")) for m in g.producers + g.consumers)]
    masks = {g.name: structured_topk(filter_norms(model, g), keep_count(g.size, 0.5, 1, g.channel_groups),
                                     g.channel_groups) for g in groups}
    apply_masks(model, groups, masks)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        masked = model(x)
        prune_model(model, groups, masks, SIZE)
        out = model(x)
    assert masked.abs().max() > 1e-3
    assert (masked - out).abs().max().item() < 1e-4 * max(1.0, masked.abs().max().item())
    assert model.layer3[0].conv3.out_channels < 1024  # the residual stream was cut as well
    folder = save_pruned(model, tmp_path / "m", make_spec(model, "resnet50", 10, image_size=SIZE))
    loaded, spec = load_pruned(folder)
    assert spec["removed_blocks"] == ["layer2.2", "layer3.4"]
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_show_lists_the_removed_blocks(tmp_path, capsys):
    _, folder = _saved(tmp_path, "resnet50", ["layer3.1", "layer3.4"])
    assert main(["show", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "removed blocks (2): layer3.1, layer3.4" in out
    layer3 = next(line for line in out.splitlines() if line.startswith("layer3 "))
    assert layer3.split()[1] == "4" and layer3.endswith("(removed: 1, 4)")


def test_onnx_export_of_a_model_without_some_blocks(tmp_path):
    pytest.importorskip("onnxruntime")
    from pipeline import export

    _, folder = _saved(tmp_path, "resnet18", ["layer1.1", "layer3.1"])
    model, _ = load_pruned(folder)
    path = export.export_onnx(model, SIZE, tmp_path / "m.onnx")
    x = torch.randn(4, 3, SIZE, SIZE)
    got = export.session(path).run(["logits"], {"images": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_pyfunc_loads_a_model_without_some_blocks_from_its_copied_modules(tmp_path):
    from pipeline.pyfunc_model import CODE_MODULES, PrunedModel

    _, folder = _saved(tmp_path, "resnet18", ["layer2.1"])
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    wrapper = PrunedModel()
    wrapper.load_context(SimpleNamespace(artifacts={"pruned": str(folder)}))
    own, _ = load_pruned(folder)
    with torch.no_grad():
        np.testing.assert_array_equal(wrapper.predict(None, x), own(torch.from_numpy(x)).numpy())
    # a serving host has only the modules the pyfunc model copies: spec.py must not need blocks.py
    pkg = tmp_path / "serve" / "pipeline"
    pkg.mkdir(parents=True)
    src = Path(__file__).resolve().parents[1] / "pipeline"
    for module in CODE_MODULES:
        (pkg / module).write_bytes((src / module).read_bytes())
    code = (f"import pipeline, pipeline.spec as s; assert pipeline.__file__.startswith({str(pkg.parent)!r}); "
            f"m, spec = s.load_pruned({str(folder)!r}); print(spec['removed_blocks'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=pkg.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['layer2.1']"


_TWO_RANKS = """
import json, sys
import torch, torch.distributed as dist, torchvision
from pipeline.blocks import block_scores, choose_blocks
from pipeline.distributed import DistInfo
from tests.lifecycle import randomise_bn

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10).eval()
randomise_bn(model)
g = torch.Generator().manual_seed(1)
xs, ys = torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 10, (12,), generator=g)
# this rank's share of the calibration draw, in batches of a size of its own
mine = list(range(rank, 12, world))
calib = [(xs[mine[i:i + 2 + rank]], ys[mine[i:i + 2 + rank]]) for i in range(0, len(mine), 2 + rank)]
scores = block_scores(model, None, calib)  # no DistInfo: found through torch.distributed
one = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))  # this process alone: no reduce
alone = block_scores(model, None, [(xs, ys)], one)
if rank == 0:
    json.dump({"ranks": scores, "alone": alone, "chosen": choose_blocks(scores, 2)}, open(sys.argv[1], "w"))
dist.barrier()
dist.destroy_process_group()
"""


def test_scores_are_reduced_over_ranks(tmp_path):
    """Two gloo ranks with half the calibration set each score like one process with all of it."""
    from tests.conftest import ROOT
    from tests.helpers.procs import torchrun

    script, out = tmp_path / "two_ranks.py", tmp_path / "scores.json"
    script.write_text(_TWO_RANKS)
    proc = torchrun(str(script), str(out), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, (proc.stdout or "")[-3000:] + (proc.stderr or "")[-3000:]
    got = json.loads(out.read_text())
    assert got["ranks"].keys() == got["alone"].keys()
    for name, rise in got["alone"].items():
        assert got["ranks"][name] == pytest.approx(rise, rel=1e-9, abs=1e-12), name
