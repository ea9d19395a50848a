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
from monai_du.kernels import PriorKernel, _drop_zero_columns, kernel_summary

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
        raise ValueError(f"a contrastive loss needs a batch of at least 2 samples, got input of shape {tuple(input.shape)}.")
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
    return _log_mean_exp_pairs(x, t)


def alignment(input: torch.Tensor) -> torch.Tensor:
    """Alignment ``-mean_i ||mu_i||^2`` of the view centroids of (B, V, D) embeddings; -1 when all views agree."""
    _check_views(input)
    return -(view_centroids(_float_input(input)) ** 2).sum(1).mean()


def conditional_mean_centroids(
    mu: torch.Tensor,
    kernel: PriorKernel,
    prior: torch.Tensor,
    lam: float = 0.01,
    instance_weight: float = 0.0,
    low_rank: bool | str = "auto",
    solve_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Conditional-mean-embedding centroids ``c = (K + lam I)^-1 K mu`` with ``K = kernel(prior) + instance_weight I``.

    ``alpha = (K + lam I)^-1 K`` depends only on the priors: no gradient flows through it. The solve uses, in order:
    Each block of a block-diagonal kernel (a product with a categorical kernel) is solved on its own, by Woodbury on
    its feature map ``F`` (``K = F F^T``) when ``low_rank`` allows it, else by a Cholesky solve.

    Args:
        mu: (B, D) view centroids.
        kernel: the prior kernel.
        prior: (B, P) prior vectors.
        lam: ridge ``lam > 0``.
        instance_weight: weight ``eta >= 0`` of an identity term added to the kernel. It keeps a share
            ``eta / (eta + lam)`` of the differences between samples that the prior cannot tell apart.
        low_rank: ``"auto"`` uses an exact feature map when its rank is at most B/2; ``True`` also accepts approximate
            feature maps (random Fourier features of an RBF); ``False`` always solves exactly.
        solve_dtype: precision of the linear algebra (float64 by default: ``K + lam I`` is ill-conditioned for small lam).

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
    b = mu.shape[0]
    prior = prior.detach()
    rhs = mu.to(solve_dtype)
    with torch.no_grad():
        feats = None
        if low_rank is not False:
            feats = kernel.feature_map(prior, approximate=low_rank is True)
            feats = None if feats is None else feats.to(solve_dtype)
        blocks = kernel.block_ids(prior)
        members = [None] if blocks is None else [(blocks == g).nonzero(as_tuple=True)[0] for g in torch.unique(blocks)]
        # a block's kernel equals the restriction of the batch kernel unless missing values use batch statistics
        per_block = blocks is not None and (kernel.is_fitted or not bool(torch.isnan(prior).any()))
        plans, full = [], None
        for idx in members:
            f, gram = None, None
            if feats is not None:
                f = feats if idx is None else _drop_zero_columns(feats[idx])
                size = b if idx is None else len(idx)
                if low_rank == "auto" and f.shape[1] > size // 2:
                    f = None
            if f is None:  # kernels in the prior's dtype; cast to solve_dtype when solved
                if per_block:
                    gram = kernel(prior[idx])
                else:
                    full = kernel(prior) if full is None else full
                    gram = full if idx is None else full[idx][:, idx]
                if instance_weight > 0:
                    gram.diagonal().add_(instance_weight)
            plans.append((idx, f, gram))
        if all(f is not None for _, f, _ in plans):
            stats: dict = _feature_summary(feats, instance_weight)
        else:  # the kernel is zero between blocks, so the blocks' sums give the batch summary
            grams = [g if g is not None else f @ f.T + instance_weight * torch.eye(len(f), dtype=f.dtype)
                     for _, f, g in plans]
            stats = kernel_summary(grams)
    parts = []
    for idx, f, gram in plans:
        sub = rhs if idx is None else rhs[idx]
        if f is not None:
            parts.append(_woodbury_smooth(f, sub, lam, instance_weight))
        else:
            parts.append(_ridge_smooth(gram.to(solve_dtype), sub, lam))
    if blocks is None:
        centroids = parts[0]
    else:
        order = torch.cat(members)
        centroids = torch.cat(parts)[torch.argsort(order)]
    ranks = [f.shape[1] for _, f, _ in plans if f is not None]
    path = f"woodbury(rank<={max(ranks)})" if len(ranks) == len(plans) else "cholesky" if not ranks else "mixed"
    stats["kernel_path"] = path if blocks is None else f"{path}, blocks={len(plans)}"
    return centroids.to(mu.dtype), stats


def _feature_summary(f: torch.Tensor, instance_weight: float) -> dict[str, float]:
    """:func:`kernel_summary` of ``F F^T + eta I`` computed from ``F`` (B, r) in O(B r^2)."""
    b = f.shape[0]
    sq_row = (f * f).sum(1)
    total = f.sum(0)
    trace = float(sq_row.sum()) + b * instance_weight
    off = (float(total @ total) - float(sq_row.sum())) / (b * (b - 1))
    small = f.T @ f
    frob = float((small**2).sum()) + 2 * instance_weight * float(sq_row.sum()) + b * instance_weight**2
    return {"kernel_mean_offdiag": off, "kernel_effective_rank": trace**2 / frob if frob > 0 else 0.0}


def _woodbury_smooth(f: torch.Tensor, rhs: torch.Tensor, lam: float, instance_weight: float) -> torch.Tensor:
    """``(K + lam I)^-1 K rhs`` for ``K = F F^T + eta I`` with F (n, r), in O(n r^2); gradient through ``rhs`` only.

    ``(F F^T + c I)^-1 F F^T = F (F^T F + c I)^-1 F^T`` with ``c = lam + eta``; with ``eta > 0``,
    ``alpha = I - lam (F F^T + c I)^-1`` and ``(F F^T + c I)^-1 = (I - F (F^T F + c I)^-1 F^T) / c``.
    """
    c0 = lam + instance_weight
    with torch.no_grad():
        chol = torch.linalg.cholesky(f.T @ f + c0 * torch.eye(f.shape[1], dtype=f.dtype, device=f.device))
    proj = f @ torch.cholesky_solve(f.T @ rhs, chol)
    if instance_weight > 0:
        return rhs - (lam / c0) * (rhs - proj)
    return proj


def _ridge_smooth(gram: torch.Tensor, rhs: torch.Tensor, lam: float) -> torch.Tensor:
    """``(K + lam I)^-1 K rhs`` by Cholesky; gradient flows through ``rhs`` (n, D) only."""
    with torch.no_grad():
        chol = torch.linalg.cholesky(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))
    return torch.cholesky_solve(gram @ rhs, chol)


class DecoupledUniformityLoss(_Loss):
    """Decoupled uniformity (Dufumier et al., ICML 2023), plain or with a prior kernel.

    ``L = log mean_{i<j} exp(-t ||c_i - c_j||^2)`` where ``c`` are the view centroids ``mu_i = mean_v z_iv/||z_iv||``
    (plain DU) or their conditional-mean estimates ``c = (K + lam I)^-1 K mu`` given the priors (kernel DU). There is
    no explicit alignment term: pushing centroids apart makes their norm grow, which aligns the views.

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
        self.kernel, self.lam, self.t = kernel, float(lam), float(t)
        self.instance_weight, self.low_rank, self.gather, self.solve_dtype = float(instance_weight), low_rank, gather, solve_dtype
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
        mu = view_centroids(_float_input(input))
        if self.kernel is None:
            centroids = mu
            self.last_kernel_stats = {}
        else:
            centroids, self.last_kernel_stats = conditional_mean_centroids(
                mu, self.kernel, target, self.lam, self.instance_weight, self.low_rank, self.solve_dtype
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
        logits, sample = _view_logits(input, self.temperature)
        log_prob = logits - torch.logsumexp(logits, 1, keepdim=True)
        positive = (sample[:, None] == sample[None, :]).fill_diagonal_(False)
        v = input.shape[1]
        per_anchor = -torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(1) / (v - 1)
        return _reduce(per_anchor, self.reduction)


class YAwareInfoNCELoss(_Loss):
    """y-Aware InfoNCE (Dufumier et al., MICCAI 2021): InfoNCE whose targets are weighted by prior similarity.

    Over the N = B*V embeddings, with ``K[a, k] = kernel(prior of a, prior of k)``, the weights are row-normalised:
    ``w[a, j] = K[a, j] / sum_{k != a} K[a, k]`` and ``l_a = -sum_{j != a} w[a, j] log p(j | a)``. With a kernel that is 1
    only for identical priors and unique priors per sample, this is :class:`InfoNCELoss`.

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
        logits, _ = _view_logits(input, self.temperature)
        log_prob = logits - torch.logsumexp(logits, 1, keepdim=True)
        w = self.weights(target, input.shape[1]).to(log_prob.dtype)
        per_anchor = -(w * log_prob.masked_fill(w == 0, 0.0)).sum(1)
        return _reduce(per_anchor, self.reduction)
