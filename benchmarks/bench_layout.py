"""Benchmark: a pretraining step of the shipped networks in PyTorch's default layout and in the layout that
:func:`monai_du.networks.to_device` gives on a CPU (channels last), side by side.

Run: ``python benchmarks/bench_layout.py [--cases cxr:64:64 cxr:224:32 brain:32:32 brain:48:16] [--threads 1 2]
[--steps 6] [--rounds 3]``

A case ``bundle:size:batch`` reads ``network_def`` from that pretrain bundle's ``configs/train.yaml``
(``cxr``: ``bundles/cxr_du_pretrain``, 2D; ``brain``: ``bundles/brain_mri_du_pretrain``, 3D) and builds it twice from
the same seed: **default** (``network.to("cpu")``, contiguous weights) and **to_device** (``to_device(network,
"cpu")``). A step is what the bundle's trainer does per batch: zero_grad, forward of ``(batch, 2, 1, *size)``
random views, ``DecoupledUniformityLoss(t=2)``, backward, AdamW step. Per case and thread count: one warm-up step per
arm, then ``rounds`` rounds of ``steps`` timed steps, the arms alternating round by round so that load from other
processes hits both alike. Prints images/s (median step) of each arm, their ratio, and the largest difference of the
two arms' losses over the first step (the same weights and inputs: only the summation order may differ).

Timings are printed, never asserted. Other processes on the machine add noise: rerun when the numbers jump.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from monai.bundle import ConfigParser  # noqa: E402

from monai_du.losses import DecoupledUniformityLoss  # noqa: E402
from monai_du.networks import to_device  # noqa: E402

BUNDLES = {
    "cxr": (REPO / "bundles" / "cxr_du_pretrain" / "configs" / "train.yaml", 2),
    "brain": (REPO / "bundles" / "brain_mri_du_pretrain" / "configs" / "train.yaml", 3),
}


def bundle_network(bundle: str) -> torch.nn.Module:
    """The bundle's ``network_def`` (its backbone, width and projection head), built with seed 0."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES[bundle][0]))
    torch.manual_seed(0)
    return parser.get_parsed_content("network_def")


def make_step(network: torch.nn.Module, x: torch.Tensor):
    loss_fn = DecoupledUniformityLoss(t=2.0)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    network.train()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(network(x))
        loss.backward()
        optimizer.step()
        return loss.detach().item()

    return step


def bench_case(bundle: str, size: int, batch: int, threads: int, steps: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    dims = BUNDLES[bundle][1]
    x = torch.rand(batch, 2, 1, *([size] * dims), generator=torch.Generator().manual_seed(1))
    base = bundle_network(bundle)
    arms = {"default": make_step(copy.deepcopy(base).to("cpu"), x),
            "to_device": make_step(to_device(copy.deepcopy(base), "cpu"), x)}
    first = {name: step() for name, step in arms.items()}  # warm-up; the same weights, so the same loss
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, step in arms.items():
            for _ in range(steps):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    rate = {name: batch / statistics.median(t) for name, t in times.items()}
    return {"rate": rate, "loss_diff": abs(first["default"] - first["to_device"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["cxr:64:64", "cxr:224:32", "brain:32:32", "brain:48:16"],
                        help="bundle:size:batch")
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per arm and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available")
    print(f"{'case':>14} {'thr':>3} | {'default':>9} {'to_device':>9} | {'ratio':>5} | {'|loss diff|':>11}")
    for case in args.cases:
        bundle, size, batch = case.split(":")
        for threads in args.threads:
            out = bench_case(bundle, int(size), int(batch), threads, args.steps, args.rounds)
            rate = out["rate"]
            print(f"{case:>14} {threads:3d} | {rate['default']:9.1f} {rate['to_device']:9.1f} | "
                  f"{rate['to_device'] / rate['default']:5.2f} | {out['loss_diff']:11.2e}", flush=True)
    print("images/s (a 3D volume is one image; each image gives 2 views), median step of each arm. "
          "ratio = to_device / default.")


if __name__ == "__main__":
    main()
