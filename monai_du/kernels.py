"""Prior kernels: similarity between samples' prior vectors (weak metadata or generative-model embeddings).

A kernel maps a prior tensor ``x`` of shape (B, P) to a (B, B) Gram matrix ``K[i, j] = k(x[i], x[j])``. Each kernel
reads its own ``columns`` of the prior, so that kernels on age, sex and site compose on one tensor::

    kernel = RBFKernel("knn", columns=[0]) * CategoricalKernel(columns=[1]) * CategoricalKernel(columns=[2])
    kernel.fit(train_prior)   # bandwidth rules, category frequencies and column statistics
    K = kernel(prior)         # (B, B)

Missing values (NaN) follow one rule for every kernel: an unknown attribute is replaced by its *expected feature*
under the training marginal (the kernel mean embedding). The kernel stays positive semi-definite, the factor of a
missing attribute discriminates only as much as the population does, and a NaN never reaches the loss:

- ``CategoricalKernel``: ``k(missing, c) = p_c`` (training frequency of ``c``) and
  ``k(missing, missing) = sum_c p_c^2``.
  With ``missing="singleton"`` (identity attributes such as a patient id, see :func:`patient_time_kernel`) a missing
  code is instead a category of its own: it matches only the sample itself.
- ``RBFKernel`` (per column, with training mean ``m`` and variance ``v``, bandwidth ``s``):
  ``k(missing, y) = sqrt(s^2 / (s^2 + v)) * exp(-(y - m)^2 / (2 (s^2 + v)))`` and
  ``k(missing, missing) = sqrt(s^2 / (s^2 + 2 v))``. This is exact for a Gaussian marginal.
- ``CosineKernel``: a missing coordinate takes its training mean before normalisation.

Unfitted kernels use the current batch's statistics for the missing-value rule; bandwidth rules (``"median"``,
``"scott"``, ``"silverman"``, ``"knn"``, ``"gap"``) must be fitted on training data with :meth:`PriorKernel.fit`.
:meth:`PriorKernel.to_dict` writes the ``__init__`` arguments and every fitted attribute (names ending in ``_``, as in
scikit-learn), and :func:`kernel_from_dict` rebuilds the same kernel.

Kernels are computed in float32 or float64 whatever the input: half-precision priors are upcast and autocast is off
inside the kernel (a bfloat16 Gram matrix is off by 1e-2, which the ridge solve amplifies).

Low-rank feature maps ``F`` (B, r) with ``K = F F^T`` are exact for categorical and cosine kernels, and approximate
(random Fourier features) for the RBF. Products take row-wise Kronecker products and sums concatenate.
:func:`nystrom_features` gives a low-rank map of any kernel from a few of its columns (pivoted Cholesky).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "PriorKernel",
    "RBFKernel",
    "CategoricalKernel",
    "CosineKernel",
    "ProductKernel",
    "SumKernel",
    "ScaledKernel",
    "BANDWIDTH_RULES",
    "kernel_from_dict",
    "kernel_summary",
    "nystrom_features",
    "patient_time_kernel",
]

BANDWIDTH_RULES = ("median", "scott", "silverman", "knn")
_GAP_RULE = "gap"  # median gap between a group's consecutive values (needs ``group_column``)
_OUTLIER_RATIO = 3.0  # a rule's bandwidth above this multiple of its robust counterpart is "dominated by outliers"


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "to_numpy"):  # pandas
        x = x.to_numpy(dtype=np.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _check_prior(x: torch.Tensor, name: str = "prior") -> torch.Tensor:
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (B, P), got {tuple(x.shape)}.")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # kernels and solves never run in half precision
    elif not torch.is_floating_point(x):
        x = x.to(torch.get_default_dtype())
    if torch.isinf(x).any():
        raise ValueError(f"{name} holds infinite values; use NaN to mark a missing attribute.")
    return x


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context in which autocast is disabled on ``device_type`` (a no-op where it is not enabled)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except (RuntimeError, ValueError):  # a device type without autocast
        enabled = False
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


def _jsonable(value: Any) -> Any:
    if isinstance(value, PriorKernel):
        return value.to_dict()
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _init_names(cls: type) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


class PriorKernel:
    """Base class of prior kernels. Subclasses implement ``_gram`` and optionally ``_features`` and ``_fit``.

    ``_gram(x, y, ref)`` computes the kernel between the selected columns of ``x`` (B, p) and ``y`` (B', p); ``ref``
    holds the rows whose statistics an unfitted kernel uses for missing values (default: ``x`` and ``y``), and
    ``y is x`` marks the Gram matrix of one batch with itself.

    Args:
        columns: indices of the prior columns this kernel reads; ``None`` reads all of them.
    """

    exact_features: bool = False  # whether ``feature_map`` is exact (True) or an approximation (False)

    def __init__(self, columns: Sequence[int] | int | None = None) -> None:
        if isinstance(columns, int):
            columns = [columns]
        if columns is not None:
            columns = [int(c) for c in columns]
            if len(columns) == 0 or any(c < 0 for c in columns):
                raise ValueError(f"columns must be a non-empty list of non-negative indices, got {columns}.")
        self.columns = columns

    # -- public API -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Gram matrix between ``x`` (B, P) and ``y`` (B', P) (default ``x``); returns (B, B'). Priors carry no
        gradient, and the result is float32 or float64."""
        x = _check_prior(_as_tensor(x))
        with _autocast_off(x.device.type):
            sx = self._select(x)
            sy = sx if y is None else self._select(_check_prior(_as_tensor(y), "y"))
            return self._gram(sx, sy)

    @torch.no_grad()
    def gram_columns(self, x: torch.Tensor, index: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Columns ``K[:, index]`` (B, len(index)) of the batch kernel ``K = self(x)``, without forming ``K``."""
        x = _check_prior(_as_tensor(x))
        index = torch.as_tensor(index, dtype=torch.long, device=x.device)
        with _autocast_off(x.device.type):
            sx = self._select(x)
            return self._gram_columns(sx, index)

    @torch.no_grad()
    def diagonal(self, x: torch.Tensor) -> torch.Tensor:
        """The diagonal ``K[i, i]`` (B,) of the batch kernel ``K = self(x)``, in O(B) kernel evaluations."""
        x = _check_prior(_as_tensor(x))
        with _autocast_off(x.device.type):
            return self._diagonal(self._select(x))

    def fit(self, prior: Any, groups: Any = None) -> PriorKernel:
        """Fit bandwidth rules and column statistics on training priors (N, P) (tensor, array or DataFrame).

        Args:
            prior: (N, P) training priors.
            groups: optional (N,) labels of the groups that batches are drawn within (e.g. the site, for a
                within-site sampler). The ``"knn"`` rule then measures neighbours inside such batches.
        """
        prior = _check_prior(_as_tensor(prior)).to(torch.float64)
        if groups is not None:
            groups = np.asarray(groups.tolist() if hasattr(groups, "tolist") else list(groups), dtype=object)
            if len(groups) != prior.shape[0]:
                raise ValueError(f"groups has {len(groups)} entries for {prior.shape[0]} prior rows.")
        self._fit(self._select(prior), groups, prior)
        return self

    def feature_map(self, x: torch.Tensor, approximate: bool = False) -> torch.Tensor | None:
        """Features ``F`` (B, r) with ``K ≈ F F^T``, or None when the kernel has none (or only an approximate one
        and ``approximate`` is False)."""
        x = _check_prior(_as_tensor(x))
        if not self.exact_features and not approximate:
            return None
        with _autocast_off(x.device.type):
            return self._features(self._select(x), approximate)

    def block_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        """Integer group ids (B,) such that ``K[i, j] == 0`` whenever the ids differ, or None if unknown."""
        return None

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has run: then missing values use training statistics, not the batch's."""
        return getattr(self, "mean_", None) is not None

    def get_params(self) -> dict[str, Any]:
        """The ``__init__`` arguments that rebuild this kernel (component kernels included, as kernels)."""
        return {name: self._param(name) for name in _init_names(type(self))}

    def fitted_params(self) -> dict[str, Any]:
        """Every fitted attribute: the public attributes whose name ends with ``_`` (scikit-learn's convention)."""
        return {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}

    def to_dict(self) -> dict:
        """JSON-serialisable description: the type, the ``__init__`` arguments and every fitted attribute (see
        :func:`kernel_from_dict`)."""
        out: dict[str, Any] = {"type": type(self).__name__}
        out.update({k: _jsonable(v) for k, v in self.get_params().items()})
        out.update({k: _jsonable(v) for k, v in self.fitted_params().items()})
        return out

    # -- composition --------------------------------------------------------------------------------------------------
    def __mul__(self, other: Any) -> PriorKernel:
        if isinstance(other, (int, float)):
            return ScaledKernel(self, float(other))
        if not isinstance(other, PriorKernel):
            return NotImplemented
        return ProductKernel(self, other)

    def __rmul__(self, other: Any) -> PriorKernel:
        return self.__mul__(other)

    def __add__(self, other: Any) -> PriorKernel:
        if not isinstance(other, PriorKernel):
            return NotImplemented
        return SumKernel(self, other)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if v is not None)
        return f"{type(self).__name__}({args})"

    # -- helpers for subclasses ---------------------------------------------------------------------------------------
    def _param(self, name: str) -> Any:
        return getattr(self, name)

    def _select(self, x: torch.Tensor) -> torch.Tensor:
        if self.columns is None:
            return x
        if max(self.columns) >= x.shape[1]:
            raise ValueError(
                f"{type(self).__name__} reads prior columns {self.columns}, but the prior has shape {tuple(x.shape)}."
            )
        return x[:, self.columns]

    def _fit(self, x: torch.Tensor, groups: np.ndarray | None = None, full: torch.Tensor | None = None) -> None:
        pass

    def _gram(self, x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _gram_columns(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self._gram(x, x[index], x)

    def _diagonal(self, x: torch.Tensor) -> torch.Tensor:
        """``K[i, i]`` (B,) from diagonal chunks of the kernel (batch statistics from all of ``x``)."""
        parts = []
        for start in range(0, x.shape[0], 256):
            chunk = x[start : start + 256]
            parts.append(self._gram(chunk, chunk, x).diagonal())
        return torch.cat(parts)

    def _features(self, x: torch.Tensor, approximate: bool) -> torch.Tensor | None:
        return None


def _column_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN-aware column mean and (population) variance of (N, P); all-missing columns get mean 0 and variance 0."""
    observed = ~torch.isnan(x)
    count = observed.sum(0).clamp_min(1)
    filled = torch.where(observed, x, torch.zeros_like(x))
    mean = filled.sum(0) / count
    var = (torch.where(observed, x - mean, torch.zeros_like(x)) ** 2).sum(0) / count
    return mean, var


def _stats_rows(x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    """Rows whose statistics an unfitted kernel uses: ``ref`` if given, else ``x`` (and ``y`` unless it is ``x``)."""
    if ref is not None:
        return ref
    return x if y is x else torch.cat([x, y])


class RBFKernel(PriorKernel):
    """Gaussian kernel ``k(x, y) = exp(-sum_d (x_d - y_d)^2 / (2 * s_d^2))`` on the selected columns.

    Args:
        bandwidth: ``s``: a positive float, one positive float per column, or a rule fitted by :meth:`fit`:
            ``"median"`` (median pairwise distance), ``"scott"`` / ``"silverman"`` (per-column density-estimation
            rules), ``"knn"`` (median distance to the ``knn_k``-th nearest neighbour inside random batches of
            ``knn_batch_size`` training samples, so that each sample has about ``knn_k`` effective neighbours in a batch
            of that size) or ``"gap"`` (one column of offsets, e.g. days since a patient's first study: the median
            positive gap between consecutive values of one group, the group read from ``group_column``). The density
            rules are broad for contrastive priors: prefer ``"knn"`` (see DESIGN §1). ``fit`` warns when a few
            outlying values dominate a ``"scott"``, ``"silverman"`` or ``"median"`` bandwidth.
        columns: prior columns read by the kernel.
        knn_k: neighbour rank for the ``"knn"`` rule.
        knn_batch_size: batch size the ``"knn"`` rule is fitted for (use the training batch size).
        n_features: rank of the random Fourier feature map used by the low-rank path.
        seed: seed of the random Fourier features (the same on every rank).
        fourier: feature map of the low-rank path. ``"rff"``: random Fourier features of rank ``n_features``.
            ``"quadrature"`` (one column only): a deterministic trapezoid rule on the Gaussian spectral density, with
            a spacing chosen from the batch's range so that aliasing is below 1e-12; its rank grows with
            ``range / bandwidth``. ``"auto"``: quadrature for one column, random features otherwise.
        group_column: prior column holding the group (patient) codes of the ``"gap"`` rule.
    """

    def __init__(
        self,
        bandwidth: float | Sequence[float] | str = 1.0,
        columns: Sequence[int] | int | None = None,
        knn_k: int = 5,
        knn_batch_size: int = 256,
        n_features: int = 256,
        seed: int = 0,
        fourier: str = "auto",
        group_column: int | None = None,
    ) -> None:
        super().__init__(columns)
        if fourier not in ("auto", "rff", "quadrature"):
            raise ValueError(f"fourier must be 'auto', 'rff' or 'quadrature', got {fourier!r}.")
        self.fourier = fourier
        self.rule: str | None = None
        self.bandwidth_: list[float] | None = None
        if isinstance(bandwidth, str):
            if bandwidth not in BANDWIDTH_RULES + (_GAP_RULE,):
                raise ValueError(f"bandwidth rule must be one of {BANDWIDTH_RULES + (_GAP_RULE,)}, got {bandwidth!r}.")
            self.rule = bandwidth
        else:
            values = [float(b) for b in (bandwidth if isinstance(bandwidth, Sequence) else [bandwidth])]
            if len(values) == 0 or not all(math.isfinite(b) and b > 0 for b in values):
                raise ValueError(f"bandwidth must be positive and finite, got {bandwidth!r}.")
            if self.columns is not None and len(values) not in (1, len(self.columns)):
                raise ValueError(f"got {len(values)} bandwidths for {len(self.columns)} columns {self.columns}.")
            self.bandwidth_ = values
        if self.rule == _GAP_RULE:
            if group_column is None or int(group_column) < 0:
                raise ValueError("bandwidth rule 'gap' needs group_column: the prior column of the patient codes.")
            if self.columns is None or len(self.columns) != 1:
                raise ValueError(f"bandwidth rule 'gap' reads one column of offsets, got columns={self.columns}.")
            if int(group_column) in self.columns:
                raise ValueError(f"group_column {group_column} is also the offset column {self.columns}.")
        elif group_column is not None:
            raise ValueError(f"group_column is read by the 'gap' bandwidth rule only, got bandwidth={bandwidth!r}.")
        self.group_column = None if group_column is None else int(group_column)
        if knn_k < 1 or knn_batch_size < 2 or knn_k >= knn_batch_size:
            raise ValueError(f"need 1 <= knn_k < knn_batch_size, got knn_k={knn_k}, knn_batch_size={knn_batch_size}.")
        if n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}.")
        self.knn_k, self.knn_batch_size, self.n_features, self.seed = int(knn_k), int(knn_batch_size), n_features, seed
        self.mean_: list[float] | None = None
        self.var_: list[float] | None = None

    @property
    def bandwidth(self) -> list[float]:
        """The bandwidth per column (fitted value for a rule)."""
        if self.bandwidth_ is None:
            raise RuntimeError(
                f"RBFKernel(bandwidth={self.rule!r}) is not fitted: call .fit(train_prior) on the training priors."
            )
        return self.bandwidth_

    def _param(self, name: str) -> Any:
        if name == "bandwidth":
            return self.rule if self.rule else self.bandwidth_
        return super()._param(name)

    def __repr__(self) -> str:
        bw = f"{self.rule!r} -> {self.bandwidth_}" if self.rule else repr(self.bandwidth_)
        return f"RBFKernel(bandwidth={bw}, columns={self.columns})"

    def _fit(self, x: torch.Tensor, groups: np.ndarray | None = None, full: torch.Tensor | None = None) -> None:
        mean, var = _column_stats(x)
        self.mean_, self.var_ = mean.tolist(), var.tolist()
        if self.rule is None:
            return
        if self.rule == _GAP_RULE:
            if full is None or self.group_column >= full.shape[1]:
                shape = None if full is None else tuple(full.shape)
                raise ValueError(
                    f"the 'gap' rule reads group_column {self.group_column}, but the prior has shape {shape}."
                )
            self.bandwidth_ = [self._gap_scale(x[:, 0], full[:, self.group_column])]
            return
        keep = ~torch.isnan(x).any(1)
        complete = x[keep]
        n, d = complete.shape
        if n < 2:
            raise ValueError(f"cannot fit bandwidth rule {self.rule!r}: fewer than 2 rows without missing values.")
        gen = torch.Generator().manual_seed(self.seed)
        factor = 1.0
        if self.rule in ("scott", "silverman"):
            std = complete.std(0)
            factor = n ** (-1.0 / (d + 4))
            if self.rule == "silverman":
                factor *= (4.0 / (d + 2)) ** (1.0 / (d + 4))
            values = (std * factor).tolist()
        elif self.rule == "median":
            values = [self._median_scale(complete, gen)] * d
        else:  # knn: median k-th neighbour distance inside training batches like the sampler's
            values = [self._knn_scale(complete, None if groups is None else groups[keep.numpy()], gen)] * d
        bad = [i for i, v in enumerate(values) if not v > 0]
        if bad:
            raise ValueError(
                f"bandwidth rule {self.rule!r} gave a non-positive bandwidth for column(s) "
                f"{[self.columns[i] if self.columns else i for i in bad]}: the training values are (nearly) constant."
            )
        self.bandwidth_ = values
        if self.rule != "knn":  # the neighbourhood rule is local, so a few far values cannot dominate it
            self._warn_if_outliers(complete, values, factor)

    @staticmethod
    def _median_scale(x: torch.Tensor, gen: torch.Generator) -> float:
        sub = x[torch.randperm(len(x), generator=gen)[:2000]]
        dist = torch.cdist(sub, sub)
        iu = torch.triu_indices(len(sub), len(sub), 1)
        return float(dist[iu[0], iu[1]].quantile(0.5))

    def _warn_if_outliers(self, x: torch.Tensor, values: list[float], factor: float) -> None:
        """Warn when a density rule's bandwidth is set by a few far values rather than by the bulk of ``x`` (n, d).

        Robust counterparts: ``factor * IQR / 1.349`` per column for Scott and Silverman (the IQR-based scale, equal to
        the standard deviation for a Gaussian), and the median rule on the rows inside Tukey's far-out fences
        (``[Q1 - 3 IQR, Q3 + 3 IQR]``) for the median rule.
        """
        names = self.columns if self.columns is not None else list(range(x.shape[1]))
        q1, med, q3 = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75], dtype=x.dtype), dim=0)
        iqr = q3 - q1
        far = ((x < q1 - 3 * iqr) | (x > q3 + 3 * iqr)) & (iqr > 0)
        dev = (x - med).abs().max(0).values
        if self.rule in ("scott", "silverman"):
            robust = (factor * iqr / 1.349).tolist()
            how = f"{factor:.3g} * IQR / 1.349"
            flagged = [
                (i, robust[i]) for i in range(x.shape[1]) if 0 < robust[i] < values[i] / _OUTLIER_RATIO
            ]
        else:
            inside = ~far.any(1)
            if bool(inside.all()) or int(inside.sum()) < 2:
                return
            robust_value = self._median_scale(x[inside], torch.Generator().manual_seed(self.seed))
            how = "the median rule on the rows inside Tukey's far-out fences"
            flagged = []
            if robust_value > 0 and values[0] > _OUTLIER_RATIO * robust_value:
                flagged = [(i, robust_value) for i in range(x.shape[1]) if bool(far[:, i].any())]
        for i, robust_i in flagged:
            warnings.warn(
                f"RBFKernel bandwidth rule {self.rule!r}: the bandwidth {values[i]:.6g} fitted for prior column "
                f"{names[i]} is {values[i] / robust_i:.0f}x its robust scale {robust_i:.6g} ({how}). A few outlying "
                f"values (up to {float(dev[i]):.6g} from the median) dominate it, so the kernel is nearly constant "
                f"over the other rows. Check the column for entry or unit errors, or set bandwidth={robust_i:.6g} "
                f"(or use the 'knn' rule).",
                UserWarning,
                stacklevel=4,
            )

    def _gap_scale(self, t: torch.Tensor, group: torch.Tensor) -> float:
        """Median positive gap between consecutive values of ``t`` (N,) inside each group of ``group`` (N,)."""
        keep = ~(torch.isnan(t) | torch.isnan(group))
        t_np, g_np = t[keep].numpy(), group[keep].numpy()
        order = np.lexsort((t_np, g_np))
        t_np, g_np = t_np[order], g_np[order]
        gaps = np.diff(t_np)[g_np[1:] == g_np[:-1]]
        gaps = gaps[gaps > 0]
        if len(gaps) == 0:
            raise ValueError(
                f"bandwidth rule 'gap': no group (prior column {self.group_column}) has two different values in "
                f"column {self.columns[0]}; give the bandwidth as a number."
            )
        return float(np.median(gaps))

    def _knn_scale(self, x: torch.Tensor, groups: np.ndarray | None, gen: torch.Generator) -> float:
        """Median distance to the ``knn_k``-th neighbour inside batches of ``knn_batch_size`` rows of ``x`` (n, d).

        Without groups the batches are random draws; with groups each batch is drawn inside one group, groups being
        picked in proportion to their size (a batch larger than its group is the whole group).
        """
        if groups is None:
            pools = [torch.arange(len(x))]
        else:
            _, codes = np.unique(groups.astype(str), return_inverse=True)
            pools = [torch.from_numpy(np.flatnonzero(codes == g)) for g in range(codes.max() + 1)]
        pools = [p for p in pools if len(p) > self.knn_k]
        if not pools:
            raise ValueError(
                f"knn_k={self.knn_k} needs a group with at least {self.knn_k + 1} complete training rows."
            )
        sizes = torch.tensor([len(p) for p in pools], dtype=torch.float64)
        n_batches = max(1, min(20, 8192 // self.knn_batch_size))
        kth = []
        for g in torch.multinomial(sizes, n_batches, replacement=True, generator=gen).tolist():
            pool = pools[g]
            batch = x[pool[torch.randperm(len(pool), generator=gen)[: self.knn_batch_size]]]
            kth.append(torch.cdist(batch, batch).sort(1).values[:, self.knn_k])  # column 0 is the sample itself
        return float(torch.cat(kth).quantile(0.5))

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean_ is not None:
            return x.new_tensor(self.mean_), x.new_tensor(self.var_)
        return _column_stats(x)

    def _scales(self, x: torch.Tensor) -> torch.Tensor:
        bw = self.bandwidth
        if len(bw) == 1:
            bw = bw * x.shape[1]
        if len(bw) != x.shape[1]:
            raise ValueError(f"RBFKernel has {len(bw)} bandwidths but reads {x.shape[1]} prior columns.")
        return x.new_tensor(bw)

    def _gram(self, x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        s = self._scales(x)
        x_nan, y_nan = torch.isnan(x), torch.isnan(y)
        if not (x_nan.any() or y_nan.any()):
            xs, ys = x / s, y / s
            if x.shape[1] > 8 or x.dtype == torch.float64:
                # |x|^2 + |y|^2 - 2 x.y after centring: one matrix product; in float64 its rounding error (about
                # 1e-14 of the squared distances) is far below the float32 kernels' exact differences
                centre = xs.mean(0)
                xs, ys = xs - centre, ys - centre
                sq = torch.addmm((ys * ys).sum(1)[None, :], xs, ys.T, alpha=-2.0)
                sq.add_((xs * xs).sum(1, keepdim=True)).clamp_min_(0)
            else:  # float32: exact differences, one column at a time, in place
                sq = (xs[:, 0, None] - ys[None, :, 0]).square_()
                for d in range(1, x.shape[1]):
                    sq.add_((xs[:, d, None] - ys[None, :, d]).square_())
            return sq.mul_(-0.5).exp_()
        mean, var = self._stats(_stats_rows(x, y, ref))
        log_k = x.new_zeros(x.shape[0], y.shape[0])
        for d in range(x.shape[1]):
            s2, m, v = s[d] ** 2, mean[d], var[d]
            xd, yd = x[:, d, None], y[None, :, d]
            xm, ym = x_nan[:, d, None], y_nan[None, :, d]
            observed = -((xd - yd) ** 2) / (2 * s2)
            # one side missing: expected kernel under the marginal N(m, v)
            half = 0.5 * torch.log(s2 / (s2 + v))
            x_miss = half - (yd - m) ** 2 / (2 * (s2 + v))
            y_miss = half - (xd - m) ** 2 / (2 * (s2 + v))
            both_miss = 0.5 * torch.log(s2 / (s2 + 2 * v))
            term = torch.where(xm & ym, both_miss, torch.where(xm, x_miss, torch.where(ym, y_miss, observed)))
            log_k = log_k + term
        return torch.exp(log_k)

    def _diagonal(self, x: torch.Tensor) -> torch.Tensor:
        """1 for a complete row; a missing column contributes ``sqrt(s^2 / (s^2 + 2 v))``."""
        missing = torch.isnan(x)
        if not bool(missing.any()):
            return x.new_ones(x.shape[0])
        s2 = self._scales(x) ** 2
        var = self._stats(x)[1]
        log_both = 0.5 * torch.log(s2 / (s2 + 2 * var))
        return torch.exp((missing.to(x) * log_both).sum(1))

    def _features(self, x: torch.Tensor, approximate: bool) -> torch.Tensor:
        """Fourier features (B, r) of the RBF; missing columns use their expectation under N(mean, var)."""
        s = self._scales(x)
        mean, var = self._stats(x)
        missing = torch.isnan(x)
        filled = torch.where(missing, mean.expand_as(x), x)
        use_quadrature = self.fourier == "quadrature" or (self.fourier == "auto" and x.shape[1] == 1)
        if use_quadrature:
            if x.shape[1] != 1:
                raise ValueError(f"quadrature features need a single prior column, got {x.shape[1]}.")
            # trapezoid rule for k(d) = E_w cos(w d), w ~ N(0, 1): nodes k h on [0, 8.5]; aliasing stays below 1e-12
            # when 2 pi / h exceeds the largest scaled distance (missing values: plus 10 marginal deviations) by 12.
            span = float((filled.max() - filled.min()) / s[0])
            if missing.any():  # a missing value acts as a Gaussian of width sqrt(var) around the mean
                span += 10.0 * float(torch.sqrt(var[0]) / s[0])
            h = 2 * math.pi / (span + 12.0)
            w = torch.arange(0, int(math.ceil(8.5 / h)) + 1, dtype=x.dtype, device=x.device) * h
            a = h * torch.exp(-0.5 * w**2) / math.sqrt(2 * math.pi)
            a[1:] *= 2
            phase = (filled / s) * w[None, :]
            damp = torch.exp(-0.5 * missing.to(x) * (var / s**2) * w[None, :] ** 2)
            amp = torch.sqrt(a)[None, :] * damp
            return torch.cat([amp * torch.cos(phase), amp[:, 1:] * torch.sin(phase[:, 1:])], 1)
        d = x.shape[1]
        gen = torch.Generator().manual_seed(self.seed)
        w = torch.randn(d, self.n_features, generator=gen, dtype=torch.float64).to(x)
        b = (2 * math.pi * torch.rand(self.n_features, generator=gen, dtype=torch.float64)).to(x)
        phase = (filled / s) @ w + b
        # E[cos(w (m + sqrt(v) e) / s + b)] = exp(-w^2 v / (2 s^2)) cos(w m / s + b) for each missing column
        damp = (missing.to(x) * (var / s**2)) @ (w**2)
        return math.sqrt(2.0 / self.n_features) * torch.exp(-0.5 * damp) * torch.cos(phase)


class CategoricalKernel(PriorKernel):
    """Equality kernel on integer codes: ``k(x, y) = prod_d [x_d == y_d]`` over the selected columns.

    Its exact feature map is the one-hot code of the joint category, so the kernel DU loss can use Woodbury, and its
    batch kernel is block-diagonal (one block per joint category). ``fit`` stores the training frequency of each code.

    Args:
        columns: prior columns holding the codes.
        missing: how a missing code (NaN) is compared. ``"expected"`` (default): the expected feature under the
            training frequencies (see the module docstring); right for attributes such as sex or site, where a missing
            value is one of the known categories. ``"singleton"``: a missing code is a category of its own that matches
            only the sample itself (``k = 1`` on the diagonal, 0 elsewhere); right for identity attributes such as a
            patient id, where an unknown or unseen patient (the prior encoder codes it NaN) matches no one. It keeps the
            kernel block-diagonal (each such sample is a block), where the expected feature links every block.
    """

    exact_features = True

    def __init__(self, columns: Sequence[int] | int | None = None, missing: str = "expected") -> None:
        super().__init__(columns)
        if missing not in ("expected", "singleton"):
            raise ValueError(f"missing must be 'expected' or 'singleton', got {missing!r}.")
        self.missing = missing
        self.categories_: list[list[float]] | None = None
        self.frequencies_: list[list[float]] | None = None

    @property
    def is_fitted(self) -> bool:
        return self.categories_ is not None

    def __repr__(self) -> str:
        mode = "" if self.missing == "expected" else f", missing={self.missing!r}"
        if self.categories_ is None:
            fitted = ""
        elif sum(len(c) for c in self.categories_) > 20:
            fitted = f", {[len(c) for c in self.categories_]} categories_"
        else:
            fitted = f", categories_={self.categories_}"
        return f"CategoricalKernel(columns={self.columns}{mode}{fitted})"

    def _fit(self, x: torch.Tensor, groups: np.ndarray | None = None, full: torch.Tensor | None = None) -> None:
        self.categories_, self.frequencies_ = [], []
        for d in range(x.shape[1]):
            col = x[:, d][~torch.isnan(x[:, d])]
            values, counts = torch.unique(col, return_counts=True)
            self.categories_.append(values.tolist())
            self.frequencies_.append((counts / counts.sum().clamp_min(1)).tolist())

    def _codebook(self, ref: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted categories (C,) of column ``d`` and their probabilities (C,): fitted, else from the batch ``ref``."""
        if self.categories_ is not None:
            if len(self.categories_) != ref.shape[1]:
                raise ValueError(
                    f"CategoricalKernel was fitted on {len(self.categories_)} columns, got {ref.shape[1]}."
                )
            cats, probs = ref.new_tensor(self.categories_[d]), ref.new_tensor(self.frequencies_[d])
            order = torch.argsort(cats)
            return cats[order], probs[order]
        col = ref[:, d][~torch.isnan(ref[:, d])]
        values, counts = torch.unique(col, return_counts=True)
        return values, counts.to(ref) / counts.sum().clamp_min(1)

    @staticmethod
    def _probability(col: torch.Tensor, cats: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Probability (B,) of each code of ``col`` (B,) under the codebook; 0 for codes absent from it (and NaN)."""
        if len(cats) == 0:
            return torch.zeros_like(col)
        filled = torch.where(torch.isnan(col), cats[0], col)
        pos = torch.searchsorted(cats, filled).clamp_max_(len(cats) - 1)
        hit = (cats[pos] == filled) & ~torch.isnan(col)
        return torch.where(hit, probs[pos], torch.zeros_like(col))

    @staticmethod
    def _column_features(col: torch.Tensor, cats: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """One-hot codes (B, C) of ``col`` (B,) over ``cats``; a missing value gets the probability vector."""
        onehot = (col[:, None] == cats[None, :]).to(col)
        return torch.where(torch.isnan(col)[:, None], probs[None, :].expand_as(onehot), onehot)

    def _gram(self, x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        out = None
        for d in range(x.shape[1]):
            xd, yd = x[:, d], y[:, d]
            equal = (xd[:, None] == yd[None, :]).to(x)  # also matches codes unseen in training to themselves
            xm, ym = torch.isnan(xd), torch.isnan(yd)
            if self.missing == "singleton":
                if y is x and bool(xm.any()):
                    equal.diagonal().masked_fill_(xm, 1.0)
            elif bool(xm.any()) or bool(ym.any()):
                cats, probs = self._codebook(_stats_rows(x, y, ref), d)
                qx, qy = self._probability(xd, cats, probs), self._probability(yd, cats, probs)
                both = (probs * probs).sum()
                one = torch.where(xm[:, None], qy[None, :].expand_as(equal), qx[:, None].expand_as(equal))
                equal = torch.where(xm[:, None] & ym[None, :], both, torch.where(xm[:, None] | ym[None, :], one, equal))
            out = equal if out is None else out.mul_(equal)
        return out

    def _gram_columns(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = self._gram(x, x[index], x)
        if self.missing == "singleton":
            own = torch.isnan(x[index]).any(1)  # a sample with a missing code still matches itself
            out[index[own], own.nonzero(as_tuple=True)[0]] = 1.0
        return out

    def _features(self, x: torch.Tensor, approximate: bool) -> torch.Tensor:
        feats = None
        for d in range(x.shape[1]):
            col = x[:, d]
            missing = torch.isnan(col)
            if self.missing == "singleton":
                f = (col[:, None] == torch.unique(col[~missing])[None, :]).to(x)
                if bool(missing.any()):  # each sample with a missing code gets a feature of its own
                    own = x.new_zeros(len(col), int(missing.sum()))
                    own[missing.nonzero(as_tuple=True)[0], torch.arange(own.shape[1], device=x.device)] = 1.0
                    f = torch.cat([f, own], 1)
            else:
                cats, probs = self._codebook(x, d)
                f = self._column_features(col, cats, probs)
                observed = col[~missing]
                unseen = torch.unique(observed[~torch.isin(observed, cats)])
                if len(unseen):  # codes absent from training each get their own feature
                    f = torch.cat([f, (col[:, None] == unseen[None, :]).to(x)], 1)
            feats = f if feats is None else _row_kron(feats, f)
        return _drop_zero_columns(feats)

    def block_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        x = self._select(_check_prior(_as_tensor(x)))
        missing = torch.isnan(x).any(1)
        if not bool(missing.any()):
            return torch.unique(x, dim=0, return_inverse=True)[1]
        if self.missing != "singleton":
            return None  # a missing code links its sample to every group
        ids = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        start = 0
        if bool((~missing).any()):
            ids[~missing] = torch.unique(x[~missing], dim=0, return_inverse=True)[1]
            start = int(ids[~missing].max()) + 1
        ids[missing] = start + torch.arange(int(missing.sum()), device=x.device)
        return ids


class CosineKernel(PriorKernel):
    """Cosine similarity ``k(x, y) = <x, y> / (||x|| ||y||)`` for embedding priors (e.g. generative-model features).

    Missing coordinates take their training (or batch) mean before normalisation. A zero vector has a zero feature,
    so its row of ``K`` is zero rather than NaN. Exact feature map: the normalised vectors (rank P).
    """

    exact_features = True

    def __init__(self, columns: Sequence[int] | int | None = None) -> None:
        super().__init__(columns)
        self.mean_: list[float] | None = None

    def _fit(self, x: torch.Tensor, groups: np.ndarray | None = None, full: torch.Tensor | None = None) -> None:
        self.mean_ = _column_stats(x)[0].tolist()

    def _unit(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        missing = torch.isnan(x)
        filled = x
        if bool(missing.any()):
            mean = x.new_tensor(self.mean_) if self.mean_ is not None else _column_stats(ref)[0]
            filled = torch.where(missing, mean.expand_as(x), x)
        norm = filled.norm(dim=1, keepdim=True)
        return torch.where(norm > 0, filled / norm.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(filled))

    def _features(self, x: torch.Tensor, approximate: bool = False) -> torch.Tensor:
        return self._unit(x, x)

    def _gram(self, x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        ref = _stats_rows(x, y, ref)
        fx = self._unit(x, ref)
        fy = fx if y is x else self._unit(y, ref)
        return fx @ fy.T


def _row_kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: (B, r) and (B, q) -> (B, r*q)."""
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)


def _drop_zero_columns(f: torch.Tensor) -> torch.Tensor:
    keep = f.abs().sum(0) > 0
    return f[:, keep] if not bool(keep.all()) else f


class _PairKernel(PriorKernel):
    """A binary composition of two kernels; each reads its own columns."""

    symbol = "?"

    def __init__(self, k1: PriorKernel, k2: PriorKernel) -> None:
        super().__init__(None)
        if not (isinstance(k1, PriorKernel) and isinstance(k2, PriorKernel)):
            raise ValueError(f"{type(self).__name__} composes two PriorKernels, got {type(k1).__name__} and "
                             f"{type(k2).__name__}.")
        self.k1, self.k2 = k1, k2
        self.exact_features = k1.exact_features and k2.exact_features

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self._combine(self.k1(x, y), self.k2(x, y))

    def gram_columns(self, x: torch.Tensor, index: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return self._combine(self.k1.gram_columns(x, index), self.k2.gram_columns(x, index))

    def diagonal(self, x: torch.Tensor) -> torch.Tensor:
        return self._combine(self.k1.diagonal(x), self.k2.diagonal(x))

    def fit(self, prior: Any, groups: Any = None) -> _PairKernel:
        self.k1.fit(prior, groups)
        self.k2.fit(prior, groups)
        return self

    def feature_map(self, x: torch.Tensor, approximate: bool = False) -> torch.Tensor | None:
        if not self.exact_features and not approximate:
            return None
        f1 = self.k1.feature_map(x, approximate)
        f2 = None if f1 is None else self.k2.feature_map(x, approximate)
        if f1 is None or f2 is None:
            return None
        return self._combine_features(f1, f2)

    @property
    def is_fitted(self) -> bool:
        return self.k1.is_fitted and self.k2.is_fitted

    def __repr__(self) -> str:
        return f"({self.k1!r} {self.symbol} {self.k2!r})"

    def _combine(self, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _combine_features(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ProductKernel(_PairKernel):
    """``k(x, y) = k1(x, y) * k2(x, y)``. Features: row-wise Kronecker product. Zero blocks of either factor stay."""

    symbol = "*"

    def _combine(self, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        return g1 * g2

    def _combine_features(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        return _drop_zero_columns(_row_kron(f1, f2))

    def block_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        b1, b2 = self.k1.block_ids(x), self.k2.block_ids(x)
        if b1 is None or b2 is None:
            return b1 if b2 is None else b2
        return torch.unique(torch.stack([b1, b2], 1), dim=0, return_inverse=True)[1]


class SumKernel(_PairKernel):
    """``k(x, y) = k1(x, y) + k2(x, y)``. Features: concatenation."""

    symbol = "+"

    def _combine(self, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        return g1 + g2

    def _combine_features(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        return torch.cat([f1, f2], 1)


class ScaledKernel(PriorKernel):
    """``k(x, y) = weight * base(x, y)`` with ``weight > 0``; written ``weight * kernel``."""

    def __init__(self, base: PriorKernel, weight: float) -> None:
        super().__init__(None)
        if not isinstance(base, PriorKernel):
            raise ValueError(f"ScaledKernel scales a PriorKernel, got {type(base).__name__}.")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"kernel weight must be positive and finite, got {weight}.")
        self.base, self.weight = base, float(weight)
        self.exact_features = base.exact_features

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.weight * self.base(x, y)

    def gram_columns(self, x: torch.Tensor, index: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return self.weight * self.base.gram_columns(x, index)

    def diagonal(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.base.diagonal(x)

    def fit(self, prior: Any, groups: Any = None) -> ScaledKernel:
        self.base.fit(prior, groups)
        return self

    def feature_map(self, x: torch.Tensor, approximate: bool = False) -> torch.Tensor | None:
        f = self.base.feature_map(x, approximate)
        return None if f is None else math.sqrt(self.weight) * f

    def block_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.base.block_ids(x)

    @property
    def is_fitted(self) -> bool:
        return self.base.is_fitted

    def __repr__(self) -> str:
        return f"{self.weight!r} * {self.base!r}"


def patient_time_kernel(
    patient_column: int = 0,
    time_column: int = 1,
    bandwidth: float | str = "gap",
    missing_patient: str = "singleton",
    **rbf_options: Any,
) -> ProductKernel:
    """Patient x time prior: ``k((p, t), (p', t')) = 1[p == p'] * exp(-(t - t')^2 / (2 h^2))``.

    ``t`` is a per-patient study offset (days since the patient's first study, or NIH's follow-up number), so images of
    one patient close in time are similar and images of different patients are not. The batch kernel is
    block-diagonal with one block per patient, and the kernel DU loss solves each patient's block on its own (the
    batch sampler must put several images of a patient in a batch for the prior to act).

    Args:
        patient_column: prior column of the patient codes (e.g. :class:`~monai_du.prior_encoder.PriorEncoder`'s
            categorical code of ``patient_id``).
        time_column: prior column of the offsets.
        bandwidth: ``h``, a positive number, or ``"gap"`` (default): the median positive gap between a patient's
            consecutive studies on the training priors, so that consecutive studies have ``k = exp(-1/2)``. Any
            :class:`RBFKernel` rule is accepted too.
        missing_patient: ``"singleton"`` (default): a missing patient code (a patient unseen when the prior encoder
            was fitted) matches only its own sample, since a new patient shares images with no known one. See
            :class:`CategoricalKernel`. A missing offset uses the RBF's expected feature under the training offsets.
        rbf_options: further :class:`RBFKernel` arguments.

    Returns:
        ``CategoricalKernel([patient_column], missing=missing_patient) * RBFKernel(bandwidth, [time_column])``; fit it
        on the training priors.
    """
    if int(patient_column) == int(time_column):
        raise ValueError(f"patient_column and time_column must differ, both are {patient_column}.")
    group = int(patient_column) if bandwidth == _GAP_RULE else None
    patient = CategoricalKernel(columns=[int(patient_column)], missing=missing_patient)
    return patient * RBFKernel(bandwidth, columns=[int(time_column)], group_column=group, **rbf_options)


@torch.no_grad()
def nystrom_features(
    kernel: PriorKernel, prior: Any, rank: int, tol: float = 1e-10, block: int = 32, seed: int = 0
) -> torch.Tensor:
    """Nystrom features ``F`` (B, r), ``r <= rank``, with ``K ≈ F F^T`` for any kernel, by greedy pivoted Cholesky.

    Pivots are batch samples drawn in rounds of ``block``, with probability proportional to the residual diagonal
    ``K[i, i] - ||F[i]||^2`` (randomly pivoted Cholesky; seeded, so every rank draws the same); a candidate whose
    residual the round's earlier pivots already explain to 90% waits for a later round. Only ``B r``
    kernel values are computed, and the cost is O(B r^2). The residual ``K - F F^T`` is positive semi-definite with
    trace equal to the summed residual diagonal, which stops the loop once below ``tol * trace(K)``: at full rank
    (``rank >= B``) the map is exact to that tolerance. Computed in float64.

    Args:
        kernel: any prior kernel. An unfitted kernel with missing values uses the whole batch's statistics.
        prior: (B, P) priors.
        rank: the largest rank r (>= 1).
        tol: relative trace of the residual kernel at which to stop.
        block: pivots tried per round (one kernel evaluation of B x block values each).
        seed: seed of the pivot draws.

    Returns:
        (B, r) float64 features.
    """
    if int(rank) < 1 or int(block) < 1:
        raise ValueError(f"rank and block must be >= 1, got rank={rank}, block={block}.")
    prior = _check_prior(_as_tensor(prior)).to(torch.float64)
    n = prior.shape[0]
    rank = min(int(rank), n)
    d = kernel.diagonal(prior).to(torch.float64).clone()
    total = float(d.clamp_min(0).sum())
    ft = prior.new_zeros(rank, n)  # F^T: rows of new features are contiguous
    gen = torch.Generator(device=prior.device).manual_seed(seed)
    floor = 1e-14 * float(d.max()) if n else 0.0
    r = 0
    while r < rank and float(d.clamp_min(0).sum()) > tol * total:
        weights = d.clamp_min(0)
        b = min(int(block), rank - r, int((weights > 0).sum()))
        # randomly pivoted Cholesky: candidates drawn in proportion to the residual diagonal spread over the batch
        cand = torch.multinomial(weights, b, replacement=False, generator=gen)
        cand = cand[torch.argsort(d[cand], descending=True)]
        cols = kernel.gram_columns(prior, cand).to(torch.float64)
        if r:
            cols -= ft[:r].T @ ft[:r, cand]  # residual columns K[:, cand] - F F[cand]^T, (n, b)
        # greedy pivoted Cholesky of the round's (b, b) residual block decides which candidates to take
        sub = cols[cand].clone()
        start = sub.diagonal().clone()
        taken: list[int] = []
        for j in range(len(cand)):
            pivot = float(sub[j, j])
            if pivot <= floor or (taken and pivot < 0.1 * float(start[j])):
                continue
            v = sub[:, j] / math.sqrt(pivot)
            sub -= v[:, None] * v[None, :]
            taken.append(j)
        if not taken:
            break
        keep = torch.tensor(taken, device=cols.device)
        chol = torch.linalg.cholesky(cols[cand[keep]][:, keep])
        new = torch.linalg.solve_triangular(chol, cols[:, keep].T, upper=False)  # (R[:, S] L^-T)^T, (a, n)
        ft[r : r + len(taken)] = new
        d -= (new * new).sum(0)
        d[cand[keep]] = 0.0
        r += len(taken)
    return ft[:r].T.contiguous()


def _kernel_classes() -> dict[str, type]:
    """Every public PriorKernel subclass, by name (user-defined subclasses included once imported)."""
    found, stack = {}, [PriorKernel]
    while stack:
        cls = stack.pop()
        if not cls.__name__.startswith("_"):
            found[cls.__name__] = cls
        stack.extend(cls.__subclasses__())
    return found


def kernel_from_dict(spec: dict) -> PriorKernel:
    """Rebuild a kernel, fitted values included, from :meth:`PriorKernel.to_dict`.

    The ``__init__`` arguments build the kernel (a nested dict with a ``"type"`` is a component kernel) and the fitted
    attributes (keys ending with ``_``) are set on it afterwards. Dicts written by earlier versions read the same way.
    """
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"a kernel description is a dict with a 'type' key, got {spec!r:.200}.")
    spec = dict(spec)
    kind = spec.pop("type")
    classes = _kernel_classes()
    if kind not in classes or kind == "PriorKernel":
        raise ValueError(f"unknown kernel type {kind!r}; expected one of {sorted(set(classes) - {'PriorKernel'})}.")
    cls = classes[kind]
    names = _init_names(cls)
    init, fitted = {}, {}
    for key, value in spec.items():
        if key in names:
            init[key] = kernel_from_dict(value) if isinstance(value, dict) and "type" in value else value
        elif key.endswith("_") and not key.startswith("_"):
            fitted[key] = value
        else:
            raise ValueError(f"{kind} has no argument {key!r}: expected {names} or fitted attributes ending in '_'.")
    kernel = cls(**init)
    for key, value in fitted.items():
        setattr(kernel, key, value)
    return kernel


def kernel_summary(gram: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, float]:
    """Summary of a batch kernel matrix (B, B): mean off-diagonal value and effective rank.

    The effective rank is the participation ratio ``trace(K)^2 / ||K||_F^2``: ``B`` for the identity (kernel DU
    equals plain DU), ``G`` for ``G`` equal categorical groups, and 1 for a constant kernel (all centroids averaged).

    Args:
        gram: the (B, B) kernel, or the diagonal blocks of a block-diagonal one (zero between blocks), each (n, n) or
            a stack (m, n, n) of m blocks of one size.
    """
    blocks = [gram] if isinstance(gram, torch.Tensor) else list(gram)
    b, trace, total, frob = 0, 0.0, 0.0, 0.0
    for g in blocks:
        if g.ndim not in (2, 3) or g.shape[-1] != g.shape[-2]:
            raise ValueError(f"gram must be square (B, B) or a stack of square blocks (m, n, n), got {tuple(g.shape)}.")
        g = g.detach()
        b += g.shape[-1] * (g.shape[0] if g.ndim == 3 else 1)
        trace += float(torch.diagonal(g, dim1=-2, dim2=-1).sum(dtype=torch.float64))
        total += float(g.sum(dtype=torch.float64))
        flat = g.reshape(-1)
        frob += float(flat @ flat) if flat.dtype == torch.float64 else float(torch.sum(flat.double() ** 2))
    off = (total - trace) / max(b * (b - 1), 1)
    return {"kernel_mean_offdiag": off, "kernel_effective_rank": trace**2 / frob if frob > 0 else 0.0}
