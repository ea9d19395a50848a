"""Tests for monai_du.data.manifest: schema validation, PHI refusal, reading and writing."""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from monai_du.data.manifest import (
    RESOLVED_IMAGE_COLUMN,
    ManifestBuildResult,
    find_phi_columns,
    label_column_name,
    normalize_sex,
    patients_in_several_splits,
    read_manifest,
    validate_manifest,
    write_manifest,
)


def _manifest() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image": ["img/a.png", "img/b.png", "/abs/c.png", "img/d.png"],
            "patient_id": ["00042", "NA", "7", "00042"],
            "age": [34.5, np.nan, 0.0, 130.0],
            "sex": ["F", "M", None, "F"],
            "site": ["A", "B", "A", None],
            "split": ["train", "val", "test", None],
            "label_effusion": [1.0, 0.0, -1.0, np.nan],
        }
    )


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_round_trip_keeps_identifiers_and_missing_values(tmp_path):
    df = _manifest()
    path = write_manifest(df, tmp_path / "sub" / "m.csv")
    back = read_manifest(path)
    # identifiers stay text: leading zeros and the literal "NA" survive
    assert back["patient_id"].tolist() == ["00042", "NA", "7", "00042"]
    np.testing.assert_array_equal(back["age"].to_numpy(), df["age"].to_numpy())
    assert back["sex"].isna().tolist() == [False, False, True, False]
    assert back["split"].tolist()[:3] == ["train", "val", "test"] and pd.isna(back["split"].iloc[3])
    np.testing.assert_array_equal(back["label_effusion"].to_numpy(), df["label_effusion"].to_numpy())
    assert back["image"].tolist() == df["image"].tolist()  # the original is kept


def test_relative_images_resolve_against_manifest_folder_or_root(tmp_path):
    path = write_manifest(_manifest(), tmp_path / "m.csv")
    back = read_manifest(path)
    base = str(tmp_path.resolve())
    expected = [os.path.join(base, "img", "a.png"), os.path.join(base, "img", "b.png")]
    assert back[RESOLVED_IMAGE_COLUMN].tolist()[:2] == expected
    assert back[RESOLVED_IMAGE_COLUMN].iloc[2] == "/abs/c.png"  # absolute paths unchanged
    other = tmp_path / "elsewhere"
    back = read_manifest(path, root=other)
    assert Path(back[RESOLVED_IMAGE_COLUMN].iloc[0]) == other.resolve() / "img" / "a.png"
    assert all(Path(p).is_absolute() for p in back[RESOLVED_IMAGE_COLUMN])


def test_write_drops_resolved_column_so_it_is_re_resolved(tmp_path):
    back = read_manifest(write_manifest(_manifest(), tmp_path / "a" / "m.csv"))
    moved = write_manifest(back, tmp_path / "b" / "m.csv")
    header = moved.read_text().splitlines()[0].split(",")
    assert RESOLVED_IMAGE_COLUMN not in header
    again = read_manifest(moved)
    assert Path(again[RESOLVED_IMAGE_COLUMN].iloc[0]) == (tmp_path / "b").resolve() / "img" / "a.png"


def test_tsv_is_read(tmp_path):
    path = _write_csv(tmp_path / "m.tsv", "image\tpatient_id\tage\nx.nii\t001\t12.5\n")
    back = read_manifest(path)
    assert back["patient_id"].tolist() == ["001"] and back["age"].tolist() == [12.5]


@pytest.mark.parametrize(
    "text, column, row_ref",
    [
        ("image,patient_id\na.png,p1\nb.png,\n", "patient_id", "row 1 (line 3)"),
        ("image,patient_id\n,p1\n", "image", "row 0 (line 2)"),
        ("image,patient_id,age\na.png,p1,30\nb.png,p2,-1\n", "age", "row 1 (line 3)"),
        ("image,patient_id,age\na.png,p1,131\n", "age", "row 0 (line 2)"),
        ("image,patient_id,age\na.png,p1,thirty\n", "age", "row 0 (line 2)"),
        ("image,patient_id,sex\na.png,p1,F\nb.png,p2,male\n", "sex", "row 1 (line 3)"),
        ("image,patient_id,label_edema\na.png,p1,1\nb.png,p2,0\nc.png,p3,2\n", "label_edema", "row 2 (line 4)"),
        ("image,patient_id,label_edema\na.png,p1,yes\n", "label_edema", "row 0 (line 2)"),
        ("image,patient_id,split\na.png,p1,training\n", "split", "row 0 (line 2)"),
    ],
)
def test_invalid_values_name_row_and_column(tmp_path, text, column, row_ref):
    path = _write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(ValueError) as info:
        read_manifest(path)
    message = str(info.value)
    assert f"'{column}'" in message and row_ref in message and str(path) in message


def test_missing_required_column_is_named(tmp_path):
    path = _write_csv(tmp_path / "m.csv", "image,age\na.png,3\n")
    with pytest.raises(ValueError, match="patient_id"):
        read_manifest(path)


def test_valid_edge_values_pass():
    df = pd.DataFrame({"image": ["a"], "patient_id": ["p"], "age": [130.0], "label_x": [-1]})
    out = validate_manifest(df)
    assert out["label_x"].dtype == np.float64 and out["label_x"].iloc[0] == -1.0


@pytest.mark.parametrize(
    "column",
    ["PatientName", "patient_name", "birth_date", "BirthDate", "PatientBirthDate", "DOB", "report", "notes",
     "Report", "clinical_notes", "ReferringPhysicianName", "PatientBirth", "patient_address", "dod"],
)
def test_phi_columns_are_refused_on_read_and_write(tmp_path, column):
    df = _manifest().assign(**{column: "x"})
    with pytest.raises(ValueError, match=column):
        write_manifest(df, tmp_path / "m.csv")
    df.to_csv(tmp_path / "raw.csv", index=False)
    with pytest.raises(ValueError, match=column):
        read_manifest(tmp_path / "raw.csv")
    assert not (tmp_path / "m.csv").exists()


def test_non_phi_columns_are_allowed():
    allowed = ["InstitutionName", "StationName", "ManufacturerModelName", "site", "view", "filename", "label_history",
               "report_id", "study_id", "age", "sex"]
    assert find_phi_columns(allowed) == {}
    found = find_phi_columns(["image", "PatientName", "notes", "age"])
    assert set(found) == {"PatientName", "notes"}


def test_normalize_sex_against_a_hand_written_table():
    raw = pd.Series(["M", "male", " Female ", "f", 1, 2.0, "2", "O", "", None, "unknown", "X9"])
    expected = ["M", "M", "F", "F", "M", "F", "F", None, None, None, None, None]
    sex, unrecognised = normalize_sex(raw)
    assert [None if pd.isna(v) else v for v in sex] == expected
    assert unrecognised == {"x9": 1}


def test_label_column_name():
    assert label_column_name("Pleural Effusion") == "label_pleural_effusion"
    assert label_column_name("Pleural_Thickening") == "label_pleural_thickening"
    with pytest.raises(ValueError):
        label_column_name("  ")


def test_build_result_unpacks_as_a_pair():
    result = ManifestBuildResult(manifest=_manifest())
    manifest, report = result
    assert manifest is result.manifest and list(report.columns) == ["item", "reason", "status"]


def test_parquet_round_trip_or_clear_error(tmp_path):
    if importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(ImportError, match="pyarrow"):
            write_manifest(_manifest(), tmp_path / "m.parquet")
        (tmp_path / "x.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pyarrow"):
            read_manifest(tmp_path / "x.parquet")
    else:
        back = read_manifest(write_manifest(_manifest(), tmp_path / "m.parquet"))
        assert back["patient_id"].tolist() == ["00042", "NA", "7", "00042"]


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="format"):
        write_manifest(_manifest(), tmp_path / "m.xlsx")
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "nope.csv")


# ------------------------------------------------------------------------------------- defects found by bad input
def test_duplicate_image_paths_are_refused_naming_rows_path_and_patients(tmp_path):
    df = _manifest()
    df.loc[3, "image"] = "img/a.png"
    df.loc[3, "patient_id"] = "p9"  # the same image under another patient
    with pytest.raises(ValueError) as info:
        validate_manifest(df)
    message = str(info.value)
    assert "'img/a.png'" in message and "row 0 (index 0)" in message and "row 3 (index 3)" in message
    assert "'00042'" in message and "'p9'" in message
    df.to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(ValueError, match=r"row 0 \(line 2\), row 3 \(line 5\)"):
        read_manifest(tmp_path / "dup.csv")
    with pytest.raises(ValueError, match="same image"):
        write_manifest(df, tmp_path / "out.csv")


def test_the_same_image_written_two_ways_is_refused_on_read(tmp_path):
    text = f"image,patient_id\nimg/a.png,p1\n./img/a.png,p2\n{tmp_path.resolve()}/img/a.png,p3\nimg/b.png,p4\n"
    path = _write_csv(tmp_path / "m.csv", text)
    with pytest.raises(ValueError) as info:
        read_manifest(path)
    message = str(info.value)
    assert "row 0 (line 2), row 1 (line 3), row 2 (line 4)" in message and str(path) in message
    assert "row 3" not in message


def test_a_patient_in_two_splits_is_refused_naming_the_patient():
    df = _manifest()
    df.loc[3, "split"] = "test"  # patient 00042 is also in train (row 0)
    with pytest.raises(ValueError) as info:
        validate_manifest(df)
    assert "'00042'" in str(info.value) and "['test', 'train']" in str(info.value)
    assert patients_in_several_splits(df) == {"00042": ["test", "train"]}
    assert patients_in_several_splits(_manifest()) == {}  # an unassigned row is no leak


@pytest.mark.parametrize("text", ["", "\n", "   \n\n"])
def test_empty_manifest_file_names_the_file(tmp_path, text):
    path = _write_csv(tmp_path / "empty.csv", text)
    with pytest.raises(ValueError, match="empty") as info:
        read_manifest(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["m.csv", "m.tsv", "m.csv.gz"])
def test_header_only_manifest_is_refused_naming_the_file(tmp_path, name):
    # it used to pass as an empty manifest, and fail later with "select_split: no manifest row in split(s) ['train']"
    path = _write_text(tmp_path / name, "image\tpatient_id\n\n" if name.endswith(".tsv") else "image,patient_id\n")
    with pytest.raises(ValueError) as info:
        read_manifest(path)
    assert str(info.value) == f"manifest {path} has a header but no rows."


def _write_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    data = text.encode(encoding)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _wide_manifest(n_columns: int = 22) -> tuple[list[str], list[list[str]]]:
    """A header of ``n_columns`` columns (image, patient_id, labels) and three full rows."""
    header = ["image", "patient_id"] + [f"label_{i}" for i in range(n_columns - 2)]
    rows = [[f"img/{i}.png", f"p{i}"] + ["1"] * (n_columns - 2) for i in range(3)]
    return header, rows


@pytest.mark.parametrize("name", ["m.csv", "m.tsv", "m.csv.gz"])
def test_truncated_row_is_refused_naming_the_file_and_line(tmp_path, name):
    sep = "\t" if ".tsv" in name else ","
    header, rows = _wide_manifest()
    rows[1] = rows[1][:5]  # cut after 5 of 22 fields: pandas would fill the other 17 with NaN
    path = _write_text(tmp_path / name, "\n".join(sep.join(r) for r in [header, *rows]) + "\n")
    with pytest.raises(ValueError) as info:
        read_manifest(path)
    assert str(info.value) == f"manifest {path}: line 3 has 5 fields, the header has 22"


def test_extra_fields_are_refused_naming_the_line(tmp_path):
    header, rows = _wide_manifest(4)
    # every row with one field too many: pandas would silently take the first column as the index
    text = "\n".join(",".join(r) for r in [header] + [r + ["x"] for r in rows]) + "\n"
    path = _write_text(tmp_path / "m.csv", text)
    with pytest.raises(ValueError) as info:
        read_manifest(path)
    assert str(info.value) == (
        f"manifest {path}: line 2 has 5 fields, the header has 4; 2 more line(s) with another field count (line 3, 4)"
    )


def test_quoted_separators_and_newlines_are_one_field(tmp_path):
    text = 'image,patient_id,site\n"img/a,1.png",p1,"ward\nnorth"\n\nimg/b.png,p2,south\n'
    back = read_manifest(_write_text(tmp_path / "m.csv", text))
    assert back["image"].tolist() == ["img/a,1.png", "img/b.png"]
    assert back["site"].tolist() == ["ward\nnorth", "south"]
    # the line of a short row after a quoted newline is the file's line, not the record's number
    broken = _write_text(tmp_path / "b.csv", text + "img/c.png,p3\n")
    with pytest.raises(ValueError, match=r": line 6 has 2 fields, the header has 3$"):
        read_manifest(broken)


@pytest.mark.parametrize("name", ["m.csv", "m.csv.gz"])
def test_latin1_manifest_is_refused_naming_the_file_byte_and_line(tmp_path, name):
    text = "image,patient_id,site\nimg/a.png,p1,north\nimg/b.png,p2,H\u00f4pital Nord\n"
    path = _write_text(tmp_path / name, text, encoding="latin-1")
    with pytest.raises(ValueError) as info:
        read_manifest(path)
    assert str(info.value) == f"manifest {path} is not UTF-8 text (byte 0xf4 at line 3); save it as UTF-8"
    # the same text saved as UTF-8 (with or without a byte-order mark) reads
    for encoding in ("utf-8", "utf-8-sig"):
        back = read_manifest(_write_text(tmp_path / name, text, encoding=encoding))
        assert back["site"].tolist() == ["north", "H\u00f4pital Nord"] and back.columns[0] == "image"


def test_corrupt_gzip_manifest_names_the_file(tmp_path):
    path = tmp_path / "m.csv.gz"
    path.write_bytes(b"image,patient_id\nimg/a.png,p1\n")  # not gzip-compressed
    with pytest.raises(ValueError, match=f"manifest {path} cannot be decompressed"):
        read_manifest(path)


def test_time_columns_are_checked_and_numeric(tmp_path):
    df = _manifest().assign(study_offset_days=[0, 14.5, None, 30], follow_up=["0", "1", "", "2"])
    out = validate_manifest(df)
    assert out["study_offset_days"].dtype == np.float64 and out["follow_up"].dtype == np.float64
    np.testing.assert_array_equal(out["follow_up"].to_numpy(), [0.0, 1.0, np.nan, 2.0])
    for column, bad, what in [("study_offset_days", -1.0, ">= 0"), ("follow_up", 1.5, "whole number"),
                              ("follow_up", "two", "not a number")]:
        broken = df.copy()
        broken[column] = broken[column].astype(object)
        broken.loc[2, column] = bad
        with pytest.raises(ValueError, match=what) as info:
            validate_manifest(broken)
        assert f"'{column}'" in str(info.value) and "row 2" in str(info.value)
