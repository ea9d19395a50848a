"""Tests of monai_du.engines and monai_du.handlers: prepare_batch, epoch/seed handler, metrics, atomic checkpoints,
resume, export and the bundle-config helpers.

The trainers here are MONAI SupervisedTrainers on tiny in-memory problems (a linear layer on (B, V, F) "views"), so
every test runs in well under a second; the bundles themselves are exercised in tests/test_bundles_pretrain.py.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from torch import nn

from monai_du.engines import (
    EpochBatchSampler,
    EpochSeededDataset,
    MultiViewPrepareBatch,
    default_bundle_root,
    fit_prior_kernel,
)
from monai_du.handlers import (
    AtomicCheckpointSaver,
    ContrastiveMetricsHandler,
    LatestCheckpointLoader,
    PretrainedEncoderExporter,
    SamplerEpochHandler,
    atomic_torch_save,
    latest_checkpoint,
)
from monai_du.kernels import CategoricalKernel, RBFKernel, kernel_from_dict
from monai_du.losses import DecoupledUniformityLoss
from monai_du.prior_encoder import PriorEncoder
from monai_du.transforms import MultiViewd

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------------------------
# tiny training problem
# ---------------------------------------------------------------------------------------------------------------


class _ViewNet(nn.Module):
    """(B, V, F) -> (B, V, D): a linear map per view (a stand-in for ContrastiveEncoder), with an .encoder part."""

    def __init__(self, features: int = 6, dim: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Linear(features, 5)
        self.projector = nn.Linear(5, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(torch.tanh(self.encoder(x)))


def _batches(n_batches: int = 3, b: int = 6, v: int = 2, f: int = 6, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        age = 20 + 60 * torch.rand(b, 1, generator=g)
        sex = torch.randint(0, 2, (b, 1), generator=g).float()
        out.append({"image": torch.randn(b, v, f, generator=g), "prior": torch.cat([age, sex], 1)})
    return out


def _trainer(net, data, max_epochs, handlers=(), loss=None, lr=0.1):
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    kernel = RBFKernel(10.0, columns=[0]) * CategoricalKernel(columns=[1])
    loss = loss if loss is not None else DecoupledUniformityLoss(kernel, lam=0.01, instance_weight=0.05)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=data,
        network=net,
        optimizer=opt,
        loss_function=loss,
        prepare_batch=MultiViewPrepareBatch(min_spatial_dims=0),
        decollate=False,
    )
    from monai.handlers import LrScheduleHandler

    LrScheduleHandler(sched, print_lr=False).attach(trainer)
    for h in handlers(net, opt, sched) if callable(handlers) else handlers:
        h.attach(trainer)
    return trainer, opt, sched


# ---------------------------------------------------------------------------------------------------------------
# prepare_batch
# ---------------------------------------------------------------------------------------------------------------


def test_prepare_batch_shapes_dtype_and_errors():
    views = torch.rand(4, 2, 1, 8, 8)
    prior = torch.tensor([[30, 1], [40, 0], [50, 1], [60, 0]], dtype=torch.int64)
    x, y = MultiViewPrepareBatch()({"image": views, "prior": prior, "age": [1, 2, 3, 4]}, torch.device("cpu"))
    assert x.shape == (4, 2, 1, 8, 8) and torch.equal(x, views)
    assert y.dtype == torch.float32 and torch.equal(y, prior.float())
    x, y = MultiViewPrepareBatch(prior_key=None)({"image": views}, "cpu")
    assert y is None and x.shape == views.shape
    x, _ = MultiViewPrepareBatch()({"image": views, "prior": prior.float()}, "cpu", False, dtype=torch.float64)
    assert x.dtype == torch.float64
    with pytest.raises(ValueError, match=r"\(B, V, C, \*spatial\)"):
        MultiViewPrepareBatch()({"image": torch.rand(4, 1, 8, 8), "prior": prior}, "cpu")
    with pytest.raises(ValueError, match="no key 'prior'"):
        MultiViewPrepareBatch()({"image": views}, "cpu")
    with pytest.raises(ValueError, match=r"shape \(B=4, P\)"):
        MultiViewPrepareBatch()({"image": views, "prior": prior[:3]}, "cpu")
    with pytest.raises(ValueError, match="no key 'image'"):
        MultiViewPrepareBatch()({"views": views}, "cpu")


def test_trainer_computes_loss_of_network_output_and_prior():
    net = _ViewNet()
    data = _batches(1)
    kernel = RBFKernel(10.0, columns=[0]) * CategoricalKernel(columns=[1])
    trainer, _, _ = _trainer(net, data, 1, loss=DecoupledUniformityLoss(kernel, lam=0.01), lr=0.0)
    seen = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _keep(engine):
        seen.update({k: v.detach().clone() for k, v in engine.state.output.items()})

    trainer.run()
    assert seen["pred"].shape == (6, 2, 4)
    assert torch.equal(seen["label"], data[0]["prior"])
    # independent float64 reference of kernel DU on (pred, prior): K = RBF(age) * [sex equal]
    z = seen["pred"].double()
    mu = (z / z.norm(dim=-1, keepdim=True)).mean(1)
    p = data[0]["prior"].double()
    k = torch.exp(-((p[:, None, 0] - p[None, :, 0]) ** 2) / (2 * 10.0**2)) * (p[:, None, 1] == p[None, :, 1])
    c = torch.linalg.solve(k + 0.01 * torch.eye(6, dtype=torch.float64), k @ mu)
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    ref = math.log(np.mean([math.exp(-2.0 * float(((c[i] - c[j]) ** 2).sum())) for i, j in pairs]))
    assert float(seen["loss"]) == pytest.approx(ref, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# SamplerEpochHandler
# ---------------------------------------------------------------------------------------------------------------


class _RecordingSampler:
    def __init__(self, n=6, bs=2):
        self.calls, self.n, self.bs = [], n, bs

    def set_epoch(self, epoch):
        self.calls.append(epoch)

    def __iter__(self):
        return iter([list(range(i, i + self.bs)) for i in range(0, self.n, self.bs)])

    def __len__(self):
        return self.n // self.bs


def test_sampler_epoch_handler_calls_set_epoch_every_epoch_before_batches():
    sampler = _RecordingSampler()
    loader = DataLoader(Dataset(list(range(6))), batch_sampler=sampler)
    engine = Engine(lambda e, b: None)
    epochs_at_first_batch = []
    engine.add_event_handler(
        Events.ITERATION_STARTED(every=3), lambda e: epochs_at_first_batch.append(list(sampler.calls))
    )
    SamplerEpochHandler(data_loader=loader).attach(engine)
    assert SamplerEpochHandler(data_loader=loader).sampler is sampler  # found on the loader
    engine.run(loader, max_epochs=3)
    assert sampler.calls == [0, 1, 2]
    with pytest.raises(ValueError, match="no set_epoch"):
        SamplerEpochHandler(sampler=object())


def test_sampler_epoch_handler_reseeds_augmentations_per_epoch():
    """The views of epoch e do not depend on how many random draws came before (what makes resume exact)."""
    from monai.transforms import RandGaussianNoise

    def make_loader():
        images = [{"image": torch.zeros(1, 4, 4)} for _ in range(4)]
        views = MultiViewd(keys="image", transform=RandGaussianNoise(prob=1.0, std=1.0), num_views=2)
        return DataLoader(Dataset(images, transform=views), batch_size=4, num_workers=0)

    def views_after(loader, epoch, warmup_draws):
        for _ in range(warmup_draws):
            next(iter(loader))
        engine = Engine(lambda e, b: None)
        engine.state.epoch = epoch
        SamplerEpochHandler(data_loader=loader, sampler=_RecordingSampler(), seed=7)(engine)
        return next(iter(loader))["image"]

    loader_a, loader_b = make_loader(), make_loader()
    a = views_after(loader_a, epoch=3, warmup_draws=0)
    b = views_after(loader_b, epoch=3, warmup_draws=2)
    c = views_after(loader_a, epoch=4, warmup_draws=0)
    assert a.shape == (4, 2, 1, 4, 4) and a.abs().sum() > 0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    worker_loader = DataLoader(Dataset([0, 1]), batch_size=1, num_workers=1, generator=torch.Generator())
    engine = Engine(lambda e, b: None)
    engine.state.epoch = 2
    SamplerEpochHandler(data_loader=worker_loader, sampler=_RecordingSampler(), seed=7)(engine)
    first = worker_loader.generator.initial_seed()
    engine.state.epoch = 3
    SamplerEpochHandler(data_loader=worker_loader, sampler=_RecordingSampler(), seed=7)(engine)
    assert worker_loader.generator.initial_seed() != first  # workers' seeds follow the epoch


class _OwnSeeding(nn.Module):
    """A random transform with its own ``set_random_state`` (it seeds a torch generator): called as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.generator = torch.Generator()

    def set_random_state(self, seed=None, state=None):
        self.calls += 1
        self.generator.manual_seed(int(seed))
        return self

    def forward(self, x):
        return x + torch.rand(x.shape, generator=self.generator)


def _seeded_views(num_workers: int, order: list[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor]:
    from monai.transforms import Compose, RandAdjustContrast, RandGaussianNoise, RandScaleIntensity

    from monai_du.transforms import RandCropRotate

    augment = Compose([RandCropRotate((6, 6)), RandScaleIntensity(0.2, prob=1.0), RandAdjustContrast(prob=1.0),
                       RandGaussianNoise(prob=1.0, std=0.1), _OwnSeeding()])
    images = [{"image": torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(i))} for i in range(4)]
    dataset = EpochSeededDataset(Dataset(images, transform=MultiViewd("image", augment, num_views=2)), seed=3)
    loader = DataLoader(dataset, batch_sampler=[[key] for key in order], num_workers=num_workers)
    return {key: batch["image"][0] for key, batch in zip(order, loader)}


def test_epoch_seeded_views_depend_on_seed_epoch_and_item_only():
    keys = [(e, i) for e in (1, 2) for i in range(4)]
    forward = _seeded_views(0, keys)
    backward = _seeded_views(2, keys[::-1])  # other order, other process
    for key in keys:
        assert torch.equal(forward[key], backward[key]), key
    distinct = {forward[key].sum().item() for key in keys}
    assert len(distinct) == len(keys)  # every (epoch, item) has its own views
    assert not torch.equal(forward[(1, 0)][0], forward[(1, 0)][1])  # and its two views differ


def test_epoch_seeded_dataset_reseeds_like_set_random_state():
    """Reseeding MONAI's transforms in place gives the streams of ``set_random_state`` with the same seeds (the
    reference: MONAI's new ``RandomState`` per transform); a transform with its own seeding is called as it is."""
    from monai.transforms import Compose, RandGaussianNoise, Randomizable, RandScaleIntensity
    from monai.utils import MAX_SEED

    def pipeline():
        return MultiViewd("image", Compose([RandScaleIntensity(0.5, prob=1.0), RandGaussianNoise(prob=1.0, std=1.0),
                                            _OwnSeeding()]), num_views=2)

    image = {"image": torch.rand(1, 5, 5, generator=torch.Generator().manual_seed(0))}
    views = EpochSeededDataset(Dataset([image], transform=pipeline()), seed=11)
    found = [(type(t).__name__, in_place) for t, in_place in views._random]
    assert found == [("Compose", True), ("MultiViewd", True), ("Compose", True), ("RandScaleIntensity", True),
                     ("RandGaussianNoise", True), ("_OwnSeeding", False)]
    got = views[(5, 0)]["image"]
    assert views._random[-1][0].calls == 1

    reference = pipeline()
    inner = reference.transform
    transforms = [Compose([reference]), reference, inner, *inner.transforms]
    seeds = [int(s) % MAX_SEED for s in np.random.SeedSequence([11, 5, 0]).generate_state(len(transforms))]
    for transform, seed in zip(transforms, seeds):
        if isinstance(transform, _OwnSeeding):
            transform.set_random_state(seed=seed)
        else:  # MONAI's base seeding of this transform alone (not its children's)
            Randomizable.set_random_state(transform, seed=seed)
    assert torch.equal(got, reference(image)["image"])
    assert not torch.equal(got, views[(6, 0)]["image"])


def test_epoch_batch_sampler_yields_epoch_item_pairs():
    sampler = EpochBatchSampler([[0, 2], [1, 3]])
    sampler.set_epoch(4)
    assert list(sampler) == [[(4, 0), (4, 2)], [(4, 1), (4, 3)]]


# ---------------------------------------------------------------------------------------------------------------
# ContrastiveMetricsHandler
# ---------------------------------------------------------------------------------------------------------------


def test_metrics_handler_records_alignment_uniformity_and_kernel_stats(tmp_path):
    net = _ViewNet()
    data = _batches(3)
    handler = ContrastiveMetricsHandler(log_dir=tmp_path / "tb")
    trainer, _, _ = _trainer(net, data, 1, handlers=[handler])
    per_iter = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _keep(engine):
        per_iter.append((engine.state.output["pred"].detach().double(), float(engine.state.output["loss"].detach()),
                         dict(engine.state.contrastive)))

    trainer.run()
    align = []
    for pred, loss, values in per_iter:
        mu = (pred / pred.norm(dim=-1, keepdim=True)).mean(1)
        align.append(-float((mu**2).sum(1).mean()))
        assert values["alignment"] == pytest.approx(align[-1], abs=1e-5)
        assert values["uniformity"] == pytest.approx(loss, abs=1e-6)
        assert values["batch_size"] == values["global_batch_size"] == 6
        assert 1.0 <= values["kernel_effective_rank"] <= 6.0
    metrics = trainer.state.metrics
    assert metrics["alignment"] == pytest.approx(np.mean(align), abs=1e-5)
    assert metrics["uniformity"] == pytest.approx(np.mean([p[1] for p in per_iter]), abs=1e-6)
    assert "kernel_mean_offdiag" in metrics and "kernel_path" not in metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("train/alignment")
    assert [e.step for e in events] == [1, 2, 3]
    assert [e.value for e in events] == pytest.approx(align, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# atomic checkpoints and resume
# ---------------------------------------------------------------------------------------------------------------


def test_atomic_torch_save_leaves_old_file_intact_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"w": torch.arange(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    with pytest.raises((pickle.PicklingError, AttributeError)):  # which one depends on where the lambda lives
        atomic_torch_save({"w": lambda: 0}, path)  # a lambda cannot be pickled: fails mid-write
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


_KILLED_SAVE = """
import os, signal, sys, torch
from monai_du.io import atomic_write
with atomic_write(sys.argv[1]) as tmp:
    torch.save({"w": torch.zeros(1000, 1000)}, tmp)  # a checkpoint-sized partial file
    os.kill(os.getpid(), signal.SIGKILL)  # killed before the rename
"""


def test_a_save_killed_mid_write_leaves_a_temporary_that_the_resumed_run_removes(tmp_path):
    import subprocess

    ckpt_dir = tmp_path / "models"
    ckpt_dir.mkdir()
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(ckpt_dir / "checkpoint_epoch=3.pt")])
    assert proc.returncode == -9
    partial = [p for p in ckpt_dir.iterdir()]
    assert len(partial) == 1 and partial[0].name.endswith(".tmp") and partial[0].stat().st_size > 1e6
    net = nn.Linear(2, 2)
    AtomicCheckpointSaver(save_dir=str(ckpt_dir), save_dict={"model": net}).attach(Engine(lambda e, b: None))
    assert list(ckpt_dir.iterdir()) == []


def _saver_and_loader(ckpt_dir, resume=True):
    def handlers(net, opt, sched):
        save_dict = {"model": net, "optimizer": opt, "lr_scheduler": sched}
        hs = [AtomicCheckpointSaver(str(ckpt_dir), save_dict, save_interval=1, n_saved=2)]
        if resume:
            hs.insert(0, LatestCheckpointLoader(ckpt_dir, dict(save_dict)))
        return hs

    return handlers


def test_checkpoint_every_epoch_is_complete_and_loadable(tmp_path):
    torch.manual_seed(0)
    net = _ViewNet()
    trainer, opt, sched = _trainer(net, _batches(3), 3, handlers=_saver_and_loader(tmp_path, resume=False))
    trainer.run()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt"]  # n_saved=2, no temporary files
    ckpt = torch.load(tmp_path / "checkpoint_epoch=3.pt", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "lr_scheduler", "trainer"}
    assert ckpt["trainer"]["iteration"] == 9 and ckpt["trainer"]["epoch_length"] == 3  # = epoch 3
    for k, v in net.state_dict().items():
        assert torch.equal(ckpt["model"][k], v)
    # the lr step of epoch 3 happened before the save (LrScheduleHandler is attached first): 0.1 * 0.5**3
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch=3.pt"


def test_resume_from_latest_checkpoint_matches_uninterrupted_run(tmp_path):
    data = _batches(3)
    torch.manual_seed(0)
    straight = _ViewNet()
    _trainer(straight, data, 4)[0].run()

    torch.manual_seed(0)
    first = _ViewNet()
    _trainer(first, data, 2, handlers=_saver_and_loader(tmp_path))[0].run()  # "killed" after epoch 2
    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    resumed = _ViewNet()
    holder = {}

    def handlers(net, opt, sched):
        hs = _saver_and_loader(tmp_path)(net, opt, sched)
        holder["loader"] = hs[0]
        return hs

    trainer, _, _ = _trainer(resumed, data, 4, handlers=handlers)
    trainer.run()
    assert holder["loader"].loaded_path == tmp_path / "checkpoint_epoch=2.pt"
    assert trainer.state.epoch == 4 and trainer.state.iteration == 12
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    # the first run's files count towards n_saved: only the two newest remain
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=3.pt", "checkpoint_epoch=4.pt"]


def test_latest_checkpoint_orders_numerically_and_loader_starts_fresh_without_one(tmp_path):
    for n in (9, 10, 2):
        (tmp_path / f"checkpoint_epoch={n}.pt").write_bytes(b"x")
    (tmp_path / "checkpoint_epoch=11.pt.tmp").write_bytes(b"x")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch=10.pt"
    assert latest_checkpoint(tmp_path / "absent") is None
    net = _ViewNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.SGD(net.parameters(), 0.1)
    loader = LatestCheckpointLoader(tmp_path / "empty", {"model": net, "optimizer": optimizer})
    engine = Engine(lambda e, b: None)
    loader.attach(engine)
    engine.run([0], max_epochs=1)
    assert loader.loaded_path is None
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# export of the pretrained encoder
# ---------------------------------------------------------------------------------------------------------------


def test_exporter_writes_encoder_model_prior_and_kernel(tmp_path):
    from monai_du.networks import (
        ContrastiveEncoder,
        ProbeClassifier,
        encoder_state_dict,
    )

    torch.manual_seed(0)
    net = ContrastiveEncoder("resnet10", spatial_dims=2, projection_dim=8, backbone_kwargs={"widen_factor": 0.125})
    df = pd.DataFrame({"age": [30.0, 50.0, np.nan, 70.0], "sex": ["F", "M", "M", None]})
    prior_encoder = PriorEncoder(continuous=["age"], categorical=["sex"]).fit(df)
    kernel = (RBFKernel(7.0, columns=[0]) * CategoricalKernel(columns=[1])).fit(prior_encoder.transform(df))
    wrapped = nn.DataParallel(net)  # wrappers are removed
    engine = Engine(lambda e, b: None)
    engine.state.epoch, engine.state.iteration = 5, 40
    written = PretrainedEncoderExporter(tmp_path, wrapped, prior_encoder, kernel, info={"backbone": "resnet10"})(engine)
    assert set(written) == {"encoder", "model", "prior_encoder", "kernel", "info"}
    enc = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert list(enc) == list(net.encoder.state_dict())
    assert all(torch.equal(enc[k], v) for k, v in net.encoder.state_dict().items())
    model = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(model[k], v) for k, v in net.state_dict().items())
    # the fine-tune side: encoder.pt loads strictly into a fresh backbone of the same architecture
    probe = ProbeClassifier("resnet10", num_classes=2, encoder_kwargs={"widen_factor": 0.125})
    probe.encoder.load_state_dict(enc)
    assert all(torch.equal(a, b) for a, b in zip(encoder_state_dict(tmp_path / "model.pt").values(), enc.values()))
    prior = torch.tensor(prior_encoder.transform(df))
    rebuilt = kernel_from_dict(json.loads((tmp_path / "kernel.json").read_text()))
    assert torch.allclose(rebuilt(prior), kernel(prior))
    assert PriorEncoder.load(tmp_path / "prior_encoder.json").to_dict() == prior_encoder.to_dict()
    info = json.loads((tmp_path / "encoder_info.json").read_text())
    assert info["feature_dim"] == net.feature_dim and info["epoch"] == 5 and info["backbone"] == "resnet10"
    with pytest.raises(ValueError, match="no .encoder"):
        PretrainedEncoderExporter(tmp_path, nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------------------
# config helpers
# ---------------------------------------------------------------------------------------------------------------


def test_fit_prior_kernel_fits_encoder_then_kernel_on_training_rows():
    df = pd.DataFrame({"age": [21.0, 35.0, 35.5, 60.0, np.nan], "sex": ["M", "F", "M", "F", "F"]})
    prior_encoder = PriorEncoder(continuous=["age"], categorical=["sex"])
    kernel = fit_prior_kernel(RBFKernel(10.0, columns=[0]) * CategoricalKernel(columns=[1]), prior_encoder, df)
    assert prior_encoder.is_fitted and prior_encoder.categories == {"sex": ["F", "M"]}
    gram = kernel(torch.tensor(prior_encoder.transform(df), dtype=torch.float64))
    for i in range(4):  # rows with an observed age: brute-force formula
        for j in range(4):
            ref = math.exp(-((df.age[i] - df.age[j]) ** 2) / 200.0) * (df.sex[i] == df.sex[j])
            assert float(gram[i, j]) == pytest.approx(ref, abs=1e-9)
    assert torch.isfinite(gram).all()  # the missing age follows the kernel's missing-value rule, never NaN
    knn = fit_prior_kernel(RBFKernel("knn", columns=[0], knn_k=1, knn_batch_size=4), prior_encoder, df)
    assert knn.bandwidth[0] > 0
    with pytest.raises(ValueError, match=r"columns \[3\]"):
        fit_prior_kernel(CategoricalKernel(columns=[3]), prior_encoder, df)


def test_default_bundle_root_follows_config_file_argument(monkeypatch, tmp_path):
    cfg = tmp_path / "bundle" / "configs" / "train.yaml"
    monkeypatch.setattr(sys, "argv", ["monai.bundle", "run", "--config_file", str(cfg)])
    assert default_bundle_root() == str(tmp_path / "bundle")
    monkeypatch.setattr(sys, "argv", ["x", "run", f"--config_file=['{cfg}', '{tmp_path}/b.yaml']"])
    assert default_bundle_root() == str(tmp_path / "bundle")
    monkeypatch.setattr(sys, "argv", ["x", "run", "--config_file", str(tmp_path / "train.yaml")])
    assert default_bundle_root() == str(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pytest"])
    assert default_bundle_root() == "."
