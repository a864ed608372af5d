import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"  # the embedded default config: the base of most tests' configs
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "false")
# every process the tests start talks over loopback only: gloo (DDP, DeepSpeed on CPU) binds the
# loopback interface, and a local Ray advertises 127.0.0.1 instead of the machine's address
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
torch.set_num_threads(2)

RESOURCE_MARKERS = ("multiprocess", "ray", "server")


def pytest_collection_modifyitems(config, items):
    """A test that needs a resource is slow too: ``-m "not slow"`` stays the quick loop."""
    for item in items:
        if any(item.get_closest_marker(m) for m in RESOURCE_MARKERS) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """scikit-learn's real digits as WebDataset shards, written once per test session."""
    from pipeline.data.convert import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(root, image_size=16, per_shard=128)
    return root


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    from pipeline.data.convert import write_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, num_classes=4, image_size=16, train_samples=96, val_samples=32, per_shard=16)
    return root
