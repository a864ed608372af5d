"""`prunepipe` with Ray and MLflow made unimportable, as on a machine without them: run under
torchrun by tests/test_deepspeed.py to show a ``registry.enabled=false`` trial needs neither."""

import sys
from pathlib import Path

BLOCKED = {"ray", "mlflow"}


class _Blocker:
    """A meta-path finder that fails every import of a blocked top-level package."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launch.cli import main  # noqa: E402

if __name__ == "__main__":
    code = main(sys.argv[1:])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    sys.exit(code)
