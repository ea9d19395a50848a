"""Prior vectors from manifest metadata: :class:`PriorEncoder`, a fitted estimator (scaling, category codes).

Fit it on the training manifest, save it with the run, and use it to turn a manifest row into the ``(P,)`` prior vector
that the kernels read (continuous attributes first, then categorical codes; NaN for a missing value).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from monai_du.io import write_text_atomic

__all__ = ["PriorEncoder", "DEFAULT_MISSING_VALUES"]

#: Strings read as a missing value (compared after ``strip().lower()``), besides ``None``, NaN and ``pd.NA``.
DEFAULT_MISSING_VALUES: tuple[str, ...] = ("", "nan", "none", "na", "n/a", "null", "unknown")

_ENCODER_FORMAT = "monai_du.PriorEncoder"
_ENCODER_FORMAT_VERSION = 1


def _unwrap_scalar(value: Any) -> Any:
    """Tensor / array of one element -> Python scalar; empty -> None; everything else unchanged."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        size = value.numel() if isinstance(value, torch.Tensor) else value.size
        if size == 0:
            return None
        if size != 1:
            raise ValueError(f"expected a scalar metadata value, got an array of shape {tuple(value.shape)}")
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _is_missing_scalar(value: Any) -> bool:
    if value is None:
        return True
    try:
        result = pd.isna(value)
    except (TypeError, ValueError):
        return False
    return bool(result) if isinstance(result, (bool, np.bool_)) else False


class PriorEncoder:
    """Turn metadata attributes into a float32 prior vector ``(P,)``, with codes and statistics fitted on a manifest.

    The vector holds the ``continuous`` attributes first, then the ``categorical`` ones, each in the order given;
    :attr:`columns` maps each attribute name to its index, so kernels can be pointed at them
    (``RBFKernel(columns=[encoder.index("age")])``).

    - **Categorical** attributes get integer codes (stored as floats), in the sorted order of their category tokens
      seen by :meth:`fit`. A value is turned into its token as ``str(value).strip()``, except that integral numbers
      are written without a decimal point (``1``, ``1.0`` and ``"1"`` are the same category). Sorting is by string,
      so numeric sites sort as text (``"10" < "2"``); codes are labels, only their equality matters. A category not
      seen during ``fit`` encodes as NaN.
    - **Continuous** attributes are kept in their raw units by default (e.g. age in years), which keeps kernel
      bandwidths interpretable. ``fit`` always records their mean, standard deviation (population, ``ddof=0``), min,
      max and counts; with ``standardize=True`` values are encoded as ``(x - mean) / std`` (``x - mean`` when the
      standard deviation is 0 or undefined).
    - **Missing** values (``None``, NaN, ``pd.NA`` and the strings in ``missing_values``, case-insensitive) encode as
      NaN. A non-numeric string in a continuous attribute is an error that names the attribute (and, in ``fit``, the
      row).

    Save the fitted encoder with the run (:meth:`save` / :meth:`load`, JSON), and fit it on the training split only.

    Args:
        continuous: names of continuous attributes (manifest columns / data-dict keys), e.g. ``["age"]``.
        categorical: names of categorical attributes, e.g. ``["sex", "site"]``.
        standardize: encode continuous attributes as z-scores instead of raw values.
        missing_values: strings read as missing (after ``strip().lower()``).

    Example::

        encoder = PriorEncoder(continuous=["age"], categorical=["sex", "site"]).fit(train_df)
        encoder.transform_row({"age": 63.0, "sex": "F", "site": "A"})  # array([63., 0., 0.], dtype=float32)
        encoder.index("sex")  # 1
    """

    def __init__(
        self,
        continuous: Sequence[str] | str | None = None,
        categorical: Sequence[str] | str | None = None,
        standardize: bool = False,
        missing_values: Sequence[str] = DEFAULT_MISSING_VALUES,
    ) -> None:
        self.continuous = self._names(continuous, "continuous")
        self.categorical = self._names(categorical, "categorical")
        names = self.continuous + self.categorical
        if not names:
            raise ValueError("PriorEncoder: give at least one attribute in continuous= or categorical=.")
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"PriorEncoder: attribute(s) {duplicated} are listed more than once.")
        if not isinstance(standardize, (bool, np.bool_)):
            raise ValueError(f"PriorEncoder: standardize must be a bool, got {standardize!r}.")
        self.standardize = bool(standardize)
        self.missing_values = tuple(sorted({str(m).strip().lower() for m in missing_values}))
        self.categories: dict[str, list[str]] | None = None
        self.stats: dict[str, dict[str, float | int | None]] | None = None
        self._code_maps: dict[str, dict[str, int]] = {}

    @staticmethod
    def _names(value: Sequence[str] | str | None, what: str) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        names = list(value)
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"PriorEncoder: {what} attribute names must be non-empty strings, got {name!r}.")
        return names

    # ----- description ---------------------------------------------------------------------------------------------

    @property
    def attributes(self) -> list[str]:
        """Attribute names in prior-vector order (continuous first, then categorical)."""
        return self.continuous + self.categorical

    @property
    def columns(self) -> dict[str, int]:
        """Attribute name -> index in the prior vector, in vector order."""
        return {name: i for i, name in enumerate(self.attributes)}

    @property
    def num_features(self) -> int:
        """Length ``P`` of the prior vector."""
        return len(self.attributes)

    def __len__(self) -> int:
        return self.num_features

    def index(self, name: str) -> int:
        """Index of attribute ``name`` in the prior vector."""
        columns = self.columns
        if name not in columns:
            raise ValueError(f"PriorEncoder: unknown attribute {name!r}; the prior holds {self.attributes}.")
        return columns[name]

    @property
    def continuous_columns(self) -> list[int]:
        """Indices of the continuous attributes in the prior vector."""
        return list(range(len(self.continuous)))

    @property
    def categorical_columns(self) -> list[int]:
        """Indices of the categorical attributes in the prior vector."""
        return list(range(len(self.continuous), self.num_features))

    @property
    def is_fitted(self) -> bool:
        return self.categories is not None and self.stats is not None

    def __repr__(self) -> str:
        parts = [f"continuous={self.continuous}", f"categorical={self.categorical}"]
        if self.standardize:
            parts.append("standardize=True")
        if self.is_fitted:
            assert self.categories is not None
            n_cat = ", ".join(f"{k}: {len(v)}" for k, v in self.categories.items())
            parts.append(f"fitted=True, categories={{{n_cat}}}")
        else:
            parts.append("fitted=False")
        return f"{type(self).__name__}({', '.join(parts)})"

    # ----- parsing of single values ---------------------------------------------------------------------------------

    def _is_missing(self, value: Any) -> bool:
        if _is_missing_scalar(value):
            return True
        return isinstance(value, str) and value.strip().lower() in self.missing_values

    def _category_token(self, value: Any) -> str | None:
        value = _unwrap_scalar(value)
        if self._is_missing(value):
            return None
        if isinstance(value, bool):
            return str(value)
        if isinstance(value, float):
            if math.isinf(value):
                return str(value)
            return str(int(value)) if value.is_integer() else repr(value)
        if isinstance(value, int):
            return str(value)
        return str(value).strip()

    def _number(self, value: Any, name: str) -> float:
        value = _unwrap_scalar(value)
        if self._is_missing(value):
            return math.nan
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise ValueError(f"PriorEncoder: attribute {name!r} must be numeric, cannot read {value!r}.") from None
        if math.isinf(number):
            raise ValueError(f"PriorEncoder: attribute {name!r} is infinite ({value!r}).")
        return number

    # ----- fitting ------------------------------------------------------------------------------------------------

    def _check_columns(self, df: pd.DataFrame) -> None:
        if not isinstance(df, pd.DataFrame):
            raise ValueError(f"PriorEncoder: expected a pandas DataFrame, got {type(df).__name__}.")
        missing = [name for name in self.attributes if name not in df.columns]
        if missing:
            raise ValueError(
                f"PriorEncoder: manifest has no column(s) {missing}; available columns: {list(df.columns)}."
            )

    def _numbers(self, series: pd.Series, name: str) -> np.ndarray:
        out = np.empty(len(series), dtype=np.float64)
        for i, (row, value) in enumerate(series.items()):
            try:
                out[i] = self._number(value, name)
            except ValueError as err:
                raise ValueError(f"{err} (manifest row {row!r}, column {name!r})") from None
        return out

    def fit(self, df: pd.DataFrame) -> PriorEncoder:
        """Learn category codes and continuous statistics from a (training) manifest.

        Args:
            df: manifest with one column per attribute.

        Returns:
            ``self``, fitted.
        """
        self._check_columns(df)
        categories: dict[str, list[str]] = {}
        for name in self.categorical:
            tokens = {self._category_token(v) for v in df[name].tolist()}
            categories[name] = sorted(t for t in tokens if t is not None)
        stats: dict[str, dict[str, float | int | None]] = {}
        for name in self.continuous:
            values = self._numbers(df[name], name)
            finite = values[~np.isnan(values)]
            count = int(finite.size)
            stats[name] = {
                "mean": float(finite.mean()) if count else None,
                "std": float(finite.std(ddof=0)) if count else None,
                "min": float(finite.min()) if count else None,
                "max": float(finite.max()) if count else None,
                "count": count,
                "n_missing": int(values.size - count),
            }
        self.categories = categories
        self.stats = stats
        self._code_maps = {name: {tok: i for i, tok in enumerate(cats)} for name, cats in categories.items()}
        return self

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"{self!r} is not fitted; call .fit(train_df) or PriorEncoder.load(path) first.")

    def _scale(self, value: float, name: str) -> float:
        if not self.standardize or math.isnan(value):
            return value
        assert self.stats is not None
        mean, std = self.stats[name]["mean"], self.stats[name]["std"]
        if mean is None:
            return math.nan
        centred = value - float(mean)
        return centred / float(std) if std is not None and float(std) > 0 else centred

    # ----- encoding -----------------------------------------------------------------------------------------------

    def transform_row(self, row: Mapping[str, Any], allow_missing_keys: bool = False) -> np.ndarray:
        """Encode one sample's metadata.

        Args:
            row: mapping from attribute name to value (a data dict, a manifest row as a dict or ``pd.Series``).
            allow_missing_keys: encode an absent attribute as NaN instead of raising.

        Returns:
            float32 array ``(P,)``, NaN where a value is missing or a category is unknown.
        """
        self._require_fitted()
        out = np.full(self.num_features, np.nan, dtype=np.float32)
        for i, name in enumerate(self.attributes):
            if name not in row:
                if allow_missing_keys:
                    continue
                raise ValueError(
                    f"PriorEncoder: sample has no key {name!r} (needed for the prior); keys present: {list(row)}."
                )
            value = row[name]
            if name in self._code_maps:
                token = self._category_token(value)
                code = self._code_maps[name].get(token) if token is not None else None
                out[i] = np.nan if code is None else float(code)
            else:
                out[i] = self._scale(self._number(value, name), name)
        return out

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """Encode every row of a manifest.

        Args:
            df: manifest with one column per attribute.

        Returns:
            float32 array ``(N, P)``.
        """
        self._require_fitted()
        self._check_columns(df)
        out = np.full((len(df), self.num_features), np.nan, dtype=np.float32)
        for i, name in enumerate(self.attributes):
            if name in self._code_maps:
                codes = self._code_maps[name]
                tokens = [self._category_token(v) for v in df[name].tolist()]
                out[:, i] = [np.nan if t is None or t not in codes else float(codes[t]) for t in tokens]
            else:
                values = self._numbers(df[name], name)
                out[:, i] = [self._scale(float(v), name) for v in values]
        return out

    def with_unseen_categories(self, df: pd.DataFrame) -> PriorEncoder:
        """A copy that also codes the categories of ``df`` unseen at fit time, for rows outside the training set.

        Known tokens keep their codes; each unseen token gets a new code after them, so that it matches only itself in
        a categorical kernel (rather than NaN, which the kernels read as *unknown*). Continuous statistics are
        unchanged.
        """
        self._require_fitted()
        self._check_columns(df)
        assert self.categories is not None
        out = copy.deepcopy(self)
        for name in self.categorical:
            known = set(out.categories[name])
            tokens = {self._category_token(v) for v in df[name].tolist()}
            out.categories[name] = out.categories[name] + sorted(t for t in tokens if t is not None and t not in known)
            out._code_maps[name] = {tok: i for i, tok in enumerate(out.categories[name])}
        return out

    def fit_transform(self, df: pd.DataFrame) -> np.ndarray:
        """``fit(df)`` then ``transform(df)``."""
        return self.fit(df).transform(df)

    def __call__(self, row: Mapping[str, Any]) -> np.ndarray:
        return self.transform_row(row)

    # ----- persistence ----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (NaN written as ``null``)."""
        return {
            "format": _ENCODER_FORMAT,
            "version": _ENCODER_FORMAT_VERSION,
            "continuous": list(self.continuous),
            "categorical": list(self.categorical),
            "standardize": self.standardize,
            "missing_values": list(self.missing_values),
            "columns": self.columns,
            "categories": None if self.categories is None else {k: list(v) for k, v in self.categories.items()},
            "stats": None if self.stats is None else {k: dict(v) for k, v in self.stats.items()},
        }

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> PriorEncoder:
        """Rebuild an encoder from :meth:`to_dict` output."""
        if not isinstance(spec, Mapping) or spec.get("format") != _ENCODER_FORMAT:
            raise ValueError(f"PriorEncoder.from_dict: not a PriorEncoder description (format != {_ENCODER_FORMAT!r}).")
        if int(spec.get("version", -1)) > _ENCODER_FORMAT_VERSION:
            raise ValueError(f"PriorEncoder.from_dict: unsupported version {spec.get('version')!r}.")
        missing = [k for k in ("continuous", "categorical", "categories", "stats") if k not in spec]
        if missing:
            raise ValueError(f"PriorEncoder.from_dict: missing field(s) {missing}.")
        encoder = cls(
            continuous=spec["continuous"],
            categorical=spec["categorical"],
            standardize=bool(spec.get("standardize", False)),
            missing_values=spec.get("missing_values", DEFAULT_MISSING_VALUES),
        )
        categories, stats = spec["categories"], spec["stats"]
        if (categories is None) != (stats is None):
            raise ValueError("PriorEncoder.from_dict: 'categories' and 'stats' must both be present or both null.")
        if categories is not None:
            absent = [n for n in encoder.categorical if n not in categories] + [
                n for n in encoder.continuous if n not in stats
            ]
            if absent:
                raise ValueError(f"PriorEncoder.from_dict: no fitted codes/statistics for attribute(s) {absent}.")
            encoder.categories = {n: [str(c) for c in categories[n]] for n in encoder.categorical}
            encoder.stats = {n: dict(stats[n]) for n in encoder.continuous}
            encoder._code_maps = {n: {t: i for i, t in enumerate(c)} for n, c in encoder.categories.items()}
        return encoder

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON (atomically: temporary file then rename). Returns the path."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> PriorEncoder:
        """Read an encoder written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"PriorEncoder.load: no such file {str(path)!r}.")
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"PriorEncoder.load: {str(path)!r} is not valid JSON ({err}).") from None
        try:
            return cls.from_dict(spec)
        except ValueError as err:
            raise ValueError(f"{err} (file {str(path)!r})") from None
