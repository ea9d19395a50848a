"""Column-mapping adapters for public datasets: the one source of truth.

Each adapter maps a public dataset's metadata table(s) to the manifest schema. They are plain dictionaries so that
they ship inside the package (no package-data needed). ``data_manifests/<name>.yaml`` are copies written from this
module, for reading and for starting a custom adapter; a test checks that they are equal. After editing an adapter,
regenerate the copies with::

    python -m monai_du.data.adapters data_manifests

The adapter format (interpreted by :func:`monai_du.data.tables.manifest_from_table`) is documented in
``data_manifests/README.md``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

__all__ = ["ADAPTERS", "CHEXPERT_LABELS", "NIH_CXR14_LABELS", "adapter_names", "get_adapter", "write_adapter_files"]

CHEXPERT_LABELS: list[str] = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]
"""The 14 CheXpert observations (also the MIMIC-CXR CheXpert-labeller columns)."""

NIH_CXR14_LABELS: list[str] = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "No Finding",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
]
"""The 14 NIH ChestX-ray14 findings plus ``No Finding``, as written in ``Finding Labels``."""

_SEX_MALE_FEMALE_WORDS = {"Male": "M", "Female": "F", "Unknown": None}
_SEX_1_MALE_2_FEMALE = {1: "M", 2: "F"}

ADAPTERS: dict[str, dict[str, Any]] = {
    "chexpert": {
        "name": "chexpert",
        "description": (
            "CheXpert (Stanford ML Group) train.csv / valid.csv. One row per image. Patient id from the path "
            "(patientNNNNN), study id patientNNNNN/studyN. Uncertain labels (-1) are kept as -1 by default "
            "(policy 'keep'); blanks (not mentioned) are NaN. view is the AP/PA column, or LATERAL for lateral "
            "images; projection is frontal/lateral. follow_up is the study number - 1 (study1 -> 0), the patient's "
            "studies in time order (in the training table a patient's age never decreases with the study number). "
            "Image paths are relative to the folder that holds CheXpert-v1.0[-small]/ (pass it as root)."
        ),
        "source": "https://stanfordmlgroup.github.io/competitions/chexpert/",
        "fields": {
            "image": {"column": "Path"},
            "patient_id": {"column": "Path", "regex": r"(patient\d+)"},
            "study_id": {"column": "Path", "regex": r"(patient\d+/study\d+)"},
            "age": {"column": "Age"},
            "sex": {"column": "Sex", "map": dict(_SEX_MALE_FEMALE_WORDS)},
            "site": {"value": "Stanford"},
            "view": {
                "column": "AP/PA",
                "fallback": {"column": "Frontal/Lateral", "map": {"Lateral": "LATERAL", "Frontal": None}},
            },
        },
        "extra": {
            "projection": {"column": "Frontal/Lateral", "map": {"Frontal": "frontal", "Lateral": "lateral"}},
            "follow_up": {"column": "Path", "regex": r"patient\d+/study(\d+)/", "add": -1},
        },
        "labels": [{"kind": "columns", "columns": list(CHEXPERT_LABELS)}],
        "uncertain": "keep",
    },
    "nih_cxr14": {
        "name": "nih_cxr14",
        "description": (
            "NIH ChestX-ray14 Data_Entry_2017(_v2020).csv. One row per image. 'Finding Labels' is split on '|' into "
            "15 binary labels (the 14 findings and No Finding); the labels are text-mined, so there is no uncertain "
            "value. follow_up is 'Follow-up #' (0 for the patient's first image). Image paths are the file names; "
            "pass the folder holding all PNGs as root."
        ),
        "source": "https://nihcc.app.box.com/v/ChestXray-NIHCC",
        "fields": {
            "image": {"column": "Image Index"},
            "patient_id": {"column": "Patient ID"},
            "age": {"column": "Patient Age"},
            "sex": {"column": "Patient Gender"},
            "site": {"value": "NIH Clinical Center"},
            "view": {"column": "View Position"},
        },
        "extra": {"follow_up": {"column": "Follow-up #"}},
        "labels": [
            {"kind": "multi_hot", "column": "Finding Labels", "sep": "|", "classes": list(NIH_CXR14_LABELS)}
        ],
        "uncertain": "keep",
    },
    "mimic_cxr": {
        "name": "mimic_cxr",
        "description": (
            "MIMIC-CXR-JPG mimic-cxr-2.0.0-metadata.csv (main table), joined with MIMIC-IV patients.csv "
            "(tables={'patients': ...}, required: gender, anchor_age, anchor_year) and optionally "
            "mimic-cxr-2.0.0-chexpert.csv or -negbio.csv (tables={'chexpert': ...}) for the 14 labels. "
            "Age at the study = anchor_age + (year of StudyDate - anchor_year), both on MIMIC's shifted time line. "
            "study_offset_days = days since the patient's first StudyDate in the table (MIMIC shifts each "
            "patient's dates by one amount, so intervals are real); no date is kept. "
            "Image paths follow files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg relative to the MIMIC-CXR-JPG root."
        ),
        "source": "https://physionet.org/content/mimic-cxr-jpg/",
        "joins": [
            {"name": "patients", "on": ["subject_id"], "required": True},
            {"name": "chexpert", "on": ["subject_id", "study_id"], "required": False},
        ],
        "fields": {
            "image": {"template": "files/p{subject_id!s:.2}/p{subject_id}/s{study_id}/{dicom_id}.jpg"},
            "patient_id": {"column": "subject_id"},
            "study_id": {"column": "study_id"},
            "age": {
                "column": "anchor_age",
                "add_years_since": {"year": "anchor_year", "date": "StudyDate", "date_format": "%Y%m%d"},
            },
            "sex": {"column": "gender"},
            "site": {"value": "BIDMC"},
            "view": {"column": "ViewPosition"},
        },
        "extra": {
            "study_offset_days": {
                "days_since_first": {"date": "StudyDate", "date_format": "%Y%m%d", "by": "subject_id"}
            },
        },
        "labels": [{"kind": "columns", "columns": list(CHEXPERT_LABELS), "requires_join": "chexpert"}],
        "uncertain": "keep",
    },
    "padchest": {
        "name": "padchest",
        "description": (
            "PadChest PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv. Site is Manufacturer_DICOM. Age at the "
            "study from PatientBirth (a year: taken as 1 July of that year) and StudyDate_DICOM; the birth year is "
            "not kept. Labels: the 'Labels' list (findings and diagnoses) as multi-hot columns, discovered from the "
            "table. Free text (Report) and other columns are never copied. Image paths are ImageDir/ImageID."
        ),
        "source": "https://bimcv.cipf.es/bimcv-projects/padchest/",
        "fields": {
            "image": {"template": "{ImageDir}/{ImageID}"},
            "patient_id": {"column": "PatientID"},
            "study_id": {"column": "StudyID"},
            "age": {"from_birth": {"birth": "PatientBirth", "date": "StudyDate_DICOM", "date_format": "%Y%m%d"}},
            "sex": {"column": "PatientSex_DICOM"},
            "site": {"column": "Manufacturer_DICOM"},
            "view": {
                "column": "ViewPosition_DICOM",
                "map": {"POSTEROANTERIOR": "PA", "ANTEROPOSTERIOR": "AP", "LATERAL": "LATERAL"},
                "keep_unmapped": True,
                "fallback": {"column": "Projection"},
            },
            "modality": {"column": "Modality_DICOM"},
        },
        "extra": {
            "projection": {"column": "Projection"},
            "labelling_method": {"column": "MethodLabel", "optional": True},
        },
        "labels": [{"kind": "multi_hot", "column": "Labels", "format": "python_list", "classes": None}],
        "uncertain": "keep",
    },
    "openbhb": {
        "name": "openbhb",
        "description": (
            "OpenBHB participants.tsv (train or validation). Age in years, sex male/female, site an integer code "
            "of the acquisition site. Image paths follow the quasi-raw release: "
            "sub-<participant_id>_preproc-quasiraw_T1w.npy."
        ),
        "source": "https://baobablab.github.io/bhb/dataset",
        "read": {"sep": "\t"},
        "derive": {"subject": {"column": "participant_id", "regex": r"^(?:sub-)?(.+)$"}},
        "fields": {
            "image": {"template": "sub-{subject}_preproc-quasiraw_T1w.npy"},
            "patient_id": {"column": "subject"},
            "age": {"column": "age"},
            "sex": {"column": "sex"},
            "site": {"column": "site"},
        },
        "extra": {"cohort": {"column": "study", "optional": True}},
        "labels": [],
        "uncertain": "keep",
    },
    "abide": {
        "name": "abide",
        "description": (
            "ABIDE I Phenotypic_V1_0b(_preprocessed1).csv. Site SITE_ID, age AGE_AT_SCAN, sex SEX (1 = male, "
            "2 = female), label_asd from DX_GROUP (1 = autism -> 1, 2 = control -> 0). Image paths assume a "
            "SITE_ID/sub-NNNNNNN/anat/sub-NNNNNNN_T1w.nii.gz layout; copy this adapter and edit image.template for "
            "another layout (or use manifest_from_bids on a BIDS copy)."
        ),
        "source": "http://fcon_1000.projects.nitrc.org/indi/abide/abide_I.html",
        "fields": {
            "image": {"template": "{SITE_ID}/sub-{SUB_ID:07d}/anat/sub-{SUB_ID:07d}_T1w.nii.gz"},
            "patient_id": {"column": "SUB_ID"},
            "age": {"column": "AGE_AT_SCAN"},
            "sex": {"column": "SEX", "map": dict(_SEX_1_MALE_2_FEMALE)},
            "site": {"column": "SITE_ID"},
        },
        "labels": [{"kind": "single", "name": "asd", "column": "DX_GROUP", "map": {1: 1, 2: 0}}],
        "uncertain": "keep",
    },
    "ixi": {
        "name": "ixi",
        "description": (
            "IXI demographics (IXI.xls exported to CSV, or read directly when xlrd is installed): IXI_ID, "
            "SEX_ID (1 = male, 2 = female), AGE. The table has no file names, so images are found under root by "
            "name (IXI<ID>-<site>-<number>-T1.nii.gz) and site is taken from the file name (Guys, HH, IOP). "
            "root is required. The DOB column is never copied."
        ),
        "source": "https://brain-development.org/ixi-dataset/",
        "files": {
            "glob": "**/IXI*-T1.nii*",
            "key_regex": r"^IXI(\d+)-",
            "key_column": "IXI_ID",
            "column": "image_file",
        },
        "fields": {
            "image": {"column": "image_file"},
            "patient_id": {"template": "IXI{IXI_ID:03d}"},
            "age": {"column": "AGE"},
            "sex": {"column": ["SEX_ID (1=m, 2=f)", "SEX_ID"], "map": dict(_SEX_1_MALE_2_FEMALE)},
            "site": {"column": "image_file", "regex": r"IXI\d+-([A-Za-z]+)-\d+"},
        },
        "labels": [],
        "uncertain": "keep",
    },
}
"""Adapters by name. Do not edit in place; :func:`get_adapter` returns copies."""


def adapter_names() -> list[str]:
    """Names of the packaged adapters, sorted."""
    return sorted(ADAPTERS)


def get_adapter(name: str) -> dict[str, Any]:
    """A deep copy of a packaged adapter.

    Raises:
        KeyError: for an unknown name, listing the known ones.
    """
    if name not in ADAPTERS:
        raise KeyError(f"unknown adapter {name!r}; packaged adapters: {adapter_names()}")
    return copy.deepcopy(ADAPTERS[name])


def _header(name: str) -> str:
    return (
        f"# Column-mapping adapter '{name}' for monai_du.data.manifest_from_table.\n"
        "# Generated from monai_du/data/adapters.py (the source of truth): edit there, then run\n"
        "#   python -m monai_du.data.adapters data_manifests\n"
        "# To customise, copy this file and pass its path as manifest_from_table(..., adapter='my.yaml').\n"
        "# The format is documented in data_manifests/README.md.\n"
    )


def write_adapter_files(folder: str | Path) -> list[Path]:
    """Write every packaged adapter as ``<folder>/<name>.yaml``.

    Returns:
        the paths written, sorted by name.
    """
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in adapter_names():
        path = folder / f"{name}.yaml"
        text = yaml.safe_dump(ADAPTERS[name], sort_keys=False, allow_unicode=True, width=100)
        path.write_text(_header(name) + text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_adapter_files(sys.argv[1] if len(sys.argv) > 1 else "data_manifests"):
        print(written_path)
