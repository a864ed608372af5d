"""The ImageNet data path end to end: a miniature ILSVRC-2012 tree (grayscale, CMYK, PNG-as-JPEG
and a corrupt file among its JPEGs, a flat val folder with the devkit's labels) is converted,
then `prunepipe prune` trains on it as a 2-rank DDP job through DALI's CPU pipeline and through
the PyTorch loader, and both readers see the same validation set."""

import json
import os
import sys

import pytest

from pipeline.data.imagenet import ConvertOptions, convert_imagenet
from tests.conftest import DEMO, ROOT
from tests.helpers.mini_imagenet import make_mini_imagenet
from tests.helpers.procs import run_tree

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    src = tmp_path_factory.mktemp("ilsvrc")
    mini = make_mini_imagenet(src, classes=12, train_per_class=12, val_per_class=4, size_range=(120, 260),
                              labels=("devkit",))
    out = tmp_path_factory.mktemp("wds") / "imagenet"
    result = convert_imagenet(ConvertOptions(src=src, out=out, per_shard=16, workers=2, progress=False))
    return mini, out, result


def test_conversion_of_a_realistic_tree(converted):
    mini, out, result = converted
    assert result.found == {"train": len(mini.train), "val": len(mini.val)}
    corrupt = len(mini.special.get("corrupt", []))
    assert corrupt >= 1 and sum(result.written.values()) == len(mini.train) + len(mini.val) - corrupt
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["classes"] == mini.wnids and manifest["num_classes"] == 12


@pytest.mark.parametrize("backend", ["dali", "webdataset"])
def test_prune_trains_under_two_rank_ddp(converted, tmp_path, backend):
    _, out, _ = converted
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "launch.cli",
           "prune", str(DEMO), f"data.root={out}", f"data.backend={backend}",
           "data.image_size=32", "data.augment=imagenet", "data.batch_size=16", "data.num_workers=1",
           "model.arch=resnet18", "model.weights=null", "prune.method=l1", "prune.prune_ratio=0.5",
           "train.budget_epochs=null", "train.epochs=2", "train.bn_recalib_batches=2", "measure.rounds=2",
           "measure.batch_size=8", f"output_dir={tmp_path / 'run'}", "registry.enabled=false"]
    # 12 s here alone: 300 s is room for a slow CI machine, and a hang costs 5 minutes, not 15
    proc = run_tree(cmd, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    finals = [json.loads(line.removeprefix("[prunepipe] ")) for line in proc.stdout.splitlines()
              if line.startswith("[prunepipe] {") and '"phase": "final"' in line]
    assert len(finals) == 1, proc.stdout[-3000:]
    final = finals[0]
    # 168 (12x12 + 24 val, minus the corrupt one) images: every rank took the same steps
    assert final["epochs"] == 2 and 0.0 <= final["val_top1"] <= 1.0
    assert (tmp_path / "run" / "model" / "spec.json").is_file()
    finetune = [json.loads(line.removeprefix("[prunepipe] ")) for line in proc.stdout.splitlines()
                if line.startswith("[prunepipe] {") and '"phase": "finetune"' in line]
    assert finetune and all(m["bad_samples"] == 0 and m["steps"] > 0 for m in finetune)
