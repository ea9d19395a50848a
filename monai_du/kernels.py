"""Prior kernels: similarity between samples' prior vectors (weak metadata or generative-model embeddings).

A kernel maps a prior tensor ``x`` of shape (B, P) to a (B, B) Gram matrix ``K[i, j] = k(x[i], x[j])``. Each kernel
reads its own ``columns`` of the prior, so that kernels on age, sex and site compose on one tensor::

    kernel = RBFKernel("knn", columns=[0]) * CategoricalKernel(columns=[1]) * CategoricalKernel(columns=[2])
    kernel.fit(train_prior)   # bandwidth rules, category frequencies and column statistics
    K = kernel(prior)         # (B, B)

Missing values (NaN) follow one rule for every kernel: an unknown attribute is replaced by its *expected feature*
under the training marginal (the kernel mean embedding). The kernel stays positive semi-definite, the factor of a
missing attribute discriminates only as much as the population does, and a NaN never reaches the loss:

- ``CategoricalKernel``: ``k(missing, c) = p_c`` (training frequency of ``c``) and ``k(missing, missing) = sum_c p_c^2``.
- ``RBFKernel`` (per column, with training mean ``m`` and variance ``v``, bandwidth ``s``):
  ``k(missing, y) = sqrt(s^2 / (s^2 + v)) * exp(-(y - m)^2 / (2 (s^2 + v)))`` and
  ``k(missing, missing) = sqrt(s^2 / (s^2 + 2 v))``. This is exact for a Gaussian marginal.
- ``CosineKernel``: a missing coordinate takes its training mean before normalisation.

Unfitted kernels use the current batch's statistics for the missing-value rule; bandwidth rules (``"median"``,
``"scott"``, ``"silverman"``, ``"knn"``) must be fitted on training data with :meth:`PriorKernel.fit`.

Low-rank feature maps ``F`` (B, r) with ``K = F F^T`` are exact for categorical and cosine kernels, and approximate
(random Fourier features) for the RBF. Products take row-wise Kronecker products and sums concatenate.
"""

from __future__ import annotations

import math
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
]

BANDWIDTH_RULES = ("median", "scott", "silverman", "knn")


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "to_numpy"):  # pandas
        x = x.to_numpy(dtype=np.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _check_prior(x: torch.Tensor, name: str = "prior") -> torch.Tensor:
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (B, P), got {tuple(x.shape)}.")
    if not torch.is_floating_point(x):
        x = x.to(torch.get_default_dtype())
    if torch.isinf(x).any():
        raise ValueError(f"{name} holds infinite values; use NaN to mark a missing attribute.")
    return x


class PriorKernel:
    """Base class of prior kernels. Subclasses implement ``_gram`` and optionally ``_features`` and ``_fit``.

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
        """Gram matrix between ``x`` (B, P) and ``y`` (B', P) (default ``x``); returns (B, B'). Priors carry no gradient."""
        x = _check_prior(_as_tensor(x))
        y = x if y is None else _check_prior(_as_tensor(y), "y")
        return self._gram(self._select(x), self._select(y))

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
        self._fit(self._select(prior), groups)
        return self

    def feature_map(self, x: torch.Tensor, approximate: bool = False) -> torch.Tensor | None:
        """Features ``F`` (B, r) with ``K ≈ F F^T``, or None when the kernel has none (or only an approximate one
        and ``approximate`` is False)."""
        x = _check_prior(_as_tensor(x))
        if not self.exact_features and not approximate:
            return None
        return self._features(self._select(x), approximate)

    def block_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        """Integer group ids (B,) such that ``K[i, j] == 0`` whenever the ids differ, or None if unknown."""
        return None

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has run: then missing values use training statistics, not the batch's."""
        return getattr(self, "mean_", None) is not None

    def to_dict(self) -> dict:
        """JSON-serialisable description, including fitted values (see :func:`kernel_from_dict`)."""
        return {"type": type(self).__name__, **self._params()}

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
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items() if v is not None)
        return f"{type(self).__name__}({args})"

    # -- helpers for subclasses ---------------------------------------------------------------------------------------
    def _select(self, x: torch.Tensor) -> torch.Tensor:
        if self.columns is None:
            return x
        if max(self.columns) >= x.shape[1]:
            raise ValueError(
                f"{type(self).__name__} reads prior columns {self.columns}, but the prior has shape {tuple(x.shape)}."
            )
        return x[:, self.columns]

    def _params(self) -> dict:
        return {"columns": self.columns}

    def _fit(self, x: torch.Tensor, groups: np.ndarray | None = None) -> None:
        pass

    def _gram(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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


class RBFKernel(PriorKernel):
    """Gaussian kernel ``k(x, y) = exp(-sum_d (x_d - y_d)^2 / (2 * s_d^2))`` on the selected columns.

    Args:
        bandwidth: ``s``: a positive float, one positive float per column, or a rule fitted by :meth:`fit`:
            ``"median"`` (median pairwise distance), ``"scott"`` / ``"silverman"`` (per-column density-estimation
            rules) or ``"knn"`` (median distance to the ``knn_k``-th nearest neighbour inside random batches of
            ``knn_batch_size`` training samples, so that each sample has about ``knn_k`` effective neighbours in a batch
            of that size). The density rules are broad for contrastive priors: prefer ``"knn"`` (see DESIGN §1).
        columns: prior columns read by the kernel.
        knn_k: neighbour rank for the ``"knn"`` rule.
        knn_batch_size: batch size the ``"knn"`` rule is fitted for (use the training batch size).
        n_features: rank of the random Fourier feature map used by the low-rank path.
        seed: seed of the random Fourier features (the same on every rank).
        fourier: feature map of the low-rank path. ``"rff"``: random Fourier features of rank ``n_features``.
            ``"quadrature"`` (one column only): a deterministic trapezoid rule on the Gaussian spectral density, with
            a spacing chosen from the batch's range so that aliasing is below 1e-12; its rank grows with
            ``range / bandwidth``. ``"auto"``: quadrature for one column, random features otherwise.
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
    ) -> None:
        super().__init__(columns)
        if fourier not in ("auto", "rff", "quadrature"):
            raise ValueError(f"fourier must be 'auto', 'rff' or 'quadrature', got {fourier!r}.")
        self.fourier = fourier
        self.rule: str | None = None
        self.bandwidth_: list[float] | None = None
        if isinstance(bandwidth, str):
            if bandwidth not in BANDWIDTH_RULES:
                raise ValueError(f"bandwidth rule must be one of {BANDWIDTH_RULES}, got {bandwidth!r}.")
            self.rule = bandwidth
        else:
            values = [float(b) for b in (bandwidth if isinstance(bandwidth, Sequence) else [bandwidth])]
            if len(values) == 0 or not all(math.isfinite(b) and b > 0 for b in values):
                raise ValueError(f"bandwidth must be positive and finite, got {bandwidth!r}.")
            if self.columns is not None and len(values) not in (1, len(self.columns)):
                raise ValueError(f"got {len(values)} bandwidths for {len(self.columns)} columns {self.columns}.")
            self.bandwidth_ = values
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

    def _params(self) -> dict:
        out: dict[str, Any] = {"bandwidth": self.rule if self.rule else self.bandwidth_, "columns": self.columns}
        if self.rule == "knn":
            out.update(knn_k=self.knn_k, knn_batch_size=self.knn_batch_size)
        if self.fourier != "auto":
            out["fourier"] = self.fourier
        if self.rule is not None:
            out["bandwidth_"] = self.bandwidth_
        out["mean_"], out["var_"] = self.mean_, self.var_
        return out

    def __repr__(self) -> str:
        bw = f"{self.rule!r} -> {self.bandwidth_}" if self.rule else repr(self.bandwidth_)
        return f"RBFKernel(bandwidth={bw}, columns={self.columns})"

    def _fit(self, x: torch.Tensor, groups: np.ndarray | None = None) -> None:
        mean, var = _column_stats(x)
        self.mean_, self.var_ = mean.tolist(), var.tolist()
        if self.rule is None:
            return
        keep = ~torch.isnan(x).any(1)
        complete = x[keep]
        n, d = complete.shape
        if n < 2:
            raise ValueError(f"cannot fit bandwidth rule {self.rule!r}: fewer than 2 rows without missing values.")
        gen = torch.Generator().manual_seed(self.seed)
        if self.rule in ("scott", "silverman"):
            std = complete.std(0)
            factor = n ** (-1.0 / (d + 4))
            if self.rule == "silverman":
                factor *= (4.0 / (d + 2)) ** (1.0 / (d + 4))
            values = (std * factor).tolist()
        elif self.rule == "median":
            sub = complete[torch.randperm(n, generator=gen)[:2000]]
            dist = torch.cdist(sub, sub)
            iu = torch.triu_indices(len(sub), len(sub), 1)
            values = [float(dist[iu[0], iu[1]].quantile(0.5))] * d
        else:  # knn: median k-th neighbour distance inside training batches like the sampler's
            values = [self._knn_scale(complete, None if groups is None else groups[keep.numpy()], gen)] * d
        bad = [i for i, v in enumerate(values) if not v > 0]
        if bad:
            raise ValueError(
                f"bandwidth rule {self.rule!r} gave a non-positive bandwidth for column(s) "
                f"{[self.columns[i] if self.columns else i for i in bad]}: the training values are (nearly) constant."
            )
        self.bandwidth_ = values

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

    def _gram(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self._scales(x)
        x_nan, y_nan = torch.isnan(x), torch.isnan(y)
        if not (x_nan.any() or y_nan.any()):
            xs, ys = x / s, y / s
            if x.shape[1] > 8:
                sq = ((xs * xs).sum(1, keepdim=True) + (ys * ys).sum(1) - 2.0 * xs @ ys.T).clamp_min_(0)
            else:  # exact differences, one column at a time, in place
                sq = (xs[:, 0, None] - ys[None, :, 0]).square_()
                for d in range(1, x.shape[1]):
                    sq.add_((xs[:, d, None] - ys[None, :, d]).square_())
            return sq.mul_(-0.5).exp_()
        both = torch.cat([x, y]) if y is not x else x
        mean, var = self._stats(both)
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

    Its exact feature map is the one-hot code of the joint category, so the kernel DU loss can use Woodbury.
    ``fit`` stores the training frequency of each code, used for missing values (see the module docstring).
    """

    exact_features = True

    def __init__(self, columns: Sequence[int] | int | None = None) -> None:
        super().__init__(columns)
        self.categories_: list[list[float]] | None = None
        self.frequencies_: list[list[float]] | None = None

    def _params(self) -> dict:
        return {"columns": self.columns, "categories_": self.categories_, "frequencies_": self.frequencies_}

    @property
    def is_fitted(self) -> bool:
        return self.categories_ is not None

    def __repr__(self) -> str:
        fitted = "" if self.categories_ is None else f", categories_={self.categories_}"
        return f"CategoricalKernel(columns={self.columns}{fitted})"

    def _fit(self, x: torch.Tensor, groups: np.ndarray | None = None) -> None:
        self.categories_, self.frequencies_ = [], []
        for d in range(x.shape[1]):
            col = x[:, d][~torch.isnan(x[:, d])]
            values, counts = torch.unique(col, return_counts=True)
            self.categories_.append(values.tolist())
            self.frequencies_.append((counts / counts.sum().clamp_min(1)).tolist())

    def _codebook(self, ref: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Categories (C,) of column ``d`` and their probabilities (C,): fitted, else from the batch ``ref``."""
        if self.categories_ is not None:
            if len(self.categories_) != ref.shape[1]:
                raise ValueError(f"CategoricalKernel was fitted on {len(self.categories_)} columns, got {ref.shape[1]}.")
            return ref.new_tensor(self.categories_[d]), ref.new_tensor(self.frequencies_[d])
        col = ref[:, d][~torch.isnan(ref[:, d])]
        values, counts = torch.unique(col, return_counts=True)
        return values, counts.to(ref) / counts.sum().clamp_min(1)

    @staticmethod
    def _column_features(col: torch.Tensor, cats: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """One-hot codes (B, C) of ``col`` (B,) over ``cats``; a missing value gets the probability vector."""
        onehot = (col[:, None] == cats[None, :]).to(col)
        return torch.where(torch.isnan(col)[:, None], probs[None, :].expand_as(onehot), onehot)

    def _gram(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ref = x if y is x else torch.cat([x, y])
        out = None
        for d in range(x.shape[1]):
            equal = (x[:, d, None] == y[None, :, d]).to(x)  # also matches codes unseen in training to themselves
            if torch.isnan(x[:, d]).any() or torch.isnan(y[:, d]).any():
                cats, probs = self._codebook(ref, d)
                fx = self._column_features(x[:, d], cats, probs)
                fy = fx if y is x else self._column_features(y[:, d], cats, probs)
                known = ~(torch.isnan(x[:, d, None]) | torch.isnan(y[None, :, d]))
                equal = torch.where(known, equal, fx @ fy.T)
            out = equal if out is None else out.mul_(equal)
        return out

    def _features(self, x: torch.Tensor, approximate: bool) -> torch.Tensor:
        feats = None
        for d in range(x.shape[1]):
            cats, probs = self._codebook(x, d)
            col = x[:, d]
            f = self._column_features(col, cats, probs)
            observed = col[~torch.isnan(col)]
            unseen = torch.unique(observed[~torch.isin(observed, cats)])
            if len(unseen):  # codes absent from training each get their own feature
                f = torch.cat([f, (col[:, None] == unseen[None, :]).to(x)], 1)
            feats = f if feats is None else _row_kron(feats, f)
        return _drop_zero_columns(feats)

    def block_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        x = self._select(_check_prior(_as_tensor(x)))
        if torch.isnan(x).any():
            return None  # a missing code links its sample to every group
        return torch.unique(x, dim=0, return_inverse=True)[1]


class CosineKernel(PriorKernel):
    """Cosine similarity ``k(x, y) = <x, y> / (||x|| ||y||)`` for embedding priors (e.g. generative-model features).

    Missing coordinates take their training (or batch) mean before normalisation. A zero vector has a zero feature,
    so its row of ``K`` is zero rather than NaN. Exact feature map: the normalised vectors (rank P).
    """

    exact_features = True

    def __init__(self, columns: Sequence[int] | int | None = None) -> None:
        super().__init__(columns)
        self.mean_: list[float] | None = None

    def _params(self) -> dict:
        return {"columns": self.columns}

    def _fit(self, x: torch.Tensor, groups: np.ndarray | None = None) -> None:
        self.mean_ = _column_stats(x)[0].tolist()

    def _features(self, x: torch.Tensor, approximate: bool = False) -> torch.Tensor:
        mean = x.new_tensor(self.mean_) if self.mean_ is not None else _column_stats(x)[0]
        filled = torch.where(torch.isnan(x), mean.expand_as(x), x)
        norm = filled.norm(dim=1, keepdim=True)
        return torch.where(norm > 0, filled / norm.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(filled))

    def _gram(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self._features(x)
        fy = fx if y is x else self._features(y)
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
        self.k1, self.k2 = k1, k2
        self.exact_features = k1.exact_features and k2.exact_features

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self._combine(self.k1(x, y), self.k2(x, y))

    def fit(self, prior: Any, groups: Any = None) -> _PairKernel:
        self.k1.fit(prior, groups)
        self.k2.fit(prior, groups)
        return self

    def feature_map(self, x: torch.Tensor, approximate: bool = False) -> torch.Tensor | None:
        f1, f2 = self.k1.feature_map(x, approximate), self.k2.feature_map(x, approximate)
        if f1 is None or f2 is None:
            return None
        return self._combine_features(f1, f2)

    @property
    def is_fitted(self) -> bool:
        return self.k1.is_fitted and self.k2.is_fitted

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, "k1": self.k1.to_dict(), "k2": self.k2.to_dict()}

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
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"kernel weight must be positive and finite, got {weight}.")
        self.base, self.weight = base, float(weight)
        self.exact_features = base.exact_features

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.weight * self.base(x, y)

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

    def to_dict(self) -> dict:
        return {"type": "ScaledKernel", "base": self.base.to_dict(), "weight": self.weight}

    def __repr__(self) -> str:
        return f"{self.weight!r} * {self.base!r}"


def kernel_from_dict(spec: dict) -> PriorKernel:
    """Rebuild a kernel, fitted values included, from :meth:`PriorKernel.to_dict`."""
    spec = dict(spec)
    kind = spec.pop("type")
    if kind in ("ProductKernel", "SumKernel"):
        cls = ProductKernel if kind == "ProductKernel" else SumKernel
        return cls(kernel_from_dict(spec["k1"]), kernel_from_dict(spec["k2"]))
    if kind == "ScaledKernel":
        return ScaledKernel(kernel_from_dict(spec["base"]), spec["weight"])
    fitted = {k: spec.pop(k) for k in list(spec) if k.endswith("_")}
    classes = {"RBFKernel": RBFKernel, "CategoricalKernel": CategoricalKernel, "CosineKernel": CosineKernel}
    if kind not in classes:
        raise ValueError(f"unknown kernel type {kind!r}; expected one of {sorted(classes)} or a composite.")
    kernel = classes[kind](**spec)
    for k, v in fitted.items():
        setattr(kernel, k, v)
    return kernel


def kernel_summary(gram: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, float]:
    """Summary of a batch kernel matrix (B, B): mean off-diagonal value and effective rank.

    The effective rank is the participation ratio ``trace(K)^2 / ||K||_F^2``: ``B`` for the identity (kernel DU
    equals plain DU), ``G`` for ``G`` equal categorical groups, and 1 for a constant kernel (all centroids averaged).

    Args:
        gram: the (B, B) kernel, or the diagonal blocks of a block-diagonal one (zero between blocks).
    """
    blocks = [gram] if isinstance(gram, torch.Tensor) else list(gram)
    for g in blocks:
        if g.ndim != 2 or g.shape[0] != g.shape[1]:
            raise ValueError(f"gram must be square (B, B), got {tuple(g.shape)}.")
    b = sum(g.shape[0] for g in blocks)
    trace = sum(float(torch.diagonal(g.detach()).sum(dtype=torch.float64)) for g in blocks)
    total = sum(float(g.detach().sum(dtype=torch.float64)) for g in blocks)
    frob = sum(float(torch.sum(g.detach() * g.detach(), dtype=torch.float64)) for g in blocks)
    off = (total - trace) / max(b * (b - 1), 1)
    return {"kernel_mean_offdiag": off, "kernel_effective_rank": trace**2 / frob if frob > 0 else 0.0}
