"""Multi-process and multi-node runs of the bundles with ``torchrun`` on CPU (gloo).

- 2 ranks on one node (``--standalone``): the CXR pretrain bundle with ``methods/kdu_attr.yaml`` (batches within one
  site) on the 4-site phantom with uneven site sizes. A probe override records the indices every rank's batch sampler
  yields: every gathered global batch is one site, ranks get disjoint indices and the same number of steps, and the
  loss is the float64 kernel-DU loss of the gathered batch, not of the local one.
- 2 nodes x 1 process on this machine: two ``torchrun --nnodes 2 --node_rank i --rdzv_backend c10d`` launches started
  together, sharing one ``bundle_root``. Only the global rank 0 writes into it (checked with a Python audit hook on
  every process, and by the files present); the first step's loss is the float64 reference on the concatenated
  batch.
- the fine-tune bundle's multi-GPU override with 2 ranks: validation sharded over the ranks, AUC on the gathered set.

The probe (tests/_bundle_helpers.py) writes its per-rank files outside ``bundle_root``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
from _bundle_helpers import (
    config,
    config_arg,
    data_args,
    du_reference,
    env,
    failure,
    free_port,
    make_phantom,
    run,
    sites_manifest,
    write_probe,
)
from _finetune_helpers import (
    SETTINGS,
    SPLIT,
    _assert_close_or_both_nan,
    _copy_bundle,
    _data_args,
    _infer,
    _logged_metrics,
    _sklearn_val_auc,
)

N_IMAGES = 96  # phantom sites: 49, 30, 9 and 8 images, every one at least a global batch of 2 x 4
BATCH = 4  # per rank
TIMEOUT = 300
EXPECTED_MODELS = {"checkpoint_epoch=1.pt", "model.pt", "encoder.pt", "encoder_info.json", "kernel.json",
                   "prior_encoder.json"}


@pytest.fixture(scope="module")
def sites_data(tmp_path_factory) -> tuple[Path, Path]:
    """(manifest, dataset_dir): the phantom with every row in the training split, so that all sites are uneven and
    each holds at least one global batch."""
    folder = tmp_path_factory.mktemp("phantom")
    phantom = make_phantom(folder / "images", N_IMAGES)
    manifest = sites_manifest(phantom, folder / "manifest_all_train.csv")
    sizes = pd.read_csv(manifest)["site"].value_counts()
    assert len(sizes) == 4 and sizes.nunique() == 4 and sizes.min() >= 2 * BATCH, sizes.to_dict()
    return manifest, phantom.parent


def _pretrain_args(root: Path, probe_dir: Path, manifest: Path, dataset_dir: Path, probe_config: Path) -> list[str]:
    files = config("cxr", "methods/kdu_attr.yaml", "multi_gpu_train.yaml") + [str(probe_config)]
    return ["-m", "monai.bundle", "run", "--config_file", config_arg(files), "--bundle_root", str(root),
            *data_args(manifest, dataset_dir), "--batch_size", str(BATCH), "--max_epochs", "1", "--num_workers", "0",
            "--num_threads", "1", "--backend", "gloo", "--probe_dir", str(probe_dir)]


def _read_probe(probe_dir: Path, world: int = 2) -> tuple[list[dict], list[dict], list[dict]]:
    summaries = [json.loads((probe_dir / f"summary_rank{r}.json").read_text()) for r in range(world)]
    writes = [json.loads((probe_dir / f"writes_rank{r}.json").read_text()) for r in range(world)]
    first = [torch.load(probe_dir / f"first_rank{r}.pt", weights_only=True) for r in range(world)]
    return summaries, writes, first


def _check_first_step_loss(first: list[dict], root: Path) -> None:
    """Every rank's first loss is the float64 kernel DU of the batch gathered in rank order, not of its own part."""
    assert all(f["pred"].shape == (BATCH, 2, 128) and f["prior"].shape == (BATCH, 2) for f in first)
    assert first[0]["loss"] == pytest.approx(first[1]["loss"], abs=1e-6)  # every rank computes the same loss
    bandwidth = json.loads((root / "models" / "kernel.json").read_text())["k1"]["bandwidth_"][0]
    pred = torch.cat([f["pred"] for f in first])
    prior = torch.cat([f["prior"] for f in first])
    assert not torch.isnan(prior).any()
    global_ref = du_reference(pred, prior, bandwidth)
    local_ref = du_reference(first[0]["pred"], first[0]["prior"], bandwidth)
    assert first[0]["loss"] == pytest.approx(global_ref, abs=1e-4)
    assert abs(first[0]["loss"] - local_ref) > 1e-3  # the local-batch loss would be a different number


def _check_only_rank0_wrote(root: Path, summaries: list[dict], writes: list[dict]) -> None:
    """Rank 0 wrote models/ and eval/tensorboard; no other rank wrote anything under bundle_root."""
    for w in writes[1:]:
        assert w["writes"] == [], f"rank {w['rank']} (pid {w['pid']}) wrote into bundle_root: {w['writes'][:10]}"
    written = {path for _, path in writes[0]["writes"]}
    assert {f"models/{name}" for name in ("encoder.pt", "model.pt", "kernel.json")} <= written
    assert any(p.startswith("eval/tensorboard/events.out.tfevents.") for p in written)
    assert {p.name for p in (root / "models").iterdir()} == EXPECTED_MODELS
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "tensorboard" not in
                  p.parts and not p.name.startswith("views")) == sorted(f"models/{name}" for name in EXPECTED_MODELS)
    assert any(p.startswith("eval/views") and p.endswith(".png") for p in written)  # what the network sees
    events = list((root / "eval" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.name.split(".")[-2] == str(summaries[0]["pid"]) for e in events)  # rank 0's pid
    ckpt = torch.load(root / "models" / "checkpoint_epoch=1.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])  # no DDP prefix


def test_torchrun_two_ranks_within_site_global_batches(sites_data, tmp_path):
    manifest, dataset_dir = sites_data
    root = tmp_path / "bundle"
    root.mkdir()
    probe_config, probe_dir = write_probe(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *_pretrain_args(root, probe_dir, manifest, dataset_dir, probe_config)]
    run(cmd, cwd=tmp_path, timeout=TIMEOUT, environment=env(probe_config.parent))
    summaries, writes, first = _read_probe(probe_dir)
    assert [s["world"] for s in summaries] == [2, 2]
    # the same number of steps on both ranks: one per global batch of 8 cut from one site (remainders dropped)
    sizes = pd.read_csv(manifest)["site"].value_counts()
    expected_steps = {site: n // (2 * BATCH) for site, n in sizes.items()}
    steps = [len(s["batches"]) for s in summaries]
    assert steps[0] == steps[1] == summaries[0]["iterations"] == summaries[1]["iterations"]
    assert steps[0] == sum(expected_steps.values())
    global_sites = []
    for part0, part1 in zip(summaries[0]["batches"], summaries[1]["batches"]):
        assert len(part0) == len(part1) == BATCH
        sites = {item["site"] for item in part0 + part1}
        assert len(sites) == 1, f"a global batch spans sites {sites}"
        global_sites.append(sites.pop())
    assert Counter(global_sites) == Counter({site: k for site, k in expected_steps.items() if k})  # every site
    indices = [[item["index"] for batch in s["batches"] for item in batch] for s in summaries]
    assert not set(indices[0]) & set(indices[1])  # disjoint ranks
    assert all(len(set(i)) == len(i) for i in indices)  # every image at most once per epoch
    _check_first_step_loss(first, root)
    _check_only_rank0_wrote(root, summaries, writes)


def test_two_nodes_c10d_rendezvous_share_one_bundle_root(sites_data, tmp_path):
    """2 nodes x 1 process (two torchrun launches on this machine, c10d rendezvous), one shared bundle_root."""
    manifest, dataset_dir = sites_data
    root = tmp_path / "shared_bundle"
    root.mkdir()
    probe_config, probe_dir = write_probe(tmp_path)
    port, rdzv_id = free_port(), f"monai_du_test_{uuid.uuid4().hex[:12]}"
    procs, logs = [], []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", rdzv_id, "--local_addr", "127.0.0.1",
               *_pretrain_args(root, probe_dir, manifest, dataset_dir, probe_config)]
        log = open(tmp_path / f"node{node}.log", "w")  # closed below
        logs.append(log)
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                      env=env(probe_config.parent, PROBE_LAUNCH=str(node))))
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)  # the launch's own session: its agent and worker
                p.wait()
        for log in logs:
            log.close()
    outputs = [(tmp_path / f"node{node}.log").read_text() for node in range(2)]
    assert codes == [0, 0], "\n".join(f"--- node {i} (exit {p.returncode})\n{failure(out)}"
                                      for i, (p, out) in enumerate(zip(procs, outputs)))
    summaries, writes, first = _read_probe(probe_dir)
    assert [s["world"] for s in summaries] == [2, 2] and [s["local_rank"] for s in summaries] == ["0", "0"]
    assert {s["probe_launch"] for s in summaries} == {"0", "1"}  # one rank per launch ("node")
    assert summaries[0]["iterations"] == summaries[1]["iterations"] == len(summaries[0]["batches"]) > 0
    _check_first_step_loss(first, root)
    _check_only_rank0_wrote(root, summaries, writes)
    assert sum("Saved the pretrained encoder" in out for out in outputs) == 1


@pytest.mark.slow
def test_finetune_two_ranks_validation_sees_all_ranks(tmp_path):
    """torchrun, 2 CPU processes: DDP training, validation sharded over the ranks, AUC computed on the gathered set."""
    name = "cxr_finetune"
    bundle = _copy_bundle(name, tmp_path)
    configs = [str(bundle / "configs" / "train.yaml"), str(bundle / "configs" / "multi_gpu_train.yaml")]
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "monai.bundle", "run", "--config_file", repr(configs), "--backend", "gloo",
               "--bundle_root", str(bundle), *_data_args(bundle, name), "--num_workers", "0",
               "--pretrained", str(tmp_path / "absent.pt"), "--train#trainer#max_epochs", "1",
               "--split_fractions", repr(SPLIT), *SETTINGS[name]["overrides"]], cwd=tmp_path, timeout=TIMEOUT)
    assert out.count("the encoder starts from RANDOM initialisation") == 2  # one warning per rank
    assert len(re.findall(r"Metrics -- .*val_mean_auc: ", out)) == 1  # logged by rank 0 only
    predictions = _infer(bundle, name)
    _assert_close_or_both_nan(_logged_metrics(bundle), _sklearn_val_auc(bundle, predictions, SETTINGS[name]["labels"]))
