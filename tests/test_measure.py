"""Interleaved dense-vs-pruned timing: the median per-round speed-up survives contention, and a
measurement that stays noisy is flagged unreliable instead of reported as a plain number."""

import os
import random

import pytest
import torch
from torch import nn

from pipeline.measure import TimingConfig, compare, count_macs, time_models


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


def _timed_pair(dense, pruned, image_size, timer, check_contention=None, **settings):
    """The pruned model's record from timing the pair under a protocol with ``settings``."""
    records = time_models([dense, pruned], image_size, TimingConfig(**settings), timer=timer,
                          check_contention=check_contention)
    return records[1]


def test_quiet_machine_gives_the_true_ratio_reliably():
    dense, pruned = _pair()
    timer = FakeTimer({id(dense): 2.0, id(pruned): 1.0}, noise=lambda r: r.uniform(0.99, 1.01))
    s = _timed_pair(dense, pruned, 8, batch_size=2, rounds=10, warmup=1, timer=timer)
    assert s.reliable and s.attempts == 1
    assert s.speedup == pytest.approx(2.0, rel=0.03)
    assert s.speedup_low <= s.speedup <= s.speedup_high and s.spread < 0.05


def test_a_hog_that_hits_some_rounds_does_not_move_the_median():
    dense, pruned = _pair()

    def hog(r):  # a quarter of the calls run 3x slower (another job took the cores)
        return 3.0 if r.random() < 0.25 else r.uniform(0.98, 1.02)

    timer = FakeTimer({id(dense): 2.5, id(pruned): 1.0}, noise=hog, seed=1)
    s = _timed_pair(dense, pruned, 8, batch_size=2, rounds=20, per_round=3, warmup=1, timer=timer)
    assert s.speedup == pytest.approx(2.5, rel=0.08)


def test_persistent_noise_is_remeasured_then_flagged_unreliable():
    dense, pruned = _pair()
    timer = FakeTimer({id(dense): 1.0, id(pruned): 1.0}, noise=lambda r: r.uniform(0.3, 3.0), seed=2)
    s = _timed_pair(dense, pruned, 8, batch_size=2, rounds=6, warmup=0, attempts=2, max_spread=0.1, timer=timer)
    assert not s.reliable
    assert s.attempts == 2 and s.rounds == 12  # measured again with twice the rounds before giving up


def test_rounds_alternate_which_model_runs_first():
    dense, pruned = _pair()
    timer = FakeTimer({id(dense): 1.0, id(pruned): 1.0})
    _timed_pair(dense, pruned, 8, batch_size=2, rounds=4, per_round=1, warmup=0, timer=timer)
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
        s = _timed_pair(dense, pruned, 8, batch_size=2, rounds=8, per_round=1, warmup=0, attempts=1,
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


def test_n_models_in_one_interleaved_run_give_a_record_each_against_the_first():
    dense, half, quarter = nn.Conv2d(3, 16, 3), nn.Conv2d(3, 8, 3), nn.Conv2d(3, 4, 3)
    timer = FakeTimer({id(dense): 4.0, id(half): 2.0, id(quarter): 1.0})
    dense_r, half_r, quarter_r = time_models([dense, half, quarter], 8, TimingConfig(batch_size=2, rounds=6, warmup=0,
                                             per_round=1), labels=("dense", "half", "quarter"), timer=timer)
    assert [r.label for r in (dense_r, half_r, quarter_r)] == ["dense", "half", "quarter"]
    assert dense_r.speedup == dense_r.speedup_low == dense_r.speedup_high == 1.0 and dense_r.reliable
    assert half_r.speedup == pytest.approx(2.0) and quarter_r.speedup == pytest.approx(4.0)
    assert {r.dense_img_s for r in (dense_r, half_r, quarter_r)} == {dense_r.img_s} == {2 / 4.0}
    assert quarter_r.macs == count_macs(quarter, 8) and quarter_r.dense_macs == count_macs(dense, 8)
    # one run: every round times all three, and each model leads some round
    rounds = [timer.calls[i:i + 3] for i in range(0, len(timer.calls), 3)]
    assert len(rounds) == 6 and all(sorted(r) == sorted(map(id, (dense, half, quarter))) for r in rounds)
    assert {r[0] for r in rounds} == {id(dense), id(half), id(quarter)}


def test_one_noisy_model_of_three_remeasures_all_then_flags_only_itself():
    dense, steady, shaky = nn.Conv2d(3, 16, 3), nn.Conv2d(3, 8, 3), nn.Conv2d(3, 4, 3)
    rng = random.Random(3)

    def timer(model, x):
        return {id(dense): 2.0, id(steady): 1.0}.get(id(model)) or rng.uniform(0.2, 5.0)

    records = time_models([dense, steady, shaky], 8, TimingConfig(batch_size=2, rounds=4, warmup=0, attempts=3,
                                                                    per_round=1), timer=timer)
    assert [(r.rounds, r.attempts) for r in records] == [(16, 3)] * 3  # 4, then 8, then 16 rounds
    assert [r.reliable for r in records] == [True, True, False]
    assert "spread" in records[2].reason and records[0].reason == records[1].reason == ""


def test_timing_runs_with_the_protocols_threads_and_restores_them():
    dense, pruned = _pair()
    seen = []

    def timer(model, x):
        seen.append(torch.get_num_threads())
        return 1.0

    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    time_models([dense, pruned], 8, TimingConfig(batch_size=1, rounds=2, warmup=1, threads=want), timer=timer)
    assert set(seen) == {want} and torch.get_num_threads() == before


def test_the_protocol_from_a_measure_config_carries_every_field():
    from pipeline.config import MeasureConfig

    values = {"batch_size": 7, "warmup": 5, "rounds": 9, "max_spread": 0.3, "attempts": 4, "max_foreign_cpu": 0.4,
              "max_drift": 0.5, "fold_bn": False, "threads": 3}
    measure = MeasureConfig(**values)
    # a new field is added here and carried below (the latency table's settings are its own section)
    assert set(values) | {"latency_table", "memory_format", "compile", "cpu_allocator"} == set(type(measure).model_fields)
    protocol = TimingConfig.from_config(measure, "cpu", torch.bfloat16, channels_last=True)
    # max_drift compares separate measurements (a search's finalists), not a setting of one
    assert {k: getattr(protocol, k) for k in values if k != "max_drift"} == {k: v for k, v in values.items()
                                                                             if k != "max_drift"}
    assert protocol.device == torch.device("cpu") and protocol.amp_dtype is torch.bfloat16 and protocol.channels_last
    assert protocol.precision == "bf16"
    assert TimingConfig.from_config(MeasureConfig(), "cpu").threads == (os.cpu_count() or 1)  # 0: every core
    # as deployed by default: each model in its faster memory format, eager
    assert protocol.fastest_format and not protocol.compile
    assert not TimingConfig.from_config(MeasureConfig(memory_format="train"), "cpu").fastest_format
    assert TimingConfig.from_config(MeasureConfig(compile="on"), "cpu").compile
    assert not TimingConfig.from_config(MeasureConfig(compile="both"), "cpu").compile  # eager decides
    with pytest.raises(TypeError):
        protocol.replace(round=3)  # a misspelt setting is refused, not ignored


def test_compare_keeps_the_metric_names_runs_and_versions_are_logged_with():
    dense, pruned = _pair()
    m = compare(dense, pruned, 8, batch_size=2, rounds=4, warmup=0, timer=FakeTimer({id(dense): 2.0, id(pruned): 1.0}))
    assert list(m) == ["dense_macs", "macs", "macs_reduction", "dense_params", "params", "params_reduction",
                       "dense_img_s", "img_s", "speedup", "speedup_low", "speedup_high", "speed_spread", "speed_rounds",
                       "speed_reliable", "speed_foreign_cpu", "channels_last", "dense_channels_last", "macs_speedup",
                       "speedup_efficiency"]
    assert m["speed_rounds"] == 4 and m["speed_spread"] == 0.0 and m["img_s"] == 2.0 and m["dense_img_s"] == 1.0


def test_each_model_is_timed_in_its_own_faster_memory_format():
    dense, pruned = _pair()

    def timer(model, x):
        cl = not x.is_contiguous()  # the channels_last copy of a 3-channel input
        # the wide model runs faster in channels_last, the narrow one contiguous
        if model.out_channels == 8:
            return 1.0 if cl else 2.0
        return 1.5 if cl else 0.5

    records = time_models([dense, pruned], 8, TimingConfig(batch_size=2, rounds=6, warmup=0, fastest_format=True),
                          timer=timer)
    assert records[0].channels_last and not records[1].channels_last
    assert records[1].speedup == 2.0  # dense at its best (1.0) over pruned at its best (0.5)
    m = records[1].metrics()
    assert m["channels_last"] == 0.0 and m["dense_channels_last"] == 1.0
    # the training format for both instead: channels_last everywhere
    fixed = time_models([dense, pruned], 8, TimingConfig(batch_size=2, rounds=6, warmup=0, channels_last=True),
                        timer=timer)
    assert fixed[1].speedup == pytest.approx(1.0 / 1.5) and fixed[1].channels_last


def test_the_cached_allocator_keeps_large_activations_from_faulting_in_again():
    import resource

    from pipeline.config import MeasureConfig
    from pipeline.measure import cached_allocator

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    assert cached_allocator() and cached_allocator()  # glibc here; asking twice changes nothing
    for _ in range(6):  # a 64 MiB activation, allocated, touched and freed: glibc settles in a few
        torch.ones((64 << 20) // 4)
    before = faults()
    for _ in range(3):
        torch.ones((64 << 20) // 4)
    # the freed block is reused: mmap-ed afresh, each would fault its 16,384 pages in again
    assert faults() - before < 2000
    assert not TimingConfig.from_config(MeasureConfig(cpu_allocator="system"), "cpu").cached_allocator
