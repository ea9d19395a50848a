"""Kernel DU forward + backward: our solver paths against the published numerical route, side by side in one run.

Priors, D = 128 embeddings, V = 2 views:

- ``age x sex x site``: RBF x categorical x categorical (block-diagonal kernel);
- ``age (dense)``: the age RBF alone (no block structure);
- ``3-col RBF (dense)``: one RBF on three continuous columns (age, BMI, systolic blood pressure), dense, with
  neighbourhood-scale bandwidths (5 years, 2 kg/m^2, 8 mmHg): about 2,000 eigenvalues of K exceed lam at B = 4096,
  so no low-rank map of a few hundred columns is accurate;
- ``3-col RBF broad``: the same with broad bandwidths (20 years, 8 kg/m^2, 30 mmHg), whose spectrum decays fast.

The published route forms ``alpha = torch.inverse(K + lam I) @ K`` explicitly in float32, then ``alpha @ mu``; it is
timed with subnormals flushed (``torch.set_flush_denormal(True)``, for every route), so that slow denormal arithmetic
does not flatter us. Ours: the exact path (``solver="auto"``: Cholesky solves, one per block of a block-diagonal
kernel; a float32 factor refined in float64 for dense blocks of at least 1024 samples), the float64 Cholesky
(``cholesky``) and the refined solve (``mixed``) forced, and the low-rank paths: Woodbury on Fourier features of the age
RBF (the quadrature map, and random Fourier features of rank 256), or on Nystrom features (``solver="nystrom"``) of
rank 256 and 1024 for the 3-column RBFs.

Prints, for the whole loss and for the kernel step alone, median wall times over repeats and the ratio
published / ours; for the loss also the relative differences from the published route and from the float64 formula
(the published formula in float64: what "exact" is measured against), and the peak resident-memory increase of one
forward + backward measured in a fresh process. The DU term itself (B^2 D) is common to every route, so it bounds the
whole-loss ratio. ``--large 16384`` adds the dense 3-column case at that size to the kernel-step table (one run of the
published route, whose float32 inverse and product there take minutes).

    python benchmarks/bench_loss.py [--sizes 256 1024 4096] [--repeats 5] [--large 16384] [--tables loss step]
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
PRIORS = ("age x sex x site", "age (dense)", "3-col RBF (dense)", "3-col RBF broad")


def make_inputs(b: int, seed: int = 0):
    """Embeddings (B, 2, D) and priors (B, 5): age, sex, site, BMI, systolic blood pressure."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 2, DIM, generator=g)
    age = 20 + 70 * torch.rand(b, 1, generator=g)
    sex = torch.randint(0, 2, (b, 1), generator=g).float()
    site = torch.randint(0, 4, (b, 1), generator=g).float()
    bmi = 16 + 24 * torch.rand(b, 1, generator=g)
    bp = 90 + 90 * torch.rand(b, 1, generator=g)
    return z, torch.cat([age, sex, site, bmi, bp], 1)


def make_kernel(prior: str, fourier: str = "auto", rank: int = 256):
    """Age RBF (bandwidth 5 years), times sex and site codes; alone; or one RBF on age, BMI and blood pressure."""
    if prior.startswith("3-col RBF"):
        scales = [20.0, 8.0, 30.0] if prior.endswith("broad") else [5.0, 2.0, 8.0]
        return RBFKernel(scales, columns=[0, 3, 4])
    age = RBFKernel(bandwidth=5.0, columns=[0], n_features=rank, fourier=fourier)
    return age if prior == "age (dense)" else age * CategoricalKernel(columns=[1]) * CategoricalKernel(columns=[2])


def published_centroids(mu: torch.Tensor, prior: torch.Tensor, kernel) -> torch.Tensor:
    """The published numerical route: explicit inverse, then two products (float32 as in the published code)."""
    gram = kernel(prior).to(mu.dtype)
    alpha = torch.inverse(gram + LAM * torch.eye(len(gram), dtype=mu.dtype)) @ gram
    return alpha @ mu


def published_route(z: torch.Tensor, prior: torch.Tensor, kernel) -> torch.Tensor:
    return _log_mean_exp_pairs(published_centroids(view_centroids(z), prior, kernel), 2.0)


def _ours(prior: str) -> dict:
    """Our paths for a prior: name -> (kernel, keyword arguments of conditional_mean_centroids)."""
    kernel = make_kernel(prior)
    paths = {"ours_exact": (kernel, {"low_rank": False})}
    if prior == "3-col RBF broad":
        paths["nystrom256"] = (kernel, {"low_rank": False, "solver": "nystrom", "rank": 256})
        paths["nystrom1024"] = (kernel, {"low_rank": False, "solver": "nystrom", "rank": 1024})
    elif prior == "3-col RBF (dense)":
        paths["ours_cholesky"] = (kernel, {"low_rank": False, "solver": "cholesky"})
        paths["ours_mixed"] = (kernel, {"low_rank": False, "solver": "mixed"})
        paths["nystrom256"] = (kernel, {"low_rank": False, "solver": "nystrom", "rank": 256})
        paths["nystrom1024"] = (kernel, {"low_rank": False, "solver": "nystrom", "rank": 1024})
    else:
        paths["ours_low_rank"] = (kernel, {"low_rank": True})
        paths["ours_rff256"] = (make_kernel(prior, "rff"), {"low_rank": True})
    return paths


def centroid_steps(prior: str):
    """The kernel step alone, (B, D) centroids -> conditional-mean centroids, for each route."""
    kernel = make_kernel(prior)
    steps = {"published": lambda mu, p: published_centroids(mu, p, kernel)}
    for name, (kern, kwargs) in _ours(prior).items():
        steps[name] = lambda mu, p, kern=kern, kwargs=kwargs: conditional_mean_centroids(mu, kern, p, LAM, **kwargs)[0]
    return steps


def variants(prior: str):
    kernel = make_kernel(prior)
    out = {"published": lambda z, p: published_route(z, p, kernel)}
    for name, (kern, kwargs) in _ours(prior).items():
        out[name] = DecoupledUniformityLoss(kernel=kern, lam=LAM, **kwargs)
    return out


def time_once(fn, z, prior, keep_output: bool = False) -> tuple[float, float | torch.Tensor]:
    z = z.clone().requires_grad_(True)
    start = time.perf_counter()
    out = fn(z, prior)
    loss = out
    if loss.ndim:  # centroids (B, D): back-propagate a fixed projection
        loss = (loss * torch.linspace(-1, 1, loss.shape[1], dtype=loss.dtype)).sum()
    loss.backward()
    seconds = time.perf_counter() - start
    return seconds, out.detach() if keep_output else float(loss.detach())


def _peak_child(name: str, b: int, prior_name: str, queue) -> None:
    torch.set_flush_denormal(True)
    z, prior = make_inputs(b)
    fn = variants(prior_name)[name]
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


def peak_mib(name: str, b: int, prior_name: str) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(name, b, prior_name, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def reference_centroids(mu: torch.Tensor, prior: torch.Tensor, prior_name: str, large: bool = False) -> torch.Tensor:
    """``(K + lam I)^-1 K mu`` in float64: ``linalg.solve`` (LU), or a float64 Cholesky solve for ``large`` batches."""
    gram = make_kernel(prior_name)(prior.double())
    a = gram + LAM * torch.eye(len(gram), dtype=torch.float64)
    rhs = gram @ mu.double()
    if large:
        return torch.cholesky_solve(rhs, torch.linalg.cholesky(a))
    return torch.linalg.solve(a, rhs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--priors", nargs="+", default=list(PRIORS), choices=PRIORS)
    parser.add_argument("--large", type=int, nargs="*", default=[], help="dense 3-column sizes for the kernel step")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--tables", nargs="+", default=["loss", "step"], choices=["loss", "step"])
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, D={DIM}, V=2, lam={LAM}, subnormals flushed")
    header = (
        f"{'prior':<20}{'B':>6}{'path':>15}{'median s':>11}{'ratio':>8}{'rel.diff':>10}{'vs f64':>10}{'peak MiB':>10}"
    )
    print("\n== the whole loss: forward + backward ==")
    print(header)
    print("-" * len(header))
    for label in args.priors if "loss" in args.tables else []:
        for b in args.sizes:
            z, prior = make_inputs(b)
            reference = float(published_route(z.double(), prior.double(), make_kernel(label)))  # float64 formula
            times, values = _interleaved(variants(label), z, prior, args.repeats)
            base = statistics.median(times["published"])
            for name in times:
                med = statistics.median(times[name])
                rel = abs(values[name] - values["published"]) / abs(values["published"])
                rel64 = abs(values[name] - reference) / abs(reference)
                peak = "" if args.no_memory else f"{peak_mib(name, b, label):.0f}"
                print(f"{label:<20}{b:>6}{name:>15}{med:>11.4f}{base / med:>8.1f}{rel:>10.1e}{rel64:>10.1e}{peak:>10}")
    print("\n== the kernel step alone: centroids (B, D) -> (K + lam I)^-1 K centroids, forward + backward ==")
    print(f"{'prior':<20}{'B':>6}{'path':>15}{'median s':>11}{'ratio':>8}{'vs f64':>10}")
    runs = [(label, b, args.repeats) for label in args.priors for b in args.sizes] if "step" in args.tables else []
    runs += [(label, b, 1) for b in args.large for label in ("3-col RBF (dense)", "3-col RBF broad")]
    for label, b, repeats in runs:
        z, prior = make_inputs(b)
        mu = view_centroids(z)
        large = b > max(args.sizes, default=0)
        want = reference_centroids(mu, prior, label, large)
        times, outputs = _interleaved(centroid_steps(label), mu, prior, repeats, keep_outputs=True)
        base = statistics.median(times["published"])
        for name in times:
            med = statistics.median(times[name])
            err = float((outputs[name].double() - want).norm() / want.norm())
            print(f"{label:<20}{b:>6}{name:>15}{med:>11.4f}{base / med:>8.1f}{err:>10.1e}")
        del want, outputs
    print("ratio = published median / this path's median (higher is faster);")
    print("rel.diff = |loss - published| / |published|;")
    print("vs f64 = relative difference from the published formula evaluated in float64 (whole loss), or the relative")
    print("Frobenius error of the centroids against a float64 solve (kernel step: LU; Cholesky for the --large sizes).")


def _interleaved(fns: dict, z: torch.Tensor, prior: torch.Tensor, repeats: int, keep_outputs: bool = False):
    """Time every route ``repeats`` times, alternating routes so that load changes hit all of them.

    Returns the times per route, and per route the last value (or, with ``keep_outputs``, the last output tensor).
    """
    times = {name: [] for name in fns}
    values = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds, values[name] = time_once(fn, z, prior, keep_outputs)
            times[name].append(seconds)
    return times, values


if __name__ == "__main__":
    main()
