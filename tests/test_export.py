"""`prunepipe export MODEL --format onnx`: a dynamic-batch ONNX file that reproduces PyTorch's
logits, timed against dense in ONNX Runtime, logged beside a registered version."""

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from launch.cli import main
from pipeline import export, registry
from pipeline.config import RegistryConfig
from pipeline.pyfunc_model import log_pyfunc
from pipeline.spec import load_pruned
from tests.helpers.factories import saved_pruned_model

SIZE = 32

pytest.importorskip("onnxruntime")


def test_export_folder_dynamic_batch_matches_pytorch(tmp_path, capsys):
    folder = saved_pruned_model(tmp_path / "model")
    code = main(["export", str(folder), "--out", str(tmp_path / "out"), "--batch-size", "4", "--rounds", "2",
                 "--threads", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "img/s" in out and "speed-up" in out
    path = tmp_path / "out" / "model.onnx"
    assert path.is_file() and (tmp_path / "out" / "model.dense.onnx").is_file()
    # a batch size never seen at export time: the batch axis is dynamic and the logits agree
    model, _ = load_pruned(folder)
    x = torch.randn(5, 3, SIZE, SIZE)
    got = export.session(path).run(["logits"], {"images": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_export_refuses_a_file_that_does_not_reproduce_the_model(tmp_path, monkeypatch):
    folder = saved_pruned_model(tmp_path / "model")
    model, _ = load_pruned(folder)
    path = export.export_onnx(model, SIZE, tmp_path / "m.onnx")
    other = saved_pruned_model(tmp_path / "other")
    other_model, _ = load_pruned(other)
    torch.nn.init.normal_(other_model.fc.weight)
    assert export.max_logit_error(path, other_model, SIZE) > 1e-2  # the check sees a different model
    monkeypatch.setattr(export, "max_logit_error", lambda *a, **k: 0.5)
    with pytest.raises(export.ExportError, match="differ from PyTorch"):
        export.export_and_time(model, model, SIZE, tmp_path / "bad.onnx", tolerance=1e-3, rounds=2, batch_size=2)


def test_export_registered_version_logs_beside_it(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = registry.connect(RegistryConfig(tracking_uri=uri, experiment="export", model_name="tiny"))
    folder = saved_pruned_model(tmp_path / "model")
    with mlflow.start_run() as run:
        mlflow.set_tag(registry.MODEL_ID_TAG, log_pyfunc(folder).model_id)
    version = registry.register(client, "tiny", run.info.run_id, {"val_top1": 0.5})
    code = main(["export", "models:/tiny@challenger", "--tracking-uri", uri, "--out", str(tmp_path / "out"),
                 "--batch-size", "2", "--rounds", "2", "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    arts = [f.path for f in MlflowClient(uri).list_artifacts(run.info.run_id, "export")]
    assert arts == ["export/tiny-challenger.onnx"]
    tags = client.get_model_version("tiny", str(version)).tags
    assert float(tags["onnx_max_abs_error"]) <= 1e-3 and float(tags["onnx_img_s"]) > 0
    assert main(["export", "models:/tiny@challenger", "--tracking-uri", uri, "--tolerance", "0"]) == 2


def test_export_report_is_the_speed_record_under_the_onnx_prefix():
    from pipeline.measure import SpeedResult, TimingConfig

    speed = SpeedResult("pruned", img_s=300.0, dense_img_s=100.0, speedup=3.0, speedup_low=2.9, speedup_high=3.1,
                        reliable=False, reason="noisy", rounds=12, attempts=2, foreign_cpu=0.0, protocol=TimingConfig())
    report = export.OnnxReport(Path("m.onnx"), 2e-5, speed)
    assert report.metrics() == {"onnx_max_abs_error": 2e-5, "onnx_dense_img_s": 100.0, "onnx_img_s": 300.0,
                                "onnx_speedup": 3.0, "onnx_speedup_low": 2.9, "onnx_speedup_high": 3.1,
                                "onnx_speed_reliable": 0.0}
    assert report.summary().splitlines()[1] == ("ONNX Runtime CPU: dense 100 img/s, pruned 300 img/s, speed-up 3.00x "
                                                "[2.90-3.10]  (noisy: re-run alone)")
