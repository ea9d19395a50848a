"""Shared test data: a small manifest with missing values, and its prior codes computed by a brute-force loop."""

from __future__ import annotations

import numpy as np
import pandas as pd


def _manifest(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 90, n)
    age[rng.random(n) < 0.2] = np.nan
    sex = rng.choice(np.array(["M", "F", None], dtype=object), n)
    site = rng.choice(np.array(["S3", "S1", "S10", "S2"], dtype=object), n)
    return pd.DataFrame({"age": age, "sex": sex, "site": site, "patient_id": [f"p{i}" for i in range(n)]})


def _brute_force(df: pd.DataFrame) -> np.ndarray:
    sexes = sorted({s for s in df["sex"] if isinstance(s, str)})
    sites = sorted({s for s in df["site"] if isinstance(s, str)})
    rows = []
    for _, r in df.iterrows():
        sex = float(sexes.index(r["sex"])) if isinstance(r["sex"], str) else np.nan
        site = float(sites.index(r["site"])) if isinstance(r["site"], str) else np.nan
        rows.append([r["age"], sex, site])
    return np.asarray(rows, dtype=np.float32)
