"""Parallel, restartable crawls of large archives: a chunked process-pool map that survives crashing workers, and
an append-only checkpoint of the finished chunks.

The manifest builders (:func:`~monai_du.data.dicom.manifest_from_dicom`, :func:`~monai_du.data.bids.manifest_from_bids`)
read one file at a time in a worker function that never raises for a bad file. This module runs such a function
over chunks of files in a process pool, and records finished chunks so that a killed crawl can go on where it
stopped.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

__all__ = ["check_num_workers", "chunked", "map_chunks", "CrawlCheckpoint"]

_LOST_REASON = "the worker process died while reading this file (a crash or out of memory)"


def check_num_workers(num_workers: int | None, chunk_size: int) -> int:
    """Validate ``num_workers`` (None: one per CPU) and ``chunk_size``; return the number of workers (>= 1)."""
    if num_workers is None:
        num_workers = os.cpu_count() or 1
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0 (0 or 1: in this process), got {num_workers!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    return max(1, num_workers)


def chunked(items: Sequence[Any], size: int) -> list[list[Any]]:
    """Consecutive chunks of at most ``size`` items."""
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def _context() -> multiprocessing.context.BaseContext:
    # fork starts a worker in milliseconds; spawn would import the whole package (torch, MONAI) in each worker
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _pool_pass(
    func: Callable[..., list[Any]],
    tasks: Sequence[Sequence[Any]],
    args: tuple,
    num_workers: int,
    in_flight: int,
    lost: list[tuple[int, str]],
) -> Iterator[list[Any]]:
    """Run every task in pools of ``num_workers``; yield results as they finish. Tasks whose worker died (or that
    raised) are appended to ``lost`` with the reason, and a new pool carries on with the rest."""
    next_task = 0
    while next_task < len(tasks):
        pool = ProcessPoolExecutor(max_workers=num_workers, mp_context=_context())
        running: dict[Future, int] = {}
        broken = False
        try:
            while (next_task < len(tasks) and not broken) or running:
                while next_task < len(tasks) and len(running) < in_flight and not broken:
                    try:
                        running[pool.submit(func, tasks[next_task], *args)] = next_task
                    except BrokenProcessPool:
                        broken = True
                        break
                    next_task += 1
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=running.__getitem__):
                    index = running.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        broken = True
                        lost.append((index, _LOST_REASON))
                        continue
                    except Exception as error:  # e.g. a result that cannot be pickled
                        lost.append((index, f"the worker failed ({type(error).__name__}: {error})"))
                        continue
                    yield result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def map_chunks(
    func: Callable[..., list[Any]],
    chunks: Sequence[Sequence[Any]],
    args: tuple = (),
    num_workers: int = 1,
    failed: Callable[[Any, str], list[Any]] | None = None,
) -> Iterator[list[Any]]:
    """Yield ``func(chunk, *args)`` for every chunk, in a process pool, in the order the chunks finish.

    ``func`` must be a module-level function that handles each item's own errors and returns a list of results.
    With ``num_workers`` <= 1 the chunks run in this process, in order. When a worker dies (a crash in a reader,
    out of memory) the chunks it held are run again one item at a time in a pool of one worker, so that only the
    item that kills its worker on its own is lost; ``failed(item, reason)`` gives the results that stand for it
    (e.g. a report row). Without ``failed`` such an item raises ``RuntimeError``.

    Args:
        func: ``func(chunk, *args) -> list``.
        chunks: the chunks of items (paths).
        args: further arguments of ``func`` (picklable).
        num_workers: worker processes.
        failed: results for an item whose worker died.

    Yields:
        each chunk's list of results (a lost chunk's items are yielded one by one).
    """
    if num_workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            yield func(chunk, *args)
        return
    lost: list[tuple[int, str]] = []
    yield from _pool_pass(func, chunks, args, num_workers, 2 * num_workers, lost)
    if not lost:
        return
    singles = [[item] for index, _ in sorted(lost) for item in chunks[index]]
    lost_again: list[tuple[int, str]] = []
    yield from _pool_pass(func, singles, args, 1, 1, lost_again)
    for index, reason in sorted(lost_again):
        item = singles[index][0]
        if failed is None:
            raise RuntimeError(f"{item}: {reason}")
        yield failed(item, reason)


class CrawlCheckpoint:
    """An append-only record of a crawl's finished chunks, so that a killed crawl can be resumed.

    The file is JSON lines: a header (the build's parameters) and then one line per finished chunk, holding that
    chunk's per-file records. Each chunk is written with one ``write`` and flushed to disk before the next, so a
    kill loses at most the chunk being written: a last line cut short has no newline (or does not parse) and is cut
    off when the checkpoint is opened again.

    Args:
        path: the checkpoint file.
        header: the build's parameters (JSON-serialisable); a checkpoint with another header is refused.
        resume: continue an existing checkpoint. Without it, an existing file raises ``FileExistsError``.
        key: the record field that names the item (records of the same item: the last one counts).

    Raises:
        FileExistsError: when ``path`` exists and ``resume`` is False.
        ValueError: for a checkpoint of another build, or a corrupt line before the last one (naming the line).
    """

    def __init__(self, path: str | os.PathLike, header: dict[str, Any], resume: bool, key: str = "file") -> None:
        self.path = Path(path)
        self.header = {"monai_du_checkpoint": 1, **header}
        self.key = key
        self.done: dict[str, Any] = {}
        if self.path.exists():
            if not resume:
                raise FileExistsError(
                    f"{self.path}: a checkpoint of an earlier build exists; pass resume=True to continue it, or "
                    "delete it to start again"
                )
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(self.path.name + ".tmp")
            with open(temporary, "wb") as fp:
                fp.write(self._line(self.header))
                fp.flush()
                os.fsync(fp.fileno())
            os.replace(temporary, self.path)
        self._fp = open(self.path, "ab")  # noqa: SIM115 (closed by close())

    @staticmethod
    def _line(value: Any) -> bytes:
        return (json.dumps(value, separators=(",", ":")) + "\n").encode("utf-8")

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline (a cut-off chunk)
        good_end = 0
        for number, line in enumerate(complete, start=1):
            try:
                value = json.loads(line)
                if number > 1 and not (isinstance(value, dict) and isinstance(value.get("records"), list)):
                    raise ValueError("not a chunk of records")
            except ValueError as error:
                if number == len(complete) and not tail:
                    break  # the last line was cut mid-way and happened to end at a newline: drop it
                raise ValueError(f"{self.path}: line {number} of the checkpoint is corrupt ({error})") from error
            if number == 1:
                if value != self.header:
                    raise ValueError(
                        f"{self.path}: this checkpoint is of another build ({value}); this build is {self.header}. "
                        "Use another checkpoint file, or delete it to start again."
                    )
            else:
                for record in value["records"]:
                    self.done[record[self.key]] = record
            good_end += len(line) + 1
        if good_end == 0:
            raise ValueError(f"{self.path}: the checkpoint has no header line")
        if good_end < len(data):
            with open(self.path, "r+b") as fp:  # cut off the chunk a kill left half written
                fp.truncate(good_end)

    def append(self, records: list[dict[str, Any]]) -> None:
        """Record a finished chunk (one line, flushed to disk)."""
        self._fp.write(self._line({"records": records}))
        self._fp.flush()
        os.fsync(self._fp.fileno())
        for record in records:
            self.done[record[self.key]] = record

    def close(self) -> None:
        self._fp.close()

    def __enter__(self) -> CrawlCheckpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
