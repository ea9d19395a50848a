"""Tests for monai_du.data.samplers: coverage, purity, balance, neighbourhoods, ranks, determinism, errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import Dataset
from sklearn.neighbors import NearestNeighbors

from monai_du.data.samplers import AttributeBatchSampler, attribute_batch_sampler
from monai_du.prior_encoder import PriorEncoder

sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ABIDE_CSV = SHARED_DATA / "abide1_phenotypic.csv"


def _epoch(sampler: AttributeBatchSampler, epoch: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def _uneven_groups(seed: int = 0) -> np.ndarray:
    """Labels of 4 groups of 50, 23, 9 and 3 members, in shuffled row order."""
    labels = np.array(["A"] * 50 + ["B"] * 23 + ["C"] * 9 + ["D"] * 3, dtype=object)
    return np.random.default_rng(seed).permutation(labels)


def _pairwise_mean_distance(points: np.ndarray) -> float:
    """Mean Euclidean distance over ordered pairs i != j, by a plain double loop (float64)."""
    n = len(points)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                total += math.sqrt(float(((points[i] - points[j]) ** 2).sum()))
    return total / (n * (n - 1))


# ---------------------------------------------------------------------- coverage and lengths


@pytest.mark.parametrize(
    "mode, kwargs",
    [
        ("random", {"num_samples": 85}),
        ("within", {"groups": _uneven_groups()}),
        ("within", {"groups": _uneven_groups(), "small_groups": "keep"}),
        ("neighbourhood", {"features": np.random.default_rng(0).normal(size=(85, 3))}),
        ("neighbourhood", {"features": np.random.default_rng(0).normal(size=(85, 3)), "n_neighbours": 9}),
    ],
)
def test_every_index_exactly_once_per_epoch(mode, kwargs):
    sampler = AttributeBatchSampler(10, mode=mode, **kwargs)
    for epoch in range(3):
        batches = _epoch(sampler, epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(85))
        assert len(batches) == len(sampler)
        assert all(1 <= len(b) <= 10 for b in batches)


@pytest.mark.parametrize("mode", ["random", "within", "balanced", "neighbourhood"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_len_matches_yield_and_drop_last_gives_full_batches(mode, drop_last):
    rng = np.random.default_rng(3)
    groups = _uneven_groups()
    sampler = AttributeBatchSampler(
        8, mode=mode, groups=None if mode == "neighbourhood" else groups,
        features=rng.normal(size=(85, 2)) if mode == "neighbourhood" else None, drop_last=drop_last,
    )
    for epoch in range(3):
        batches = _epoch(sampler, epoch)
        assert len(batches) == len(sampler)
        if drop_last:
            assert all(len(b) == 8 for b in batches)
        assert all(len(set(b)) == len(b) or mode == "balanced" for b in batches)


# ---------------------------------------------------------------------- within


def test_within_batches_are_pure_and_merged_batches_hold_only_small_groups():
    groups = _uneven_groups()
    sampler = AttributeBatchSampler(10, mode="within", groups=groups, small_groups="merge")
    assert sorted(sampler.merged_groups) == ["C", "D"]
    batches = _epoch(sampler)
    for batch in batches:
        labels = {groups[i] for i in batch}
        assert len(labels) == 1 or labels <= {"C", "D"}
    # A (50) -> 5 batches, B (23) -> 3 batches, pool C+D (12) -> 2 batches.
    assert len(batches) == 5 + 3 + 2
    # The pool is laid out group after group: at most one merged batch mixes C and D.
    assert sum(len({groups[i] for i in b}) > 1 for b in batches) <= 1


def test_within_keep_gives_small_groups_their_own_short_batch():
    groups = _uneven_groups()
    batches = _epoch(AttributeBatchSampler(10, mode="within", groups=groups, small_groups="keep"))
    assert all(len({groups[i] for i in b}) == 1 for b in batches)
    by_group = Counter(groups[b[0]] for b in batches)
    assert by_group == {"A": 5, "B": 3, "C": 1, "D": 1}


def test_within_drop_warns_and_leaves_small_groups_out():
    groups = _uneven_groups()
    with pytest.warns(UserWarning, match="drops groups"):
        sampler = AttributeBatchSampler(10, mode="within", groups=groups, small_groups="drop")
    assert sorted(sampler.dropped_groups) == ["C", "D"]
    flat = sorted(i for b in _epoch(sampler) for i in b)
    assert flat == [i for i in range(len(groups)) if groups[i] in ("A", "B")]


def test_within_keep_with_drop_last_is_refused():
    with pytest.raises(ValueError, match="drop_last"):
        AttributeBatchSampler(10, mode="within", groups=_uneven_groups(), small_groups="keep", drop_last=True)


def test_missing_group_labels_form_their_own_group():
    groups = ["s1"] * 6 + [None] * 4 + [float("nan")] * 2 + ["s2"] * 6
    batches = _epoch(AttributeBatchSampler(3, mode="within", groups=groups, small_groups="keep"))
    missing = set(range(6, 12))
    for batch in batches:
        assert set(batch) <= missing or not set(batch) & missing
    assert sorted(i for b in batches for i in b) == list(range(18))


@pytest.mark.parametrize("as_type", [list, np.asarray, pd.Series, torch.tensor])
def test_group_labels_are_compared_by_value_whatever_the_container(as_type):
    codes = [0, 1] * 6 + [2] * 4
    sampler = AttributeBatchSampler(4, mode="within", groups=as_type(codes))
    assert len(sampler.group_labels) == 3
    for batch in _epoch(sampler):
        assert len({codes[i] for i in batch}) == 1


# ---------------------------------------------------------------------- balanced


def test_balanced_counts_equal_when_batch_divides():
    groups = np.array(["a"] * 100 + ["b"] * 40 + ["c"] * 20 + ["d"] * 12, dtype=object)
    sampler = AttributeBatchSampler(16, mode="balanced", groups=groups)
    batches = _epoch(sampler)
    assert len(batches) == math.ceil(172 / 16)
    for batch in batches:
        assert Counter(groups[i] for i in batch) == {"a": 4, "b": 4, "c": 4, "d": 4}


def test_balanced_counts_differ_by_at_most_one_and_carry_on_across_epochs():
    groups = np.array(["a"] * 100 + ["b"] * 40 + ["c"] * 20, dtype=object)
    sampler = AttributeBatchSampler(10, mode="balanced", groups=groups)  # 10 = 3 * 3 + 1 leftover slot
    totals = Counter()
    for epoch in range(6):
        for batch in _epoch(sampler, epoch):
            counts = Counter(groups[i] for i in batch)
            assert sorted(counts) == ["a", "b", "c"]
            assert max(counts.values()) - min(counts.values()) <= 1
            totals.update(counts)
    # 6 epochs * 16 batches = 96 leftover slots, dealt round-robin: 32 each.
    assert set(totals.values()) == {96 * 3 + 32}


def test_balanced_traverses_each_group_without_replacement_across_epochs():
    groups = np.array(["a"] * 97 + ["b"] * 13, dtype=object)
    sampler = AttributeBatchSampler(8, mode="balanced", groups=groups)
    seen = Counter()
    draws_a = 0
    for epoch in range(7):
        for batch in _epoch(sampler, epoch):
            seen.update(batch)
            draws_a += sum(groups[i] == "a" for i in batch)
    counts_a = [seen[i] for i in range(97)]
    counts_b = [seen[i] for i in range(97, 110)]
    # Reference: a stream of back-to-back permutations visits every member floor or ceil of (draws / size) times.
    assert min(counts_a) >= draws_a // 97 and max(counts_a) <= -(-draws_a // 97)
    draws_b = sum(counts_b)
    assert min(counts_b) >= draws_b // 13 and max(counts_b) <= -(-draws_b // 13)


def test_balanced_small_group_policies():
    # 4 groups, share = ceil(16 / 4) = 4: "c" (2) and "d" (3) are small.
    groups = np.array(["a"] * 60 + ["b"] * 60 + ["c"] * 2 + ["d"] * 3, dtype=object)
    pooled = {"c", "d"}
    merged = AttributeBatchSampler(16, mode="balanced", groups=groups, small_groups="merge")
    assert sorted(merged.merged_groups) == ["c", "d"]
    for batch in _epoch(merged):  # three groups (a, b, pool) share 16 slots: 5, 5, 6 in some order
        counts = Counter("pool" if groups[i] in pooled else groups[i] for i in batch)
        assert sorted(counts.values()) == [5, 5, 6]
    with pytest.warns(UserWarning, match="drops groups"):
        dropped = AttributeBatchSampler(16, mode="balanced", groups=groups, small_groups="drop")
    assert sorted(dropped.dropped_groups) == ["c", "d"]
    for batch in _epoch(dropped):
        assert Counter(groups[i] for i in batch) == {"a": 8, "b": 8}
    kept = AttributeBatchSampler(16, mode="balanced", groups=groups, small_groups="keep")
    for batch in _epoch(kept):
        assert Counter(groups[i] for i in batch) == {"a": 4, "b": 4, "c": 4, "d": 4}
        assert {i for i in batch if groups[i] == "c"} == {120, 121}  # 2 members cycled over 4 slots


# ---------------------------------------------------------------------- neighbourhood


def test_neighbourhood_batches_are_tighter_than_random_batches():
    rng = np.random.default_rng(7)
    raw = np.column_stack([rng.uniform(20, 90, 400), rng.integers(0, 2, 400), rng.normal(0, 5, 400)])
    reference = (raw - raw.mean(0)) / raw.std(0)  # the documented standardisation, computed here independently
    near = AttributeBatchSampler(20, mode="neighbourhood", features=raw, n_neighbours=19)
    rand = AttributeBatchSampler(20, mode="random", num_samples=400)
    near_mean = np.mean([_pairwise_mean_distance(reference[b]) for b in _epoch(near)])
    rand_mean = np.mean([_pairwise_mean_distance(reference[b]) for b in _epoch(rand)])
    assert near_mean < 0.5 * rand_mean


def test_neighbourhoods_are_close_to_true_nearest_neighbours():
    rng = np.random.default_rng(11)
    raw = rng.normal(size=(960, 3)) * np.array([1.0, 10.0, 0.1])
    reference = (raw - raw.mean(0)) / raw.std(0)
    k = 7
    sampler = AttributeBatchSampler(32, mode="neighbourhood", features=raw, n_neighbours=k)
    batches = _epoch(sampler)
    # Each batch holds 32 / 8 neighbourhoods, one after another.
    mates = []
    for batch in batches:
        for start in range(0, len(batch), k + 1):
            block = reference[batch[start : start + k + 1]]
            for i in range(len(block)):
                mates.append(np.sqrt(((block - block[i]) ** 2).sum(1)).sum() / k)
    knn_dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(reference).kneighbors(reference)
    knn_mean = knn_dist[:, 1:].mean()
    rand_mean = _pairwise_mean_distance(reference[rng.choice(960, 200, replace=False)])
    assert np.mean(mates) < 2.5 * knn_mean
    assert np.mean(mates) < 0.4 * rand_mean


def test_neighbourhood_handles_missing_values_and_many_columns():
    rng = np.random.default_rng(5)
    raw = rng.normal(size=(150, 12))
    raw[rng.random(raw.shape) < 0.2] = np.nan
    raw[:, 4] = np.nan  # a column with no observed value
    sampler = AttributeBatchSampler(16, mode="neighbourhood", features=raw)
    flat = sorted(i for b in _epoch(sampler) for i in b)
    assert flat == list(range(150))


def test_neighbourhood_treats_missing_value_as_column_mean():
    # Two clusters in column 0; column 1 is noise. Rows with column 0 missing sit at the mean, between the clusters.
    raw = np.array([[0.0, 0.0]] * 8 + [[10.0, 0.0]] * 8 + [[np.nan, 0.0]] * 8)
    batches = _epoch(AttributeBatchSampler(8, mode="neighbourhood", features=raw, n_neighbours=7))
    assert sorted(sorted(b) for b in batches) == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]


# ---------------------------------------------------------------------- distributed: R ranks emulated in one process


def _steps(R: int, epoch: int = 0, **kwargs) -> list[list[list[int]]]:
    """Every step of an epoch as the R rank parts, from R samplers built with num_replicas=R, rank=r."""
    samplers = [AttributeBatchSampler(num_replicas=R, rank=r, **kwargs) for r in range(R)]
    epochs = [_epoch(s, epoch) for s in samplers]
    assert [len(e) for e in epochs] == [len(s) for s in samplers] == [len(epochs[0])] * R  # equal step counts
    return [list(parts) for parts in zip(*epochs)]


def _gathered(parts: list[list[int]]) -> list[int]:
    """What an all_gather in rank order puts together."""
    return [i for part in parts for i in part]


def _assert_disjoint(parts: list[list[int]]) -> None:
    seen: set[int] = set()
    for part in parts:
        assert part and not seen & set(part)
        seen |= set(part)


def _pk_patients(groups: np.ndarray, batch: list[int], k: int) -> list[set]:
    """Patient labels of each consecutive block of k indices."""
    assert len(batch) % k == 0
    return [{groups[i] for i in batch[s : s + k]} for s in range(0, len(batch), k)]


def test_issue_example_four_sites_two_ranks_gives_pure_global_batches():
    groups = np.random.default_rng(0).permutation(np.repeat(np.array(["s0", "s1", "s2", "s3"], dtype=object), 64))
    steps = _steps(2, groups=groups, batch_size=16, mode="within", drop_last=True)
    assert len(steps) == 8  # 4 sites x 64 / global batch 32
    for parts in steps:
        assert [len(p) for p in parts] == [16, 16]
        assert len({groups[i] for i in _gathered(parts)}) == 1
        _assert_disjoint(parts)


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize(
    "small_groups, drop_last", [("merge", True), ("merge", False), ("keep", False), ("drop", True)]
)
def test_within_gathered_batches_are_pure_over_uneven_groups(replicas, small_groups, drop_last):
    groups = _uneven_groups()  # 50, 23, 9, 3
    size = 4 * replicas
    small = {g for g, n in Counter(groups).items() if n < size}  # brute-force small groups at the global size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = AttributeBatchSampler(4, mode="within", groups=groups, small_groups=small_groups, drop_last=drop_last,
                                      num_replicas=replicas, rank=0)
        steps = _steps(replicas, epoch=2, batch_size=4, mode="within", groups=groups, small_groups=small_groups,
                       drop_last=drop_last)
    assert set(probe.merged_groups) | set(probe.dropped_groups) == (small if small_groups != "keep" else set())
    seen = Counter()
    for parts in steps:
        _assert_disjoint(parts)
        labels = {groups[i] for i in _gathered(parts)}
        assert len(labels) == 1 or (small_groups == "merge" and labels <= small)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1 and (not drop_last or sizes == [4] * replicas)
        seen.update(_gathered(parts))
    expected = [i for i in range(len(groups)) if small_groups != "drop" or groups[i] not in small]
    if not drop_last:  # every kept index once; a short batch smaller than the ranks may repeat a few
        assert set(seen) == set(expected) and sum(seen.values()) - len(expected) < replicas * len(steps)
    assert all(n == 1 for n in seen.values()) or not drop_last


@pytest.mark.parametrize("replicas", [2, 3])
def test_balanced_gathered_batch_is_balanced_and_each_rank_part_close_to_it(replicas):
    groups = np.array(["a"] * 70 + ["b"] * 41 + ["c"] * 17 + ["d"] * 11, dtype=object)
    for epoch in range(3):
        for parts in _steps(replicas, epoch=epoch, batch_size=5, mode="balanced", groups=groups, drop_last=True):
            counts = Counter(groups[i] for i in _gathered(parts))
            assert sorted(counts) == ["a", "b", "c", "d"]
            assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == 5 * replicas
            for part in parts:
                assert len(part) == 5
                local = Counter(groups[i] for i in part)
                for g, c in counts.items():
                    assert local[g] in (c // replicas, -(-c // replicas))


def test_neighbourhoods_are_planned_at_the_global_size_and_stay_whole_across_ranks():
    # 12 well separated clusters of exactly 4 points: every neighbourhood of 4 must be one cluster.
    centres = np.random.default_rng(3).permutation(12)[:, None] * np.array([[100.0, -50.0]])
    raw = np.repeat(centres, 4, axis=0) + np.random.default_rng(4).normal(scale=0.1, size=(48, 2))
    cluster = np.repeat(np.arange(12), 4)
    # batch_size 2 per rank cannot hold a neighbourhood of 4; the global batch of 2 ranks can.
    steps = _steps(2, batch_size=2, mode="neighbourhood", features=raw, n_neighbours=3, drop_last=True)
    assert len(steps) == 12
    for parts in steps:
        _assert_disjoint(parts)
        assert len({cluster[i] for i in _gathered(parts)}) == 1
    with pytest.raises(ValueError, match="n_neighbours"):
        AttributeBatchSampler(2, mode="neighbourhood", features=raw, n_neighbours=3)  # one process: global batch 2


@pytest.mark.parametrize("mode", ["random", "within", "balanced", "neighbourhood", "pk"])
@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_together_give_the_single_process_batches_at_the_global_size(mode, replicas, drop_last):
    groups = _uneven_groups()
    kwargs = {"within": {"groups": groups}, "balanced": {"groups": groups}, "pk": {"groups": groups},
              "neighbourhood": {"features": np.random.default_rng(2).normal(size=(85, 2))},
              "random": {"num_samples": 85}}[mode]
    if mode == "pk":  # 9 big "patients", many blocks each
        kwargs = {"groups": np.random.default_rng(5).integers(0, 9, 85), "images_per_group": 2}
    single = _epoch(AttributeBatchSampler(4 * replicas, mode=mode, drop_last=drop_last, seed=7, **kwargs), 3)
    steps = _steps(replicas, epoch=3, batch_size=4, mode=mode, drop_last=drop_last, seed=7, **kwargs)
    assert len(steps) == len(single)
    unit = 2 if mode == "pk" else 1
    for parts, batch in zip(steps, single):
        got = _gathered(parts)
        if mode == "balanced":  # the ranks take strided parts: the same multiset
            assert sorted(got) == sorted(batch)
        else:  # a short batch with fewer units than ranks is completed, so it only starts the same
            assert got[: len(batch)] == batch and (len(got) == len(batch) or len(batch) < replicas * unit)
        if mode not in ("balanced", "pk"):
            _assert_disjoint(parts)
        assert all(len(p) % unit == 0 and p for p in parts)


def test_short_global_batch_is_split_evenly_and_padded_when_smaller_than_ranks():
    # 61 samples at global batch 3 x 10 = 30: two full batches and one of a single index, which three ranks share.
    steps = _steps(3, batch_size=10, mode="random", num_samples=61)
    assert [[len(p) for p in parts] for parts in steps] == [[10, 10, 10], [10, 10, 10], [1, 1, 1]]
    flat = [i for parts in steps for i in _gathered(parts)]
    assert sorted(set(flat)) == list(range(61)) and len(flat) == 63  # the padding repeats two indices
    for parts in steps:
        _assert_disjoint(parts)
    # 75 samples: the short batch of 15 is split 5, 5, 5.
    steps = _steps(3, batch_size=10, mode="random", num_samples=75)
    assert [len(p) for p in steps[-1]] == [5, 5, 5]
    assert sorted(i for parts in steps for i in _gathered(parts)) == list(range(75))


def test_global_batch_size_reports_ranks_times_batch_size():
    assert AttributeBatchSampler(8, num_samples=100).global_batch_size == 8
    sampler = AttributeBatchSampler(8, num_samples=100, num_replicas=4, rank=3)
    assert sampler.global_batch_size == 32 and len(sampler) == math.ceil(100 / 32)


def test_default_replicas_without_process_group():
    assert not torch.distributed.is_initialized()
    sampler = AttributeBatchSampler(4, num_samples=10)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)


# ---------------------------------------------------------------------- pk: P patients x K images


def _patients(seed: int = 0) -> np.ndarray:
    """Patient ids of 20 patients with 1 to 13 images (104 rows), in shuffled row order."""
    sizes = [1, 2, 3, 3, 4, 5, 6, 7, 9, 11, 2, 1, 8, 3, 6, 10, 4, 5, 1, 13]
    return np.random.default_rng(seed).permutation(np.repeat([f"p{i:02d}" for i in range(20)], sizes).astype(object))


@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("k, batch_size", [(2, 4), (3, 6), (4, 4)])
def test_pk_batches_hold_whole_blocks_of_distinct_patients(replicas, k, batch_size):
    pid = _patients()
    sizes = Counter(pid)
    for epoch in range(3):
        steps = _steps(replicas, epoch=epoch, batch_size=batch_size, mode="pk", groups=pid, images_per_group=k,
                       small_groups="keep", drop_last=True, seed=1)
        # Brute-force count of blocks: ceil(n / K) per patient; the epoch has floor(blocks / P_global) batches.
        blocks = sum(-(-n // k) for n in sizes.values())
        assert len(steps) == blocks // (replicas * batch_size // k)
        seen = Counter()
        for parts in steps:
            for part in parts:  # each rank holds P whole blocks
                assert len(part) == batch_size
                assert all(len(p) == 1 for p in _pk_patients(pid, part, k))
            owners = [next(iter(p)) for p in _pk_patients(pid, _gathered(parts), k)]
            assert len(owners) == replicas * batch_size // k == len(set(owners))  # R x P distinct patients
            for s in range(0, len(_gathered(parts)), k):
                block = _gathered(parts)[s : s + k]
                assert len(set(block)) == min(k, sizes[pid[block[0]]])  # repeats only for patients under K images
            seen.update(_gathered(parts))
        assert set(seen) <= set(range(len(pid)))


@pytest.mark.parametrize("replicas", [1, 2])
def test_pk_sees_every_image_each_epoch_and_cycles_big_patients(replicas):
    pid = _patients()
    sizes = Counter(pid)
    k = 3
    steps = _steps(replicas, epoch=4, batch_size=6, mode="pk", groups=pid, images_per_group=k, small_groups="keep",
                   drop_last=False)
    seen = Counter(i for parts in steps for i in _gathered(parts))
    assert set(seen) == set(range(len(pid)))  # every image, also of patients with more than K images
    for patient, n in sizes.items():
        rows = [i for i in range(len(pid)) if pid[i] == patient]
        draws = sum(seen[i] for i in rows)
        if n >= k:  # ceil(n / K) blocks: every image once, K - n % K of them twice
            assert draws == -(-n // k) * k and max(seen[i] for i in rows) <= 2
        else:  # one block, with replacement
            assert draws == k and min(seen[i] for i in rows) >= 1


def test_pk_small_patient_policies():
    pid = _patients()
    sizes = Counter(pid)
    small = {p for p, n in sizes.items() if n < 4}
    merged = AttributeBatchSampler(8, mode="pk", groups=pid, images_per_group=4, small_groups="merge")
    assert set(merged.merged_groups) == small
    seen = Counter()
    for batch in _epoch(merged, 1):
        for patients in _pk_patients(pid, batch, 4):
            assert len(patients) == 1 or patients <= small  # only pooled blocks mix patients
        seen.update(batch)
    assert set(seen) == set(range(len(pid)))
    with pytest.warns(UserWarning, match="drops"):
        dropped = AttributeBatchSampler(8, mode="pk", groups=pid, images_per_group=4, small_groups="drop")
    assert set(dropped.dropped_groups) == small
    flat = {i for b in _epoch(dropped) for i in b}
    assert flat == {i for i in range(len(pid)) if pid[i] not in small}
    kept = AttributeBatchSampler(8, mode="pk", groups=pid, images_per_group=4, small_groups="keep")
    for batch in _epoch(kept):
        assert all(len(p) == 1 for p in _pk_patients(pid, batch, 4))


def test_pk_missing_patient_ids_are_distinct_patients():
    pid = ["a"] * 4 + [None] * 3 + [float("nan")] * 3 + ["b"] * 4
    with pytest.warns(UserWarning, match="drops 6 patients"):
        sampler = AttributeBatchSampler(4, mode="pk", groups=pid, images_per_group=2, small_groups="drop")
    assert len(sampler.dropped_groups) == 6  # six patients of one image each, none pooled into a "missing" patient
    assert {i for b in _epoch(sampler) for i in b} == {0, 1, 2, 3, 10, 11, 12, 13}


@pytest.mark.parametrize("replicas", [1, 2])
def test_pk_blocks_follow_block_order(replicas):
    """With block_order, a block is K images of its patient consecutive in that order (cyclically), from an offset
    that changes with the epoch; every image is still seen each epoch (brute-force check of every block)."""
    pid = _patients()
    times = np.random.default_rng(3).permutation(len(pid)).astype(float)  # distinct study times
    k = 2
    sizes = Counter(pid)
    starts = set()
    for epoch in range(4):
        steps = _steps(replicas, epoch=epoch, batch_size=4, mode="pk", groups=pid, images_per_group=k,
                       small_groups="merge", drop_last=False, block_order=times)
        seen = Counter()
        for parts in steps:
            batch = _gathered(parts)
            for s in range(0, len(batch), k):
                block = batch[s : s + k]
                patients = {pid[i] for i in block}
                if len(patients) > 1:  # a pooled block of small patients
                    assert all(sizes[p] < k for p in patients)
                    continue
                history = sorted((i for i in range(len(pid)) if pid[i] == pid[block[0]]), key=lambda i: times[i])
                place = [history.index(i) for i in block]
                n = len(history)
                assert all((b - a) % n == 1 for a, b in zip(place, place[1:]))  # next study, wrapping at the end
                if n > 3:
                    starts.add((pid[block[0]], epoch, min(place)))
            seen.update(batch)
        assert set(seen) == set(range(len(pid)))
    assert len({(p, start) for p, _, start in starts}) > len({p for p, _, _ in starts})  # offsets change by epoch


def test_pk_block_order_errors_and_attribute():
    with pytest.raises(ValueError, match="only used by mode='pk'"):
        AttributeBatchSampler(4, num_samples=8, block_order=range(8))
    with pytest.raises(ValueError, match="8 samples"):
        AttributeBatchSampler(4, mode="pk", groups=["a"] * 8, images_per_group=2, block_order=[1.0] * 7)
    with pytest.raises(ValueError, match="numbers"):
        AttributeBatchSampler(4, mode="pk", groups=["a"] * 8, images_per_group=2, block_order=["x"] * 8)
    records = [{"image": f"{i}.png", "patient_id": f"P{i // 4}", "follow_up": float(3 - i % 4)} for i in range(16)]
    sampler = attribute_batch_sampler(Dataset(records), batch_size=4, mode="pk", attribute="patient_id",
                                      images_per_group=2, order_attribute="follow_up")
    for batch in sampler:
        for s in (0, 2):
            gap = abs(records[batch[s]]["follow_up"] - records[batch[s + 1]]["follow_up"])
            assert gap in (1.0, 3.0)  # consecutive follow-ups, or the wrap from the last to the first
    with pytest.raises(ValueError, match="'study_offset_days' is not in the manifest"):
        attribute_batch_sampler(Dataset(records), batch_size=4, mode="pk", attribute="patient_id",
                                images_per_group=2, order_attribute="study_offset_days")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 6, "mode": "pk", "groups": ["a"] * 12}, "needs images_per_group"),
        ({"batch_size": 6, "mode": "pk", "groups": ["a"] * 12, "images_per_group": 4}, "multiple of images_per_group"),
        ({"batch_size": 6, "mode": "pk", "groups": ["a"] * 12, "images_per_group": 0}, "positive integer"),
        ({"batch_size": 6, "mode": "pk", "num_samples": 12, "images_per_group": 3}, "patient ids"),
        ({"batch_size": 6, "mode": "within", "groups": ["a"] * 12, "images_per_group": 3}, "only used by mode='pk'"),
    ],
)
def test_pk_bad_inputs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttributeBatchSampler(**kwargs)


def test_attribute_batch_sampler_builds_pk_batches_from_patient_ids():
    records = [{"image": f"{i}.png", "patient_id": f"P{i // 3}", "site": "x"} for i in range(36)]
    ds = Dataset(records)
    sampler = attribute_batch_sampler(ds, batch_size=6, mode="pk", attribute="patient_id", images_per_group=3,
                                      num_replicas=2, rank=1)
    assert sampler.global_batch_size == 12 and len(sampler) == 3
    for batch in sampler:
        assert len(batch) == 6
        assert [len({records[i]["patient_id"] for i in batch[s : s + 3]}) for s in (0, 3)] == [1, 1]
    # images_per_group is ignored outside "pk", so a bundle can always pass it
    within = attribute_batch_sampler(ds, batch_size=6, mode="within", attribute="site", images_per_group=3)
    assert within.images_per_group is None
    with pytest.raises(ValueError, match="needs images_per_group"):
        attribute_batch_sampler(ds, batch_size=6, mode="pk", attribute="patient_id")


# ---------------------------------------------------------------------- distributed: a real 2-process gloo run


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sampler_ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "_sampler_ddp_worker.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", ["within", "within_keep", "balanced", "pk", "pk_merge", "random"])
def test_two_gloo_ranks_gather_batches_of_the_single_process_composition(gloo_results, name):
    from _sampler_ddp_worker import EPOCHS, make_cases

    case = make_cases()[name]
    groups = case.get("groups")
    size = 2 * case["batch_size"]
    ranks = [r[name] for r in gloo_results]
    assert [r["replicas"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    assert [r["global_batch_size"] for r in ranks] == [size, size]
    for epoch in EPOCHS:
        counts = ranks[0][epoch]["counts"].tolist()
        assert counts == [ranks[0]["len"]] * 2 == [ranks[1]["len"]] * 2  # equal step counts on both ranks
        steps = [s.tolist() for s in ranks[0][epoch]["steps"]]
        assert steps == [s.tolist() for s in ranks[1][epoch]["steps"]]  # both ranks gathered the same batches
        seen = Counter()
        for batch, part_sizes in zip(steps, ranks[0][epoch]["part_sizes"]):
            n0 = int(part_sizes[0])
            parts = [batch[:n0], batch[n0:]]
            if name != "balanced":
                _assert_disjoint(parts)
            seen.update(batch)
            if case.get("drop_last"):
                assert len(batch) == size and part_sizes.tolist() == [size // 2] * 2
            if name.startswith("within"):
                assert len({groups[i] for i in batch}) == 1
            elif name == "balanced":
                assert set(Counter(groups[i] for i in batch).values()) == {size // 5}  # 5 groups
                for part in parts:
                    assert set(Counter(groups[i] for i in part).values()) == {size // 10}
            elif name.startswith("pk"):
                k = case["images_per_group"]
                assert n0 % k == 0  # the ranks split at a block boundary
                patients = _pk_patients(groups, batch, k)
                small = {p for p, n in Counter(groups).items() if n < k}
                owners = [next(iter(p)) for p in patients if len(p) == 1]
                assert all(len(p) == 1 or p <= small for p in patients) and len(owners) == len(set(owners))
                if name == "pk":
                    assert len(owners) == size // k
        if name in ("within_keep", "pk_merge", "random"):  # drop_last=False: every index is seen
            n = len(groups) if groups is not None else case["num_samples"]
            assert set(seen) == set(range(n))


# ---------------------------------------------------------------------- determinism


@pytest.mark.parametrize("mode", ["random", "within", "balanced", "neighbourhood"])
def test_deterministic_for_seed_and_epoch_and_changes_across_epochs(mode):
    groups = _uneven_groups()
    features = np.random.default_rng(1).normal(size=(85, 3))
    kwargs = {"groups": groups} if mode in ("within", "balanced") else {"features": features}
    a = AttributeBatchSampler(8, mode=mode, seed=3, **kwargs)
    b = AttributeBatchSampler(8, mode=mode, seed=3, **kwargs)
    assert _epoch(a, 5) == _epoch(b, 5)
    assert _epoch(a, 5) == _epoch(a, 5)
    assert _epoch(a, 5) != _epoch(a, 6)
    assert _epoch(a, 5) != _epoch(AttributeBatchSampler(8, mode=mode, seed=4, **kwargs), 5)


# ---------------------------------------------------------------------- manifests, configs, loaders


def test_from_manifest_encodes_columns():
    manifest = pd.DataFrame(
        {
            "site": ["x", "y", None, "x", "y", None, "x", "y"],
            "sex": ["M", "F", "F", None, "M", "F", "M", "F"],
            "age": [30.0, 40.0, np.nan, 50.0, 60.0, 70.0, 80.0, 90.0],
        }
    )
    within = AttributeBatchSampler.from_manifest(manifest, 2, mode="within", attribute="site", small_groups="keep")
    site = manifest["site"].fillna("<missing>").to_numpy()
    for batch in _epoch(within):
        assert len({site[i] for i in batch}) == 1
    near = AttributeBatchSampler.from_manifest(manifest, 4, mode="neighbourhood", feature_columns=["sex", "age"])
    assert sorted(i for b in _epoch(near) for i in b) == list(range(8))
    with pytest.raises(ValueError, match="scanner"):
        AttributeBatchSampler.from_manifest(manifest, 2, mode="within", attribute="scanner")


def test_bundle_config_builds_sampler_for_monai_and_torch_loaders():
    from monai.bundle import ConfigParser
    from monai.data import DataLoader as MonaiDataLoader
    from monai.data import Dataset

    sites = ["a"] * 12 + ["b"] * 8
    config = {
        "sites": sites,
        "dataset": {
            "_target_": "monai.data.Dataset",
            "data": "$[{'index': i, 'site': s} for i, s in enumerate(@sites)]",
        },
        "sampler": {
            "_target_": "monai_du.data.samplers.AttributeBatchSampler",
            "batch_size": 4,
            "mode": "within",
            "groups": "@sites",
            "seed": 1,
        },
        "loader": {"_target_": "monai.data.DataLoader", "dataset": "@dataset", "batch_sampler": "@sampler"},
    }
    parser = ConfigParser(config)
    sampler = parser.get_parsed_content("sampler")
    loader = parser.get_parsed_content("loader")
    assert isinstance(sampler, AttributeBatchSampler) and isinstance(loader, MonaiDataLoader)
    seen = []
    for batch in loader:
        assert len(set(batch["site"])) == 1
        seen.extend(batch["index"].tolist())
    assert sorted(seen) == list(range(20))
    torch_loader = torch.utils.data.DataLoader(Dataset([{"i": i} for i in range(20)]), batch_sampler=sampler)
    assert len(torch_loader) == 5 and sum(len(b["i"]) for b in torch_loader) == 20


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 8, "mode": "by_site", "num_samples": 10}, "mode"),
        ({"batch_size": 1, "num_samples": 10}, "batch_size"),
        ({"batch_size": True, "num_samples": 10}, "batch_size"),
        ({"batch_size": 4, "mode": "within", "num_samples": 10}, "needs groups"),
        ({"batch_size": 4, "mode": "within", "groups": ["a"] * 9, "num_samples": 10}, "disagree"),
        ({"batch_size": 4, "mode": "neighbourhood", "num_samples": 10}, "needs features"),
        ({"batch_size": 4, "mode": "neighbourhood", "features": np.zeros(10)}, r"shape \(10,\)"),
        ({"batch_size": 4, "mode": "neighbourhood", "features": np.zeros((10, 2, 2))}, r"\(10, 2, 2\)"),
        ({"batch_size": 4, "mode": "neighbourhood", "features": np.full((10, 2), np.inf)}, "infinite"),
        ({"batch_size": 4, "mode": "neighbourhood", "features": np.zeros((10, 2)), "n_neighbours": 4}, "n_neighbours"),
        ({"batch_size": 4, "mode": "neighbourhood", "features": np.zeros((10, 2)), "groups": ["a"] * 10}, "groups"),
        ({"batch_size": 4, "mode": "within", "groups": ["a"] * 10, "small_groups": "pad"}, "small_groups"),
        ({"batch_size": 4, "num_samples": 10, "num_replicas": 2, "rank": 2}, "rank"),
        ({"batch_size": 16, "num_samples": 10, "drop_last": True}, "no batch"),
        ({"batch_size": 4}, "num_samples"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttributeBatchSampler(**kwargs)


def test_set_epoch_rejects_negative():
    with pytest.raises(ValueError, match="epoch"):
        AttributeBatchSampler(4, num_samples=10).set_epoch(-1)


# ---------------------------------------------------------------------- real table


def test_abide_within_site_batches_are_pure():
    if not ABIDE_CSV.is_file():
        pytest.skip(f"real ABIDE table not found at {ABIDE_CSV} (../shared/data is absent outside the project machine)")
    table = pd.read_csv(ABIDE_CSV, usecols=["SITE_ID", "AGE_AT_SCAN", "SEX"])
    sites = table["SITE_ID"].to_numpy(dtype=object)
    assert len(set(sites)) == 20
    sampler = AttributeBatchSampler.from_manifest(table, 32, mode="within", attribute="SITE_ID", small_groups="keep")
    batches = _epoch(sampler, 2)
    assert all(len({sites[i] for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(table)))
    expected = sum(math.ceil(n / 32) for n in Counter(sites).values())
    assert len(batches) == expected
    # Balanced over the 20 sites at 40 per batch: two subjects of every site in every batch.
    balanced = AttributeBatchSampler.from_manifest(table, 40, mode="balanced", attribute="SITE_ID")
    for batch in _epoch(balanced):
        assert set(Counter(sites[i] for i in batch).values()) == {2}



def test_attribute_batch_sampler_reads_groups_from_dataset_records():
    records = [{"image": f"{i}.png", "site": "AB"[i % 2] if i < 20 else "C", "age": float(i)} for i in range(30)]
    records = [r for i, r in enumerate(records) if i not in (3, 4)]  # rows skipped for unreadable images
    ds = Dataset(records)
    sampler = attribute_batch_sampler(ds, batch_size=4, mode="within", attribute="site", seed=1)
    batches = list(sampler)
    assert batches and all(len(b) == 4 for b in batches)
    for batch in batches:
        assert len({records[i]["site"] for i in batch}) == 1
    random = attribute_batch_sampler(ds, batch_size=4, mode="random", attribute=None)
    assert sorted(i for b in random for i in b) == list(range(28))
    encoder = PriorEncoder(continuous=["age"]).fit(pd.DataFrame(records))
    hood = attribute_batch_sampler(ds, batch_size=4, mode="neighbourhood", prior_encoder=encoder, n_neighbours=3)
    for batch in hood:  # neighbourhoods of 4 consecutive ages in 1D: each batch spans a narrow age range
        ages = [records[i]["age"] for i in batch]
        assert max(ages) - min(ages) <= 8
    with pytest.raises(ValueError, match="sampler attribute 'scanner'"):
        attribute_batch_sampler(ds, batch_size=4, mode="within", attribute="scanner")
