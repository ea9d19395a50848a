"""Contrastive losses on multi-view embeddings: decoupled uniformity (plain and kernel), InfoNCE, y-Aware InfoNCE.

All losses take ``input`` of shape (B, V, D): raw projector outputs of V >= 2 augmented views of B samples, and an
optional ``target`` of shape (B, P): the prior vector of each sample (weak metadata or a generative-model embedding).
Inside an initialised process group with several ranks they gather embeddings and priors from every rank first, so
every rank computes the loss of the global batch (see :mod:`monai_du.distributed`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from monai_du.distributed import gather_no_grad, gather_with_grad
from monai_du.kernels import PriorKernel, _autocast_off, _drop_zero_columns, nystrom_features
from monai_du.kernels import _check_prior as _kernel_prior

__all__ = [
    "DecoupledUniformityLoss",
    "InfoNCELoss",
    "YAwareInfoNCELoss",
    "alignment",
    "uniformity",
    "view_centroids",
    "conditional_mean_centroids",
]


def _check_views(input: torch.Tensor) -> None:
    if input.ndim != 3:
        raise ValueError(f"input must have shape (B, V, D), got {tuple(input.shape)}.")
    b, v, _ = input.shape
    if b < 2:
        raise ValueError(
            f"a contrastive loss needs a batch of at least 2 samples, got input of shape {tuple(input.shape)}."
        )
    if v < 2:
        raise ValueError(f"need at least 2 views per sample, got input of shape {tuple(input.shape)}.")
    if not torch.isfinite(input).all():
        raise ValueError(f"input of shape {tuple(input.shape)} holds non-finite values (NaN or inf).")


def _check_prior(target: torch.Tensor, batch: int) -> None:
    if target.ndim != 2 or target.shape[0] != batch:
        raise ValueError(f"target (prior) must have shape (B={batch}, P), got {tuple(target.shape)}.")


def _float_input(input: torch.Tensor) -> torch.Tensor:
    """Losses are computed in float32 at least (half-precision inputs from AMP are upcast)."""
    return input.float() if input.dtype in (torch.float16, torch.bfloat16) else input


def view_centroids(input: torch.Tensor) -> torch.Tensor:
    """Mean of the unit-normalised views: (B, V, D) -> (B, D)."""
    return F.normalize(input, dim=-1).mean(1)


def _log_mean_exp_pairs(c: torch.Tensor, t: float) -> torch.Tensor:
    """``log(mean_{i<j} exp(-t ||c_i - c_j||^2))`` for c (B, D), with log-sum-exp.

    The distances are symmetric, so the mean over pairs i<j equals the mean over all i != j. With
    ``-t ||c_i - c_j||^2 = 2t <c_i, c_j> - t ||c_j||^2 - t ||c_i||^2``, one fused matrix product gives every row's
    logits up to the row constant ``-t ||c_i||^2``, which is added after the row-wise log-sum-exp.
    """
    b = c.shape[0]
    sq = (c * c).sum(1)
    logits = torch.addmm(-t * sq[None, :], c, c.T, alpha=2 * t)
    logits.diagonal().fill_(float("-inf"))
    rows = torch.logsumexp(logits, 1) - t * sq
    return torch.logsumexp(rows, 0) - math.log(b * (b - 1))


def uniformity(input: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Uniformity ``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` of frozen embeddings (lower is more uniform).

    Args:
        input: (B, V, D) multi-view embeddings (measured on the view centroids) or (N, D) embeddings (normalised).
        t: temperature of the Gaussian potential.
    """
    if input.ndim == 3:
        _check_views(input)
        x = view_centroids(_float_input(input))
    elif input.ndim == 2:
        if input.shape[0] < 2:
            raise ValueError(f"uniformity needs at least 2 embeddings, got shape {tuple(input.shape)}.")
        x = F.normalize(_float_input(input), dim=-1)
    else:
        raise ValueError(f"input must have shape (B, V, D) or (N, D), got {tuple(input.shape)}.")
    with _autocast_off(x.device.type):
        return _log_mean_exp_pairs(x, t)


def alignment(input: torch.Tensor) -> torch.Tensor:
    """Alignment ``-mean_i ||mu_i||^2`` of the view centroids of (B, V, D) embeddings; -1 when all views agree."""
    _check_views(input)
    return -(view_centroids(_float_input(input)) ** 2).sum(1).mean()


_SOLVERS = ("auto", "cholesky", "mixed", "nystrom")
# "auto" refines a float32 factor for dense blocks of n >= max(1024, 48 D) samples: the float32 factor saves about
# n^3 / 6 float64-equivalent flops, and the float64 residuals of the refinement cost about 8 n^2 D more
_MIXED_MIN_BLOCK, _MIXED_MIN_PER_DIM = 1024, 48
_STACK_MAX_BLOCK = 256  # dense blocks up to this size are solved together, stacked by size
_NYSTROM_MIN_BLOCK = 32  # "nystrom": smaller blocks are solved exactly (their Nystrom map would be full rank)
_MAX_FEATURE_BLOCKS = 64  # feature maps (Woodbury) are used per block up to this many blocks


def _check_solver(solver: str, rank: int, refine_tol: float) -> None:
    if solver not in _SOLVERS:
        raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}.")
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}.")
    if not (0 < refine_tol < 1):
        raise ValueError(f"refine_tol must be in (0, 1), got {refine_tol!r}.")


def conditional_mean_centroids(
    mu: torch.Tensor,
    kernel: PriorKernel,
    prior: torch.Tensor,
    lam: float = 0.01,
    instance_weight: float = 0.0,
    low_rank: bool | str = "auto",
    solve_dtype: torch.dtype = torch.float64,
    solver: str = "auto",
    rank: int = 256,
    refine_tol: float = 1e-7,
) -> tuple[torch.Tensor, dict[str, float | str]]:
    """Conditional-mean-embedding centroids ``c = (K + lam I)^-1 K mu`` with ``K = kernel(prior) + instance_weight I``.

    ``alpha = (K + lam I)^-1 K = I - lam (K + lam I)^-1`` depends only on the priors: no gradient flows through it, and
    it is symmetric, so the backward pass applies it to the incoming gradient. Each block of a block-diagonal kernel (a
    product with a categorical kernel, e.g. one block per patient) is solved on its own: by Woodbury on a feature map
    ``F`` (``K = F F^T``) when ``low_rank`` allows it; else small blocks together, stacked by size, by a batched
    float64 Cholesky; else one dense solve per block chosen by ``solver``. Kernels and solves run with autocast off, in
    float32 or float64 whatever the input dtype.

    Args:
        mu: (B, D) view centroids.
        kernel: the prior kernel.
        prior: (B, P) prior vectors.
        lam: ridge ``lam > 0``.
        instance_weight: weight ``eta >= 0`` of an identity term added to the kernel. It keeps a share
            ``eta / (eta + lam)`` of the differences between samples that the prior cannot tell apart.
        low_rank: ``"auto"`` uses an exact feature map when its rank is at most B/2; ``True`` also accepts approximate
            feature maps (random Fourier features of an RBF); ``False`` never uses the kernel's feature map.
        solve_dtype: precision of the linear algebra (float64 by default: ``K + lam I`` is ill-conditioned for small
            lam). With float32 every dense block is a float32 Cholesky solve (no refinement).
        solver: dense blocks without a usable feature map. ``"cholesky"``: float64 Cholesky. ``"mixed"``: Cholesky
            factor in float32, then iterative refinement in float64 until the float64 residual ``R`` of the solve
            satisfies ``||R||_F <= refine_tol ||c||_F``, which bounds the centroids' relative error by ``refine_tol``
            (``||lam (K + lam I)^-1|| <= 1``); it falls back to the float64 factor when the float32 factor fails or
            the refinement stalls. ``"auto"``: ``"mixed"`` for blocks of at least ``max(1024, 48 D)`` samples (where the
            float32 factor saves more than the float64 residuals cost), else ``"cholesky"``.
            ``"nystrom"``: approximate: Woodbury on :func:`~monai_du.kernels.nystrom_features` of rank ``rank`` (exact
            when ``rank`` reaches the block size); blocks of at most 32 samples are solved exactly.
        rank: the Nystrom rank (``solver="nystrom"``).
        refine_tol: the refinement tolerance (``solver="mixed"`` or ``"auto"``).

    Returns:
        centroids (B, D) in the dtype of ``mu``, and a dict of kernel statistics (mean off-diagonal value, effective
        rank, path taken).
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}.")
    if instance_weight < 0:
        raise ValueError(f"instance_weight must be >= 0, got {instance_weight}.")
    if low_rank not in ("auto", True, False):
        raise ValueError(f"low_rank must be 'auto', True or False, got {low_rank!r}.")
    _check_solver(solver, rank, refine_tol)
    if mu.ndim != 2 or prior.ndim != 2 or prior.shape[0] != mu.shape[0]:
        raise ValueError(f"need mu (B, D) and prior (B, P), got {tuple(mu.shape)} and {tuple(prior.shape)}.")
    with _autocast_off(mu.device.type):
        prior = _kernel_prior(prior.detach())
        return _conditional_mean(mu, kernel, prior, float(lam), float(instance_weight), low_rank, solve_dtype, solver,
                                 rank, refine_tol)


def _conditional_mean(mu, kernel, prior, lam, eta, low_rank, solve_dtype, solver, rank, refine_tol):
    b = mu.shape[0]
    rhs = mu.to(solve_dtype)
    summary = _Summary()
    parts, order, kinds = [], [], []
    with torch.no_grad():
        blocks = kernel.block_ids(prior)
        members = [None] if blocks is None else _split_blocks(blocks)
        # a block's kernel equals the restriction of the batch kernel unless missing values use batch statistics
        separable = kernel.is_fitted or not bool(torch.isnan(prior).any())
        prior_s = prior.to(solve_dtype)
        full = None if blocks is None or separable else kernel(prior_s)
        feats = None
        if low_rank is not False and len(members) <= _MAX_FEATURE_BLOCKS:
            feats = kernel.feature_map(prior, approximate=low_rank is True)
            feats = None if feats is None else feats.to(solve_dtype)
        woodbury, stacks, singles = [], {}, []
        for idx in members:
            size = b if idx is None else len(idx)
            f, kind = None, None
            if feats is not None:
                f = feats if idx is None else _drop_zero_columns(feats[idx])
                kind = "woodbury"
                if low_rank == "auto" and f.shape[1] > size // 2:
                    f = None
            if f is None and solver == "nystrom" and size > _NYSTROM_MIN_BLOCK and (idx is None or separable):
                f = nystrom_features(kernel, prior_s if idx is None else prior_s[idx], rank).to(solve_dtype)
                kind = "nystrom"
            if f is not None:
                small = f.T @ f
                woodbury.append((idx, f, small, kind))
                summary.add_features(f, small, eta)
            elif idx is not None and size <= _STACK_MAX_BLOCK:
                stacks.setdefault(size, []).append(idx)
            else:
                singles.append(idx)
    for idx, f, small, kind in woodbury:
        parts.append(_woodbury_smooth(f, rhs if idx is None else rhs[idx], lam, eta, small))
        order.append(idx)
        kinds.append(f"{kind}(rank<={f.shape[1]})")
    for idxs in stacks.values():
        index = torch.stack(idxs)  # (m, s)
        with torch.no_grad():
            grams = _stacked_grams(kernel, prior_s, index, full)
            summary.add_gram(grams, eta)
            grams.diagonal(dim1=-2, dim2=-1).add_(eta + lam)
            chol = torch.linalg.cholesky(grams)
        sub = rhs[index]
        parts.append((sub - lam * torch.cholesky_solve(sub, chol)).reshape(-1, rhs.shape[1]))
        order.append(index.reshape(-1))
        kinds.append("cholesky")
    for idx in singles:
        with torch.no_grad():
            if idx is None:
                gram = kernel(prior_s)
            else:
                gram = full[idx][:, idx] if full is not None else kernel(prior_s[idx])
            summary.add_gram(gram, eta)
            gram.diagonal().add_(eta + lam)  # A = K + (eta + lam) I, in place
            refine = solve_dtype == torch.float64 and (
                solver == "mixed"
                or (solver == "auto" and gram.shape[0] >= max(_MIXED_MIN_BLOCK, _MIXED_MIN_PER_DIM * rhs.shape[1]))
            )
            ridge = _DenseRidge(gram, lam, refine, refine_tol)
        sub = rhs if idx is None else rhs[idx]
        parts.append(_RefinedSmooth.apply(sub, ridge) if ridge.refined else sub - lam * ridge.solve(sub))
        order.append(idx)
        kinds.append(ridge.describe())
    if blocks is None:
        centroids = parts[0]
    else:
        centroids = torch.cat(parts)[torch.argsort(torch.cat(order))]
    stats: dict[str, float | str] = summary.result()
    names = sorted(set(k.split("(")[0] for k in kinds))
    if len(names) == 1:
        path = kinds[0] if len(kinds) == 1 else _widest(kinds, names[0])
    else:
        path = "mixed(" + "+".join(names) + ")"
    stats["kernel_path"] = path if blocks is None else f"{path}, blocks={len(members)}"
    return centroids.to(mu.dtype), stats


def _widest(kinds: list[str], name: str) -> str:
    """One label for several blocks of one kind: the largest rank for feature maps."""
    if name in ("woodbury", "nystrom"):
        return f"{name}(rank<={max(int(k.split('<=')[1].rstrip(')')) for k in kinds)})"
    return name


def _split_blocks(blocks: torch.Tensor) -> list[torch.Tensor]:
    """Sample indices of each block id, in increasing order of id and of index."""
    order = torch.argsort(blocks, stable=True)
    counts = torch.unique_consecutive(blocks[order], return_counts=True)[1]
    return list(torch.split(order, counts.tolist()))


def _stacked_grams(kernel: PriorKernel, prior: torch.Tensor, index: torch.Tensor, full: torch.Tensor | None):
    """Kernels (m, s, s) of the m blocks ``index`` (m, s); several blocks per kernel call, keeping the diagonal ones."""
    m, s = index.shape
    if full is not None:
        return full[index[:, :, None], index[:, None, :]]
    per = max(1, 512 // s)
    out = []
    for start in range(0, m, per):
        chunk = index[start : start + per]
        c = chunk.shape[0]
        g = kernel(prior[chunk.reshape(-1)]).reshape(c, s, c, s)
        diag = torch.arange(c, device=g.device)
        out.append(g[diag, :, diag, :])
    return torch.cat(out)


class _Summary:
    """Accumulates :func:`~monai_du.kernels.kernel_summary` of ``K + eta I`` over blocks given as grams or features."""

    def __init__(self) -> None:
        self.n, self.trace, self.total, self.frob = 0, 0.0, 0.0, 0.0

    def add_gram(self, g: torch.Tensor, eta: float) -> None:
        n = g.shape[-1] * (g.shape[0] if g.ndim == 3 else 1)
        trace = float(torch.diagonal(g, dim1=-2, dim2=-1).sum(dtype=torch.float64))
        flat = g.reshape(-1)
        frob = float(flat @ flat) if flat.dtype == torch.float64 else float(torch.sum(flat.double() ** 2))
        self._add(n, trace, float(g.sum(dtype=torch.float64)), frob, eta)

    def add_features(self, f: torch.Tensor, small: torch.Tensor, eta: float) -> None:
        """Block ``F F^T + eta I`` from ``F`` (n, r) and ``F^T F`` (r, r), in O(n r)."""
        sq = float(torch.diagonal(small).sum())
        col = f.sum(0)
        self._add(f.shape[0], sq, float(col @ col), float((small * small).sum()), eta)

    def _add(self, n: int, trace: float, total: float, frob: float, eta: float) -> None:
        self.n += n
        self.trace += trace + n * eta
        self.total += total + n * eta
        self.frob += frob + 2 * eta * trace + n * eta**2

    def result(self) -> dict[str, float]:
        off = (self.total - self.trace) / max(self.n * (self.n - 1), 1)
        rank = self.trace**2 / self.frob if self.frob > 0 else 0.0
        return {"kernel_mean_offdiag": off, "kernel_effective_rank": rank}


class _DenseRidge:
    """Solves ``A x = r`` for ``A = K + (eta + lam) I`` (n, n) of one dense block (``A`` is kept, not copied).

    With ``refine`` (``A`` in float64): a float32 Cholesky factor, and float64 iterative refinement of each solve until
    the float64 residual meets the tolerance; the float64 factor is used when the float32 one fails or a refinement
    stalls. Else a Cholesky factor in ``A``'s dtype.
    """

    def __init__(self, a: torch.Tensor, lam: float, refine: bool, tol: float, max_iter: int = 10) -> None:
        self.a, self.lam, self.tol, self.max_iter = a, lam, tol, max_iter
        self.l32, self.chol = None, None
        self.iterations, self.fallback = 0, False
        if refine and a.dtype == torch.float64:
            l32, info = torch.linalg.cholesky_ex(a.float())
            if int(info) == 0:
                self.l32 = l32
            else:
                self.fallback = True
        self.refined = self.l32 is not None
        if self.l32 is None:
            self.chol = torch.linalg.cholesky(a)

    def describe(self) -> str:
        if self.fallback:
            return "refined(float64 fallback)"
        return f"refined(iterations={self.iterations})" if self.refined else "cholesky"

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        """``A^-1 r`` (n, D); differentiable in ``r`` on the float64 path (the refined one runs in
        :class:`_RefinedSmooth`)."""
        if self.l32 is not None:
            x = self._refine(r)
            if x is not None:
                return x
            self.fallback, self.l32 = True, None
            self.chol = torch.linalg.cholesky(self.a)
        if self.chol is None:
            self.chol = torch.linalg.cholesky(self.a)
        y = torch.linalg.solve_triangular(self.chol, r, upper=False)  # two triangular solves: no copy of the factor
        return torch.linalg.solve_triangular(self.chol.mT, y, upper=True)

    def _solve32(self, r: torch.Tensor) -> torch.Tensor:
        y = torch.linalg.solve_triangular(self.l32, r.float(), upper=False)
        return torch.linalg.solve_triangular(self.l32.mT, y, upper=True).to(r.dtype)

    def _refine(self, r: torch.Tensor) -> torch.Tensor | None:
        """``A^-1 r`` refined until ``||r - A x|| <= tol ||r - lam x||``: the smoothed output ``r - lam x`` then has
        relative error at most ``tol``. None when the refinement stalls (``cond(A) * eps32`` too large)."""
        x = self._solve32(r)
        previous = math.inf
        for it in range(self.max_iter + 1):
            residual = torch.addmm(r, self.a, x, alpha=-1)  # float64
            norm = float(torch.linalg.vector_norm(residual))
            if norm <= self.tol * float(torch.linalg.vector_norm(r - self.lam * x)):
                self.iterations = max(self.iterations, it)
                return x
            if norm > 0.5 * previous or it == self.max_iter:
                return None
            previous = norm
            x += self._solve32(residual)
        return None


class _RefinedSmooth(torch.autograd.Function):
    """``c = r - lam A^-1 r`` with a refined solve; ``alpha = I - lam A^-1`` is symmetric, so the backward pass is
    the same map applied to the incoming gradient."""

    @staticmethod
    def forward(ctx, rhs: torch.Tensor, ridge: _DenseRidge) -> torch.Tensor:
        ctx.ridge = ridge
        return rhs - ridge.lam * ridge.solve(rhs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ridge = ctx.ridge
        return grad - ridge.lam * ridge.solve(grad.contiguous()), None


def _woodbury_smooth(
    f: torch.Tensor, rhs: torch.Tensor, lam: float, instance_weight: float, small: torch.Tensor | None = None
) -> torch.Tensor:
    """``(K + lam I)^-1 K rhs`` for ``K = F F^T + eta I`` with F (n, r), in O(n r^2); gradient through ``rhs`` only.
    ``small`` is ``F^T F`` when already computed.

    ``(F F^T + c I)^-1 F F^T = F (F^T F + c I)^-1 F^T`` with ``c = lam + eta``; with ``eta > 0``,
    ``alpha = I - lam (F F^T + c I)^-1`` and ``(F F^T + c I)^-1 = (I - F (F^T F + c I)^-1 F^T) / c``.
    """
    c0 = lam + instance_weight
    with torch.no_grad():
        small = f.T @ f if small is None else small
        chol = torch.linalg.cholesky(small + c0 * torch.eye(f.shape[1], dtype=f.dtype, device=f.device))
    proj = f @ torch.cholesky_solve(f.T @ rhs, chol)
    if instance_weight > 0:
        return rhs - (lam / c0) * (rhs - proj)
    return proj


class DecoupledUniformityLoss(_Loss):
    """Decoupled uniformity (Dufumier et al., ICML 2023), plain or with a prior kernel.

    ``L = log mean_{i<j} exp(-t ||c_i - c_j||^2)`` where ``c`` are the view centroids ``mu_i = mean_v z_iv/||z_iv||``
    (plain DU) or their conditional-mean estimates ``c = (K + lam I)^-1 K mu`` given the priors (kernel DU). There is
    no explicit alignment term: pushing centroids apart makes their norm grow, which aligns the views.

    The loss runs with autocast off: half-precision embeddings are upcast to float32, and priors, kernels and solves
    are float32 or float64 (see :func:`conditional_mean_centroids`).

    After each call, ``last_alignment`` (``-mean ||mu_i||^2``), ``last_uniformity`` (the loss value) and
    ``last_kernel_stats`` (mean off-diagonal kernel value, effective rank, solver path) hold floats for logging.

    Args:
        kernel: prior kernel; None gives plain DU (a ``target`` is then ignored).
        lam: ridge of the conditional mean embedding, > 0 (0.01 as in the published code).
        t: temperature of the Gaussian potential, > 0.
        instance_weight: identity (instance) term added to the kernel, >= 0. Coarse priors (sex, site, age groups)
            average whole groups; this term keeps a share ``eta / (eta + lam)`` of the within-group differences.
        low_rank: ``"auto"``, True or False; see :func:`conditional_mean_centroids`.
        gather: gather embeddings and priors from all ranks inside a process group.
        solve_dtype: precision of the linear algebra (float64).
        solver: dense-block solver: ``"auto"``, ``"cholesky"``, ``"mixed"`` (float32 factor refined in float64, exact
            to ``refine_tol``) or ``"nystrom"`` (approximate, rank ``rank``); see :func:`conditional_mean_centroids`.
        rank: rank of the Nystrom path.
        refine_tol: relative accuracy of the centroids on the refined path.
    """

    def __init__(
        self,
        kernel: PriorKernel | None = None,
        lam: float = 0.01,
        t: float = 2.0,
        instance_weight: float = 0.0,
        low_rank: bool | str = "auto",
        gather: bool = True,
        solve_dtype: torch.dtype = torch.float64,
        solver: str = "auto",
        rank: int = 256,
        refine_tol: float = 1e-7,
    ) -> None:
        super().__init__()
        if not (isinstance(lam, (int, float)) and lam > 0 and math.isfinite(lam)):
            raise ValueError(f"lam must be a positive finite number, got {lam!r}.")
        if not (t > 0 and math.isfinite(t)):
            raise ValueError(f"t must be a positive finite number, got {t!r}.")
        if not instance_weight >= 0:
            raise ValueError(f"instance_weight must be >= 0, got {instance_weight!r}.")
        if low_rank not in ("auto", True, False):
            raise ValueError(f"low_rank must be 'auto', True or False, got {low_rank!r}.")
        if kernel is not None and not isinstance(kernel, PriorKernel):
            raise ValueError(f"kernel must be a monai_du.kernels.PriorKernel or None, got {type(kernel).__name__}.")
        _check_solver(solver, rank, refine_tol)
        self.kernel, self.lam, self.t = kernel, float(lam), float(t)
        self.instance_weight, self.low_rank, self.gather = float(instance_weight), low_rank, gather
        self.solve_dtype, self.solver, self.rank, self.refine_tol = solve_dtype, solver, rank, float(refine_tol)
        self.last_alignment: float = float("nan")
        self.last_uniformity: float = float("nan")
        self.last_kernel_stats: dict = {}

    def forward(self, input: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            input: (B, V, D) raw projector outputs, V >= 2.
            target: (B, P) priors; required when a kernel is set. NaN marks a missing attribute.

        Returns:
            the scalar loss.
        """
        _check_views(input)
        if self.kernel is not None:
            if target is None:
                raise ValueError("DecoupledUniformityLoss has a kernel, so it needs the (B, P) prior as target.")
            _check_prior(target, input.shape[0])
        if self.gather:
            input = gather_with_grad(input)
            target = None if target is None or self.kernel is None else gather_no_grad(target)
        with _autocast_off(input.device.type):
            mu = view_centroids(_float_input(input))
            if self.kernel is None:
                centroids = mu
                self.last_kernel_stats = {}
            else:
                centroids, self.last_kernel_stats = conditional_mean_centroids(
                    mu, self.kernel, target, self.lam, self.instance_weight, self.low_rank, self.solve_dtype,
                    self.solver, self.rank, self.refine_tol,
                )
            loss = _log_mean_exp_pairs(centroids, self.t)
        with torch.no_grad():
            self.last_alignment = float(-(mu**2).sum(1).mean())
            self.last_uniformity = float(loss)
        return loss


def _view_logits(input: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine logits between all B*V embeddings, self-pairs masked; returns (logits (N, N), sample index (N,))."""
    b, v, d = input.shape
    u = F.normalize(_float_input(input), dim=-1).reshape(b * v, d)
    logits = u @ u.T / temperature
    eye = torch.eye(b * v, dtype=torch.bool, device=u.device)
    logits = logits.masked_fill(eye, float("-inf"))
    sample = torch.arange(b, device=u.device).repeat_interleave(v)
    return logits, sample


def _reduce(per_anchor: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_anchor.mean()
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor


class InfoNCELoss(_Loss):
    """NT-Xent (SimCLR's InfoNCE) over V >= 2 views, with log-sum-exp (stable at low temperature).

    Each of the B*V embeddings is an anchor; its V-1 other views are positives and every other embedding in the
    (gathered) batch is a negative:
    ``l_a = -(1/(V-1)) sum_{p in pos(a)} [s_ap / T - log sum_{k != a} exp(s_ak / T)]``.

    Args:
        temperature: T > 0.
        reduction: "mean", "sum" or "none" (per anchor, shape (B*V,)).
        gather: gather embeddings from all ranks inside a process group.
    """

    def __init__(self, temperature: float = 0.1, reduction: str = "mean", gather: bool = True) -> None:
        super().__init__(reduction=reduction)
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}.")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
        self.temperature, self.gather = float(temperature), gather

    def forward(self, input: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """input: (B, V, D) projector outputs; target: ignored (present for a common interface)."""
        _check_views(input)
        if self.gather:
            input = gather_with_grad(input)
        with _autocast_off(input.device.type):
            logits, sample = _view_logits(input, self.temperature)
            log_prob = logits - torch.logsumexp(logits, 1, keepdim=True)
            positive = (sample[:, None] == sample[None, :]).fill_diagonal_(False)
            v = input.shape[1]
            per_anchor = -torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(1) / (v - 1)
            return _reduce(per_anchor, self.reduction)


class YAwareInfoNCELoss(_Loss):
    """y-Aware InfoNCE (Dufumier et al., MICCAI 2021): InfoNCE whose targets are weighted by prior similarity.

    Over the N = B*V embeddings, with ``K[a, k] = kernel(prior of a, prior of k)``, the weights are row-normalised:
    ``w[a, j] = K[a, j] / sum_{k != a} K[a, k]`` and ``l_a = -sum_{j != a} w[a, j] log p(j | a)``. With a kernel that
    is 1 only for identical priors and unique priors per sample, this is :class:`InfoNCELoss`.

    Args:
        kernel: prior kernel.
        temperature: T > 0.
        reduction: "mean", "sum" or "none" (per anchor, shape (B*V,)).
        gather: gather embeddings and priors from all ranks inside a process group.
    """

    def __init__(self, kernel: PriorKernel, temperature: float = 0.1, reduction: str = "mean", gather: bool = True):
        super().__init__(reduction=reduction)
        if not isinstance(kernel, PriorKernel):
            raise ValueError(f"kernel must be a monai_du.kernels.PriorKernel, got {type(kernel).__name__}.")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}.")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
        self.kernel, self.temperature, self.gather = kernel, float(temperature), gather

    def weights(self, target: torch.Tensor, num_views: int) -> torch.Tensor:
        """Row-normalised target weights (B*V, B*V) for priors (B, P); the diagonal is 0."""
        with torch.no_grad():
            gram = self.kernel(target.detach()).to(torch.float64)
            gram = gram.repeat_interleave(num_views, 0).repeat_interleave(num_views, 1)
            gram.fill_diagonal_(0)
            row = gram.sum(1, keepdim=True)
            if not (row > 0).all():
                bad = (row[:, 0] <= 0).nonzero()[0, 0].item() // num_views
                raise ValueError(f"prior kernel row of sample {bad} sums to 0 over the other embeddings.")
            return gram / row

    def forward(self, input: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """input: (B, V, D) projector outputs; target: (B, P) priors."""
        _check_views(input)
        if target is None:
            raise ValueError("YAwareInfoNCELoss needs the (B, P) prior as target.")
        _check_prior(target, input.shape[0])
        if self.gather:
            input, target = gather_with_grad(input), gather_no_grad(target)
        with _autocast_off(input.device.type):
            logits, _ = _view_logits(input, self.temperature)
            log_prob = logits - torch.logsumexp(logits, 1, keepdim=True)
            w = self.weights(target, input.shape[1]).to(log_prob.dtype)
            per_anchor = -(w * log_prob.masked_fill(w == 0, 0.0)).sum(1)
            return _reduce(per_anchor, self.reduction)
