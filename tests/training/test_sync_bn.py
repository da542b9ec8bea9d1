"""The synchronised uncentred BatchNorm: 2 gloo processes compute the statistics, outputs and gradients of one
process with the whole batch; outside a process group it is the plain layer."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import torch

from bcosify.nn import SyncUncenteredBatchNorm2d, UncenteredBatchNorm2d, sync_batchnorm

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sync_bn_entry import batch  # noqa: E402


def _full_batch(x, w, layer):
    x = x.clone().requires_grad_()
    out = layer.train()(x)
    (out * w).sum().backward()
    return out.detach(), x.grad, layer.weight.grad, layer.running_var


def test_two_processes_compute_the_full_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(HERE / "sync_bn_entry.py"), str(tmp_path)], capture_output=True, text=True, env=env,
                            timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    out, x_grad, weight_grad, running_var = _full_batch(*batch())
    assert [r["kind"] for r in ranks] == ["SyncUncenteredBatchNorm2d"] * 2
    assert [r["after"] for r in ranks] == ["UncenteredBatchNorm2d"] * 2  # plain again after the run
    for r in ranks:  # the running variance of the global batch (unbiased over its 8 x 25 values) in each process
        torch.testing.assert_close(r["running_var"], running_var, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out, rtol=1e-10, atol=1e-12)
    # the input gradient includes the other process's share of the loss (through the shared statistics)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ranks[0]["weight_grad"] + ranks[1]["weight_grad"], weight_grad, rtol=1e-10, atol=1e-12)
    # the check can fail: a process alone (per-process statistics, the default) computes something else
    x, w, layer = batch()
    half_out, half_grad, _, half_var = _full_batch(x[:4], w[:4], layer)
    assert not torch.allclose(half_var, running_var, rtol=1e-3) and not torch.allclose(half_out, out[:4], rtol=1e-3)
    assert not torch.allclose(half_grad, x_grad[:4], rtol=1e-3)


def test_alone_it_is_the_plain_layer_and_saves_as_one():
    x, w, layer = batch()
    reference = _full_batch(x, w, batch()[2])
    with sync_batchnorm(layer):
        assert isinstance(layer, SyncUncenteredBatchNorm2d)
        synced = _full_batch(x, w, layer)
        keys = set(layer.state_dict())
    assert type(layer) is UncenteredBatchNorm2d and keys == set(layer.state_dict())
    for a, b in zip(synced, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
