"""Tests of monai_du.runs: how a composite method's epochs and folders are laid out, and how a changed run is named.
The runs themselves (reuse, resume, refusal, logs) are exercised end to end in tests/test_compare.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from monai_du.bundles import MethodSpec, Stage
from monai_du.runs import _changed, _stage_epochs, stage_roots


def _spec(*shares: float) -> MethodSpec:
    stages = tuple(Stage(f"m{i}", share) for i, share in enumerate(shares))
    return MethodSpec(key="x", name="x", order=None, stages=stages, path=Path("x.yaml"))


@pytest.mark.parametrize("epochs, shares, expected", [
    (10, (), [10]),
    (10, (0.5, 0.5), [5, 5]),
    (7, (0.5, 0.5), [4, 3]),  # round(3.5) = 4; the last stage takes the rest
    (1, (0.5, 0.5), [1, 0]),  # every stage but the last has at least one epoch
    (10, (0.2, 0.3, 0.5), [2, 3, 5]),
])
def test_stage_epochs_are_shares_and_add_up(epochs, shares, expected):
    got = _stage_epochs(epochs, _spec(*shares))
    assert got == expected and sum(got) == epochs


def test_stage_folders_put_the_last_stage_in_the_run_folder():
    root = Path("/runs/seed0/x")
    assert stage_roots(root, _spec()) == [root]
    assert stage_roots(root, _spec(0.2, 0.3, 0.5)) == [root / "stage1", root / "stage2", root]


def test_a_changed_run_names_the_override_ids_with_old_and_new_values():
    old = {"overrides": {"max_epochs": 10, "lam": 0.01}}
    new = {"overrides": {"max_epochs": 20, "lam": 0.01, "seed": 1}}
    assert _changed(["manifest_sha256", "overrides"], old, new) == (
        "manifest_sha256, max_epochs (10 -> 20), seed ('unset' -> 1)")
