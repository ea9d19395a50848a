"""Worker for the torchrun test in tests/test_samplers.py: 2 CPU processes (gloo) draw batches from one sampler.

Each rank builds every sampler of :func:`make_cases` with ``num_replicas`` and ``rank`` left to the process group, runs
two epochs, and at every step gathers its local indices with ``monai_du.distributed.gather_no_grad``, the same
path the losses gather embeddings by. It saves, per case and epoch, the gathered batch of every step and the size of
every rank's part to OUT/rank{r}.pt.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

EPOCHS = (0, 1)
PACKAGE = Path(__file__).resolve().parents[1] / "monai_du"


def _load(relative: str):
    """Load one module of the package from its file, without ``monai_du/__init__`` (which imports MONAI, seconds per
    process): the sampler and gather modules only need numpy, pandas and torch."""
    spec = importlib.util.spec_from_file_location(f"_worker_{Path(relative).stem}", PACKAGE / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def uneven_groups(sizes: list[int], seed: int) -> np.ndarray:
    """Labels ``g0, g1, ...`` with the given group sizes, in shuffled row order."""
    labels = np.concatenate([[f"g{g}"] * n for g, n in enumerate(sizes)]).astype(object)
    return np.random.default_rng(seed).permutation(labels)


def make_cases() -> dict[str, dict]:
    """Sampler arguments (without the ranks) of every case; shared by the worker and the test."""
    sites = uneven_groups([50, 37, 20, 9, 3], seed=0)  # 119 rows; at global batch 8, groups of 3 are small
    patients = uneven_groups([1, 2, 3, 3, 4, 5, 6, 7, 9, 11, 2, 1, 8, 3, 6, 10, 4, 5, 1, 13], seed=1)  # 104 rows
    return {
        "within": dict(batch_size=4, mode="within", groups=sites, drop_last=True, seed=5),
        "within_keep": dict(batch_size=4, mode="within", groups=sites, small_groups="keep", drop_last=False, seed=5),
        "balanced": dict(batch_size=5, mode="balanced", groups=sites, drop_last=True, seed=2),
        "pk": dict(batch_size=6, mode="pk", groups=patients, images_per_group=3, small_groups="keep", drop_last=True,
                   seed=3),
        "pk_merge": dict(batch_size=6, mode="pk", groups=patients, images_per_group=3, drop_last=False, seed=3),
        "random": dict(batch_size=5, mode="random", num_samples=83, drop_last=False, seed=4),
    }


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    AttributeBatchSampler = _load("data/samplers.py").AttributeBatchSampler  # noqa: N806
    gather_no_grad = _load("distributed.py").gather_no_grad
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result: dict[str, dict] = {}
    for name, kwargs in make_cases().items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sampler = AttributeBatchSampler(**kwargs)
        result[name] = {"len": len(sampler), "replicas": sampler.num_replicas, "rank": sampler.rank,
                        "global_batch_size": sampler.global_batch_size}
        for epoch in EPOCHS:
            sampler.set_epoch(epoch)
            local = list(sampler)
            counts = gather_no_grad(torch.tensor([len(local)]))  # equal step counts, checked before the steps
            steps, part_sizes = [], []
            for s in range(int(counts.min())):
                indices = torch.tensor(local[s], dtype=torch.long)
                steps.append(gather_no_grad(indices))
                part_sizes.append(gather_no_grad(torch.tensor([len(indices)])))
            result[name][epoch] = {"counts": counts, "steps": steps, "part_sizes": part_sizes}
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # both ranks leave together: a rank left alone in destroy_process_group was seen to hang
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
