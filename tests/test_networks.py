from __future__ import annotations

import copy

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader
from torch import nn

from monai_du.networks import (
    ContrastiveEncoder,
    ProbeClassifier,
    ProjectionHead,
    build_encoder,
    encoder_state_dict,
    to_device,
)

TINY = {"widen_factor": 0.125}  # resnet widths 8..64: fast on CPU


def _tiny_net(spatial_dims: int = 2, projection_dim: int = 16) -> ContrastiveEncoder:
    torch.manual_seed(0)
    return ContrastiveEncoder(
        "resnet10", spatial_dims=spatial_dims, projection_dim=projection_dim, backbone_kwargs=TINY
    )


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("resnet10", TINY),
        ("resnet18", TINY),
        ("resnet34", TINY),
        ("resnet50", TINY),
        ("densenet121", {"init_features": 8, "growth_rate": 4, "block_config": (1, 1, 1, 1)}),
    ],
)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_build_encoder_feature_dim_matches_output(name, kwargs, spatial_dims):
    module, feature_dim = build_encoder(name, spatial_dims=spatial_dims, in_channels=2, **kwargs)
    side = 32 if name == "densenet121" else 16  # DenseNet downsamples by 32
    x = torch.rand((2, 2) + (side,) * spatial_dims)
    assert module.eval()(x).shape == (2, feature_dim)


def test_build_encoder_errors():
    with pytest.raises(ValueError, match="unknown backbone 'vit'"):
        build_encoder("vit")
    with pytest.raises(ValueError, match="spatial_dims"):
        build_encoder("resnet10", spatial_dims=4)
    with pytest.raises(ValueError, match="widths"):
        build_encoder("resnet10", widen_factor=0.001)
    with pytest.raises(ValueError, match="feed_forward"):
        build_encoder("resnet10", feed_forward=True)


@pytest.mark.parametrize("spatial_dims, size", [(2, (20, 16)), (3, (12, 10, 8))])
def test_contrastive_encoder_shapes(spatial_dims, size):
    net = _tiny_net(spatial_dims, projection_dim=24)
    assert net(torch.rand(3, 2, 1, *size)).shape == (3, 2, 24)
    assert net(torch.rand(3, 1, *size)).shape == (3, 24)
    assert net.forward_features(torch.rand(3, 2, 1, *size)).shape == (3, 2, net.feature_dim)


@pytest.mark.parametrize("spatial_dims, size", [(2, (16, 16)), (3, (8, 8, 8))])
def test_multiview_forward_equals_per_view_loop(spatial_dims, size):
    net = _tiny_net(spatial_dims).eval()
    x = torch.rand(4, 3, 1, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = net(x)
        reference = torch.stack([net(x[:, v]) for v in range(x.shape[1])], dim=1)
        features = net.forward_features(x)
        reference_features = torch.stack([net.encoder(x[:, v]) for v in range(x.shape[1])], dim=1)
    torch.testing.assert_close(z, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features, reference_features, rtol=1e-5, atol=1e-5)


def test_projection_head_structure_and_values():
    torch.manual_seed(0)
    head = ProjectionHead(6, 5, 3).eval()
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    x = torch.randn(4, 6, dtype=torch.float64)
    lin1, bn, _, lin2 = (m.double() for m in head)
    h = x @ lin1.weight.T + lin1.bias
    h = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    expected = h.clamp_min(0) @ lin2.weight.T + lin2.bias
    torch.testing.assert_close(head(x), expected)


def test_contrastive_encoder_input_errors():
    net = _tiny_net(2)
    with pytest.raises(ValueError, match=r"shape \[2, 16, 16\]"):
        net(torch.rand(2, 16, 16))
    with pytest.raises(ValueError, match="1 channel"):
        net(torch.rand(2, 2, 3, 16, 16))
    with pytest.raises(ValueError, match="feature_dim"):
        ContrastiveEncoder(nn.Identity())


def test_custom_backbone_module():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    net = ContrastiveEncoder(backbone, spatial_dims=2, feature_dim=10, projection_dim=4).eval()
    assert net(torch.rand(2, 3, 1, 8, 8)).shape == (2, 3, 4)
    assert net.encoder is backbone


def test_encoder_state_dict_round_trip(tmp_path):
    net = _tiny_net(2).eval()
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        expected = net.encoder(x)

    # encoder saved alone, loaded into a fresh encoder
    torch.save(net.encoder.state_dict(), tmp_path / "encoder.pt")
    torch.manual_seed(123)
    fresh, _ = build_encoder("resnet10", spatial_dims=2, in_channels=1, **TINY)
    with torch.no_grad():
        assert not torch.allclose(fresh.eval()(x), expected)  # different initialisation
    fresh.load_state_dict(encoder_state_dict(tmp_path / "encoder.pt"))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), expected, rtol=0, atol=0)

    # full network state dict, nested in a checkpoint, with DDP's "module." prefix
    nested = {"model": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}
    torch.save(nested, tmp_path / "checkpoint.pt")
    fresh2, _ = build_encoder("resnet10", spatial_dims=2, in_channels=1, **TINY)
    fresh2.load_state_dict(encoder_state_dict(tmp_path / "checkpoint.pt"))
    with torch.no_grad():
        torch.testing.assert_close(fresh2.eval()(x), expected, rtol=0, atol=0)

    with pytest.raises(ValueError, match="no state dict found"):
        encoder_state_dict({"epoch": 3})


def test_pretrain_checkpoint_loads_into_probe_with_checkpoint_loader(tmp_path):
    net = _tiny_net(2)
    torch.save({"model": net.state_dict()}, tmp_path / "pretrain.pt")
    probe = ProbeClassifier("resnet10", num_classes=3, spatial_dims=2, encoder_kwargs=TINY)
    classifier_before = probe.classifier.weight.detach().clone()
    loader = CheckpointLoader(load_path=str(tmp_path / "pretrain.pt"), load_dict={"model": probe}, strict=False)
    loader(Engine(lambda engine, batch: None))
    for key, value in net.encoder.state_dict().items():
        torch.testing.assert_close(probe.encoder.state_dict()[key], value, rtol=0, atol=0)
    assert torch.equal(probe.classifier.weight, classifier_before)


def _train_step(probe: ProbeClassifier) -> None:
    optimizer = torch.optim.SGD([p for p in probe.parameters() if p.requires_grad], lr=0.5)
    probe.train()
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 1, 0])
    loss = nn.functional.cross_entropy(probe(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_probe_classifier_frozen_encoder_does_not_change():
    net = _tiny_net(2)
    probe = ProbeClassifier(net, num_classes=2, freeze=True)
    assert probe.feature_dim == net.feature_dim
    assert all(not p.requires_grad for p in probe.encoder.parameters())
    assert all(p.requires_grad for p in probe.classifier.parameters())
    encoder_before = {k: v.clone() for k, v in probe.encoder.state_dict().items()}  # weights and BN statistics
    classifier_before = probe.classifier.weight.detach().clone()
    _train_step(probe)
    assert not probe.encoder.training and probe.classifier.training
    for key, value in probe.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key
    assert not torch.equal(probe.classifier.weight, classifier_before)


def test_probe_classifier_full_finetune_updates_encoder():
    probe = ProbeClassifier("resnet10", num_classes=2, freeze=False, encoder_kwargs=TINY)
    assert all(p.requires_grad for p in probe.parameters())
    before = probe.encoder.conv1.weight.detach().clone()
    _train_step(probe)
    assert probe.encoder.training
    assert not torch.equal(probe.encoder.conv1.weight, before)


def test_probe_classifier_argument_checks():
    with pytest.raises(ValueError, match="feature_dim"):
        ProbeClassifier(nn.Identity(), num_classes=2)
    with pytest.raises(ValueError, match="gives 64"):
        ProbeClassifier("resnet10", feature_dim=32, encoder_kwargs=TINY)
    with pytest.raises(ValueError, match="num_classes"):
        ProbeClassifier("resnet10", num_classes=0, encoder_kwargs=TINY)


@pytest.mark.parametrize("spatial_dims, size", [(2, (16, 16)), (3, (8, 8, 8))])
def test_probe_classifier_trace_and_script_round_trip(tmp_path, spatial_dims, size):
    torch.manual_seed(0)
    probe = ProbeClassifier("resnet10", num_classes=3, spatial_dims=spatial_dims, encoder_kwargs=TINY).eval()
    example = torch.rand(2, 1, *size)
    other = torch.rand(5, 1, *size)  # another batch size: the export must not bake in the example's shape
    with torch.no_grad():
        expected = probe(other)
    traced = torch.jit.trace(probe, example)
    torch.jit.save(traced, tmp_path / "traced.ts")
    scripted = torch.jit.script(probe)
    torch.jit.save(scripted, tmp_path / "scripted.ts")
    for path in ("traced.ts", "scripted.ts"):
        loaded = torch.jit.load(tmp_path / path)
        with torch.no_grad():
            torch.testing.assert_close(loaded(other), expected, rtol=1e-5, atol=1e-5)


def test_contrastive_encoder_scripts(tmp_path):
    net = _tiny_net(2).eval()
    x = torch.rand(2, 2, 1, 16, 16)
    with torch.no_grad():
        expected = net(x)
    scripted = torch.jit.script(net)
    torch.jit.save(scripted, tmp_path / "net.ts")
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(tmp_path / "net.ts")(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial_dims, size, layout", [(2, 32, torch.channels_last), (3, 16, torch.channels_last_3d)])
def test_to_device_channels_last_on_cpu_keeps_outputs_and_gradients(spatial_dims, size, layout):
    torch.manual_seed(0)
    plain = ContrastiveEncoder("resnet10", spatial_dims=spatial_dims, in_channels=1, projection_dim=8,
                               backbone_kwargs={"widen_factor": 0.25})
    fast = to_device(copy.deepcopy(plain), "cpu")
    convs = [p for p in fast.parameters() if p.dim() == spatial_dims + 2]
    assert convs and all(p.is_contiguous(memory_format=layout) for p in convs)
    assert any(not p.is_contiguous() for p in convs)  # (1x1 kernels and 1 input channel are both layouts at once)
    assert all(p.is_contiguous() for p in plain.parameters())
    reference = copy.deepcopy(plain).double()  # float64, default layout: the independent reference
    x = torch.rand(4, 2, 1, *([size] * spatial_dims), generator=torch.Generator().manual_seed(1))
    out_ref, out_plain, out_fast = reference(x.double()), plain(x), fast(x)
    torch.testing.assert_close(out_fast.double(), out_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_plain.double(), out_ref, atol=1e-5, rtol=1e-4)
    for out in (out_ref, out_plain, out_fast):
        out.square().sum().backward()
    scale = max(p.grad.abs().max().item() for p in reference.parameters())  # errors of float32 summation order
    for (name, r), (_, a), (_, b) in zip(reference.named_parameters(), plain.named_parameters(),
                                         fast.named_parameters()):
        assert (b.grad.double() - r.grad).abs().max().item() <= 1e-4 * scale, name
        assert (a.grad.double() - r.grad).abs().max().item() <= 1e-4 * scale, name
    # a checkpoint of the channels-last network loads into a default one and gives the same outputs
    fresh = ContrastiveEncoder("resnet10", spatial_dims=spatial_dims, in_channels=1, projection_dim=8,
                               backbone_kwargs={"widen_factor": 0.25})
    fresh.load_state_dict(fast.state_dict())
    torch.testing.assert_close(fresh(x), out_fast.detach(), atol=1e-5, rtol=1e-4)


def test_to_device_leaves_mixed_or_convolution_free_networks_as_they_are():
    mixed = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv3d(1, 2, 3))
    assert to_device(mixed, "cpu") is mixed
    assert all(p.is_contiguous() for p in mixed.parameters())
    linear = nn.Linear(3, 2)
    assert to_device(linear, torch.device("cpu")) is linear and linear.weight.is_contiguous()
