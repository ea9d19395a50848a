"""Tests for monai_du.data.crawl: the chunked process-pool map and the crawl checkpoint."""

from __future__ import annotations

import json
import os

import pytest

from monai_du.data.crawl import CrawlCheckpoint, check_num_workers, chunked, map_chunks


def _square_chunk(items: list[int], offset: int) -> list[tuple[int, int]]:
    return [(i, i * i + offset) for i in items]


def _die_on_13(items: list[int]) -> list[tuple[int, int]]:
    if 13 in items:
        os._exit(5)  # a worker that dies (as a segfaulting reader would)
    return [(i, -i) for i in items]


def test_chunked_covers_every_item_once():
    chunks = chunked(list(range(10)), 4)
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunked([], 3) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_map_chunks_gives_every_result(workers):
    items = list(range(23))
    results = [r for chunk in map_chunks(_square_chunk, chunked(items, 4), args=(1,), num_workers=workers)
               for r in chunk]
    assert sorted(results) == [(i, i * i + 1) for i in items]  # brute-force reference


def test_a_dying_worker_loses_only_the_item_that_kills_it():
    failed = []

    def on_failure(item, reason):
        failed.append((item, reason))
        return [(item, None)]

    results = [r for chunk in map_chunks(_die_on_13, chunked(list(range(30)), 4), num_workers=2, failed=on_failure)
               for r in chunk]
    assert sorted(r for r in results if r[1] is not None) == [(i, -i) for i in range(30) if i != 13]
    assert [item for item, _ in failed] == [13] and "died" in failed[0][1]
    with pytest.raises(RuntimeError, match="13"):
        list(map_chunks(_die_on_13, chunked(list(range(30)), 4), num_workers=2))


def test_checkpoint_round_trip_cut_line_and_other_build(tmp_path):
    path = tmp_path / "c.jsonl"
    with CrawlCheckpoint(path, {"build": "a"}, resume=False) as log:
        log.append([{"file": "x", "v": 1}, {"file": "y", "v": 2}])
        log.append([{"file": "z", "v": 3}])
    with open(path, "ab") as fp:
        fp.write(b'{"records": [{"file": "w", "v"')  # killed mid-write
    with CrawlCheckpoint(path, {"build": "a"}, resume=True) as log:
        assert log.done == {"x": {"file": "x", "v": 1}, "y": {"file": "y", "v": 2}, "z": {"file": "z", "v": 3}}
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0]) == {"monai_du_checkpoint": 1, "build": "a"}
    with pytest.raises(FileExistsError):
        CrawlCheckpoint(path, {"build": "a"}, resume=False)
    with pytest.raises(ValueError, match="another build"):
        CrawlCheckpoint(path, {"build": "b"}, resume=True)


def test_check_num_workers():
    assert check_num_workers(0, 1) == 1 and check_num_workers(3, 8) == 3 and check_num_workers(None, 8) >= 1
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_workers"):
            check_num_workers(bad, 8)
    with pytest.raises(ValueError, match="chunk_size"):
        check_num_workers(1, 0)
