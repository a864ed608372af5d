"""Run a whole search in a fresh process, as ``prunepipe search`` does, and hand its result back.

Why not in the pytest process: a search starts a local Ray in the process that calls it and shuts
it down at the end. Ray's core worker is not made to be started and shut down again and again in
one process (ray-project/ray#31145: threads of an earlier session touch freed state), and the
suite's process that had done so three times crashed at exit in CI with a segmentation fault,
after every test had passed. A spawned child owns one Ray session, as a user's command does, and
exits with it; exceptions still reach the test with their traceback.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor


def run_search_in_child(cfg, **kwargs) -> dict:
    from launch.search import run_search

    # spawn, not fork: the parent has torch's thread pools (and may have imported Ray) already
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_search, cfg, **kwargs).result()
