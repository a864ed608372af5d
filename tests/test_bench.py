"""`prunepipe bench`: dense and pruned models timed side by side; BN folding is exact."""

import subprocess
import sys

import mlflow
import pytest
import torch
import torchvision

from pipeline import registry
from pipeline.bench import BenchModel, distinct_labels, run_bench
from pipeline.config import RegistryConfig
from pipeline.measure import TimingConfig, count_macs, fold_batchnorm
from pipeline.spec import make_spec, save_pruned
from tests.conftest import ROOT
from tests.helpers.factories import pruned_model


def _pruned(ratio, arch="resnet18", size=32):
    return pruned_model(ratio, arch, size, random_bn=True)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_folding_batchnorm_keeps_the_logits_and_removes_every_bn(arch):
    model = _pruned(0.4, arch, 32)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref, got = model(x), folded(x)
    assert (ref - got).abs().max() <= 1e-4 * ref.abs().max()


def test_run_bench_speedups_follow_an_injected_clock():
    """With a clock proportional to MACs the speed-up of every row is the MACs ratio: the
    table's arithmetic (per-round ratios against the dense model, rows per setting) is right."""
    dense = torchvision.models.resnet18(num_classes=10)
    small, smaller = _pruned(0.3), _pruned(0.6)
    cache = {}

    def clock(model, x):
        # the model is kept in the cache: a freed model's id can be reused by the next one
        cache.setdefault(id(model), (model, count_macs(model, x.shape[-1])))
        return cache[id(model)][1] * 1e-9 * x.shape[0]

    models = [BenchModel("dense", dense), BenchModel("a", small), BenchModel("b", smaller)]
    rows = run_bench(models, 32, [1, 4], ["fp32"], [False, True], [False], rounds=4, timer=clock)
    assert len(rows) == 3 * 2 * 2
    for r in rows:
        m = next(m for m in models if m.label == r.label)
        assert r.speedup == pytest.approx(models[0].macs / m.macs, rel=1e-6) and r.reliable
        assert (r.latency_p50_ms is not None) == (r.batch == 1)
    assert [r.speedup for r in rows if r.label == "dense"] == [1.0] * 4


def test_bench_command_times_folders_and_registry_versions(tmp_path):
    a = save_pruned(_pruned(0.5), tmp_path / "a", make_spec(_pruned(0.5), "resnet18", 10, image_size=32))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = registry.connect(RegistryConfig(tracking_uri=uri, experiment="b", model_name="m"))
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(a), artifact_path="model")
    registry.register(client, "m", run.info.run_id, {"val_top1": 0.5})
    plot = tmp_path / "speed.png"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "bench", str(a), "models:/m@challenger", "--tracking-uri", uri,
         "--batch-sizes", "1", "2", "--precision", "fp32", "bf16", "--rounds", "3", "--plot", str(plot),
         "--log-mlflow", "--out", str(tmp_path / "t.md")],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [ln for ln in (tmp_path / "t.md").read_text().splitlines() if ln.startswith("| ") and not ln.startswith("| model |")]
    assert {ln.split("|")[1].strip() for ln in table} == {"dense resnet18", "a", "models:/m@challenger"}
    assert len(table) == 3 * 2 * 2  # dense + 2 models, 2 batch sizes, 2 precisions
    assert all(("| 1 |" in ln) == (ln.split("|")[-2].strip() != "-") for ln in table)  # latency at batch 1 only
    assert plot.stat().st_size > 10_000
    arts = [f.path for f in client.list_artifacts(run.info.run_id, "bench")]
    assert "bench/bench.md" in arts and "bench/speed.png" in arts


def test_bench_labels_tell_every_model_apart(tmp_path):
    # a search's trials all save to <trial>/model: the folder's own name would label every row "model"
    trials = [str(tmp_path / "trials" / t / "model") for t in ("t_00000", "t_00001")]
    assert distinct_labels(trials) == ["t_00000/model", "t_00001/model"]
    assert distinct_labels([str(tmp_path / "a"), "models:/m@champion"]) == ["a", "models:/m@champion"]
    same = [str(tmp_path / "a"), str(tmp_path / "a")]
    assert distinct_labels(same) == same  # one model given twice cannot be told apart: shown as given


@pytest.mark.parametrize("args, words", [
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--precision", "fp16", "--device", "cpu"], "fp16"),
    (["--image-size", "5000"], "--image-size"),
])
def test_bench_refuses_bad_arguments_in_one_line(tmp_path, args, words):
    a = save_pruned(_pruned(0.5), tmp_path / "a", make_spec(_pruned(0.5), "resnet18", 10, image_size=32))
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "bench", str(a), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_bench_compiled_and_channels_last(tmp_path):
    a = save_pruned(_pruned(0.5), tmp_path / "a", make_spec(_pruned(0.5), "resnet18", 10, image_size=32))
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "bench", str(a), "--batch-sizes", "2",
                           "--channels-last", "on", "--compile", "on", "--rounds", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ") and "| on | yes |" in ln]
    assert len(rows) == 2


def test_run_bench_times_under_the_protocol_it_is_given():
    """A bench setting is the given protocol at one batch size, precision, format and mode:
    without BN folding the models themselves are timed, and each row names its setting."""
    dense, pruned = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(3, 4, 3)
    seen = []

    def clock(model, x):
        seen.append((id(model), x.shape[0]))
        return {id(dense): 2.0, id(pruned): 1.0}[id(model)]

    models = [BenchModel("dense", dense), BenchModel("pruned", pruned)]
    rows = run_bench(models, 8, [1, 3], ["fp32", "bf16"], [False], [False],
                     TimingConfig(rounds=3, warmup=0, per_round=1), timer=clock)
    assert [(r.label, r.batch, r.precision, r.channels_last, r.compiled) for r in rows] == [
        (label, b, p, False, False) for p in ("fp32", "bf16") for b in (1, 3) for label in ("dense", "pruned")]
    assert {i for i, _ in seen} == {id(dense), id(pruned)} and len(seen) == 4 * 2 * 3
    assert [r.speedup for r in rows] == [1.0, 2.0] * 4 and all(r.reliable for r in rows)
    assert models[1].macs == count_macs(pruned, 8) and rows[1].macs_reduction == 1 - models[1].macs / models[0].macs
