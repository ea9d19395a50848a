"""Tests for monai_du.data.tables: public-dataset adapters on the real metadata tables, and on small tables in the
published formats of the datasets whose metadata is not shipped here (MIMIC-CXR, PadChest, OpenBHB, IXI)."""

from __future__ import annotations

import json
import math
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from monai_du.data.adapters import CHEXPERT_LABELS, NIH_CXR14_LABELS, get_adapter
from monai_du.data.manifest import find_phi_columns, label_column_name, read_manifest, write_manifest
from monai_du.data.tables import load_adapter, manifest_from_table, validate_adapter

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHEXPERT = SHARED_DATA / "chexpert_train.csv.gz"
NIH = SHARED_DATA / "nih_cxr14_data_entry_2017_v2020.csv.gz"
ABIDE = SHARED_DATA / "abide1_phenotypic.csv"


def _need(path: Path) -> None:
    if not path.is_file():
        pytest.skip(f"{path.name} not found in {SHARED_DATA} (the shared real-metadata folder beside the repo "
                    "is absent)")


def _same(a: pd.Series, b: pd.Series) -> bool:
    """Element-wise equal, NaN equal to NaN."""
    a, b = pd.Series(a).reset_index(drop=True), pd.Series(b).reset_index(drop=True)
    return bool(((a == b) | (a.isna() & b.isna())).all())


# ------------------------------------------------------------------------------------------------- real tables
@pytest.fixture(scope="module")
def chexpert():
    _need(CHEXPERT)
    return pd.read_csv(CHEXPERT), manifest_from_table(CHEXPERT, "chexpert")


def test_chexpert_rows_ids_and_demographics(chexpert):
    source, (manifest, report) = chexpert
    assert len(manifest) == len(source) and len(report) == 0
    reference_ids = source["Path"].str.split("/").map(lambda parts: next(p for p in parts if p.startswith("patient")))
    assert manifest["patient_id"].tolist() == reference_ids.tolist()
    assert manifest["image"].tolist() == source["Path"].tolist()
    np.testing.assert_array_equal(manifest["age"].to_numpy(), source["Age"].to_numpy(dtype=float))
    reference_sex = source["Sex"].map({"Male": "M", "Female": "F"})
    assert _same(manifest["sex"], reference_sex)
    lateral = source["Frontal/Lateral"] == "Lateral"
    reference_view = source["AP/PA"].where(~lateral, "LATERAL")
    assert _same(manifest["view"], reference_view)
    studies = source["Path"].str.extract(r"/(study\d+)/")[0]
    assert manifest["study_id"].tolist() == (reference_ids + "/" + studies).tolist()
    # follow_up: the study number - 1, read independently by splitting the path
    numbers = source["Path"].str.split("/").map(lambda parts: int(next(p for p in parts if p.startswith("study"))[5:]))
    np.testing.assert_array_equal(manifest["follow_up"].to_numpy(), numbers.to_numpy(dtype=float) - 1.0)
    # the study number orders a patient's studies in time: age never decreases along it
    ages = source.assign(patient=reference_ids, number=numbers).groupby(["patient", "number"])["Age"].first()
    assert (ages.groupby(level="patient").diff().dropna() >= 0).all()


def test_chexpert_labels_keep_uncertain_as_documented(chexpert):
    source, (manifest, _) = chexpert
    for name in CHEXPERT_LABELS:
        column = label_column_name(name)
        assert _same(manifest[column], source[name]), name
        assert (manifest[column] == -1).sum() == (source[name] == -1).sum()
    assert (manifest[[label_column_name(n) for n in CHEXPERT_LABELS]] == -1).to_numpy().sum() > 0


def test_chexpert_uncertain_policy_override(chexpert, tmp_path):
    source = chexpert[0].head(20000)  # the first 20,000 real rows keep this test quick
    source.to_csv(tmp_path / "chexpert_head.csv", index=False)
    manifest, _ = manifest_from_table(tmp_path / "chexpert_head.csv", "chexpert", uncertain="zeros")
    edema = manifest["label_edema"]
    assert (edema == -1).sum() == 0
    assert (edema == 0).sum() == (source["Edema"] == 0).sum() + (source["Edema"] == -1).sum()
    assert edema.isna().sum() == source["Edema"].isna().sum()
    assert (source["Edema"] == -1).sum() > 0
    with pytest.raises(ValueError, match="uncertain"):
        manifest_from_table(tmp_path / "chexpert_head.csv", "chexpert", uncertain="maybe")


def test_chexpert_manifest_round_trip(chexpert, tmp_path):
    _, (manifest, _) = chexpert
    head = manifest.head(500)
    back = read_manifest(write_manifest(head, tmp_path / "chexpert.csv"))
    assert back["patient_id"].tolist() == head["patient_id"].tolist()
    assert _same(back["label_edema"], head["label_edema"])


def test_nih_rows_ids_and_multi_hot_labels():
    _need(NIH)
    source = pd.read_csv(NIH)
    manifest, report = manifest_from_table(NIH, "nih_cxr14", root="/data/nih/images")
    assert len(manifest) == len(source) and len(report) == 0
    assert manifest["patient_id"].tolist() == source["Patient ID"].astype(str).tolist()
    assert manifest["image"].tolist() == ["/data/nih/images/" + name for name in source["Image Index"]]
    np.testing.assert_array_equal(manifest["age"].to_numpy(), source["Patient Age"].to_numpy(dtype=float))
    assert manifest["sex"].tolist() == source["Patient Gender"].tolist()
    counts = Counter(token for labels in source["Finding Labels"] for token in labels.split("|"))
    for name in NIH_CXR14_LABELS:
        column = label_column_name(name)
        assert manifest[column].sum() == counts[name], name
    # a brute-force check of every label on a slice of rows
    for labels, row in zip(source["Finding Labels"][:2000], manifest[:2000].itertuples(index=False)):
        tokens = set(labels.split("|"))
        for name in NIH_CXR14_LABELS:
            assert getattr(row, label_column_name(name)) == float(name in tokens)


def test_abide_site_age_sex_diagnosis():
    _need(ABIDE)
    source = pd.read_csv(ABIDE)
    manifest, report = manifest_from_table(ABIDE, "abide")
    assert len(manifest) == len(source) == 1112 and len(report) == 0
    assert manifest["patient_id"].tolist() == source["SUB_ID"].astype(str).tolist()
    assert manifest["site"].tolist() == source["SITE_ID"].tolist() and manifest["site"].nunique() == 20
    np.testing.assert_allclose(manifest["age"].to_numpy(), source["AGE_AT_SCAN"].to_numpy(dtype=float))
    assert manifest["sex"].tolist() == ["M" if s == 1 else "F" for s in source["SEX"]]
    assert manifest["label_asd"].tolist() == [1.0 if d == 1 else 0.0 for d in source["DX_GROUP"]]
    first = source.iloc[0]
    subject = f"sub-{int(first['SUB_ID']):07d}"
    assert manifest["image"].iloc[0] == f"{first['SITE_ID']}/{subject}/anat/{subject}_T1w.nii.gz"
    assert find_phi_columns(manifest.columns) == {}
    assert "MEDICATION_NAME" not in manifest.columns


# ------------------------------------------------------------------------------- published formats, small tables
def test_mimic_cxr_joins_age_and_labels(tmp_path):
    metadata = pd.DataFrame(
        {
            "dicom_id": ["d1", "d2", "d3", "d4"],
            "subject_id": [10000032, 10000032, 11000011, 12000022],
            "study_id": [50414267, 50414267, 53189527, 55555555],
            "ViewPosition": ["PA", "LATERAL", "AP", ""],
            "StudyDate": [21800506, 21800506, 21830101, 21900101],
        }
    )
    patients = pd.DataFrame(
        {"subject_id": [10000032, 11000011, 12000022], "gender": ["F", "M", "F"], "anchor_age": [52, 70, 40],
         "anchor_year": [2180, 2180, 2190], "anchor_year_group": ["2014 - 2016"] * 3, "dod": ["2185-01-01", "", ""]}
    )
    labels = pd.DataFrame({"subject_id": [10000032, 11000011], "study_id": [50414267, 53189527]})
    for i, name in enumerate(CHEXPERT_LABELS):
        labels[name] = [[1.0, -1.0, 0.0, np.nan][i % 4], [np.nan, 1.0, 1.0, 0.0][i % 4]]
    for name, table in (("metadata", metadata), ("patients", patients), ("chexpert", labels)):
        table.to_csv(tmp_path / f"{name}.csv", index=False)
    manifest, _ = manifest_from_table(
        tmp_path / "metadata.csv", "mimic_cxr",
        tables={"patients": tmp_path / "patients.csv", "chexpert": tmp_path / "chexpert.csv"},
    )
    assert manifest["image"].tolist()[0] == "files/p10/p10000032/s50414267/d1.jpg"
    assert manifest["patient_id"].tolist() == ["10000032", "10000032", "11000011", "12000022"]
    # age at the study = anchor_age + (study year - anchor_year)
    assert manifest["age"].tolist() == [52.0, 52.0, 73.0, 40.0]
    assert manifest["sex"].tolist() == ["F", "F", "M", "F"]
    assert manifest["view"].tolist()[:3] == ["PA", "LATERAL", "AP"] and pd.isna(manifest["view"].iloc[3])
    first = CHEXPERT_LABELS[1]  # -1.0 for the first study, 1.0 for the second
    assert _same(manifest[label_column_name(first)], pd.Series([-1.0, -1.0, 1.0, np.nan]))
    assert "dod" not in manifest.columns and find_phi_columns(manifest.columns) == {}
    # days since the patient's first study, from the (per-patient shifted) StudyDate; no date column kept
    offsets = [0.0, 0.0, 0.0, 0.0]
    assert manifest["study_offset_days"].tolist() == offsets and "StudyDate" not in manifest.columns
    without_labels, _ = manifest_from_table(tmp_path / "metadata.csv", "mimic_cxr",
                                            tables={"patients": tmp_path / "patients.csv"})
    assert not [c for c in without_labels.columns if c.startswith("label_")]
    with pytest.raises(ValueError, match="patients"):
        manifest_from_table(tmp_path / "metadata.csv", "mimic_cxr")


def test_padchest_age_from_birth_year_site_and_labels(tmp_path):
    table = pd.DataFrame(
        {
            "ImageID": ["a.png", "b.png", "c.png"],
            "ImageDir": [0, 12, 3],
            "StudyDate_DICOM": ["20150701", "20091231", "20120115"],
            "StudyID": ["s1", "s2", "s3"],
            "PatientID": ["p1", "p2", "p3"],
            "PatientBirth": ["1940.0", "1975.0", ""],
            "PatientSex_DICOM": ["M", "F", "O"],
            "ViewPosition_DICOM": ["POSTEROANTERIOR", "", "LATERAL"],
            "Projection": ["PA", "AP_horizontal", "L"],
            "Modality_DICOM": ["CR", "DX", "CR"],
            "Manufacturer_DICOM": ["PhilipsMedicalSystems", "ImagingDynamicsCompanyLtd", "PhilipsMedicalSystems"],
            "Report": ["texto libre del informe", "otro", "mas"],
            "MethodLabel": ["Physician", "RNN_model", "Physician"],
            "Labels": ["['normal']", "['pleural effusion', 'cardiomegaly', '']", ""],
        }
    )
    table.to_csv(tmp_path / "padchest.csv", index=False)
    manifest, report = manifest_from_table(tmp_path / "padchest.csv", "padchest")
    assert manifest["image"].tolist() == ["0/a.png", "12/b.png", "3/c.png"]
    expected_age = [
        (date(2015, 7, 1) - date(1940, 7, 1)).days / 365.25,
        (date(2009, 12, 31) - date(1975, 7, 1)).days / 365.25,
    ]
    np.testing.assert_allclose(manifest["age"].to_numpy()[:2], expected_age)
    assert math.isnan(manifest["age"].iloc[2])
    assert manifest["site"].tolist() == table["Manufacturer_DICOM"].tolist()
    assert manifest["view"].tolist() == ["PA", "AP_horizontal", "LATERAL"]
    assert manifest["label_normal"].tolist()[:2] == [1.0, 0.0]
    assert manifest["label_pleural_effusion"].tolist()[:2] == [0.0, 1.0]
    assert manifest["label_cardiomegaly"].tolist()[:2] == [0.0, 1.0]
    assert manifest.filter(like="label_").iloc[2].isna().all()  # no label list: unknown, not negative
    assert not {"Report", "PatientBirth", "report"} & set(manifest.columns)
    cells = {str(v) for v in manifest.to_numpy().ravel()}
    assert "1940.0" not in cells and "texto libre del informe" not in cells


def test_openbhb_participants_tsv(tmp_path):
    (tmp_path / "participants.tsv").write_text(
        "participant_id\tstudy\tsex\tage\tsite\tdiagnosis\n"
        "1402\tabide1\tmale\t24.5\t3\tcontrol\n"
        "sub-9001\tixi\tfemale\t61.25\t17\tcontrol\n"
    )
    manifest, _ = manifest_from_table(tmp_path / "participants.tsv", "openbhb", root=tmp_path)
    assert manifest["patient_id"].tolist() == ["1402", "9001"]
    assert manifest["image"].tolist() == [str(tmp_path.resolve() / "sub-1402_preproc-quasiraw_T1w.npy"),
                                          str(tmp_path.resolve() / "sub-9001_preproc-quasiraw_T1w.npy")]
    assert manifest["sex"].tolist() == ["M", "F"] and manifest["age"].tolist() == [24.5, 61.25]
    assert manifest["site"].tolist() == ["3", "17"] and manifest["cohort"].tolist() == ["abide1", "ixi"]


def test_ixi_matches_files_and_reports_the_unmatched(tmp_path):
    pd.DataFrame(
        {
            "IXI_ID": [2, 12, 13, 99, 12],
            "SEX_ID (1=m, 2=f)": [2, 1, 1, 2, 1],
            "HEIGHT": [164, 175, 182, 160, 175],
            "DOB": ["1977-01-17", "1966-08-20", "1958-09-15", "1980-01-01", "1966-08-20"],
            "AGE": [35.8, 38.78, 46.71, 31.0, 38.78],
        }
    ).to_csv(tmp_path / "IXI.csv", index=False)
    images = tmp_path / "T1"
    images.mkdir()
    for name in ("IXI002-Guys-0828-T1.nii.gz", "IXI012-HH-1211-T1.nii.gz", "IXI013-HH-1212-T1.nii.gz",
                 "IXI500-IOP-1234-T1.nii.gz"):
        (images / name).write_bytes(b"")
    manifest, report = manifest_from_table(tmp_path / "IXI.csv", "ixi", root=images)
    assert manifest["patient_id"].tolist() == ["IXI002", "IXI012", "IXI013"]
    assert manifest["site"].tolist() == ["Guys", "HH", "HH"]
    assert manifest["sex"].tolist() == ["F", "M", "M"] and manifest["age"].tolist() == [35.8, 38.78, 46.71]
    assert [Path(p).name for p in manifest["image"]] == ["IXI002-Guys-0828-T1.nii.gz", "IXI012-HH-1211-T1.nii.gz",
                                                         "IXI013-HH-1212-T1.nii.gz"]
    reasons = " | ".join(report["item"] + ": " + report["reason"])
    assert "IXI500-IOP-1234-T1.nii.gz" in reasons and "IXI_ID='99'" in reasons and "repeats" in reasons
    assert "DOB" not in manifest.columns
    with pytest.raises(ValueError, match="root"):
        manifest_from_table(tmp_path / "IXI.csv", "ixi")


# ------------------------------------------------------------------------------------ robustness and adapters
def _small_abide_like(tmp_path: Path) -> Path:
    pd.DataFrame(
        {"SUB_ID": [1, 2, 3, None, 5], "SITE_ID": ["A", "A", "B", "B", "C"], "AGE_AT_SCAN": [10, 200, -3, 20, 30],
         "SEX": [1, 2, 3, 1, 2], "DX_GROUP": [1, 2, 2, 1, 1]}
    ).to_csv(tmp_path / "t.csv", index=False)
    return tmp_path / "t.csv"


def test_bad_rows_are_skipped_or_set_missing_and_reported(tmp_path):
    manifest, report = manifest_from_table(_small_abide_like(tmp_path), "abide")
    assert manifest["patient_id"].tolist() == ["1", "2", "3", "5"]  # the row without SUB_ID is skipped
    assert _same(manifest["age"], pd.Series([10.0, np.nan, np.nan, 30.0]))
    assert _same(manifest["sex"], pd.Series(["M", "F", np.nan, "F"]))
    skipped = report.loc[report["status"] == "skipped", "item"].tolist()
    assert skipped == ["row 3 (line 5)"]
    warnings = " ".join(report.loc[report["status"] == "warning", "reason"])
    assert "age 200" in warnings and "age -3" in warnings and "'3'" in warnings


def test_label_values_outside_the_schema_raise(tmp_path):
    path = _small_abide_like(tmp_path)
    adapter = get_adapter("abide")
    adapter["labels"] = [{"kind": "single", "name": "asd", "column": "DX_GROUP"}]  # raw 1/2 codes, no map
    with pytest.raises(ValueError, match="DX_GROUP"):
        manifest_from_table(path, adapter)


def test_unmapped_label_codes_raise_with_the_source_row(tmp_path):
    pd.DataFrame(
        {"SUB_ID": [1, 2, 3], "SITE_ID": ["A", "A", "B"], "AGE_AT_SCAN": [10, 11, 12], "SEX": [1, 2, 1],
         "DX_GROUP": [1, 2, 9]}
    ).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=r"DX_GROUP.*row 2 \(line 4\): '9'"):
        manifest_from_table(tmp_path / "t.csv", "abide")


def test_adapter_from_a_yaml_or_json_file(tmp_path):
    path = _small_abide_like(tmp_path)
    adapter = get_adapter("abide")
    adapter["fields"]["image"] = {"template": "{SITE_ID}_{SUB_ID:03d}.nii.gz"}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(adapter))
    (tmp_path / "mine.json").write_text(json.dumps(adapter))
    for file in ("mine.yaml", "mine.json"):
        manifest, _ = manifest_from_table(path, tmp_path / file)
        assert manifest["image"].tolist() == ["A_001.nii.gz", "A_002.nii.gz", "B_003.nii.gz", "C_005.nii.gz"]


def test_unquoted_yaml_on_key_is_understood(tmp_path):
    text = (tmp_path / "x.yaml")
    adapter = get_adapter("mimic_cxr")
    text.write_text(yaml.safe_dump(adapter).replace("'on':", "on:"))
    assert load_adapter(text)["joins"][0]["on"] == ["subject_id"]


def test_check_files_skips_missing_images(tmp_path):
    path = _small_abide_like(tmp_path)
    (tmp_path / "A" / "sub-0000001" / "anat").mkdir(parents=True)
    (tmp_path / "A" / "sub-0000001" / "anat" / "sub-0000001_T1w.nii.gz").write_bytes(b"")
    manifest, report = manifest_from_table(path, "abide", root=tmp_path, check_files=True)
    assert manifest["patient_id"].tolist() == ["1"]
    assert report["reason"].str.contains("image file not found").sum() == 3


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("fields"), "fields"),
        (lambda a: a["fields"].pop("image"), "image"),
        (lambda a: a.__setitem__("colour", 1), "colour"),
        (lambda a: a["fields"].__setitem__("age", {"column": "AGE", "regex": "no group"}), "capture group"),
        (lambda a: a["fields"].__setitem__("weight", {"column": "W"}), "weight"),
        (lambda a: a.__setitem__("extra", {"patient_name": {"column": "X"}}), "protected health"),
        (lambda a: a.__setitem__("uncertain", "sometimes"), "uncertain"),
        (lambda a: a["labels"].append({"kind": "bag"}), "kind"),
    ],
)
def test_invalid_adapters_are_rejected_with_the_key(change, message):
    adapter = get_adapter("abide")
    change(adapter)
    with pytest.raises(ValueError, match=message):
        validate_adapter(adapter)


def test_unknown_adapter_and_missing_source_column(tmp_path):
    with pytest.raises(ValueError, match="chexpert"):
        load_adapter("not_a_dataset")
    pd.DataFrame({"Path": ["x/patient1/study1/a.jpg"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match="not found"):
        manifest_from_table(tmp_path / "t.csv", "chexpert")


def test_mimic_study_offset_days_per_patient_and_bad_dates(tmp_path):
    dates = {  # subject -> study dates (YYYYMMDD, MIMIC's shifted time line), written by hand
        101: ["21800506", "21800101", "21810506"],
        102: ["21900101", "21900101"],
        103: ["not-a-date", "21950301"],
    }
    rows = [(subject, 50000000 + 10 * subject + i, d) for subject, ds in dates.items() for i, d in enumerate(ds)]
    metadata = pd.DataFrame(
        {"dicom_id": [f"d{i}" for i in range(len(rows))], "subject_id": [r[0] for r in rows],
         "study_id": [r[1] for r in rows], "ViewPosition": "PA", "StudyDate": [r[2] for r in rows]}
    )
    patients = pd.DataFrame({"subject_id": list(dates), "gender": "F", "anchor_age": 50, "anchor_year": 2180})
    metadata.to_csv(tmp_path / "metadata.csv", index=False)
    patients.to_csv(tmp_path / "patients.csv", index=False)
    manifest, report = manifest_from_table(tmp_path / "metadata.csv", "mimic_cxr",
                                           tables={"patients": tmp_path / "patients.csv"})
    expected = []
    for ds in dates.values():
        valid = [date(int(d[:4]), int(d[4:6]), int(d[6:])) for d in ds if d.isdigit()]
        for d in ds:
            expected.append((date(int(d[:4]), int(d[4:6]), int(d[6:])) - min(valid)).days if d.isdigit() else np.nan)
    assert _same(manifest["study_offset_days"], pd.Series(expected, dtype=float))
    assert manifest["study_offset_days"].tolist()[:3] == [126.0, 0.0, 491.0]
    bad = report[report["reason"].str.contains("not-a-date")]
    assert bad["item"].tolist() == ["row 5 (line 7)"] and "not a valid date" in bad["reason"].iloc[0]


def test_unknown_sex_codes_get_a_report_row_per_row(tmp_path):
    pd.DataFrame(
        {"Image Index": ["a.png", "b.png", "c.png", "d.png"], "Patient ID": [1, 2, 3, 4],
         "Patient Age": [40, 50, 60, 70], "Patient Gender": ["M", "Q", "O", "F"], "View Position": "PA",
         "Follow-up #": [0, 0, 0, 0], "Finding Labels": "No Finding"}
    ).to_csv(tmp_path / "nih.csv", index=False)
    manifest, report = manifest_from_table(tmp_path / "nih.csv", "nih_cxr14")
    assert _same(manifest["sex"], pd.Series(["M", np.nan, np.nan, "F"]))
    assert report["item"].tolist() == ["row 1 (line 3)"]  # Q is reported; O (other) is missing by definition
    assert "'Q'" in report["reason"].iloc[0] and report["status"].iloc[0] == "warning"
    # through a map (ABIDE's 1/2 coding), an unmapped code is reported on its row too
    manifest, report = manifest_from_table(_small_abide_like(tmp_path), "abide")
    sex_rows = report[report["reason"].str.contains("fields.sex")]
    assert sex_rows["item"].tolist() == ["row 2 (line 4)"] and "'3'" in sex_rows["reason"].iloc[0]


def test_fallback_filled_values_are_not_reported(tmp_path):
    adapter = get_adapter("abide")
    adapter["fields"]["sex"] = {"column": "SEX", "map": {1: "M", 2: "F"}, "fallback": {"value": "F"}}
    manifest, report = manifest_from_table(_small_abide_like(tmp_path), adapter)
    assert manifest["sex"].tolist() == ["M", "F", "F", "F"]
    assert not report["reason"].str.contains("fields.sex").any()


def test_add_and_days_since_first_specs_are_validated():
    adapter = get_adapter("abide")
    adapter["extra"] = {"visit": {"column": "SUB_ID", "add": "one"}}
    with pytest.raises(ValueError, match="add"):
        validate_adapter(adapter)
    adapter["extra"] = {"study_offset_days": {"days_since_first": {"date": "D"}}}
    with pytest.raises(ValueError, match="by"):
        validate_adapter(adapter)
