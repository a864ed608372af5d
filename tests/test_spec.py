"""The pruned-model format: spec + safetensors round trip, and nothing is ever unpickled."""

import copy
import json

import pytest
import torch
import torchvision

from methods import keep_count
from pipeline.models import WeightsError, build_model
from pipeline.spec import SpecError, load_pruned, make_spec, save_pruned, stage_widths
from pipeline.surgery import apply_masks, filter_norms, find_groups, prune_model, structured_topk


def _pruned(arch="resnet50", size=32):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=7).eval()
    groups = find_groups(model, size, "inner")
    masks = {g.name: structured_topk(filter_norms(model, g), keep_count(g.size, 0.5), g.channel_groups) for g in groups}
    apply_masks(model, groups, masks)
    return prune_model(model, groups, masks, size)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_round_trip_reproduces_logits_exactly(tmp_path, arch, monkeypatch):
    model = _pruned(arch)
    save_pruned(model, tmp_path, make_spec(model, arch, 7, image_size=32))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("loading a pruned model must not call torch.load")

    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded, spec = load_pruned(tmp_path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert spec["arch"] == arch
    assert loaded.layer1[0].conv1.out_channels == model.layer1[0].conv1.out_channels < 64 * (2 if "x" in arch else 1)


def test_stage_widths_reports_pruned_inner_widths(tmp_path):
    model = _pruned("resnet50")
    spec = make_spec(model, "resnet50", 7)
    rows = stage_widths(spec)
    assert [r["blocks"] for r in rows] == [3, 4, 6, 3]
    assert [r["out"] for r in rows] == [256, 512, 1024, 2048]  # residual widths untouched
    assert rows[0]["inner"][0] == "32/32"  # 64 → 32 kept in conv1 and conv2


def test_tampered_spec_is_refused(tmp_path):
    model = _pruned("resnet18")
    save_pruned(model, tmp_path, make_spec(model, "resnet18", 7))
    spec = json.loads((tmp_path / "spec.json").read_text())
    for bad, needle in [
        ({**spec, "arch": "evilnet"}, "spec.arch"),
        ({**spec, "format": "pickle"}, "spec.format"),
        ({**spec, "num_classes": -3}, "spec.num_classes"),
        ({**spec, "layers": {**spec["layers"], "layer1.0.conv1": {"in": 64, "out": 0, "groups": 1}}}, "layer1.0.conv1"),
    ]:
        (tmp_path / "spec.json").write_text(json.dumps(bad))
        with pytest.raises(SpecError, match=needle):
            load_pruned(tmp_path)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    other = copy.deepcopy(spec)
    other["layers"]["layer1.0.conv1"]["out"] += 1
    other["layers"]["layer1.0.bn1"]["features"] += 1
    other["layers"]["layer1.0.conv2"]["in"] += 1
    (tmp_path / "spec.json").write_text(json.dumps(other))
    with pytest.raises(SpecError, match="does not match its spec"):
        load_pruned(tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(SpecError, match="spec.json is missing"):
        load_pruned(tmp_path)


class Payload:
    """Stands for any object a malicious checkpoint could smuggle in."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_that_is_not_plain_weights_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "payload": Payload()}, path)
    with pytest.raises(WeightsError, match="refused to unpickle"):
        build_model("resnet18", 10, path)
    assert "this must never run" not in capsys.readouterr().out


def test_plain_weights_load_and_head_of_other_size_is_reinitialised(tmp_path):
    src = build_model("resnet18", 1000)
    path = tmp_path / "imagenet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    model = build_model("resnet18", 10, path)
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert model.fc.out_features == 10
    with pytest.raises(WeightsError, match="does not exist"):
        build_model("resnet18", 10, tmp_path / "missing.pt")
    with pytest.raises(WeightsError, match="does not fit"):
        build_model("resnet50", 10, path)
