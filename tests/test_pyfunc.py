"""The MLflow pyfunc flavor: a registered pruned model loads through `mlflow.pyfunc` and serves
over HTTP with the same logits as prunepipe's own loader (temporary SQLite store)."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from pipeline import registry
from pipeline.pyfunc_model import log_pyfunc
from pipeline.spec import load_pruned
from tests.helpers.factories import saved_pruned_model, sqlite_store
from tests.helpers.procs import free_port

SIZE = 32


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A pruned resnet18 logged as a pyfunc by a run and registered as ``tiny@challenger``."""
    tmp = tmp_path_factory.mktemp("pyfunc")
    cfg = sqlite_store(tmp, "pyfunc", "tiny")
    client = registry.connect(cfg)
    folder = saved_pruned_model(tmp / "model", size=SIZE)
    with mlflow.start_run(run_name="tiny") as run:
        info = log_pyfunc(folder)
        mlflow.set_tag(registry.MODEL_ID_TAG, info.model_id)
    version = registry.register(client, "tiny", run.info.run_id, {"val_top1": 0.5})
    yield cfg.tracking_uri, folder, version
    mlflow.end_run()


def _images(n=3):
    return np.random.default_rng(1).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def _own_logits(folder: Path, x: np.ndarray) -> np.ndarray:
    model, _ = load_pruned(folder)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_pyfunc_by_alias_predicts_prunepipes_logits(registered, tmp_path):
    uri, folder, version = registered
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model("models:/tiny@challenger")
    x = _images()
    np.testing.assert_allclose(loaded.predict(x), _own_logits(folder, x), rtol=1e-5, atol=1e-5)
    # the version is a real MLflow model: signature, pinned requirements, no pickled object
    meta = loaded.metadata
    assert meta.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, SIZE, SIZE)
    assert meta.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 10)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/tiny/{version}"))
    reqs = (local / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") for r in reqs) and all("==" in r for r in reqs if not r.startswith("-"))
    assert not list(local.rglob("*.pkl")) and len(list(local.glob("artifacts/*/spec.json"))) == 1
    # prunepipe's own URI loader finds the spec folder inside the pyfunc model
    (tmp_path / "dl").mkdir()
    own, _ = load_pruned(registry.download_model("models:/tiny@challenger", uri, tmp_path / "dl"))
    with torch.no_grad():
        np.testing.assert_allclose(own(torch.from_numpy(x)).numpy(), _own_logits(folder, x), rtol=1e-6, atol=1e-6)
    # the signature is enforced: a wrong image shape is refused before the network runs
    with pytest.raises(Exception, match="does not match expected shape"):
        loaded.predict(np.zeros((2, 1, SIZE, SIZE), dtype=np.float32))


@pytest.mark.server
def test_mlflow_models_serve_answers_over_http(registered):
    uri, folder, _ = registered
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    # the server runs `uvicorn` by name: the virtual environment's bin folder must be on PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{mlflow_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(mlflow_bin), "models", "serve", "-m", "models:/tiny@challenger", "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    x = _images(2)
    body = json.dumps({"inputs": x.tolist()}).encode()
    try:
        deadline, answer = time.monotonic() + 240, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as resp:
                    answer = json.loads(resp.read())
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        if answer is None:
            proc.kill()
            pytest.fail(f"server never answered (exit {proc.poll()}): {proc.communicate(timeout=20)[0][-3000:]}")
        got = np.asarray(answer["predictions"], dtype=np.float32)
        np.testing.assert_allclose(got, _own_logits(folder, x), rtol=1e-4, atol=1e-4)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_the_pyfunc_class_defines_without_mlflows_missing_type_hint_warning():
    # MLflow checks predict's hints when the class is defined: a fresh interpreter sees it
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-W", "always", "-c", "import pipeline.pyfunc_model"], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "type hint" not in out.stderr.lower(), out.stderr
