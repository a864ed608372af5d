"""Interleaved dense-vs-pruned timing: the median per-round speed-up survives contention, and a
measurement that stays noisy is flagged unreliable instead of reported as a plain number."""

import os
import random

import pytest
import torch
from torch import nn

from pipeline.measure import compare, count_macs, interleaved_speedup


class FakeTimer:
    """Seconds per forward = a model's 'true' cost × contention noise; records the call order."""

    def __init__(self, cost: dict[int, float], noise=lambda rng: 1.0, seed=0):
        self.cost, self.noise, self.rng = cost, noise, random.Random(seed)
        self.calls: list[int] = []

    def __call__(self, model, x):
        self.calls.append(id(model))
        return self.cost[id(model)] * self.noise(self.rng)


def _pair():
    return nn.Conv2d(3, 8, 3), nn.Conv2d(3, 4, 3)


def test_quiet_machine_gives_the_true_ratio_reliably():
    dense, pruned = _pair()
    timer = FakeTimer({id(dense): 2.0, id(pruned): 1.0}, noise=lambda r: r.uniform(0.99, 1.01))
    s = interleaved_speedup(dense, pruned, 8, batch_size=2, rounds=10, warmup=1, timer=timer)
    assert s.reliable and s.attempts == 1
    assert s.speedup == pytest.approx(2.0, rel=0.03)
    assert s.low <= s.speedup <= s.high and s.spread < 0.05


def test_a_hog_that_hits_some_rounds_does_not_move_the_median():
    dense, pruned = _pair()

    def hog(r):  # a quarter of the calls run 3x slower (another job took the cores)
        return 3.0 if r.random() < 0.25 else r.uniform(0.98, 1.02)

    timer = FakeTimer({id(dense): 2.5, id(pruned): 1.0}, noise=hog, seed=1)
    s = interleaved_speedup(dense, pruned, 8, batch_size=2, rounds=20, per_round=3, warmup=1, timer=timer)
    assert s.speedup == pytest.approx(2.5, rel=0.08)


def test_persistent_noise_is_remeasured_then_flagged_unreliable():
    dense, pruned = _pair()
    timer = FakeTimer({id(dense): 1.0, id(pruned): 1.0}, noise=lambda r: r.uniform(0.3, 3.0), seed=2)
    s = interleaved_speedup(dense, pruned, 8, batch_size=2, rounds=6, warmup=0, attempts=2, max_spread=0.1, timer=timer)
    assert not s.reliable
    assert s.attempts == 2 and s.rounds == 12  # measured again with twice the rounds before giving up


def test_rounds_alternate_which_model_runs_first():
    dense, pruned = _pair()
    timer = FakeTimer({id(dense): 1.0, id(pruned): 1.0})
    interleaved_speedup(dense, pruned, 8, batch_size=2, rounds=4, per_round=1, warmup=0, timer=timer)
    firsts = [timer.calls[i] for i in range(0, 8, 2)]
    assert firsts == [id(dense), id(pruned), id(dense), id(pruned)]  # ABBA...


def test_compare_reports_spread_and_flag_and_real_macs():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    pruned = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1))
    timer = FakeTimer({id(dense): 2.0, id(pruned): 1.0})
    m = compare(dense, pruned, 8, batch_size=2, rounds=4, warmup=0, timer=timer)
    assert m["speed_reliable"] == 1.0 and m["speedup"] == pytest.approx(2.0)
    assert m["speedup_low"] <= m["speedup"] <= m["speedup_high"]
    assert m["macs"] == count_macs(pruned, 8) < m["dense_macs"] == count_macs(dense, 8)
    assert m["speedup_efficiency"] == pytest.approx(2.0 / (m["dense_macs"] / m["macs"]))


def test_a_steady_hog_on_the_cores_is_flagged_even_when_the_ratio_looks_tight():
    """Load that stays makes every forward equally slow: the ratio comes out tight and wrong.
    Other processes burning the CPUs while we time must mark the result unreliable."""
    import subprocess
    import sys
    import time

    dense, pruned = _pair()

    def sleepy(model, x):  # wall time passes, this process uses no CPU: all the busy time is foreign
        time.sleep(0.02)
        return 0.02

    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)
        s = interleaved_speedup(dense, pruned, 8, batch_size=2, rounds=8, per_round=1, warmup=0, attempts=1,
                                timer=sleepy, check_contention=True)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert s.spread == 0.0  # perfectly tight...
    assert s.foreign_cpu > 0.5 and not s.reliable  # ...and still not to be trusted


@pytest.mark.parametrize("round_to, device, warned", [(1, "cuda", True), (4, "cuda", True), (12, "cuda", True),
                                                      (8, "cuda", False), (64, "cuda", False), (1, "cpu", False)])
def test_round_to_warning_only_for_widths_tensor_cores_dislike_on_a_gpu(round_to, device, warned):
    from pipeline.engine import round_to_warning

    note = round_to_warning(round_to, torch.device(device))
    assert (note is not None) == warned
    if warned:
        assert f"prune.round_to = {round_to}" in note and "multiple" in note
