"""Run under `torchrun --nproc_per_node=2`: rank 1's reader runs short ("short") or fails ("fail")
while rank 0's still has batches; writes what each rank saw for the test to check."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.data.errors import BadDataError, BadSampleLog  # noqa: E402
from pipeline.distributed import init_distributed, shutdown_distributed  # noqa: E402
from pipeline.engine import train_epoch  # noqa: E402
from tests.helpers.ddp_check import ddp_backend  # noqa: E402


class FakeLoader:
    """Declares 6 batches on every rank (as a manifest would); rank 1 really holds fewer."""

    def __init__(self, rank: int, mode: str) -> None:
        self.rank, self.mode = rank, mode
        self.errors = BadSampleLog("skip")
        self.max_bad_fraction = 1.0

    def __len__(self) -> int:
        return 6

    def __iter__(self):
        g = torch.Generator().manual_seed(self.rank)
        for i in range(6):
            if self.rank == 1 and i == 3:
                if self.mode == "fail":
                    raise BadDataError("shard train/x.tar key k7: undecodable image")
                return  # short: 3 of 6 batches
            yield torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)


def main(out: str, mode: str) -> None:
    info = init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3))
    backend = ddp_backend(model, info)
    result = {"rank": info.rank}
    try:
        stats = train_epoch(backend, FakeLoader(info.rank, mode), info)
        result["steps"] = stats["steps"]
    except BadDataError as err:
        result["error"] = str(err)
    Path(f"{out}.{info.rank}").write_text(json.dumps(result))
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
