"""MLflow registration, aliases, loading by URI and promotion, against a temporary SQLite store."""

import subprocess
import sys

import mlflow
import pytest
import torch
import torchvision

from methods import keep_count
from pipeline import registry
from pipeline.config import RegistryConfig
from pipeline.promote import promote
from pipeline.spec import load_pruned, make_spec, save_pruned
from pipeline.surgery import apply_masks, filter_norms, find_groups, prune_model, structured_topk
from tests.conftest import ROOT


def _logged_model(tmp_path, ratio, top1, name):
    """A real pruned resnet50 (ratio of inner channels removed), logged as a run's model/ folder."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval()
    if ratio > 0:
        groups = find_groups(model, 64, "inner")
        masks = {g.name: structured_topk(filter_norms(model, g), keep_count(g.size, ratio), 1) for g in groups}
        apply_masks(model, groups, masks)
        prune_model(model, groups, masks, 64)
    folder = save_pruned(model, tmp_path / name, make_spec(model, "resnet50", 10, image_size=64))
    with mlflow.start_run(run_name=name) as run:
        mlflow.log_artifacts(str(folder), artifact_path="model")
        mlflow.log_metric("val_top1", top1)
    return run.info.run_id, model


@pytest.fixture()
def store(tmp_path):
    cfg = RegistryConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="t", model_name="m")
    client = registry.connect(cfg)
    yield cfg, client
    mlflow.end_run()


def test_register_alias_load_and_promote(tmp_path, store):
    cfg, client = store
    uri = cfg.tracking_uri
    dense_run, dense = _logged_model(tmp_path, 0.0, 0.90, "dense")
    v1 = registry.register(client, "m", dense_run, {"val_top1": 0.90, "img_s": 100.0})
    assert int(client.get_model_version_by_alias("m", "challenger").version) == v1
    # loading by alias rebuilds the exact model from spec + safetensors
    loaded, spec = load_pruned(registry.download_model("models:/m@challenger", uri))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), dense(x))
    assert client.get_model_version("m", str(v1)).tags["val_top1"] == "0.9"

    first = promote("m", uri, tolerance=0.01)
    assert first.promoted and int(client.get_model_version_by_alias("m", "champion").version) == v1
    assert not promote("m", uri, tolerance=0.01).promoted  # already champion

    # less accurate than the champion beyond the tolerance: refused, and the reason says so
    worse_run, _ = _logged_model(tmp_path, 0.6, 0.80, "worse")
    registry.register(client, "m", worse_run, {"val_top1": 0.80})
    d = promote("m", uri, tolerance=0.01)
    assert not d.promoted and "below champion" in d.message
    assert int(client.get_model_version_by_alias("m", "champion").version) == v1

    # as accurate within tolerance and really faster (60 % of inner channels removed): promoted
    good_run, _ = _logged_model(tmp_path, 0.6, 0.895, "good")
    v3 = registry.register(client, "m", good_run, {"val_top1": 0.895})
    d = promote("m", uri, tolerance=0.01)
    assert d.promoted, d.message
    assert int(client.get_model_version_by_alias("m", "champion").version) == v3

    # the CLI loads the champion by URI
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "show", "models:/m@champion", "--tracking-uri", uri],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resnet50" in proc.stdout and "layer1" in proc.stdout


def test_promote_without_challenger_and_unknown_uri(tmp_path, store):
    cfg, _ = store
    with pytest.raises(registry.RegistryError, match="challenger"):
        promote("nobody", cfg.tracking_uri, 0.01)
    with pytest.raises(registry.RegistryError, match="not found"):
        registry.download_model("models:/nobody@champion", cfg.tracking_uri)
