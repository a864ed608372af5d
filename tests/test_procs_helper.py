"""The tests' guard for hung multi-process jobs (tests/helpers/procs.py): a torchrun job whose ranks
and their forked workers hang is reported with each process's stack, and none of them survives."""

import os
import sys
import textwrap

import _pytest.outcomes
import pytest

from tests.helpers.procs import alive, run_tree

pytestmark = pytest.mark.multiprocess

HANG = textwrap.dedent("""
    import multiprocessing as mp, os, sys, time

    def worker_waits_forever():
        time.sleep(3600)

    def rank_waits_on_its_worker(pids):
        child = mp.get_context("fork").Process(target=worker_waits_forever)
        child.start()
        with open(pids, "a") as f:
            f.write(f"{os.getpid()} {child.pid}\\n")
        child.join()

    if __name__ == "__main__":
        rank_waits_on_its_worker(sys.argv[1])
""")


def test_a_hung_torchrun_job_fails_with_every_stack_and_leaves_no_process(tmp_path):
    script, pids = tmp_path / "hang.py", tmp_path / "pids"
    script.write_text(HANG)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(pids)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}  # the helper must set it itself
    with pytest.raises(_pytest.outcomes.Failed) as failed:
        run_tree(cmd, timeout=20, env={**env, "OMP_NUM_THREADS": "1"})
    started = [int(p) for line in pids.read_text().splitlines() for p in line.split()]
    assert len(started) == 4, "both ranks and both workers should have started within 20 s"
    message = str(failed.value)
    assert "still running after 20 s" in message
    # faulthandler's stacks: each worker in its sleep, each rank waiting on its worker
    assert message.count("in worker_waits_forever") == 2, message[-4000:]
    assert message.count("in rank_waits_on_its_worker") >= 2, message[-4000:]
    assert not [p for p in started if alive(p)]
