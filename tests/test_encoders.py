"""Tests of monai_du.encoders' weight loaders for bundle runs: load_initial_weights (a pretraining run started from a
whole-network or encoder-only checkpoint) and load_pretrained_encoder (a fine-tuning run's encoder). load_encoder is
tested with the prior tables it feeds, in tests/test_priors.py."""

from __future__ import annotations

import logging

import pytest
import torch

from monai_du.encoders import load_initial_weights, load_pretrained_encoder
from monai_du.networks import ContrastiveEncoder, ProbeClassifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _net(seed: int) -> ContrastiveEncoder:
    torch.manual_seed(seed)
    return ContrastiveEncoder("resnet10", spatial_dims=2, projection_dim=4, backbone_kwargs={"widen_factor": 0.125})


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_load_initial_weights(tmp_path):
    source = _net(1)
    whole = tmp_path / "checkpoint_epoch=3.pt"  # as the bundles' checkpoint saver writes it, from a DDP network
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, whole)
    net = _net(2)
    assert load_initial_weights(net, whole) is net and _same(net.state_dict(), source.state_dict())

    encoder_only = tmp_path / "encoder.pt"
    torch.save(source.encoder.state_dict(), encoder_only)
    net = _net(2)
    head = {k: v.clone() for k, v in net.projector.state_dict().items()}
    load_initial_weights(net, encoder_only)
    assert _same(net.encoder.state_dict(), source.encoder.state_dict())
    assert _same(net.projector.state_dict(), head)  # the head keeps its initialisation

    net = _net(2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for nothing in (None, "", "null", "None"):
        assert _same(load_initial_weights(net, nothing).state_dict(), before)
    with pytest.raises(ValueError, match="init_checkpoint .*absent.pt.* does not exist"):
        load_initial_weights(net, tmp_path / "absent.pt")


def test_load_pretrained_encoder(tmp_path, caplog):
    source = _net(1)
    weights = tmp_path / "encoder.pt"
    torch.save(source.encoder.state_dict(), weights)
    probe = ProbeClassifier("resnet10", num_classes=2, spatial_dims=2, encoder_kwargs={"widen_factor": 0.125})
    assert load_pretrained_encoder(probe, weights, mode="finetune") is probe
    assert _same(probe.encoder.state_dict(), source.encoder.state_dict())

    with caplog.at_level(logging.WARNING, logger="monai_du"):
        load_pretrained_encoder(probe, None, mode="linear_probe")
        load_pretrained_encoder(probe, tmp_path / "absent.pt", mode="linear_probe")
    assert "RANDOM initialisation" in caplog.text and "absent.pt" in caplog.text
    with pytest.raises(ValueError, match="absent.pt.* not found \\(require_pretrained=true\\)"):
        load_pretrained_encoder(probe, tmp_path / "absent.pt", require=True)
