"""Losses against independent float64 references: explicit formulas, explicit inverses and brute-force loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator

import monai_du
from monai_du.kernels import CategoricalKernel, CosineKernel, RBFKernel, kernel_summary, patient_time_kernel
from monai_du.losses import (
    DecoupledUniformityLoss,
    InfoNCELoss,
    YAwareInfoNCELoss,
    alignment,
    conditional_mean_centroids,
    uniformity,
)


def _data(b=24, v=2, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, v, d, generator=g, dtype=dtype)
    age = 20 + 70 * torch.rand(b, 1, generator=g, dtype=torch.float64)
    sex = torch.randint(0, 2, (b, 1), generator=g).double()
    site = torch.randint(0, 3, (b, 1), generator=g).double()
    return z, torch.cat([age, sex, site], 1)


def _reference_du(z, gram=None, lam=0.01, t=2.0):
    """DU written from the paper's formulas: explicit inverse, python loop over pairs, float64."""
    z = z.double()
    u = z / torch.sqrt((z * z).sum(-1, keepdim=True))
    mu = u.sum(1) / z.shape[1]
    if gram is not None:
        gram = torch.as_tensor(gram, dtype=torch.float64)
        mu = torch.linalg.inv(gram + lam * torch.eye(len(gram), dtype=torch.float64)) @ gram @ mu
    terms = []
    for i in range(len(mu)):
        for j in range(i + 1, len(mu)):
            terms.append(torch.exp(-t * ((mu[i] - mu[j]) ** 2).sum()))
    return torch.log(sum(terms) / len(terms))


def _loop_gram(fn, prior):
    p = prior.numpy()
    return torch.tensor([[fn(a, b) for b in p] for a in p], dtype=torch.float64)


def _grad(fn, z):
    z = z.clone().requires_grad_(True)
    out = fn(z)
    (g,) = torch.autograd.grad(out, z)
    return out.detach(), g


@pytest.mark.parametrize("views", [2, 3, 5])
def test_plain_du_value_and_gradient(views):
    z, _ = _data(v=views)
    got, g_got = _grad(lambda x: DecoupledUniformityLoss()(x), z)
    want, g_want = _grad(lambda x: _reference_du(x), z)
    assert float(got) == pytest.approx(float(want), rel=1e-10)
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("t", [0.5, 2.0, 5.0])
def test_rbf_kernel_du_value_and_gradient(t):
    z, prior = _data()
    s = 12.0
    gram = _loop_gram(lambda a, b: math.exp(-((a - b) ** 2).sum() / (2 * s * s)), prior[:, :1])
    loss = DecoupledUniformityLoss(kernel=RBFKernel(bandwidth=s, columns=[0]), t=t)
    got, g_got = _grad(lambda x: loss(x, prior), z)
    want, g_want = _grad(lambda x: _reference_du(x, gram, t=t), z)
    assert float(got) == pytest.approx(float(want), rel=1e-9)
    torch.testing.assert_close(g_got, g_want, rtol=1e-7, atol=1e-10)
    assert loss.last_kernel_stats["kernel_path"] == "cholesky"


def test_rbf_kernel_du_on_all_prior_columns_float32_input():
    z, prior = _data(b=64, d=16)
    s = 9.0
    gram = _loop_gram(lambda a, b: math.exp(-((a - b) ** 2).sum() / (2 * s * s)), prior)
    got = DecoupledUniformityLoss(kernel=RBFKernel(bandwidth=s))(z.float(), prior.float())
    want = _reference_du(z, gram)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_product_kernel_block_path_matches_reference():
    z, prior = _data(b=40, v=3)
    kernel = RBFKernel(bandwidth=10.0, columns=[0]) * CategoricalKernel(columns=[1]) * CategoricalKernel(columns=[2])
    gram = _loop_gram(lambda a, b: math.exp(-((a[0] - b[0]) ** 2) / 200.0) * (a[1] == b[1]) * (a[2] == b[2]), prior)
    loss = DecoupledUniformityLoss(kernel=kernel, lam=0.05)
    got, g_got = _grad(lambda x: loss(x, prior), z)
    want, g_want = _grad(lambda x: _reference_du(x, gram, lam=0.05), z)
    assert loss.last_kernel_stats["kernel_path"] == "cholesky, blocks=6"
    assert float(got) == pytest.approx(float(want), rel=1e-9)
    torch.testing.assert_close(g_got, g_want, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("instance_weight", [0.0, 0.02, 1.0])
def test_woodbury_matches_exact_and_reference(instance_weight):
    z, prior = _data(b=48)
    kernel = CategoricalKernel(columns=[1]) * CategoricalKernel(columns=[2]) + 0.5 * CosineKernel(columns=[0, 2])
    gram = kernel(prior) + instance_weight * torch.eye(48, dtype=torch.float64)
    low = DecoupledUniformityLoss(kernel=kernel, low_rank=True, instance_weight=instance_weight)
    exact = DecoupledUniformityLoss(kernel=kernel, low_rank=False, instance_weight=instance_weight)
    got, g_low = _grad(lambda x: low(x, prior), z)
    ex, g_exact = _grad(lambda x: exact(x, prior), z)
    want = _reference_du(z, gram)
    assert low.last_kernel_stats["kernel_path"].startswith("woodbury")
    assert exact.last_kernel_stats["kernel_path"] == "cholesky"
    assert float(got) == pytest.approx(float(want), rel=1e-9)
    assert float(ex) == pytest.approx(float(want), rel=1e-9)
    torch.testing.assert_close(g_low, g_exact, rtol=1e-7, atol=1e-10)
    for key in ("kernel_mean_offdiag", "kernel_effective_rank"):
        assert low.last_kernel_stats[key] == pytest.approx(exact.last_kernel_stats[key], rel=1e-9)


def test_auto_path_uses_exact_feature_map_when_cheaper():
    z, prior = _data(b=64)
    loss = DecoupledUniformityLoss(kernel=CategoricalKernel(columns=[1, 2]))  # rank <= 6
    loss(z, prior)
    assert loss.last_kernel_stats["kernel_path"].startswith("woodbury")
    rbf = DecoupledUniformityLoss(kernel=RBFKernel(5.0, columns=[0]))  # no exact feature map
    rbf(z, prior)
    assert rbf.last_kernel_stats["kernel_path"] == "cholesky"


def test_low_rank_rbf_paths_are_close_to_exact():
    z, prior = _data(b=96, d=16)
    prior[::9, 0] = float("nan")
    for fourier, tol in (("rff", 0.05), ("quadrature", 1e-8)):
        kernel = RBFKernel(bandwidth=15.0, columns=[0], n_features=2048, fourier=fourier) * CategoricalKernel([2])
        low = DecoupledUniformityLoss(kernel=kernel, low_rank=True)
        approx = low(z, prior)
        exact = DecoupledUniformityLoss(kernel=kernel, low_rank=False)(z, prior)
        assert low.last_kernel_stats["kernel_path"].startswith("woodbury")
        assert "blocks=3" in low.last_kernel_stats["kernel_path"]
        assert abs(float(approx) - float(exact)) / abs(float(exact)) < tol


def test_instance_weight_interpolates_between_kernel_and_plain_du():
    z, prior = _data(b=32)
    kernel = CategoricalKernel(columns=[1])
    plain = float(DecoupledUniformityLoss()(z))
    coarse = float(DecoupledUniformityLoss(kernel=kernel)(z, prior))
    weights = (1e-3, 1e-2, 1e-1, 1e3)
    values = [float(DecoupledUniformityLoss(kernel=kernel, instance_weight=w)(z, prior)) for w in weights]
    # with the within-group differences removed, only the two sex centroids remain: the loss differs from plain DU,
    # and the instance term brings it back monotonically towards plain DU
    assert abs(coarse - plain) > 0.1
    assert values[-1] == pytest.approx(plain, abs=1e-4)
    distances = [abs(v - plain) for v in values]
    assert all(a > b for a, b in zip(distances, distances[1:]))


def test_nan_prior_gives_finite_loss_and_gradient():
    z, prior = _data(b=32)
    prior[::4, 0] = float("nan")
    prior[1::5, 2] = float("nan")
    kernel = RBFKernel(bandwidth=10.0, columns=[0]) * CategoricalKernel(columns=[1]) * CategoricalKernel(columns=[2])
    value, grad = _grad(lambda x: DecoupledUniformityLoss(kernel=kernel)(x, prior), z)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    gram = kernel(prior)
    assert float(value) == pytest.approx(float(_reference_du(z, gram)), rel=1e-9)


@pytest.mark.parametrize("fitted", [False, True])
def test_blocks_with_missing_ages_match_the_batch_kernel(fitted):
    z, prior = _data(b=40)
    prior[::3, 0] = float("nan")  # ages missing, sex and site known: the kernel is still block-diagonal
    kernel = RBFKernel(bandwidth=10.0, columns=[0]) * CategoricalKernel(columns=[1]) * CategoricalKernel(columns=[2])
    if fitted:
        kernel.fit(_data(b=200, seed=5)[1])
    loss = DecoupledUniformityLoss(kernel=kernel, instance_weight=0.02)
    value = loss(z, prior)
    gram = kernel(prior) + 0.02 * torch.eye(40, dtype=torch.float64)  # the whole batch's kernel
    assert loss.last_kernel_stats["kernel_path"].startswith("cholesky, blocks=")
    assert float(value) == pytest.approx(float(_reference_du(z, gram)), rel=1e-9)
    summary = kernel_summary(gram)
    for key, want in summary.items():
        assert loss.last_kernel_stats[key] == pytest.approx(want, rel=1e-9)


def test_no_gradient_flows_into_the_prior():
    z, prior = _data()
    prior = prior.clone().requires_grad_(True)
    z = z.clone().requires_grad_(True)
    DecoupledUniformityLoss(kernel=RBFKernel(10.0, columns=[0]))(z, prior).backward()
    assert prior.grad is None and z.grad is not None


def test_metrics_after_call_and_frozen_functions():
    z, _ = _data(v=3)
    loss = DecoupledUniformityLoss()
    value = loss(z)
    u = z / z.norm(dim=-1, keepdim=True)
    mu = u.mean(1)
    assert loss.last_alignment == pytest.approx(float(-(mu**2).sum(1).mean()), rel=1e-12)
    assert loss.last_uniformity == pytest.approx(float(value))
    assert float(alignment(z)) == pytest.approx(loss.last_alignment, rel=1e-12)
    assert float(uniformity(z)) == pytest.approx(float(_reference_du(z)), rel=1e-10)
    flat = torch.randn(15, 4, dtype=torch.float64)
    x = flat / flat.norm(dim=1, keepdim=True)
    pairs = [math.exp(-2 * float(((x[i] - x[j]) ** 2).sum())) for i in range(15) for j in range(i + 1, 15)]
    assert float(uniformity(flat)) == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-10)
    aligned = torch.randn(6, 1, 4).repeat(1, 3, 1)
    assert float(alignment(aligned)) == pytest.approx(-1.0, abs=1e-6)


def _reference_infonce(z, temperature, weights=None):
    """Brute-force NT-Xent (or y-Aware with given weights) over anchors, float64 with explicit log-sum-exp."""
    b, v, d = z.shape
    u = (z / z.norm(dim=-1, keepdim=True)).reshape(b * v, d).double()
    n = b * v
    total = []
    for a in range(n):
        logits = [float(u[a] @ u[k]) / temperature for k in range(n) if k != a]
        top = max(logits)
        lse = top + math.log(sum(math.exp(x - top) for x in logits))
        loss = 0.0
        for j in range(n):
            if j == a:
                continue
            w = weights[a][j] if weights is not None else (1.0 / (v - 1) if j // v == a // v else 0.0)
            if w:
                loss -= w * (float(u[a] @ u[j]) / temperature - lse)
        total.append(loss)
    return sum(total) / n, total


@pytest.mark.parametrize("views", [2, 3])
@pytest.mark.parametrize("temperature", [0.5, 0.1, 0.01])
def test_infonce_matches_loop(views, temperature):
    z, _ = _data(b=10, v=views)
    want, per_anchor = _reference_infonce(z, temperature)
    assert float(InfoNCELoss(temperature)(z)) == pytest.approx(want, rel=1e-10)
    np.testing.assert_allclose(InfoNCELoss(temperature, reduction="none")(z).numpy(), per_anchor, rtol=1e-10)
    assert float(InfoNCELoss(temperature, reduction="sum")(z)) == pytest.approx(sum(per_anchor), rel=1e-10)


def test_infonce_stable_at_low_temperature_in_float32():
    z, _ = _data(b=16)
    value, grad = _grad(lambda x: InfoNCELoss(0.005)(x), z.float())
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert float(value) == pytest.approx(_reference_infonce(z, 0.005)[0], rel=1e-4)


def test_y_aware_weights_hand_computed_and_row_normalised():
    # three samples, two views; sample 0 and 1 share a category, sample 2 does not.
    prior = torch.tensor([[0.0], [0.0], [1.0]], dtype=torch.float64)
    loss = YAwareInfoNCELoss(kernel=CategoricalKernel(columns=[0]))
    w = loss.weights(prior, num_views=2).numpy()
    # embeddings 0,1 (sample 0), 2,3 (sample 1), 4,5 (sample 2); anchor 0 is similar to 1, 2, 3 -> 1/3 each
    third = 1 / 3
    want = np.array(
        [
            [0, third, third, third, 0, 0],
            [third, 0, third, third, 0, 0],
            [third, third, 0, third, 0, 0],
            [third, third, third, 0, 0, 0],
            [0, 0, 0, 0, 0, 1],
            [0, 0, 0, 0, 1, 0],
        ]
    )
    np.testing.assert_allclose(w, want, rtol=1e-12)
    # an asymmetric case: rows sum to 1, columns do not
    rbf = YAwareInfoNCELoss(kernel=RBFKernel(1.0)).weights(torch.tensor([[0.0], [0.5], [3.0]]), num_views=2)
    np.testing.assert_allclose(rbf.sum(1).numpy(), 1.0, rtol=1e-12)
    assert not np.allclose(rbf.sum(0).numpy(), 1.0)


def test_y_aware_matches_loop_and_reduces_to_infonce():
    z, prior = _data(b=8, v=2)
    kernel = RBFKernel(bandwidth=15.0, columns=[0])
    b, v = 8, 2
    gram = _loop_gram(lambda a, c: math.exp(-((a[0] - c[0]) ** 2) / 450.0), prior).numpy()
    weights = [[0.0] * (b * v) for _ in range(b * v)]
    for a in range(b * v):
        row = [gram[a // v][k // v] if k != a else 0.0 for k in range(b * v)]
        total = sum(row)
        weights[a] = [r / total for r in row]
    want, _ = _reference_infonce(z, 0.1, weights)
    assert float(YAwareInfoNCELoss(kernel, temperature=0.1)(z, prior)) == pytest.approx(want, rel=1e-10)
    unique = torch.arange(8, dtype=torch.float64)[:, None]
    y_aware = YAwareInfoNCELoss(CategoricalKernel(columns=[0]), temperature=0.1)(z, unique)
    assert float(y_aware) == pytest.approx(float(InfoNCELoss(0.1)(z)), rel=1e-12)


@pytest.mark.parametrize(
    "make, args, match",
    [
        (lambda: DecoupledUniformityLoss(), (torch.randn(4, 8),), r"\(B, V, D\)"),
        (lambda: DecoupledUniformityLoss(), (torch.randn(4, 1, 8),), "at least 2 views"),
        (lambda: DecoupledUniformityLoss(), (torch.randn(1, 2, 8),), "at least 2 samples"),
        (lambda: DecoupledUniformityLoss(), (torch.full((4, 2, 8), float("nan")),), "non-finite"),
        (lambda: DecoupledUniformityLoss(), (torch.tensor([[[1.0, float("inf")]] * 2] * 3),), "non-finite"),
        (lambda: DecoupledUniformityLoss(RBFKernel(1.0)), (torch.randn(4, 2, 8), torch.randn(5, 1)), r"B=4"),
        (lambda: DecoupledUniformityLoss(RBFKernel(1.0)), (torch.randn(4, 2, 8), torch.randn(4)), r"\(B=4, P\)"),
        (lambda: DecoupledUniformityLoss(RBFKernel(1.0)), (torch.randn(4, 2, 8),), "needs the"),
        (lambda: InfoNCELoss(), (torch.randn(4, 1, 8),), "at least 2 views"),
        (lambda: YAwareInfoNCELoss(RBFKernel(1.0)), (torch.randn(4, 2, 8), torch.randn(3, 1)), r"B=4"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, args, match):
    with pytest.raises(ValueError, match=match):
        make()(*args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lam": 0.0}, "lam"),
        ({"lam": -0.1}, "lam"),
        ({"t": 0.0}, "t must"),
        ({"instance_weight": -1.0}, "instance_weight"),
        ({"low_rank": "sometimes"}, "low_rank"),
        ({"kernel": "rbf"}, "PriorKernel"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecoupledUniformityLoss(**kwargs)
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0.0)


def test_bundle_config_resolves_short_names():
    config = {
        "imports": ["$import monai_du"],
        "age": {"_target_": "RBFKernel", "bandwidth": 10.0, "columns": [0]},
        "sex": {"_target_": "CategoricalKernel", "columns": [1]},
        "loss": {"_target_": "DecoupledUniformityLoss", "kernel": "$@age * @sex", "lam": 0.05},
        "infonce": {"_target_": "InfoNCELoss", "temperature": 0.2},
        "yaware": {"_target_": "YAwareInfoNCELoss", "kernel": "@age"},
    }
    parser = ConfigParser(config)
    loss = parser.get_parsed_content("loss")
    assert isinstance(loss, DecoupledUniformityLoss) and loss.lam == 0.05
    z, prior = _data()
    gram = _loop_gram(lambda a, b: math.exp(-((a[0] - b[0]) ** 2) / 200.0) * (a[1] == b[1]), prior)
    assert float(loss(z, prior)) == pytest.approx(float(_reference_du(z, gram, lam=0.05)), rel=1e-9)
    assert isinstance(parser.get_parsed_content("infonce"), InfoNCELoss)
    assert isinstance(parser.get_parsed_content("yaware"), YAwareInfoNCELoss)


def test_no_component_name_clashes_with_monai():
    locator = ComponentLocator()
    for name in ("DecoupledUniformityLoss", "InfoNCELoss", "YAwareInfoNCELoss", "RBFKernel", "CategoricalKernel",
                 "CosineKernel", "ProductKernel", "SumKernel", "ScaledKernel", "PriorKernel"):
        module = locator.get_component_module_name(name)
        assert isinstance(module, str) and module.startswith("monai_du."), (name, module)
        assert getattr(monai_du, name) is not None


# -- precision: half-precision priors and autocast --------------------------------------------------------------------


def _vector_du(c, t=2.0):
    """DU of centroids (B, D) from the explicit float64 distance matrix (for batches too large for a Python loop)."""
    c = c.double()
    sq = ((c[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    iu = torch.triu_indices(len(c), len(c), 1)
    return torch.log(torch.exp(-t * sq[iu[0], iu[1]]).mean())


def test_bf16_prior_gives_the_float64_loss():
    z, prior = _data(b=48)
    half = prior.to(torch.bfloat16)
    s = 6.0
    gram = _loop_gram(lambda a, b: math.exp(-((a[0] - b[0]) ** 2) / (2 * s * s)), half.double()[:, :1])
    loss = DecoupledUniformityLoss(kernel=RBFKernel(bandwidth=s, columns=[0]))
    got = loss(z.float(), half)
    assert float(got) == pytest.approx(float(_reference_du(z.float(), gram)), rel=1e-5)


def test_autocast_does_not_reach_the_kernel_step():
    z, prior = _data(b=64, d=16)
    emb = torch.randn(64, 12, generator=torch.Generator().manual_seed(3))
    prior = torch.cat([prior, emb.double()], 1)
    kernel = CosineKernel(columns=list(range(3, 15))) + RBFKernel(3.0, columns=list(range(3, 15)))
    unit = emb.double() / emb.double().norm(dim=1, keepdim=True)
    sq = ((emb.double()[:, None] - emb.double()[None]) ** 2).sum(-1)
    gram = unit @ unit.T + torch.exp(-sq / 18.0)
    mu = F.normalize(z.float(), dim=-1).mean(1)
    want = torch.linalg.solve(gram + 0.01 * torch.eye(64, dtype=torch.float64), gram @ mu.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (mu @ mu.T).dtype == torch.bfloat16  # the premise: autocast runs matrix products in bf16
        centroids, _ = conditional_mean_centroids(mu, kernel, prior.float())
        loss = DecoupledUniformityLoss(kernel=kernel)
        value = loss(z.float().requires_grad_(True), prior.float())
    assert centroids.dtype == torch.float32 and value.dtype == torch.float32
    torch.testing.assert_close(centroids.double(), want, rtol=1e-5, atol=1e-6)
    assert float(value.detach()) == pytest.approx(float(_reference_du(z.float(), gram)), rel=1e-5)
    # embeddings that a network produced under autocast arrive in bf16: the loss of their values, in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = loss(z.to(torch.bfloat16), prior.float())
    assert half.dtype == torch.float32
    assert float(half) == pytest.approx(float(_reference_du(z.to(torch.bfloat16).double(), gram)), rel=1e-5)


# -- dense solvers: refinement and Nystrom -----------------------------------------------------------------------------


def _dense(b, seed=0):
    z, prior = _data(b=b, seed=seed)
    prior[:, 1] = 10 * torch.rand(b, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return z, prior, RBFKernel([8.0, 2.0, 1.5], columns=[0, 1, 2])


@pytest.mark.parametrize("lam", [0.01, 1e-4])
def test_refined_solve_matches_float64_solve_and_gradient(lam):
    torch.set_num_threads(1)
    z, prior, kernel = _dense(300)
    gram = kernel(prior)
    mu = F.normalize(z, dim=-1).mean(1).requires_grad_(True)
    want = torch.linalg.solve(gram + lam * torch.eye(300, dtype=torch.float64), gram @ mu)
    weights = torch.randn_like(want)
    (g_want,) = torch.autograd.grad((want * weights).sum(), mu)
    got, stats = conditional_mean_centroids(mu, kernel, prior.float(), lam, solver="mixed", refine_tol=1e-8)
    (g_got,) = torch.autograd.grad((got * weights).sum(), mu)
    got, want = got.detach(), want.detach()
    assert stats["kernel_path"].startswith("refined(")
    assert float((got - want).norm() / want.norm()) < 1e-6
    assert float((g_got - g_want).norm() / g_want.norm()) < 1e-6


def test_refinement_falls_back_to_float64_when_float32_cannot_factor():
    z, prior, kernel = _dense(200)
    kernel = RBFKernel(60.0, columns=[0])  # smooth: K + lam I is singular in float32 for lam = 1e-6
    gram = kernel(prior)
    mu = F.normalize(z, dim=-1).mean(1)
    want = torch.linalg.solve(gram + 1e-6 * torch.eye(200, dtype=torch.float64), gram @ mu)
    got, stats = conditional_mean_centroids(mu, kernel, prior, 1e-6, solver="mixed")
    assert "fallback" in stats["kernel_path"]
    assert float((got - want).norm() / want.norm()) < 1e-6


def test_nystrom_at_full_rank_equals_exact_path():
    z, prior, kernel = _dense(96)
    prior[::7, 0] = float("nan")
    kernel.fit(_dense(300, seed=4)[1])
    gram = kernel(prior)
    nystrom = DecoupledUniformityLoss(kernel=kernel, solver="nystrom", rank=96)
    exact = DecoupledUniformityLoss(kernel=kernel, solver="cholesky")
    got, g_got = _grad(lambda x: nystrom(x, prior), z)
    ex, g_exact = _grad(lambda x: exact(x, prior), z)
    assert nystrom.last_kernel_stats["kernel_path"].startswith("nystrom(rank<=")
    assert float(got) == pytest.approx(float(_reference_du(z, gram)), rel=1e-8)
    assert float(got) == pytest.approx(float(ex), rel=1e-8)
    torch.testing.assert_close(g_got, g_exact, rtol=1e-6, atol=1e-9)
    for key in ("kernel_mean_offdiag", "kernel_effective_rank"):
        assert nystrom.last_kernel_stats[key] == pytest.approx(kernel_summary(gram)[key], rel=1e-7)
    smooth = RBFKernel([30.0, 8.0, 6.0], columns=[0, 1, 2]).fit(_dense(300, seed=4)[1])
    full = float(_reference_du(z, smooth(prior)))
    errors = [abs(float(DecoupledUniformityLoss(kernel=smooth, solver="nystrom", rank=r)(z, prior)) - full) / abs(full)
              for r in (16, 32, 64)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5  # the error falls fast with the rank


@pytest.mark.parametrize(
    "kwargs, match",
    [({"solver": "qr"}, "solver"), ({"rank": 0}, "rank"), ({"refine_tol": 0.0}, "refine_tol")],
)
def test_bad_solver_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecoupledUniformityLoss(kernel=RBFKernel(1.0), **kwargs)


# -- patient x time prior ----------------------------------------------------------------------------------------------


def test_patient_time_loss_with_thousands_of_patients_matches_float64_formula():
    torch.set_num_threads(1)
    rng = np.random.default_rng(8)
    train_patients = np.repeat(np.arange(3000), 3).astype(float)
    train = np.stack([train_patients, rng.integers(0, 1500, len(train_patients)).astype(float)], 1)
    kernel = patient_time_kernel(patient_column=0, time_column=1).fit(train)
    b = 1500
    patients = rng.choice(3000, 700, replace=False)
    prior = np.stack([rng.choice(patients, b).astype(float), rng.integers(0, 1500, b).astype(float)], 1)
    prior[::50, 0] = np.nan  # patients unknown to the prior encoder: each its own block
    prior[3::40, 1] = np.nan  # missing offsets: expected feature under the training offsets
    h2, m, v = kernel.k2.bandwidth[0] ** 2, train[:, 1].mean(), train[:, 1].var()
    p, t = prior[:, 0], prior[:, 1]
    same = (p[:, None] == p[None, :]) | np.eye(b, dtype=bool)
    tm = np.isnan(t)
    one = np.sqrt(h2 / (h2 + v)) * np.exp(-((np.where(tm, m, t) - m) ** 2) / (2 * (h2 + v)))
    rbf = np.exp(-((t[:, None] - t[None, :]) ** 2) / (2 * h2))
    rbf = np.where(tm[:, None] & ~tm[None, :], one[None, :], rbf)
    rbf = np.where(~tm[:, None] & tm[None, :], one[:, None], rbf)
    rbf = np.where(tm[:, None] & tm[None, :], np.sqrt(h2 / (h2 + 2 * v)), rbf)
    gram = torch.tensor(np.where(same, rbf, 0.0))
    z = torch.randn(b, 2, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loss = DecoupledUniformityLoss(kernel=kernel, instance_weight=0.05)
    value = loss(z, torch.tensor(prior, dtype=torch.float32))
    u = z / z.norm(dim=-1, keepdim=True)
    mu = u.mean(1)
    a = gram + 0.05 * torch.eye(b, dtype=torch.float64)
    c = torch.linalg.inv(a + 0.01 * torch.eye(b, dtype=torch.float64)) @ a @ mu
    assert float(value) == pytest.approx(float(_vector_du(c)), rel=1e-8)
    blocks = len(set(p[~np.isnan(p)])) + int(np.isnan(p).sum())
    assert loss.last_kernel_stats["kernel_path"] == f"cholesky, blocks={blocks}" and blocks > 500
    for key, want in kernel_summary(a).items():
        assert loss.last_kernel_stats[key] == pytest.approx(want, rel=1e-9)
