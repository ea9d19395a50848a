"""Tests of the generated phantom cohorts (monai_du.phantoms).

Properties are measured on the written files (PNG via PIL, DICOM via pydicom, NIfTI via nibabel) and checked with
independent statistics (scipy, scikit-learn). The embedded real-table constants are recomputed from ../shared/data
when it is present.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from monai_du.data.manifest import read_manifest
from monai_du.phantoms import (
    ABIDE_SITES,
    CHEXPERT_LABEL_LOGIT,
    NIH_AGE_BIN_EDGES,
    NIH_AP_FRACTION,
    NIH_FOLLOWUP_AGE_STEP,
    NIH_IMAGES_PER_PATIENT,
    NIH_PATIENT_AGE_HIST,
    brain_site_profiles,
    cxr_site_profiles,
    ensure_demo_cohort,
    make_brain_cohort,
    make_cxr_cohort,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _dicom_display(path: Path) -> np.ndarray:
    """DICOM pixels in [0, 1] with bright = dense, read with pydicom alone."""
    import pydicom

    ds = pydicom.dcmread(path)
    x = ds.pixel_array.astype(np.float64) / (2 ** int(ds.BitsStored) - 1)
    return 1.0 - x if ds.PhotometricInterpretation == "MONOCHROME1" else x


# ---------------------------------------------------------------------------------------------------------------
# fixtures: one chest X-ray and one brain cohort shared by the module
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cxr(tmp_path_factory):
    out = tmp_path_factory.mktemp("cxr")
    path = make_cxr_cohort(out, n=500, seed=3, size=64, formats=("png", "dicom"))
    df = pd.read_csv(path, dtype={"patient_id": str, "study_id": str, "series_id": str})
    images = np.stack([_png(out / p) for p in df["image"]]).astype(np.float64) / 255.0
    return out, path, df, images


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    import nibabel as nib

    out = tmp_path_factory.mktemp("brain")
    path = make_brain_cohort(out, n=100, seed=1, size=32)
    df = pd.read_csv(path)
    vols, vox = [], []
    for p in df["image"]:
        img = nib.load(out / p)
        vols.append(np.asarray(img.dataobj, dtype=np.float64))
        vox.append(abs(np.linalg.det(img.affine[:3, :3])))
    return out, path, df, np.stack(vols), np.asarray(vox)


# ---------------------------------------------------------------------------------------------------------------
# chest X-rays
# ---------------------------------------------------------------------------------------------------------------


def test_cxr_deterministic_for_a_seed(tmp_path):
    kw = dict(n=40, size=32, formats=("png", "dicom"), bit_depth=16)
    a = make_cxr_cohort(tmp_path / "a", seed=11, **kw)
    b = make_cxr_cohort(tmp_path / "b", seed=11, **kw)
    c = make_cxr_cohort(tmp_path / "c", seed=12, **kw)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    df = pd.read_csv(a)
    # the formats do not change the cohort: a PNG-only run gives the same manifest, less the per-format columns
    png_only = pd.read_csv(make_cxr_cohort(tmp_path / "p", seed=11, n=40, size=32, bit_depth=16))
    pd.testing.assert_frame_equal(png_only, df.drop(columns=["image_png", "image_dicom"]))
    for rel in df["image_png"]:
        np.testing.assert_array_equal(_png(tmp_path / "a" / rel), _png(tmp_path / "b" / rel))
    for rel in df["image_dicom"]:
        np.testing.assert_array_equal(_dicom_display(tmp_path / "a" / rel), _dicom_display(tmp_path / "b" / rel))
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_cxr_manifest_follows_schema(cxr):
    out, path, df, _ = cxr
    m = read_manifest(path)  # raises on any schema violation
    assert len(m) == 500
    for column in ("image", "patient_id", "study_id", "series_id", "age", "sex", "site", "view", "modality"):
        assert column in m.columns and m[column].notna().all(), column
    assert set(m["sex"]) <= {"M", "F"} and set(m["view"]) <= {"PA", "AP"}
    assert set(m["label_cardiomegaly"]) <= {0.0, 1.0} and set(m["label_effusion"]) <= {0.0, 1.0}
    assert all(not Path(p).is_absolute() and (out / p).is_file() for p in m["image"])
    assert m["study_id"].is_unique and m["image"].is_unique
    # follow-up studies: several images for some patients, with constant sex and site and non-decreasing age
    per_patient = m.groupby("patient_id")
    assert (per_patient.size() > 1).sum() >= 20
    assert (per_patient["sex"].nunique() == 1).all() and (per_patient["site"].nunique() == 1).all()
    assert all(np.all(np.diff(g["age"].to_numpy()) >= 0) for _, g in per_patient)
    # a positive patient stays positive at later, older studies
    for _, g in per_patient:
        for lab in ("label_cardiomegaly", "label_effusion"):
            assert np.all(np.diff(g[lab].to_numpy()) >= 0)


def test_cxr_dicom_tags_match_manifest_and_png(cxr):
    import pydicom
    from pydicom.uid import UID

    out, _, df, images = cxr
    institutions: dict[str, set] = {}
    photometric = set()
    for i in range(0, len(df), 7):
        row = df.iloc[i]
        ds = pydicom.dcmread(out / row["image_dicom"])
        assert ds.Modality == row["modality"] in ("DX", "CR")
        expected_sop = {"DX": "1.2.840.10008.5.1.4.1.1.1.1", "CR": "1.2.840.10008.5.1.4.1.1.1"}[ds.Modality]
        assert ds.SOPClassUID == expected_sop == ds.file_meta.MediaStorageSOPClassUID
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert UID(uid).is_valid
        assert ds.StudyInstanceUID == row["study_id"] and ds.SeriesInstanceUID == row["series_id"]
        assert ds.PatientID == row["patient_id"] and ds.PatientSex == row["sex"] and ds.ViewPosition == row["view"]
        assert re.fullmatch(r"\d{3}[YM]", ds.PatientAge)
        age = int(ds.PatientAge[:3]) / (12.0 if ds.PatientAge.endswith("M") else 1.0)
        assert age == pytest.approx(row["age"], abs=1e-3)
        assert str(ds.PatientName) == "" and ds.get("PatientBirthDate", "") == ""
        assert (ds.Rows, ds.Columns, ds.BitsStored, ds.SamplesPerPixel) == (64, 64, 12, 1)
        institutions.setdefault(row["site"], set()).add((ds.InstitutionName, ds.Manufacturer))
        photometric.add(ds.PhotometricInterpretation)
        # the DICOM shows the same picture as the PNG (12-bit vs 8-bit quantisation)
        np.testing.assert_allclose(_dicom_display(out / row["image_dicom"]), images[i], atol=0.6 / 255 + 0.6 / 4095)
    assert all(len(v) == 1 for v in institutions.values())
    assert len({next(iter(v)) for v in institutions.values()}) == len(institutions) == 4
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}


def test_cxr_files_readable_by_monai(cxr):
    from monai.transforms import LoadImage

    out, _, df, images = cxr
    loader = LoadImage(image_only=True)
    png = loader(str(out / df["image_png"].iloc[0]))
    dcm = loader(str(out / df["image_dicom"].iloc[0]))
    assert tuple(png.shape) == tuple(dcm.shape) == (64, 64)
    # MONAI's readers index (x, y): the transpose of the row-major PNG
    np.testing.assert_allclose(png.numpy().T / 255.0, images[0], atol=1e-6)


def test_cxr_label_prevalence_increases_with_age(tmp_path):
    from sklearn.linear_model import LogisticRegression

    df = pd.read_csv(make_cxr_cohort(tmp_path, n=2500, seed=5, size=16))
    age = df["age"].to_numpy()
    old, young = age >= np.quantile(age, 2 / 3), age <= np.quantile(age, 1 / 3)
    for lab in ("label_cardiomegaly", "label_effusion"):
        y = df[lab].to_numpy()
        assert y[old].mean() > y[young].mean() + 0.03, lab
        slope = LogisticRegression(C=1e6).fit(((age - 50) / 10)[:, None], y).coef_[0, 0]
        assert 0.03 < slope < 0.5, (lab, slope)
    # a stronger requested age effect gives a steeper fitted slope; a requested prevalence is met at age ~50
    df2 = pd.read_csv(
        make_cxr_cohort(
            tmp_path / "strong", n=2500, seed=5, size=16, labels=("cardiomegaly",),
            age_odds_ratio={"cardiomegaly": 3.0}, prevalence={"cardiomegaly": 0.3},
        )
    )
    assert "label_effusion" not in df2.columns
    fit = LogisticRegression(C=1e6).fit(((df2["age"].to_numpy() - 50) / 10)[:, None], df2["label_cardiomegaly"])
    assert fit.coef_[0, 0] > 0.7 and abs(1 / (1 + np.exp(-fit.intercept_[0])) - 0.3) < 0.08


def test_cxr_sites_change_intensity_and_noise(cxr):
    from scipy.stats import f_oneway

    _, _, df, images = cxr
    sites = sorted(df["site"].unique())
    means = [images[df["site"].to_numpy() == s].mean(axis=(1, 2)) for s in sites]
    assert f_oneway(*means).pvalue < 1e-10
    # noise: median absolute second difference along rows, a high-pass estimate dominated by pixel noise
    hp = np.abs(images[:, :, 2:] - 2 * images[:, :, 1:-1] + images[:, :, :-2])
    noise = np.median(hp[:, 8:56, 8:56].reshape(len(images), -1), axis=1)
    per_site = np.array([np.median(noise[df["site"].to_numpy() == s]) for s in sites])
    assert per_site.max() > 2.0 * per_site.min()
    # site is easy to tell from these two statistics: a nearest-centroid rule beats chance (0.25) by far
    feats = np.stack([images.mean(axis=(1, 2)), noise], 1)
    feats = (feats - feats.mean(0)) / feats.std(0)
    codes = pd.Categorical(df["site"], categories=sites).codes
    centroids = np.stack([feats[codes == k].mean(0) for k in range(len(sites))])
    pred = np.argmin(((feats[:, None] - centroids[None]) ** 2).sum(-1), 1)
    assert (pred == codes).mean() > 0.6


def test_cxr_age_and_sex_change_anatomy(cxr):
    from scipy.stats import mannwhitneyu, spearmanr

    _, _, df, images = cxr
    # bone density falls with age: the vertical high-frequency energy of the rib cage over the lungs drops
    ribs = np.abs(np.diff(images[:, 13:38, 10:54], axis=1)).mean(axis=(1, 2))
    # men have wider chests: more of the image is body rather than background
    mean = images.mean(axis=(1, 2))
    group = df.groupby(["site", "view"]).size().idxmax()
    g = (df["site"] == group[0]).to_numpy() & (df["view"] == group[1]).to_numpy()
    rho, p = spearmanr(df["age"].to_numpy()[g], ribs[g])
    assert rho < -0.3 and p < 1e-3
    male = g & (df["sex"] == "M").to_numpy()
    female = g & (df["sex"] == "F").to_numpy()
    assert mannwhitneyu(mean[male], mean[female], alternative="greater").pvalue < 1e-3


def test_cxr_labels_visible_in_images(cxr):
    from sklearn.metrics import roc_auc_score

    _, _, df, images = cxr
    z = (images - images.mean(axis=(1, 2), keepdims=True)) / images.std(axis=(1, 2), keepdims=True)
    heart = z[:, 32:48, 19:48].mean(axis=(1, 2))  # lower middle: where an enlarged heart spreads
    for site in df["site"].unique():
        s = (df["site"] == site).to_numpy()
        y = df["label_cardiomegaly"].to_numpy()[s]
        if 0 < y.sum() < len(y):
            assert roc_auc_score(y, heart[s]) > 0.75, site
    bases = np.concatenate([z[:, 38:51, 6:19], z[:, 38:51, 45:58]], axis=2).mean(axis=(1, 2))
    assert roc_auc_score(df["label_effusion"], bases) > 0.55


def test_cxr_metadata_follows_embedded_nih_distribution(tmp_path):
    df = pd.read_csv(make_cxr_cohort(tmp_path, n=3000, seed=2, size=16, n_sites=2))
    patients = df.groupby("patient_id").agg(sex=("sex", "first"), age=("age", "first"), n=("image", "size"))
    p_male = sum(NIH_PATIENT_AGE_HIST["M"]) / (sum(NIH_PATIENT_AGE_HIST["M"]) + sum(NIH_PATIENT_AGE_HIST["F"]))
    se = np.sqrt(p_male * (1 - p_male) / len(patients))
    assert abs((patients["sex"] == "M").mean() - p_male) < 4 * se
    counts = np.asarray(NIH_PATIENT_AGE_HIST["M"]) + np.asarray(NIH_PATIENT_AGE_HIST["F"])
    expected_mean_age = np.sum(counts * (np.asarray(NIH_AGE_BIN_EDGES[:-1]) + 2.0)) / counts.sum()
    assert abs(patients["age"].mean() - expected_mean_age) < 1.5
    single = NIH_IMAGES_PER_PATIENT[0] / sum(NIH_IMAGES_PER_PATIENT[:5])
    assert abs((patients["n"] == 1).mean() - single) < 0.05
    assert patients["n"].max() == 5
    assert len(df) == 3000 and set(df["site"]) == {p["site"] for p in cxr_site_profiles(2)}


def test_cxr_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="formats"):
        make_cxr_cohort(tmp_path, n=2, formats=("jpeg",))
    with pytest.raises(ValueError, match="unknown label"):
        make_cxr_cohort(tmp_path, n=2, labels=("pneumonia",))
    with pytest.raises(ValueError, match="prevalence"):
        make_cxr_cohort(tmp_path, n=2, prevalence={"effusion": 1.5})
    with pytest.raises(ValueError, match="bit_depth"):
        make_cxr_cohort(tmp_path, n=2, bit_depth=12)


# ---------------------------------------------------------------------------------------------------------------
# brains
# ---------------------------------------------------------------------------------------------------------------


def test_brain_deterministic_for_a_seed(tmp_path):
    import nibabel as nib

    a = make_brain_cohort(tmp_path / "a", n=6, seed=4, size=20)
    b = make_brain_cohort(tmp_path / "b", n=6, seed=4, size=20)
    c = make_brain_cohort(tmp_path / "c", n=6, seed=5, size=20)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert (tmp_path / "a" / "participants.tsv").read_bytes() == (tmp_path / "b" / "participants.tsv").read_bytes()
    for rel in pd.read_csv(a)["image"]:
        va = np.asarray(nib.load(tmp_path / "a" / rel).dataobj)
        vb = np.asarray(nib.load(tmp_path / "b" / rel).dataobj)
        np.testing.assert_array_equal(va, vb)
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_brain_bids_layout_and_manifest(brain):
    import json

    import nibabel as nib

    out, path, df, vols, vox = brain
    m = read_manifest(path)
    assert len(m) == 100 and m["patient_id"].is_unique
    assert set(m["sex"]) <= {"M", "F"} and set(m["label_lesion"]) <= {0.0, 1.0}
    for _, row in m.iterrows():
        sub = row["patient_id"]
        assert re.fullmatch(r"sub-\d{3}", sub)
        assert row["image"] == f"{sub}/anat/{sub}_T1w.nii.gz" and (out / row["image"]).is_file()
    participants = pd.read_csv(out / "participants.tsv", sep="\t")
    assert list(participants.columns[:4]) == ["participant_id", "age", "sex", "site"]
    assert participants["participant_id"].tolist() == m["patient_id"].tolist()
    np.testing.assert_allclose(participants["age"], m["age"])
    assert (participants["site"] == m["site"]).all() and (participants["sex"] == m["sex"]).all()
    assert json.loads((out / "dataset_description.json").read_text())["BIDSVersion"]
    # affine: RAS, isotropic voxels of the site's field of view / size, in mm
    fov = {p["site"]: p["fov_mm"] for p in brain_site_profiles(4)}
    for i in range(0, 100, 17):
        img = nib.load(out / m["image"].iloc[i])
        assert img.shape == (32, 32, 32) and img.get_data_dtype() == np.int16
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(nib.affines.voxel_sizes(img.affine), [fov[m["site"].iloc[i]] / 32] * 3, rtol=1e-6)
        assert img.header.get_xyzt_units()[0] == "mm" and int(img.header["sform_code"]) == 1


def test_brain_files_readable_by_monai(brain):
    from monai.transforms import LoadImage

    out, _, df, vols, _ = brain
    img = LoadImage(image_only=True)(str(out / df["image"].iloc[0]))
    assert tuple(img.shape) == (32, 32, 32)
    np.testing.assert_allclose(img.numpy(), vols[0])


def _head_stats(vols: np.ndarray) -> dict[str, np.ndarray]:
    """Per volume: mean intensity of the head, a noise estimate from the background corners, head voxel count."""
    out = {"mean": [], "noise": [], "head_voxels": []}
    for v in vols:
        head = v > 0.3 * np.percentile(v, 99)
        out["mean"].append(v[head].mean())
        out["noise"].append(np.concatenate([v[:3, :3].ravel(), v[-3:, -3:].ravel()]).std())
        out["head_voxels"].append(head.sum())
    return {k: np.asarray(x, dtype=np.float64) for k, x in out.items()}


def test_brain_sites_change_intensity_and_noise(brain):
    from scipy.stats import f_oneway

    _, _, df, vols, _ = brain
    stats = _head_stats(vols)
    groups = [df["site"].to_numpy() == s for s in sorted(df["site"].unique())]
    assert f_oneway(*[stats["mean"][g] for g in groups]).pvalue < 1e-10
    noise = np.array([np.median(stats["noise"][g]) for g in groups])
    assert noise.max() > 2.0 * noise.min()


def _zone_dark_fraction(v: np.ndarray, affine: np.ndarray, centre_mm: np.ndarray) -> float:
    """Fraction of CSF-dark voxels in a box around the lateral ventricles, in mm from the head centre."""
    import nibabel as nib

    head = v > 0.3 * np.percentile(v, 99)
    r = nib.affines.apply_affine(affine, np.argwhere(np.ones_like(v, dtype=bool))) - centre_mm
    zone = (np.abs(r[:, 0]) < 10) & (np.abs(r[:, 1]) < 22) & (np.abs(r[:, 2] - 14) < 10)
    return float((v.ravel()[zone] < 0.45 * np.percentile(v[head], 90)).mean())


def test_brain_age_changes_anatomy_within_a_site(tmp_path):
    import nibabel as nib
    from scipy.stats import spearmanr

    # one site with a wide age range (ABIDE MAX_MUN: 7-58 y): the ventricles widen with age
    out = tmp_path / "maxmun"
    df = pd.read_csv(make_brain_cohort(out, n=50, seed=3, size=32, sites=["MAX_MUN"]))
    dark = []
    for rel in df["image"]:
        img = nib.load(out / rel)
        v = np.asarray(img.dataobj, dtype=np.float64)
        head = np.argwhere(v > 0.3 * np.percentile(v, 99))
        dark.append(_zone_dark_fraction(v, img.affine, nib.affines.apply_affine(img.affine, head).mean(0)))
    rho, p = spearmanr(df["age"], dark)
    assert rho > 0.35 and p < 0.01


def test_brain_sex_changes_head_size(brain):
    from scipy.stats import mannwhitneyu

    _, _, df, vols, vox = brain
    # men have larger heads: physical head volume (voxel count x voxel volume from the affine), from 14 years on
    # so that childhood growth does not mix in
    volume = _head_stats(vols)["head_voxels"] * vox
    grown = (df["age"] >= 14).to_numpy()
    male, female = grown & (df["sex"] == "M").to_numpy(), grown & (df["sex"] == "F").to_numpy()
    assert female.sum() >= 5
    assert mannwhitneyu(volume[male], volume[female], alternative="greater").pvalue < 0.01


def test_brain_lesions_visible_and_more_frequent_with_age(tmp_path, brain):
    import nibabel as nib
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    out, _, df, vols, _ = brain
    # lesions are dark spots in the periventricular white matter: the mean of that zone (in mm from the head's
    # centroid, located through the affine) drops relative to the bright white matter
    zone_mean = []
    for rel, v in zip(df["image"], vols):
        affine = nib.load(out / rel).affine
        head = v > 0.3 * np.percentile(v, 99)
        ijk = np.argwhere(head)
        r = nib.affines.apply_affine(affine, ijk)
        r -= r.mean(0)
        zone = (np.abs(np.abs(r[:, 0]) - 18) < 6) & (np.abs(r[:, 1]) < 25) & (np.abs(r[:, 2] - 20) < 8)
        zone_mean.append(v[tuple(ijk[zone].T)].mean() / np.percentile(v[head], 90))
    assert df["label_lesion"].sum() >= 4
    assert roc_auc_score(df["label_lesion"], -np.asarray(zone_mean)) > 0.8
    big = pd.read_csv(make_brain_cohort(tmp_path, n=600, seed=9, size=16, n_sites=20))
    age = big["age"].to_numpy()
    slope = LogisticRegression(C=1e6).fit(((age - 20) / 10)[:, None], big["label_lesion"]).coef_[0, 0]
    assert slope > 0.3


def test_brain_metadata_follows_embedded_abide_distribution(tmp_path):
    df = pd.read_csv(make_brain_cohort(tmp_path, n=800, seed=2, size=16, sites=["NYU", "USM", "KKI"]))
    n_real = np.array([ABIDE_SITES[s][0] for s in ("NYU", "USM", "KKI")], dtype=float)
    share = df["site"].value_counts().reindex(["NYU", "USM", "KKI"]).to_numpy() / len(df)
    np.testing.assert_allclose(share, n_real / n_real.sum(), atol=0.06)
    assert (df.loc[df["site"] == "USM", "sex"] == "M").all()  # USM has no women in ABIDE
    for site in ("NYU", "USM", "KKI"):
        q = np.asarray(ABIDE_SITES[site][2])
        ages = df.loc[df["site"] == site, "age"]
        assert q[0] - 0.01 <= ages.min() and ages.max() <= q[-1] + 0.01
        assert abs(ages.median() - q[5]) < 0.15 * (q[-1] - q[0])
    with pytest.raises(ValueError, match="unknown ABIDE sites"):
        make_brain_cohort(tmp_path / "x", n=2, sites=["NOWHERE"])


# ---------------------------------------------------------------------------------------------------------------
# embedded constants vs the real tables
# ---------------------------------------------------------------------------------------------------------------


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not found: the real tables in ../shared/data are not beside this checkout")
    return path


def test_nih_constants_match_real_table():
    d = pd.read_csv(_shared("nih_cxr14_data_entry_2017_v2020.csv.gz"))
    d = d.sort_values(["Patient ID", "Follow-up #"])
    first = d.groupby("Patient ID").first()
    for sex in ("M", "F"):
        hist, _ = np.histogram(first.loc[first["Patient Gender"] == sex, "Patient Age"], bins=NIH_AGE_BIN_EDGES)
        assert tuple(int(v) for v in hist) == NIH_PATIENT_AGE_HIST[sex]
    sizes = d.groupby("Patient ID").size()
    expected = tuple(int((sizes == k).sum()) for k in range(1, 11)) + (int((sizes > 10).sum()),)
    assert expected == NIH_IMAGES_PER_PATIENT
    steps = d.groupby("Patient ID")["Patient Age"].diff().dropna().astype(int)
    assert tuple(int(v) for v in np.bincount(steps)) == NIH_FOLLOWUP_AGE_STEP
    assert (d["View Position"] == "AP").mean() == pytest.approx(NIH_AP_FRACTION, abs=1e-4)


def test_chexpert_label_logits_match_real_table():
    from sklearn.linear_model import LogisticRegression

    d = pd.read_csv(_shared("chexpert_train.csv.gz"), usecols=["Age", "Cardiomegaly", "Pleural Effusion"])
    x = ((d["Age"].to_numpy(dtype=np.float64) - 50.0) / 10.0)[:, None]
    for name, column in (("cardiomegaly", "Cardiomegaly"), ("effusion", "Pleural Effusion")):
        fit = LogisticRegression(C=1e6).fit(x, (d[column] == 1).astype(int))
        assert fit.intercept_[0] == pytest.approx(CHEXPERT_LABEL_LOGIT[name][0], abs=2e-3)
        assert fit.coef_[0, 0] == pytest.approx(CHEXPERT_LABEL_LOGIT[name][1], abs=2e-3)


def test_abide_constants_match_real_table():
    d = pd.read_csv(_shared("abide1_phenotypic.csv"), usecols=["SITE_ID", "AGE_AT_SCAN", "SEX"])
    assert set(d["SITE_ID"]) == set(ABIDE_SITES)
    for site, (n, n_female, q) in ABIDE_SITES.items():
        g = d[d["SITE_ID"] == site]
        assert len(g) == n and int((g["SEX"] == 2).sum()) == n_female
        np.testing.assert_allclose(np.quantile(g["AGE_AT_SCAN"], np.linspace(0, 1, 11)), q, atol=0.006)
    sizes = [v[0] for v in ABIDE_SITES.values()]
    assert sizes == sorted(sizes, reverse=True)  # n_sites picks the largest sites first



def test_ensure_demo_cohort_generates_once_and_repairs_partial(tmp_path):
    folder = tmp_path / "demo"
    manifest = ensure_demo_cohort(folder, "cxr", n=6, seed=1, size=16)
    df = pd.read_csv(manifest)
    assert len(df) == 6 and all((folder / p).is_file() for p in df.image)
    stamp = manifest.stat().st_mtime_ns
    assert ensure_demo_cohort(folder, "cxr", n=6, seed=1, size=16) == manifest
    assert manifest.stat().st_mtime_ns == stamp  # not regenerated
    # a killed generation leaves the partial marker: the next call starts over
    (folder / ".monai_du_demo.json").unlink()
    (folder / ".monai_du_demo.partial").write_text("{}")
    (folder / "half_written.png").write_bytes(b"")
    ensure_demo_cohort(folder, "cxr", n=6, seed=1, size=16)
    assert not (folder / "half_written.png").exists() and not (folder / ".monai_du_demo.partial").exists()
    # other arguments: regenerated
    assert len(pd.read_csv(ensure_demo_cohort(folder, "cxr", n=4, seed=1, size=16))) == 4
    # a folder with someone else's files is never wiped
    other = tmp_path / "user_data"
    other.mkdir()
    (other / "scan.dcm").write_bytes(b"x")
    with pytest.raises(ValueError, match="holds files"):
        ensure_demo_cohort(other, "cxr", n=4, size=16)
    assert (other / "scan.dcm").exists()
    with pytest.raises(ValueError, match="modality"):
        ensure_demo_cohort(tmp_path / "x", "ct")


def test_ensure_demo_cohort_done_marker_keys_on_what_shapes_the_cohort(tmp_path, monkeypatch):
    import json

    import monai_du
    from monai_du.io import DoneMarker

    folder = tmp_path / "demo"
    manifest = ensure_demo_cohort(folder, "cxr", n=5, seed=2, size=16)
    recorded = json.loads((folder / ".monai_du_demo.json").read_text())
    assert recorded["format"] == DoneMarker.FORMAT
    assert recorded["inputs"] == {
        "modality": "cxr", "n": 5, "seed": 2, "size": 16, "monai_du_version": monai_du.__version__
    }
    stamp = manifest.stat().st_mtime_ns
    # another package version: regenerated
    monkeypatch.setattr(monai_du, "__version__", "999.0")
    ensure_demo_cohort(folder, "cxr", n=5, seed=2, size=16)
    assert manifest.stat().st_mtime_ns != stamp
    stamp = manifest.stat().st_mtime_ns
    assert ensure_demo_cohort(folder, "cxr", n=5, seed=2, size=16) == manifest and manifest.stat().st_mtime_ns == stamp
    # another argument of the cohort function: regenerated with it
    ensure_demo_cohort(folder, "cxr", n=5, seed=2, size=16, formats=("dicom",))
    assert pd.read_csv(manifest)["image"].str.endswith(".dcm").all()
    # a marker of the earlier scheme (the bare arguments) is not trusted
    (folder / ".monai_du_demo.json").write_text(json.dumps({"modality": "cxr", "n": 5, "seed": 2, "size": 16}))
    stamp = manifest.stat().st_mtime_ns
    ensure_demo_cohort(folder, "cxr", n=5, seed=2, size=16)
    assert manifest.stat().st_mtime_ns != stamp and pd.read_csv(manifest)["image"].str.endswith(".png").all()


def _ensure_counting(folder: str, calls: str) -> None:
    """Child process: ensure_demo_cohort with a cohort function that logs each call and takes a while."""
    import time

    import monai_du.phantoms as phantoms

    make = phantoms.make_cxr_cohort

    def slow_make(*args, **kwargs):
        with open(calls, "a") as fh:
            fh.write("call\n")
        time.sleep(0.5)
        return make(*args, **kwargs)

    phantoms.make_cxr_cohort = slow_make
    phantoms.ensure_demo_cohort(folder, "cxr", n=6, seed=1, size=16)


def test_ensure_demo_cohort_concurrent_callers_generate_once(tmp_path):
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    folder, calls = tmp_path / "demo", tmp_path / "calls.txt"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_ensure_counting, args=(str(folder), str(calls))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert calls.read_text().splitlines() == ["call"]
    assert len(pd.read_csv(folder / "manifest.csv")) == 6
