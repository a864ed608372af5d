"""MLflow registration, aliases, loading by URI and promotion, against a temporary SQLite store."""

import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline import registry
from pipeline.config import RegistryConfig
from pipeline.promote import promote
from pipeline.spec import load_pruned
from tests.conftest import ROOT
from tests.helpers.factories import logged_pruned_model, macs_timer


@pytest.fixture()
def store(tmp_path):
    cfg = RegistryConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="t", model_name="m")
    client = registry.connect(cfg)
    yield cfg, client
    mlflow.end_run()


def test_register_alias_load_and_promote(tmp_path, store):
    cfg, client = store
    uri = cfg.tracking_uri
    dense_run, dense = logged_pruned_model(tmp_path, 0.0, 0.90, "dense")
    v1 = registry.register(client, "m", dense_run, {"val_top1": 0.90, "img_s": 100.0})
    assert int(client.get_model_version_by_alias("m", "challenger").version) == v1
    # loading by alias rebuilds the exact model from spec + safetensors
    (tmp_path / "dl").mkdir()
    loaded, spec = load_pruned(registry.download_model("models:/m@challenger", uri, tmp_path / "dl"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), dense(x))
    # loading for use (show, bench, promote) leaves no download behind: each is a whole model
    before = set(Path(tempfile.gettempdir()).glob("prunepipe-model-*"))
    again, _ = registry.load_registered("models:/m@challenger", uri)
    assert set(Path(tempfile.gettempdir()).glob("prunepipe-model-*")) == before
    with torch.no_grad():
        assert torch.equal(again(x), dense(x))
    assert client.get_model_version("m", str(v1)).tags["val_top1"] == "0.9"

    # the first champion must be faster than the dense model it came from: the dense one is not
    first = promote("m", uri, tolerance=0.01, timer=macs_timer())
    assert not first.promoted and "not measured faster than the dense" in first.message
    assert registry.version_by_alias(client, "m", "champion") is None

    small_run, _ = logged_pruned_model(tmp_path, 0.3, 0.90, "small")
    v2 = registry.register(client, "m", small_run, {"val_top1": 0.90})
    first = promote("m", uri, tolerance=0.01, timer=macs_timer())
    assert first.promoted, first.message
    assert int(client.get_model_version_by_alias("m", "champion").version) == v2
    assert not promote("m", uri, tolerance=0.01, timer=macs_timer()).promoted  # already champion

    # less accurate than the champion beyond the tolerance: refused, and the reason says so
    worse_run, _ = logged_pruned_model(tmp_path, 0.6, 0.80, "worse")
    registry.register(client, "m", worse_run, {"val_top1": 0.80})
    d = promote("m", uri, tolerance=0.01, timer=macs_timer())
    assert not d.promoted and "below champion" in d.message

    # exactly at the tolerance boundary (0.89 = 0.90 - 0.01) and smaller: promoted
    good_run, _ = logged_pruned_model(tmp_path, 0.6, 0.89, "good")
    v4 = registry.register(client, "m", good_run, {"val_top1": 0.89})
    d = promote("m", uri, tolerance=0.01, timer=macs_timer())
    assert d.promoted, d.message
    assert int(client.get_model_version_by_alias("m", "champion").version) == v4

    # more accurate but slower (fewer channels removed than the champion): refused
    slow_run, _ = logged_pruned_model(tmp_path, 0.3, 0.95, "slow")
    registry.register(client, "m", slow_run, {"val_top1": 0.95})
    d = promote("m", uri, tolerance=0.01, timer=macs_timer())
    assert not d.promoted and "not measured faster than champion" in d.message
    assert int(client.get_model_version_by_alias("m", "champion").version) == v4

    # faster, but the clock is too noisy to tell: refused, never promoted on a guess
    fast_run, _ = logged_pruned_model(tmp_path, 0.7, 0.95, "fast")
    registry.register(client, "m", fast_run, {"val_top1": 0.95})
    d = promote("m", uri, tolerance=0.01, timer=macs_timer(noise=lambda r: r.uniform(0.2, 5.0)))
    assert not d.promoted and "too noisy" in d.message
    d = promote("m", uri, tolerance=0.01, timer=macs_timer())
    assert d.promoted, d.message

    # the CLI loads the champion by URI
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "show", "models:/m@champion", "--tracking-uri", uri],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resnet50" in proc.stdout and "layer1" in proc.stdout
    # and `promote` itself runs from the command line (already champion: no timing involved)
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "promote", "m", "--tracking-uri", uri],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and "already the champion" in proc.stdout, proc.stderr[-2000:]


def test_promote_without_challenger_and_unknown_uri(tmp_path, store):
    cfg, _ = store
    with pytest.raises(registry.RegistryError, match="challenger"):
        promote("nobody", cfg.tracking_uri, 0.01)
    with pytest.raises(registry.RegistryError, match="not found"):
        registry.download_model("models:/nobody@champion", cfg.tracking_uri, tmp_path)


def test_a_shard_folder_is_a_dataset_input_without_mlflows_source_warning(tmp_path, store):
    import warnings

    folder = tmp_path / "shards"
    folder.mkdir()
    with mlflow.start_run() as run, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry.log_dataset(folder, "train", {"name": "tiny-shards", "shards": ["a.tar"]})
    assert not [w for w in caught if "dataset source" in str(w.message)], [str(w.message) for w in caught]
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.tags[0].value) for i in inputs] == [("tiny-shards", "train")]
    assert str(folder.resolve()) in inputs[0].dataset.source
