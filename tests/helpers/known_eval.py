"""A model of known accuracy on a known set: sample ``i`` is the one-pixel image ``[i]`` and the
model's logits for it are row ``i`` of a fixed random table, so top-1, top-5 and the loss of
any subset follow from the table alone (:func:`expected_metrics`, plain Python arithmetic)."""

import math

import torch
from torch import nn

N_SAMPLES, N_CLASSES = 37, 9
# an uneven split of the set over 2 ranks: a per-rank mean averaged over ranks would be wrong
KNOWN_SPLIT = [(0, 24), (24, N_SAMPLES)]


def _table() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(N_SAMPLES, N_CLASSES, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, N_CLASSES, (N_SAMPLES,), generator=g)
    labels[::3] = logits[::3].argmax(1)  # a third right for sure: top-1 well above chance
    return logits.float(), labels


class TableModel(nn.Module):
    """Logits of sample ``i`` = row ``i`` of the table (the image holds ``i``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", _table()[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()]


def known_model() -> TableModel:
    return TableModel()


def known_batches(lo: int, hi: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Samples ``lo..hi-1`` in batches of ``batch``."""
    labels = _table()[1]
    idx = list(range(lo, hi))
    return [(torch.tensor(idx[i:i + batch], dtype=torch.float32)[:, None], labels[idx[i:i + batch]])
            for i in range(0, len(idx), batch)]


def expected_metrics(lo: int = 0, hi: int = N_SAMPLES) -> dict[str, float]:
    """Top-1, top-5 and mean cross-entropy of samples ``lo..hi-1``, from the table by hand."""
    logits, labels = _table()
    top1 = top5 = loss = 0.0
    for i in range(lo, hi):
        row = [float(v) for v in logits[i]]
        y = int(labels[i])
        above = sum(v > row[y] for v in row)  # classes ranked ahead of the true one
        top1 += above == 0
        top5 += above < 5
        loss += math.log(sum(math.exp(v) for v in row)) - row[y]
    n = hi - lo
    return {"val_top1": top1 / n, "val_top5": top5 / n, "val_loss": loss / n}
