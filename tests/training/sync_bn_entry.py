"""``torchrun --nproc-per-node=N sync_bn_entry.py FOLDER``: each process runs its share of one batch through a
synchronised uncentred BatchNorm (forward and backward) and saves what it saw to ``FOLDER/rank<RANK>.pt``."""

import pathlib
import sys

import torch
import torch.distributed as dist

from bcosify.nn import UncenteredBatchNorm2d, sync_batchnorm


def batch(n: int = 8):
    """The global batch, its output weights (the loss is ``sum(out * w)``) and the layer, alike in every process
    (float64: the comparison is not about rounding)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, 3, 5, 5, generator=g) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1) + 2.0).double()
    w = torch.randn(n, 3, 5, 5, generator=g).double()
    layer = UncenteredBatchNorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(3, generator=g) + 0.5)
    return x, w, layer


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, w, layer = batch()
    share = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    x = x[share].clone().requires_grad_()
    with sync_batchnorm(layer):
        kind = type(layer).__name__
        out = layer.train()(x)
        (out * w[share]).sum().backward()
    torch.save({"kind": kind, "after": type(layer).__name__, "out": out.detach(), "x_grad": x.grad,
                "weight_grad": layer.weight.grad, "running_var": layer.running_var},
               pathlib.Path(sys.argv[1]) / f"rank{rank}.pt")
    dist.destroy_process_group()
