"""Drive a method through the recipe's life cycle on a small model (shared by the tests)."""

import copy

import torch
import torchvision

from methods import SelectContext, get_method_class
from pipeline.surgery import apply_masks, find_groups, prune_model


def calib(n=32, size=32, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g))]


def fitted_resnet18(size: int):
    """A ResNet-18 fitted to its calibration batch (``calib(32, size)``), eval mode; returns
    (model, batches). On an untrained net, masking channels hardly moves (or even lowers) the
    loss, so any δ prunes most of every group: lossvar's tests need channels that matter."""
    from pipeline.engine import recalibrate_bn

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    data = calib(32, size)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(30):
        x, y = data[0]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    recalibrate_bn(model, data)
    return model.eval(), data


def run_lifecycle(name, model, ratio=0.4, steps=3, size=32, options=None, lr=0.01, seed=1):
    """prepare → a few training steps → keep_masks → finalize; returns (method, groups, masks)."""
    torch.manual_seed(seed)  # as every rank is seeded alike before prepare()
    groups = find_groups(model, size, "inner")
    if name == "lossvar" and options is None:
        options = {"delta": 0.05}  # a fixed δ: the δ search has its own tests (test_lossvar.py)
    method = get_method_class(name)(groups, ratio, round_to=1, options=options, seed=seed, image_size=size)
    method.prepare(model)
    if method.training_aware and steps:
        method.on_train_start(model, steps_per_epoch=steps, epochs=1)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=method.optimizer_overrides().get("momentum", 0.9))
        model.train()
        data = calib(16, size, seed=seed)
        for _ in range(steps):
            x, y = data[0]
            loss = torch.nn.functional.cross_entropy(model(x), y)
            extra = method.loss_term(model)
            if extra is not None:
                loss = loss + extra
            opt.zero_grad()
            loss.backward()
            opt.step()
            method.after_step(model, opt)
    model.eval()
    masks = method.keep_masks(model, SelectContext(calib=calib(size=size), image_size=size))
    method.finalize(model, masks)
    return method, groups, masks


def cut_equals_masked(model, groups, masks, size=32, rel=1e-5):
    masked = copy.deepcopy(model).eval()
    apply_masks(masked, groups, masks)
    pruned = prune_model(copy.deepcopy(masked), groups, masks, size)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = masked(x)
        err = (ref - pruned(x)).abs().max() / ref.abs().max().clamp_min(1e-6)
    return float(err) < rel


def randomise_bn(model, shift=-0.5):
    """Fresh BNs are identity maps; random statistics make equality tests meaningful."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) + shift)
