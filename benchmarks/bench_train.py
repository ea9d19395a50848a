"""Benchmark: iteration time of the pretraining trainer against a bare PyTorch loop.

Run: ``python benchmarks/bench_train.py [--threads 2] [--batch-size 32] [--size 64] [--iters 12] [--rounds 6]``
and ``python benchmarks/bench_train.py --bundle-workers [--epochs 3]``.

Both arms train the same network (``ContrastiveEncoder``, resnet10 at widen_factor 0.25, the bundle default), from
the same initial weights, with the same loss (kernel DU, age x sex prior, the bundle's ``lam`` and
``instance_weight``) and optimizer (AdamW), on the same pre-collated in-memory batches ``{"image": (B, V, 1, H, W),
"prior": (B, 2)}``:

- **trainer**: ``monai.engines.SupervisedTrainer`` with ``monai_du.engines.MultiViewPrepareBatch`` and the
  per-iteration handlers of the pretrain bundle (``ContrastiveMetricsHandler``, ``StatsHandler`` logging every
  iteration, to a null stream, ``LrScheduleHandler``); ``decollate=False`` as in the bundle;
- **bare**: ``for batch in batches: zero_grad; loss(net(views), prior).backward(); step``.

An iteration's time is the wall time from one iteration's end to the next (batch fetch, prepare, forward, backward,
step and, for the trainer, its events and handlers). The arms alternate epoch by epoch (one trainer epoch, then one
bare epoch, inside the trainer's EPOCH_COMPLETED), so that load from other processes hits both alike; the first
iteration of every epoch and the whole first round are left out. Prints the median per-iteration time of each arm and
their ratio (target: trainer / bare <= 1.15). Timings are printed, never asserted.

``--bundle-workers``: the CXR pretrain bundle itself (``configs/train.yaml``, the embedded real cohort, plain DU) run
in-process for a few epochs with its default ``num_workers`` (:func:`monai_du.engines.default_num_workers`: the
augmentations run in worker processes) and with ``num_workers=0`` (augmentations on the training thread), the two
arms alternating; prints the median iteration time of each (first epoch of each run left out) and their ratio.
"""

from __future__ import annotations

import argparse
import copy
import io
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ignite.engine import Events  # noqa: E402
from monai.engines import SupervisedTrainer  # noqa: E402
from monai.handlers import LrScheduleHandler, StatsHandler  # noqa: E402

from monai_du.engines import MultiViewPrepareBatch  # noqa: E402
from monai_du.handlers import ContrastiveMetricsHandler  # noqa: E402
from monai_du.kernels import CategoricalKernel, RBFKernel  # noqa: E402
from monai_du.losses import DecoupledUniformityLoss  # noqa: E402
from monai_du.networks import ContrastiveEncoder  # noqa: E402

TARGET_RATIO = 1.15


def make_batches(n: int, batch_size: int, size: int, views: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        age = 20 + 60 * torch.rand(batch_size, 1, generator=g)
        sex = torch.randint(0, 2, (batch_size, 1), generator=g).float()
        image = torch.rand(batch_size, views, 1, size, size, generator=g)
        batches.append({"image": image, "prior": torch.cat([age, sex], 1)})
    return batches


def make_loss(batches: list[dict], batch_size: int) -> DecoupledUniformityLoss:
    kernel = RBFKernel("knn", columns=[0], knn_k=5, knn_batch_size=batch_size) * CategoricalKernel(columns=[1])
    kernel.fit(torch.cat([b["prior"] for b in batches]))
    return DecoupledUniformityLoss(kernel, lam=0.01, t=2.0, instance_weight=0.05)


def make_optimizer(net: torch.nn.Module):
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-5)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=64, help="view side in pixels")
    ap.add_argument("--iters", type=int, default=12, help="iterations per epoch (distinct batches)")
    ap.add_argument("--rounds", type=int, default=6, help="epochs per arm, alternating; the first is warm-up")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    batches = make_batches(args.iters, args.batch_size, args.size)
    torch.manual_seed(0)
    net0 = ContrastiveEncoder("resnet10", spatial_dims=2, projection_dim=128, backbone_kwargs={"widen_factor": 0.25})

    # --- bare loop -----------------------------------------------------------------------------------------
    bare_net = copy.deepcopy(net0)
    bare_loss = make_loss(batches, args.batch_size)
    bare_opt, bare_sched = make_optimizer(bare_net)
    bare_times: list[list[float]] = []

    def bare_epoch() -> None:
        bare_net.train()
        times = []
        last = time.perf_counter()
        for batch in batches:
            views, prior = batch["image"], batch["prior"]
            bare_opt.zero_grad(set_to_none=False)
            loss = bare_loss(bare_net(views), prior)
            loss.backward()
            bare_opt.step()
            now = time.perf_counter()
            times.append(now - last)
            last = now
        bare_sched.step()
        bare_times.append(times[1:])

    # --- trainer -------------------------------------------------------------------------------------------
    trainer_net = copy.deepcopy(net0)
    trainer_loss = make_loss(batches, args.batch_size)
    trainer_opt, trainer_sched = make_optimizer(trainer_net)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=args.rounds,
        train_data_loader=batches,
        network=trainer_net,
        optimizer=trainer_opt,
        loss_function=trainer_loss,
        prepare_batch=MultiViewPrepareBatch(),
        decollate=False,
    )
    sink = logging.getLogger("bench_train.stats")
    sink.propagate = False
    sink.addHandler(logging.StreamHandler(io.StringIO()))
    sink.setLevel(logging.INFO)
    ContrastiveMetricsHandler().attach(trainer)
    LrScheduleHandler(trainer_sched, print_lr=False).attach(trainer)
    StatsHandler(name="bench_train.stats", tag_name="train_loss", output_transform=lambda o: o["loss"].item(),
                 iteration_log=True).attach(trainer)
    trainer_times: list[list[float]] = []
    state = {"last": 0.0, "epoch": []}

    @trainer.on(Events.EPOCH_STARTED)
    def _start(engine):
        state["epoch"] = []
        state["last"] = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)  # attached last: its interval covers every other handler
    def _tick(engine):
        now = time.perf_counter()
        state["epoch"].append(now - state["last"])
        state["last"] = now

    @trainer.on(Events.EPOCH_COMPLETED)
    def _alternate(engine):
        trainer_times.append(state["epoch"][1:])
        bare_epoch()

    trainer.run()

    flat_trainer = [t for epoch in trainer_times[1:] for t in epoch]
    flat_bare = [t for epoch in bare_times[1:] for t in epoch]
    med_t, med_b = statistics.median(flat_trainer), statistics.median(flat_bare)
    ratio = med_t / med_b
    print(f"threads={args.threads} batch={args.batch_size}x2 views size={args.size} iters/epoch={args.iters} "
          f"timed epochs/arm={args.rounds - 1} iterations timed/arm={len(flat_trainer)}")
    print(f"median iteration: trainer {med_t * 1e3:.2f} ms   bare loop {med_b * 1e3:.2f} ms")
    for name, xs in (("trainer", flat_trainer), ("bare", flat_bare)):
        q = statistics.quantiles(xs, n=4)
        print(f"  {name:8s} quartiles ms: {q[0] * 1e3:.2f} / {q[1] * 1e3:.2f} / {q[2] * 1e3:.2f}")
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(f"ratio trainer / bare = {ratio:.3f}  (target <= {TARGET_RATIO}: {verdict})")


def bundle_iteration_times(workers: int | None, epochs: int, root: Path) -> list[float]:
    """Per-iteration seconds of the CXR pretrain bundle (epochs after the first), ``num_workers`` = ``workers``
    (None: the bundle's default)."""
    from monai.bundle import ConfigWorkflow

    bundle = REPO / "bundles" / "cxr_du_pretrain"
    overrides = {"bundle_root": str(root), "max_epochs": epochs, "resume": False}
    if workers is not None:
        overrides["num_workers"] = workers
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "train.yaml"), logging_file=False,
                              meta_file=str(bundle / "configs" / "metadata.json"), workflow_type=None, **overrides)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    times: list[float] = []
    state = {"last": 0.0}

    @trainer.on(Events.EPOCH_STARTED)
    def _start(engine):
        state["last"] = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _tick(engine):
        now = time.perf_counter()
        if engine.state.epoch > 1:
            times.append(now - state["last"])
        state["last"] = now

    workflow.run()
    workflow.finalize()
    return times


def bundle_workers(epochs: int, rounds: int) -> None:
    import tempfile

    from monai_du.engines import default_num_workers

    default, zero = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            default += bundle_iteration_times(None, epochs, Path(tmp) / f"default{r}")
            zero += bundle_iteration_times(0, epochs, Path(tmp) / f"zero{r}")
    med_d, med_z = statistics.median(default), statistics.median(zero)
    print(f"CXR pretrain bundle, {epochs} epochs x {rounds} rounds per arm, torch threads {torch.get_num_threads()}")
    print(f"median iteration: num_workers={default_num_workers()} (default) {med_d * 1e3:.1f} ms over {len(default)}  "
          f"num_workers=0 {med_z * 1e3:.1f} ms over {len(zero)}")
    print(f"ratio default / num_workers=0 = {med_d / med_z:.3f}")


if __name__ == "__main__":
    if "--bundle-workers" in sys.argv:
        ap = argparse.ArgumentParser(description="bundle iteration: default workers against num_workers=0")
        ap.add_argument("--bundle-workers", action="store_true")
        ap.add_argument("--epochs", type=int, default=3)
        ap.add_argument("--rounds", type=int, default=2)
        opts = ap.parse_args()
        bundle_workers(opts.epochs, opts.rounds)
    else:
        main()
