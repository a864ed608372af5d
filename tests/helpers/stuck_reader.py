"""Readers for the worker tests, importable by DataLoader workers started by a forkserver (a
monkeypatch of the test's class would not reach them: they are not forked from the test).

As a program (``python -m tests.helpers.stuck_reader ROOT WORKERS``): read ``ROOT``'s val split
with a decode that never returns, under ``data.worker_timeout_s=2``, and print as JSON the error,
how long it took, the stuck workers' pids and those still alive 30 s later. In a process of its
own so that the forkserver, and the stderr its workers print their stacks to, are this run's.
"""

import json
import os
import sys
import time

from pipeline.data.loaders import ShardedSamples


class StuckSamples(ShardedSamples):
    def _decode(self, sample):
        return waits_forever()


def waits_forever():
    time.sleep(3600)


class ParentOfWorker(ShardedSamples):
    """Labels each sample with the pid of the process that forked the worker reading it."""

    def _decode(self, sample):
        image, _, bad = super()._decode(sample)
        return image, os.getppid(), bad


def main(root: str, workers: int) -> dict:
    import torch

    from pipeline.config import DataConfig
    from pipeline.data import loaders
    from tests.helpers.procs import alive

    cfg = DataConfig(root=root, image_size=16, batch_size=8, num_workers=workers, worker_timeout_s=2)
    # the forkserver starts once per process (about 3 s here): started by a good loader first,
    # so the 2 s time the stuck read, not the server's imports
    next(iter(loaders.build_loader(cfg, "val", 0, 1, torch.device("cpu"))))
    loaders.ShardedSamples = StuckSamples
    it = iter(loaders.build_loader(cfg, "val", 0, 1, torch.device("cpu")))
    started = time.monotonic()
    try:
        next(it)
    except loaders.DataStallError as err:
        message, seconds = str(err), time.monotonic() - started
    else:
        return {"error": None}
    pids = [int(p) for p in message.split("worker processes [")[1].split("]")[0].split(", ")]
    del it
    deadline = time.monotonic() + 30  # the DataLoader's own shutdown ends its workers
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return {"error": message, "seconds": seconds, "pids": pids, "left": [p for p in pids if alive(p)]}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
