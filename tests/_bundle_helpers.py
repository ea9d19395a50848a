"""Shared helpers of the bundle tests (test_bundles_pretrain.py, test_bundles_distributed.py); not a test module.

- subprocess runs of ``python -m monai.bundle run`` / ``torchrun`` with a clean environment;
- tiny copies of the demo chest X-ray phantom (``make_phantom_manifest``);
- the float64 kernel-DU reference (``du_reference``);
- a probe module and probe override config for distributed runs: the probe records the indices every rank's batch
  sampler yields, the first step's embeddings, priors and loss, and every file-system write under ``bundle_root``
  (through a Python audit hook), into per-rank files of a probe folder outside ``bundle_root``.
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLES = {"cxr": REPO / "bundles" / "cxr_du_pretrain", "brain": REPO / "bundles" / "brain_mri_du_pretrain"}
SHARED = Path(__file__).resolve().parents[2] / "shared"
SCHEMA = SHARED / "monai" / "meta_schema_20240725.json"


def config(bundle: str, *names: str) -> list[str]:
    """Paths of ``train.yaml`` then the named files of the bundle's configs folder (e.g. ``methods/kdu_attr.yaml``)."""
    folder = BUNDLES[bundle] / "configs"
    return [str(folder / "train.yaml")] + [str(folder / name) for name in names]


def config_arg(files: list[str]) -> str:
    """The ``--config_file`` value of MONAI's CLI: one path, or a Python list of paths."""
    return files[0] if len(files) == 1 else repr([str(f) for f in files])


def env(*python_paths: str | os.PathLike, **extra: str) -> dict:
    out = dict(os.environ)
    out["OMP_NUM_THREADS"] = "1"  # 2 shared cores: avoid OpenMP spin contention; also makes runs comparable
    paths = [str(REPO), *(str(p) for p in python_paths), out.get("PYTHONPATH", "")]
    out["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    out.update(extra)
    return out


def check_fire() -> None:
    try:
        import fire  # noqa: F401
    except ImportError:  # pragma: no cover
        pytest.fail("`python -m monai.bundle` needs the `fire` package: pip install fire (listed in pyproject.toml)")


def run(cmd: list[str], cwd: Path, timeout: int = 300, environment: dict | None = None) -> str:
    """Run ``cmd``; fail the test with the command and the end of its output unless it exits with 0."""
    check_fire()
    proc = subprocess.run(cmd, cwd=cwd, env=environment or env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{failure(out)}"
    return out


def failure(out: str) -> str:
    """The end of a failed run's output, after the error lines of every rank (a torchrun log ends with the
    launcher's summary, and rank 0's error is often only the echo of another rank's crash)."""
    errors = [line for line in out.splitlines() if re.match(r"^(\[rank\d+\]: )?\w*(Error|Exception)\b", line)]
    return "\n".join(["errors:", *errors[-12:], "--- end of the output:", out[-5000:]])


def bundle_run(files: list[str], bundle_root: Path, *overrides: str, timeout: int = 300) -> str:
    """``python -m monai.bundle run`` of ``files`` with ``bundle_root`` and the overrides, from its parent folder."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_arg(files),
           "--bundle_root", str(bundle_root), *overrides]
    return run(cmd, cwd=bundle_root.parent, timeout=timeout)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------


def make_phantom(folder: Path, n: int, size: int = 64) -> Path:
    """The demo chest X-ray phantom (4 acquisition sites, NIH-like patients and follow-ups) in ``folder``."""
    from monai_du.phantoms import ensure_demo_cohort

    return ensure_demo_cohort(folder, "cxr", n=n, seed=0, size=size)


def data_args(manifest: Path, dataset_dir: Path) -> list[str]:
    return ["--manifest", str(manifest), "--dataset_dir", str(dataset_dir)]


# ---------------------------------------------------------------------------------------------------------------
# float64 reference of the loss
# ---------------------------------------------------------------------------------------------------------------


def du_reference(pred: torch.Tensor, prior: torch.Tensor, bandwidth: float, lam=0.01, eta=0.05, t=2.0) -> float:
    """Kernel DU in float64 from its definition: K = RBF(age) * [sex equal] + eta I, c = (K + lam I)^-1 K mu,
    L = log(mean over pairs i<j of exp(-t ||c_i - c_j||^2)). ``pred`` (B, V, D), ``prior`` (B, 2) = (age, sex code)."""
    z = pred.double()
    mu = (z / z.norm(dim=-1, keepdim=True)).mean(1)
    age, sex = prior[:, 0].double(), prior[:, 1].double()
    b = len(age)
    k = torch.exp(-((age[:, None] - age[None, :]) ** 2) / (2 * bandwidth**2)) * (sex[:, None] == sex[None, :])
    k = k + eta * torch.eye(b, dtype=torch.float64)
    c = torch.linalg.solve(k + lam * torch.eye(b, dtype=torch.float64), k @ mu)
    vals = [math.exp(-t * float(((c[i] - c[j]) ** 2).sum())) for i in range(b) for j in range(i + 1, b)]
    return math.log(np.mean(vals))


# ---------------------------------------------------------------------------------------------------------------
# probe of a (distributed) bundle run
# ---------------------------------------------------------------------------------------------------------------

PROBE_MODULE = '''"""Probe of a bundle run (written by the tests). Files go to probe_dir, one per global rank."""
import atexit
import json
import os
import sys

import torch

_WRITES = []
_WRITE_EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.chmod", "os.truncate", "os.utime",
                 "os.symlink", "os.link", "tempfile.mkstemp", "tempfile.mkdtemp", "shutil.rmtree", "shutil.copyfile",
                 "shutil.move")
_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _rank():
    return int(os.environ.get("RANK", "0"))


def _identity():
    keys = ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "PROBE_LAUNCH")
    return {"pid": os.getpid(), **{k.lower(): os.environ.get(k) for k in keys}}


def watch_writes(bundle_root, probe_dir):
    """Record every write-like file-system event under bundle_root (Python audit hook) until the process exits."""
    root = os.path.abspath(bundle_root)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if not isinstance(path, (str, bytes, os.PathLike)):
                return
            if not (any(c in (mode or "") for c in "wax+") or (flags or 0) & _FLAGS):
                return
            paths = [path]
        elif event in _WRITE_EVENTS:
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        for p in paths:
            p = os.path.abspath(os.fsdecode(p))
            entry = [event, os.path.relpath(p, root)]
            if (p == root or p.startswith(root + os.sep)) and entry not in _WRITES:
                _WRITES.append(entry)

    def dump():
        with open(os.path.join(probe_dir, f"writes_rank{_rank()}.json"), "w") as f:
            json.dump({**_identity(), "writes": _WRITES}, f)

    sys.addaudithook(hook)
    atexit.register(dump)
    return True


class RecordingBatchSampler:
    """Wraps the data loader's batch sampler; records the dataset indices of every batch it yields, per epoch."""

    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler
        self.batches = []

    def set_epoch(self, epoch):
        self.batch_sampler.set_epoch(epoch)

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        epoch = []
        self.batches.append(epoch)
        for batch in self.batch_sampler:
            epoch.append([int(i[1]) if isinstance(i, tuple) else int(i) for i in batch])
            yield batch


def attach(trainer, probe_dir):
    """Save the first iteration's output (local embeddings, priors, loss) of this rank."""
    from ignite.engine import Events

    @trainer.on(Events.ITERATION_COMPLETED(once=1))
    def _first(engine):
        out = engine.state.output
        torch.save({"pred": out["pred"].detach().cpu(), "prior": out["label"].detach().cpu(),
                    "loss": float(out["loss"])}, os.path.join(probe_dir, f"first_rank{_rank()}.pt"))

    return trainer


def finish(trainer, dataset, probe_dir):
    """This rank's steps, sampled indices and their sites, and the metrics of the run."""
    sampler = trainer.data_loader.batch_sampler
    records = dataset.data
    batches = [[{"index": i, "site": records[i]["site"], "image": os.path.basename(str(records[i]["image"]))}
                for i in b] for b in sampler.batches[0]]
    summary = {**_identity(), "iterations": int(trainer.state.iteration),
               "epoch_length": int(trainer.state.epoch_length),
               "world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
               "metrics": {k: float(v) for k, v in trainer.state.metrics.items()}, "batches": batches}
    with open(os.path.join(probe_dir, f"summary_rank{_rank()}.json"), "w") as f:
        json.dump(summary, f)
    return summary
'''

PROBE_CONFIG = """# probe override (tests): record the sampled batches, the first step and the writes of every rank
probe_dir: null
train#dataloader#batch_sampler: $bundle_probe.RecordingBatchSampler(monai_du.engines.EpochBatchSampler(@train#sampler))
run:
  - $import bundle_probe
  - $bundle_probe.watch_writes(@bundle_root, @probe_dir)
  - $bundle_probe.attach(@train#trainer, @probe_dir)
  - $@train#trainer.run()
  - $bundle_probe.finish(@train#trainer, @train#dataset, @probe_dir)
"""


def write_probe(folder: Path) -> tuple[Path, Path]:
    """Write ``bundle_probe.py`` and ``probe.yaml`` into ``folder/probe_code``, make ``folder/probe`` (the per-rank
    outputs); returns (probe config, probe output folder). Put ``folder/probe_code`` on PYTHONPATH."""
    code = folder / "probe_code"
    code.mkdir(parents=True, exist_ok=True)
    (code / "bundle_probe.py").write_text(PROBE_MODULE)
    (code / "probe.yaml").write_text(PROBE_CONFIG)
    out = folder / "probe"
    out.mkdir(exist_ok=True)
    return code / "probe.yaml", out


def sites_manifest(phantom_manifest: Path, out: Path) -> Path:
    """The phantom's manifest with every row in the training split (a ``split`` column), so that all its site
    sizes (uneven) reach the sampler."""
    df = pd.read_csv(phantom_manifest)
    df["split"] = "train"
    df.to_csv(out, index=False)
    return out
