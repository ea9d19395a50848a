"""Benchmark: DICOM header ingestion (files/s) at 1 and 2 workers, against the bare pydicom header loop.

A generated archive (default 5,000 files: patient/study/series folders, 32x32 16-bit pixel data, realistic headers:
PatientID, PatientName, PatientBirthDate, PatientAge, PatientSex, StudyDate, InstitutionName, Manufacturer,
Modality, ViewPosition, UIDs, descriptions) is written once and cached in the temp folder. The bare loop is
``pydicom.dcmread(path, stop_before_pixels=True)`` over the files; ``manifest_from_dicom`` also checks that the
pixel data are complete, normalises the values and builds the table. Target on 2 cores: at 2 workers, at least
1.6x the serial rate. Other processes on a shared machine take cores, so a pure CPU loop run in turn and in 2
processes, interleaved with the builds, measures how much 2 processes could gain at the time.

Run: ``python benchmarks/bench_ingest.py [--files 5000] [--repeats 3] [--folder DIR]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path

TARGET_SPEEDUP = 1.6

_SITES = [("Hospital A", "SIEMENS", "Ysio Max"), ("Hospital B", "GE Healthcare", "Definium 8000"),
          ("Clinic C", "Philips", "DigitalDiagnost"), ("Hospital D", "Agfa", "DX-D 300")]


def make_archive(folder: Path, n_files: int, seed: int = 0) -> list[Path]:
    """Write (or reuse) an archive of ``n_files`` DICOM files under ``folder``; return the file paths."""
    import numpy as np
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    done = folder.with_name(folder.name + ".complete")  # beside the archive, not in it
    if done.is_file() and int(done.read_text()) == n_files:
        return sorted(folder.rglob("*.dcm"))
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 4096, (32, 32), dtype=np.uint16).tobytes()
    written: list[Path] = []
    patient = 0
    while len(written) < n_files:
        patient += 1
        pid = f"{patient:08d}"
        born = 1930 + int(rng.integers(0, 80))
        institution, manufacturer, model = _SITES[int(rng.integers(len(_SITES)))]
        sex = str(rng.choice(["M", "F", "F", "M", "O"]))
        for study in range(int(rng.integers(1, 4))):
            year = 2010 + int(rng.integers(0, 14))
            study_date = f"{year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
            study_uid = generate_uid()
            for image in range(int(rng.integers(1, 3))):
                if len(written) >= n_files:
                    break
                meta = FileMetaDataset()
                meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
                meta.MediaStorageSOPInstanceUID = generate_uid()
                meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds = Dataset()
                ds.file_meta = meta
                ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
                ds.PatientID, ds.PatientName = pid, f"Patient^{pid}"
                ds.PatientBirthDate, ds.PatientSex = f"{born}0101", sex
                ds.PatientAge = f"{year - born:03d}Y"
                ds.StudyDate, ds.StudyTime, ds.SeriesDate = study_date, "101500", study_date
                ds.AccessionNumber, ds.ReferringPhysicianName = f"A{patient}{study}", "Ref^Doctor"
                ds.StudyDescription, ds.SeriesDescription = "CHEST 2 VIEWS", "PA" if image == 0 else "LAT"
                ds.InstitutionName, ds.Manufacturer, ds.ManufacturerModelName = institution, manufacturer, model
                ds.StationName, ds.Modality, ds.BodyPartExamined = f"{institution[:3].upper()}XR1", "DX", "CHEST"
                ds.ViewPosition = "PA" if image == 0 else "LL"
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
                ds.Rows = ds.Columns = 32
                ds.PixelSpacing = [0.139, 0.139]
                ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
                ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
                ds.PixelData = pixels
                path = folder / pid / f"study{study}" / f"series{image}" / "image.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pydicom.dcmwrite(path, ds, enforce_file_format=True)
                written.append(path)
    done.write_text(str(n_files))
    return sorted(written)


_SPIN = 12_000_000  # about 1 s of one core per loop


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def _spin_pair() -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_spin, [_SPIN, _SPIN]))


def _bare_loop(files: list[Path]) -> int:
    import pydicom

    for path in files:
        pydicom.dcmread(path, stop_before_pixels=True)
    return len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--folder", type=Path, default=None, help="archive folder (default: a cached temp folder)")
    args = parser.parse_args()

    from monai_du.data.dicom import manifest_from_dicom

    folder = args.folder or Path(tempfile.gettempdir()) / f"monai_du_bench_dicom_{args.files}"
    start = time.perf_counter()
    files = make_archive(folder, args.files)
    print(f"archive: {len(files)} files in {folder} ({time.perf_counter() - start:.1f} s to write or find)")
    _bare_loop(files)  # warm the page cache

    def build(workers: int) -> int:
        manifest, report = manifest_from_dicom(folder, progress=False, num_workers=workers, chunk_size=args.chunk_size)
        assert len(manifest) == len(files) and len(report) == 0, (len(manifest), len(report))
        return len(manifest)

    methods = {
        "CPU loop x2, in turn (calibration)": lambda: [_spin(_SPIN) for _ in range(2)],
        "CPU loop x2, 2 processes": _spin_pair,
        "pydicom header loop (reference)": lambda: _bare_loop(files),
        "manifest_from_dicom, 1 worker": lambda: build(1),
        "manifest_from_dicom, 2 workers": lambda: build(2),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(max(1, args.repeats)):  # interleaved, so that load from other processes hits all alike
        for name, run in methods.items():
            before = _cpu_seconds()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(_cpu_seconds() - before)  # this process and its (joined) workers

    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    bare, serial = medians["pydicom header loop (reference)"], medians["manifest_from_dicom, 1 worker"]
    print(f"\nload average before the runs: {_load()}; {os.cpu_count()} CPUs")
    print(f"{'method':36s} {'median s':>9s} {'files/s':>9s} {'vs loop':>8s} {'vs 1 worker':>11s} {'CPU s':>7s}"
          "   runs (s)")
    for name, median in medians.items():
        if "calibration" in name or name.startswith("CPU loop"):
            continue
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:36s} {median:9.2f} {len(files) / median:9.0f} {bare / median:8.2f} {serial / median:11.2f}"
              f" {cpu_medians[name]:7.2f}   {runs}")
    speedup = serial / medians["manifest_from_dicom, 2 workers"]
    verdict = "meets" if speedup >= TARGET_SPEEDUP else "misses"
    print(f"\n2 workers: {speedup:.2f}x the serial rate ({verdict} the {TARGET_SPEEDUP:g}x target); load average "
          f"now {_load()}")
    overhead = cpu_medians["manifest_from_dicom, 2 workers"] / cpu_medians["manifest_from_dicom, 1 worker"]
    print(f"CPU seconds at 2 workers / at 1 worker: {overhead:.2f} (1.00: the pool adds no work; the wall-clock "
          "speedup then depends on the cores other processes leave free)")
    free = medians["CPU loop x2, in turn (calibration)"] / medians["CPU loop x2, 2 processes"]
    print(f"a pure CPU loop gained {free:.2f}x from 2 processes in the same runs (2.00 on 2 idle cores): the build's "
          f"2-worker speedup is {speedup / free:.0%} of what the machine allowed")


def _cpu_seconds() -> float:
    self_usage, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_usage.ru_utime + self_usage.ru_stime + children.ru_utime + children.ru_stime


def _load() -> str:
    try:
        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
