"""The browser check (scripts/browser_check.py) on a small store laid out as a search leaves it:
a parent run, a named trial run with a dataset input, a registered pyfunc version. Skipped
when Chromium is not installed."""

import sys

import mlflow
import pytest

from pipeline import registry
from pipeline.config import RegistryConfig
from pipeline.pyfunc_model import log_pyfunc
from tests.conftest import ROOT
from tests.helpers.factories import saved_pruned_model

sys.path.insert(0, str(ROOT / "scripts"))
import browser_check  # noqa: E402

pytestmark = [pytest.mark.server,
              pytest.mark.skipif(browser_check.find_chromium() is None,
                                 reason="Chromium is not installed (Debian: apt-get install chromium)")]


def test_browser_check_sees_a_readable_store(tmp_path, digits_root):
    from pipeline.data.manifest import read_manifest

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = registry.connect(RegistryConfig(tracking_uri=uri, experiment="seen", model_name="tiny"))
    folder = saved_pruned_model(tmp_path / "model")
    with mlflow.start_run(run_name="search demo") as parent:
        pass
    with mlflow.start_run(run_name=registry.run_name("l1", "r0.50", "abc_00000"),
                          parent_run_id=parent.info.run_id) as run:
        manifest = read_manifest(digits_root, verify=False)
        registry.log_dataset(digits_root, "train", manifest)
        mlflow.set_tag(registry.MODEL_ID_TAG, log_pyfunc(folder).model_id)
    registry.register(client, "tiny", run.info.run_id, {"val_top1": 0.5}, description="## card")
    out = tmp_path / "shots"
    assert browser_check.main(["--store", uri, "--experiment", "seen", "--model", "tiny", "--out", str(out)]) == 0, \
        (out / "findings.txt").read_text()
    for page in ("experiment", "run", "model"):
        assert (out / f"{page}.png").stat().st_size > 10_000  # a drawn page, not an empty frame
    # and a store with a run left RUNNING fails the check
    mlflow.start_run(run_name="l1 r0.60 abc_00001", parent_run_id=parent.info.run_id)
    assert browser_check.main(["--store", uri, "--experiment", "seen", "--model", "tiny", "--out", str(out)]) == 1
    assert "RUNNING" in (out / "findings.txt").read_text()
    mlflow.end_run()
