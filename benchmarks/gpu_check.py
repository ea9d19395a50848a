"""GPU readiness check (run on a machine with CUDA; ``bash benchmarks/gpu_check.sh``). Prints, never asserts.

1. CUDA and NCCL: device, capability, torch / CUDA / NCCL versions.
2. One CXR pretrain bundle run (kernel DU, age x sex, ``methods/kdu_attr.yaml``) on the embedded real cohort, in
   float32 and with AMP (bf16): images/s of the epochs after the first, peak GPU memory, and the first iteration's
   loss of each (same seed, same batch) with their relative difference.
3. The kernel DU loss step (forward + backward) at B = 4096 and 16384 on the GPU: an age x sex x site prior
   (block path) and a dense RBF on 3 continuous columns; median of repeats, and the loss against float64.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cuda_report() -> bool:
    print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, available: {torch.cuda.is_available()}")
    if not torch.cuda.is_available():
        return False
    props = torch.cuda.get_device_properties(0)
    print(f"device 0: {props.name}, capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
          f"{torch.cuda.device_count()} device(s); bf16 supported: {torch.cuda.is_bf16_supported()}")
    nccl = torch.distributed.is_nccl_available()
    version = torch.cuda.nccl.version() if nccl else None
    print(f"NCCL available: {nccl}, version {version}")
    return True


def bundle_epochs(amp: bool, epochs: int = 3) -> dict:
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    bundle = REPO / "bundles" / "cxr_du_pretrain"
    with tempfile.TemporaryDirectory() as root:
        workflow = ConfigWorkflow(
            config_file=[str(bundle / "configs" / "train.yaml"), str(bundle / "configs" / "methods" / "kdu_attr.yaml")],
            meta_file=str(bundle / "configs" / "metadata.json"), logging_file=False, workflow_type=None,
            bundle_root=root, max_epochs=epochs, amp=amp, resume=False,
        )
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        stats = {"first_loss": None, "epoch_s": [], "images": 0}
        clock = {}

        @trainer.on(Events.ITERATION_COMPLETED)
        def _first(engine):
            if stats["first_loss"] is None:
                stats["first_loss"] = float(engine.state.output["loss"])
            if engine.state.epoch > 1:
                stats["images"] += engine.state.output["pred"].shape[0]

        @trainer.on(Events.EPOCH_STARTED)
        def _start(engine):
            torch.cuda.synchronize()
            clock["t"] = time.perf_counter()

        @trainer.on(Events.EPOCH_COMPLETED)
        def _end(engine):
            torch.cuda.synchronize()
            if engine.state.epoch > 1:
                stats["epoch_s"].append(time.perf_counter() - clock["t"])

        torch.cuda.reset_peak_memory_stats()
        workflow.run()
        workflow.finalize()
        stats["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    stats["images_per_s"] = stats["images"] / max(sum(stats["epoch_s"]), 1e-9)
    return stats


def loss_step(batch: int, dense: bool, repeats: int = 5) -> tuple[float, float]:
    from monai_du.kernels import CategoricalKernel, RBFKernel
    from monai_du.losses import DecoupledUniformityLoss

    g = torch.Generator().manual_seed(0)
    if dense:
        prior = torch.randn(batch, 3, generator=g) * torch.tensor([10.0, 1.0, 5.0])
        kernel = RBFKernel("knn", columns=[0, 1, 2], knn_batch_size=batch)
    else:
        prior = torch.stack([20 + 60 * torch.rand(batch, generator=g), torch.randint(0, 2, (batch,), generator=g),
                             torch.randint(0, 4, (batch,), generator=g)], 1).float()
        kernel = RBFKernel("knn", columns=[0], knn_batch_size=batch) * CategoricalKernel(columns=[1]) \
            * CategoricalKernel(columns=[2])
    kernel.fit(prior)
    z = torch.randn(batch, 2, 128, generator=g).cuda().requires_grad_(True)
    prior = prior.cuda()
    loss_fn = DecoupledUniformityLoss(kernel=kernel, lam=0.01, instance_weight=0.05, gather=False)
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = loss_fn(z, prior)
        loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        z.grad = None
    reference = DecoupledUniformityLoss(kernel=kernel, lam=0.01, instance_weight=0.05, gather=False,
                                        solve_dtype=torch.float64)(z.double(), prior.double())
    return statistics.median(times[1:]), abs(float(loss) - float(reference)) / abs(float(reference))


def main() -> None:
    if not cuda_report():
        print("no CUDA device: nothing more to check")
        return
    fp32, bf16 = bundle_epochs(False), bundle_epochs(True)
    for name, s in (("fp32", fp32), ("amp bf16", bf16)):
        print(f"bundle epoch {name:9s}: {s['images_per_s']:.0f} images/s, peak {s['peak_mib']:.0f} MiB, "
              f"first loss {s['first_loss']:.6f}")
    rel = abs(bf16["first_loss"] - fp32["first_loss"]) / abs(fp32["first_loss"])
    speed = bf16["images_per_s"] / fp32["images_per_s"]
    print(f"amp / fp32: {speed:.2f}x images/s, first-loss relative diff {rel:.2e}")
    for batch in (4096, 16384):
        for dense in (False, True):
            seconds, error = loss_step(batch, dense)
            what = "dense RBF, 3 columns" if dense else "age x sex x site (blocks)"
            print(f"kernel DU step B={batch:5d} {what:26s}: median {seconds * 1e3:.1f} ms, rel. error vs float64 "
                  f"{error:.1e}")


if __name__ == "__main__":
    main()
