"""Gathering across ranks: a real 2-process gloo run under torchrun, compared with one process on the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monai_du.distributed import gather_no_grad, gather_with_grad, is_distributed

sys.path.insert(0, str(Path(__file__).parent))
from _ddp_worker import make_losses, make_problem  # noqa: E402


def test_gather_is_a_no_op_outside_a_process_group():
    assert not is_distributed()
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x
    assert gather_no_grad(x) is x


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "_ddp_worker.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)  # generous: 2 shared cores
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_gather_concatenates_uneven_shards_in_rank_order(ddp_results):
    x, prior, _ = make_problem()
    for result in ddp_results:
        torch.testing.assert_close(result["gathered_prior"], prior, rtol=0, atol=0)
        torch.testing.assert_close(result["gathered_x"], x, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["du", "kernel_du", "infonce", "y_aware"])
def test_ddp_loss_and_gradients_equal_single_process(ddp_results, name):
    x, prior, model = make_problem()
    loss = make_losses()[name](model(x), prior)
    loss.backward()
    want = [p.grad for p in model.parameters()]
    for result in ddp_results:
        assert float(result[name]["loss"]) == pytest.approx(float(loss), rel=1e-10)
        for got, ref in zip(result[name]["grads"], want):
            torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-12)
