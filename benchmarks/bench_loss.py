"""Kernel DU forward + backward: our solver paths against the published numerical route, side by side in one run.

Prior: age x sex x site (RBF x categorical x categorical), D = 128 embeddings, V = 2 views.
The published route forms ``alpha = torch.inverse(K + lam I) @ K`` explicitly, then ``alpha @ mu``.
Ours: the exact path (Cholesky solves, one per block of the block-diagonal kernel), the same exact solver on a dense
kernel (age RBF alone, no block structure, against the published route on that kernel), and the low-rank path
(Woodbury per block on Fourier features of the age RBF: the deterministic quadrature map, and random Fourier
features of rank 256).

Prints, for the whole loss and for the kernel step alone, median wall times over repeats and the ratio
published / ours; for the loss also the relative differences and the peak resident-memory increase of one
forward + backward measured in a fresh process. The DU term itself (B^2 D) is common to every route, so it bounds the
whole-loss ratio.

    python benchmarks/bench_loss.py [--sizes 256 1024 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch

from monai_du.kernels import CategoricalKernel, RBFKernel
from monai_du.losses import DecoupledUniformityLoss, _log_mean_exp_pairs, conditional_mean_centroids, view_centroids

LAM, DIM = 0.01, 128


def make_inputs(b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 2, DIM, generator=g)
    age = 20 + 70 * torch.rand(b, 1, generator=g)
    sex = torch.randint(0, 2, (b, 1), generator=g).float()
    site = torch.randint(0, 4, (b, 1), generator=g).float()
    return z, torch.cat([age, sex, site], 1)


def make_kernel(dense: bool, fourier: str = "auto", rank: int = 256):
    """Age RBF (bandwidth 5 years), times sex and site codes unless ``dense``."""
    age = RBFKernel(bandwidth=5.0, columns=[0], n_features=rank, fourier=fourier)
    return age if dense else age * CategoricalKernel(columns=[1]) * CategoricalKernel(columns=[2])


def published_centroids(mu: torch.Tensor, prior: torch.Tensor, kernel) -> torch.Tensor:
    """The published numerical route: explicit inverse, then two products (float32 as in the published code)."""
    gram = kernel(prior).to(mu.dtype)
    alpha = torch.inverse(gram + LAM * torch.eye(len(gram), dtype=mu.dtype)) @ gram
    return alpha @ mu


def published_route(z: torch.Tensor, prior: torch.Tensor, kernel) -> torch.Tensor:
    return _log_mean_exp_pairs(published_centroids(view_centroids(z), prior, kernel), 2.0)


def centroid_steps(dense: bool):
    """The kernel step alone, (B, D) centroids -> conditional-mean centroids, for each route."""
    kernel, rff = make_kernel(dense), make_kernel(dense, "rff")
    return {
        "published": lambda mu, p: published_centroids(mu, p, kernel),
        "ours_exact": lambda mu, p: conditional_mean_centroids(mu, kernel, p, LAM, low_rank=False)[0],
        "ours_low_rank": lambda mu, p: conditional_mean_centroids(mu, kernel, p, LAM, low_rank=True)[0],
        "ours_rff256": lambda mu, p: conditional_mean_centroids(mu, rff, p, LAM, low_rank=True)[0],
    }


def variants(dense: bool):
    kernel = make_kernel(dense)
    return {
        "published": lambda z, p: published_route(z, p, kernel),
        "ours_exact": DecoupledUniformityLoss(kernel=kernel, lam=LAM, low_rank=False),
        "ours_low_rank": DecoupledUniformityLoss(kernel=kernel, lam=LAM, low_rank=True),
        "ours_rff256": DecoupledUniformityLoss(kernel=make_kernel(dense, "rff"), lam=LAM, low_rank=True),
    }


def time_once(fn, z, prior) -> tuple[float, float]:
    z = z.clone().requires_grad_(True)
    start = time.perf_counter()
    loss = fn(z, prior)
    if loss.ndim:  # centroids (B, D): back-propagate a fixed projection
        loss = (loss * torch.linspace(-1, 1, loss.shape[1], dtype=loss.dtype)).sum()
    loss.backward()
    return time.perf_counter() - start, float(loss.detach())


def _peak_child(name: str, b: int, dense: bool, queue) -> None:
    z, prior = make_inputs(b)
    fn = variants(dense)[name]
    time_once(fn, make_inputs(64)[0], make_inputs(64)[1])  # warm up the libraries
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark (VmHWM) to the current RSS
        f.write("5")
    before = _status_kib("VmRSS")
    time_once(fn, z, prior)
    queue.put((_status_kib("VmHWM") - before) / 1024.0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_mib(name: str, b: int, dense: bool) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(name, b, dense, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, D={DIM}, V=2, lam={LAM}")
    header = (
        f"{'prior':<18}{'B':>6}{'path':>15}{'median s':>11}{'ratio':>8}{'rel.diff':>10}{'vs f64':>10}{'peak MiB':>10}"
    )
    print("\n== the whole loss: forward + backward ==")
    print(header)
    print("-" * len(header))
    for dense in (False, True):
        label = "age (dense)" if dense else "age x sex x site"
        for b in args.sizes:
            z, prior = make_inputs(b)
            reference = float(published_route(z.double(), prior.double(), make_kernel(dense)))  # float64 formula
            times, values = _interleaved(variants(dense), z, prior, args.repeats)
            base = statistics.median(times["published"])
            for name in times:
                med = statistics.median(times[name])
                rel = abs(values[name] - values["published"]) / abs(values["published"])
                rel64 = abs(values[name] - reference) / abs(reference)
                peak = "" if args.no_memory else f"{peak_mib(name, b, dense):.0f}"
                print(f"{label:<18}{b:>6}{name:>15}{med:>11.4f}{base / med:>8.1f}{rel:>10.1e}{rel64:>10.1e}{peak:>10}")
    print("\n== the kernel step alone: centroids (B, D) -> (K + lam I)^-1 K centroids, forward + backward ==")
    print(f"{'prior':<18}{'B':>6}{'path':>15}{'median s':>11}{'ratio':>8}")
    for dense in (False, True):
        label = "age (dense)" if dense else "age x sex x site"
        for b in args.sizes:
            z, prior = make_inputs(b)
            times, _ = _interleaved(centroid_steps(dense), view_centroids(z), prior, args.repeats)
            base = statistics.median(times["published"])
            for name in times:
                med = statistics.median(times[name])
                print(f"{label:<18}{b:>6}{name:>15}{med:>11.4f}{base / med:>8.1f}")
    print("ratio = published median / this path's median (higher is faster); rel.diff = |loss - published| / |published|;")
    print("vs f64 = relative difference from the published formula evaluated in float64.")


def _interleaved(fns: dict, z: torch.Tensor, prior: torch.Tensor, repeats: int) -> tuple[dict, dict]:
    """Time every route ``repeats`` times, alternating routes so that load changes hit all of them."""
    times = {name: [] for name in fns}
    values = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds, values[name] = time_once(fn, z, prior)
            times[name].append(seconds)
    return times, values


if __name__ == "__main__":
    main()
