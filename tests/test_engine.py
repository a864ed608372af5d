"""The engine: its schedules, the order of a step's hooks, resuming a phase mid-way, and a phase
handing the trained module back to the recipe's loop."""

import math

import pytest
import torch
from torch import nn

from pipeline.config import build_config
from pipeline.distributed import DistInfo
from pipeline.engine import TrainPhase, fast_forward, lr_schedule
from tests.helpers.factories import ListLoader

CPU = torch.device("cpu")


def _train(**kw):
    return build_config({"train": kw}).train


def _run(model, train, info, epochs: range, method=None, total=3):
    with TrainPhase(model, train, info, ListLoader(), 4, total, first_epoch=epochs.start, method=method) as phase:
        stats = [phase.train_epoch(e) for e in epochs]
    return phase.module, stats


# --- the engine's schedules -----------------------------------------------------------------------
def _lrs(train, per_epoch, epochs, skip=0):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=train.lr)
    sched = lr_schedule(opt, train, per_epoch, epochs)
    fast_forward(sched, skip)
    out = []
    for _ in range(per_epoch * epochs - skip):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_step_schedule_drops_by_gamma_at_each_milestone_epoch():
    t = _train(lr=0.1, schedule="step", milestones=[2, 4], gamma=0.1)
    lrs = _lrs(t, per_epoch=3, epochs=5)
    want = [0.1] * 6 + [0.01] * 6 + [0.001] * 3  # epochs 0-1, 2-3, 4
    assert lrs == pytest.approx(want)


def test_step_schedule_restarts_every_cycle_and_warms_up():
    t = _train(lr=1.0, schedule="step", milestones=[1], gamma=0.5, cycle_epochs=2, warmup_epochs=1)
    lrs = _lrs(t, per_epoch=2, epochs=4)
    assert lrs[:2] == pytest.approx([0.5, 1.0])  # linear warm-up over the first epoch's 2 steps
    assert lrs[2:] == pytest.approx([0.5, 0.5, 1.0, 1.0, 0.5, 0.5])  # epoch 1 stepped; epoch 2 restarts


def test_cosine_schedule_is_unchanged_default():
    t = _train(lr=1.0)
    lrs = _lrs(t, per_epoch=2, epochs=2)
    assert lrs == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])


def test_fast_forward_gives_the_same_learning_rates_as_running():
    t = _train(lr=0.1, schedule="step", milestones=[1, 3], gamma=0.2)
    full = _lrs(t, per_epoch=4, epochs=4)
    assert _lrs(t, per_epoch=4, epochs=4, skip=6) == pytest.approx(full[6:])


# --- the engine's order: hook before schedule, and resume ----------------------------------------
class _RecordLr:
    """A method that records the learning rate its post-step hook sees."""

    def __init__(self):
        self.seen = []

    def loss_term(self, model):
        return None

    def after_step(self, model, optimizer):
        self.seen.append(optimizer.param_groups[0]["lr"])

    def on_epoch_end(self, model, epoch):
        pass

    def optimizer_overrides(self):
        return {}

    def lr_scales(self, model):
        return {}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def test_after_step_sees_the_steps_own_lr_and_resume_fast_forwards():
    t = _train(lr=1.0, schedule="step", milestones=[1, 2], gamma=0.1, amp="off", channels_last="off")
    info = DistInfo(0, 1, 0, CPU)
    full = _RecordLr()
    _run(_net(), t, info, range(0, 3), full)
    assert full.seen == pytest.approx([1.0] * 3 + [0.1] * 3 + [0.01] * 3)  # the step's own lr, not the next
    resumed = _RecordLr()
    _run(_net(), t, info, range(2, 3), resumed)
    assert resumed.seen == pytest.approx(full.seen[6:])




def test_a_phase_trains_the_model_it_was_given_and_hands_it_back_unwrapped():
    t = _train(lr=0.5, amp="off", channels_last="off")
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    module, stats = _run(net, t, DistInfo(0, 1, 0, CPU), range(0, 2))
    assert module is net  # the same plain module, not a wrapper: the recipe evaluates and saves it
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert [s["steps"] for s in stats] == [3, 3]
    assert all(math.isfinite(s["train_loss"]) for s in stats)


def test_a_phase_resumed_from_its_state_takes_the_same_steps_as_one_run_through():
    t = _train(lr=0.1, momentum=0.9, amp="off", channels_last="off")
    info = DistInfo(0, 1, 0, CPU)
    whole, _ = _run(_net(), t, info, range(0, 2), total=2)
    with TrainPhase(_net(), t, info, ListLoader(), 4, 2) as first:
        first.train_epoch(0)
        state, weights = first.state_dict(), {k: v.clone() for k, v in first.module.state_dict().items()}
    net = _net()
    net.load_state_dict(weights)
    with TrainPhase(net, t, info, ListLoader(), 4, 2, first_epoch=1, optimizer_state=state) as second:
        second.train_epoch(1)
    for a, b in zip(whole.state_dict().values(), second.module.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
