"""A rank whose reader runs short or fails ends the epoch on every rank at once: no hang."""

import json
import os
import sys

import pytest

from tests.conftest import ROOT
from tests.helpers.procs import run_tree

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("mode", ["short", "fail"])
def test_short_or_failing_reader_on_one_rank_does_not_hang_ddp(tmp_path, mode):
    out = tmp_path / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "helpers" / "lockstep_check.py"), str(out), mode]
    proc = run_tree(cmd, timeout=240, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"r.{i}").read_text()) for i in (0, 1))
    if mode == "short":
        assert r0["steps"] == r1["steps"] == 3  # both stopped where rank 1's data ended
    else:
        assert "k7" in r1["error"]  # the failing rank names the sample
        assert "another rank" in r0["error"]  # the other stops too, instead of waiting for ever
