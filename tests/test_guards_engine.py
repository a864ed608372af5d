"""The engine's numbers: ``evaluate`` against figures computed by hand, and the optimizer's
parameter groups (no weight decay on BN and biases; a method's own learning rates)."""

import pytest
import torch
import torchvision

from pipeline.distributed import DistInfo
from pipeline.engine import cosine_schedule, evaluate, make_optimizer
from tests.helpers.known_eval import KNOWN_SPLIT, N_SAMPLES, expected_metrics, known_batches, known_model

ONE = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.mark.parametrize("batch", [1, 5, N_SAMPLES])
def test_evaluate_gives_the_known_top1_top5_and_loss(batch):
    got = evaluate(known_model(), known_batches(0, N_SAMPLES, batch), ONE)
    want = expected_metrics()
    assert 0.3 < want["val_top1"] < want["val_top5"] < 1.0  # the set is not degenerate
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (k, got, want)


def test_evaluate_of_one_share_is_that_share_not_the_whole():
    # the 2-rank test relies on the shares being different: a rank alone must not see the whole set
    lo, hi = KNOWN_SPLIT[1]
    got = evaluate(known_model(), known_batches(lo, hi, 4), ONE)
    assert got["val_top1"] == pytest.approx(expected_metrics(lo, hi)["val_top1"])
    assert got["val_top1"] != pytest.approx(expected_metrics()["val_top1"])


def _group_of(opt: torch.optim.Optimizer, p: torch.nn.Parameter) -> dict:
    hits = [g for g in opt.param_groups if any(q is p for q in g["params"])]
    assert len(hits) == 1, "a parameter must be in exactly one group"
    return hits[0]


def test_optimizer_decays_conv_and_linear_weights_only_and_scales_given_lrs():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    gate = model.layer1[0].bn1.weight  # stands in for a method's score parameter
    model.layer2[0].conv1.weight.requires_grad_(False)
    opt = make_optimizer(model, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, lr_scales={gate: 10.0})
    seen = sum(len(g["params"]) for g in opt.param_groups)
    assert seen == sum(1 for p in model.parameters() if p.requires_grad)  # the frozen one is left out
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert all(all(q is not p for q in g["params"]) for g in opt.param_groups), name
            continue
        g = _group_of(opt, p)
        if p is gate:
            assert g["lr"] == pytest.approx(1.0) and g["weight_decay"] == 0.0
        elif name.endswith("weight") and p.ndim > 1:  # conv and fc weights
            assert g["weight_decay"] == 1e-3 and g["lr"] == pytest.approx(0.1), name
        else:  # BN γ/β and the fc bias
            assert g["weight_decay"] == 0.0 and g["lr"] == pytest.approx(0.1), name
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


def test_weight_decay_moves_only_decayed_parameters_and_schedule_keeps_lr_ratio():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    gate = model[1].bias
    opt = make_optimizer(model, lr=0.5, momentum=0.0, nesterov=False, weight_decay=0.1, lr_scales={gate: 4.0})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: only weight decay can move a parameter
    after = dict(model.named_parameters())
    assert torch.allclose(after["0.weight"], before["0.weight"] * (1 - 0.5 * 0.1))
    for n in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(after[n].detach(), before[n]), n
    sched = cosine_schedule(opt, total_steps=10, warmup_steps=2)
    for _ in range(5):
        opt.step()
        sched.step()
        lr = _group_of(opt, model[0].weight)["lr"]
        assert _group_of(opt, gate)["lr"] == pytest.approx(4.0 * lr)


def test_nesterov_only_with_momentum_and_only_when_asked():
    model = torch.nn.Linear(3, 2)
    assert not make_optimizer(model, 0.1, 0.9, False, 0.0).defaults["nesterov"]
    # SGD refuses Nesterov without momentum: asked for with momentum 0, it is quietly off
    assert not make_optimizer(model, 0.1, 0.0, True, 0.0).defaults["nesterov"]


def test_cosine_schedule_warms_up_linearly_then_follows_the_half_cosine_to_zero():
    import math

    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    total, warm = 20, 4
    sched = cosine_schedule(opt, total_steps=total, warmup_steps=warm)
    seen = []
    for _ in range(total + 3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for step, lr in enumerate(seen):
        if step < warm:
            want = (step + 1) / warm
        else:
            want = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / (total - warm))))
        assert lr == pytest.approx(want, abs=1e-12), step
    assert seen[warm] == pytest.approx(1.0) and seen[total] == pytest.approx(0.0, abs=1e-12)
    assert seen[warm + (total - warm) // 2] == pytest.approx(0.5)
