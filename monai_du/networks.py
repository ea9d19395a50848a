"""Encoder backbones (from MONAI's networks), projection head, and the classifier used to probe or fine-tune.

- :func:`build_encoder` makes a MONAI ResNet or DenseNet121 (2D or 3D) that maps ``(N, C, *spatial)`` to features
  ``(N, F)``.
- :class:`ContrastiveEncoder` is the pretraining network: ``.encoder`` (the backbone) then ``.projector``
  (:class:`ProjectionHead`), mapping ``(B, V, C, *spatial)`` to ``(B, V, D)``.
- :class:`ProbeClassifier` is the fine-tuning network: ``.encoder`` then a linear ``.classifier``.

Both networks keep the backbone under the attribute ``encoder``, so their state dicts share the ``encoder.`` key
prefix. A pretraining checkpoint therefore loads into a :class:`ProbeClassifier` with
``monai.handlers.CheckpointLoader(..., strict=False)`` (the projector keys are ignored, the classifier keeps its
initialisation), and :func:`encoder_state_dict` extracts the encoder's weights from either kind of checkpoint, or
from a file written by ``torch.save(net.encoder.state_dict())``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets import DenseNet121
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck
from torch import nn

__all__ = [
    "ENCODER_NAMES",
    "build_encoder",
    "ProjectionHead",
    "ContrastiveEncoder",
    "ProbeClassifier",
    "encoder_state_dict",
    "to_device",
]

# name -> (block, layers)
_RESNETS: dict[str, tuple[type[ResNetBlock | ResNetBottleneck], list[int]]] = {
    "resnet10": (ResNetBlock, [1, 1, 1, 1]),
    "resnet18": (ResNetBlock, [2, 2, 2, 2]),
    "resnet34": (ResNetBlock, [3, 4, 6, 3]),
    "resnet50": (ResNetBottleneck, [3, 4, 6, 3]),
}
_RESNET_INPLANES = [64, 128, 256, 512]

#: Backbone names accepted by :func:`build_encoder`.
ENCODER_NAMES: tuple[str, ...] = (*_RESNETS, "densenet121")


def build_encoder(
    name: str = "resnet18",
    spatial_dims: int = 2,
    in_channels: int = 1,
    widen_factor: float = 1.0,
    **kwargs: Any,
) -> tuple[nn.Module, int]:
    """Build a MONAI backbone without its classification layer.

    ResNets are :class:`monai.networks.nets.ResNet` with ``feed_forward=False``; the stem defaults to a 7-wide,
    stride-2 convolution followed by max pooling (as in the usual ImageNet ResNet; MONAI's own default stride is 1,
    pass ``conv1_t_stride=1`` to get it back). ``widen_factor`` scales the channel widths ``[64, 128, 256, 512]``:
    ``build_encoder("resnet10", widen_factor=0.125)`` (8 to 64 channels, 64 features) is the small, fast setting for
    CPU smoke tests and the demo. DenseNet121 is :class:`monai.networks.nets.DenseNet121` with its last linear layer
    replaced by an identity; pass ``init_features``, ``growth_rate`` or ``block_config`` to shrink it.

    Nothing is downloaded: backbones are always randomly initialised.

    Args:
        name: one of :data:`ENCODER_NAMES` (case-insensitive).
        spatial_dims: 2 or 3.
        in_channels: input channels ``C``.
        widen_factor: channel multiplier for the ResNets (must be 1 for DenseNet121).
        kwargs: further arguments of the MONAI network (e.g. ``conv1_t_size``, ``norm``, ``growth_rate``).

    Returns:
        ``(module, feature_dim)``: the module maps ``(N, C, *spatial)`` to ``(N, feature_dim)``.
    """
    key = str(name).lower()
    if spatial_dims not in (2, 3):
        raise ValueError(f"build_encoder: spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    if int(in_channels) < 1:
        raise ValueError(f"build_encoder: in_channels must be >= 1, got {in_channels!r}.")
    if key in _RESNETS:
        for reserved in ("block", "layers", "spatial_dims", "n_input_channels", "feed_forward", "num_classes"):
            if reserved in kwargs:
                raise ValueError(f"build_encoder: {reserved!r} is set by the backbone name {name!r}; do not pass it.")
        block, layers = _RESNETS[key]
        inplanes = list(kwargs.pop("block_inplanes", _RESNET_INPLANES))
        widths = [int(p * widen_factor) for p in inplanes]
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(
                f"build_encoder: block_inplanes {inplanes} x widen_factor {widen_factor} gives widths {widths}; "
                "need four widths >= 1."
            )
        kwargs.setdefault("conv1_t_stride", 2)
        module = ResNet(
            block=block,
            layers=layers,
            block_inplanes=inplanes,
            spatial_dims=spatial_dims,
            n_input_channels=int(in_channels),
            widen_factor=widen_factor,
            feed_forward=False,
            **kwargs,
        )
        return module, widths[3] * block.expansion
    if key == "densenet121":
        if widen_factor != 1.0:
            raise ValueError("build_encoder: widen_factor applies to ResNets only; use init_features/growth_rate.")
        module = DenseNet121(spatial_dims=spatial_dims, in_channels=int(in_channels), out_channels=1, **kwargs)
        feature_dim = int(module.class_layers.out.in_features)
        module.class_layers.out = nn.Identity()
        return module, feature_dim
    raise ValueError(f"build_encoder: unknown backbone {name!r}; choose one of {list(ENCODER_NAMES)}.")


class ProjectionHead(nn.Sequential):
    """MLP projection head ``Linear -> BatchNorm1d -> ReLU -> Linear``, mapping ``(N, F)`` to ``(N, D)``.

    Args:
        in_features: feature size ``F`` of the encoder.
        hidden_features: hidden width (defaults to ``in_features``).
        out_features: embedding size ``D``.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int = 128) -> None:
        hidden = int(in_features if hidden_features is None else hidden_features)
        if min(int(in_features), hidden, int(out_features)) < 1:
            raise ValueError(
                f"ProjectionHead: sizes must be >= 1, got in={in_features}, hidden={hidden}, out={out_features}."
            )
        super().__init__(
            nn.Linear(int(in_features), hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, int(out_features)),
        )


class ContrastiveEncoder(nn.Module):
    """Encoder backbone plus projection head for contrastive pretraining.

    ``forward`` maps multi-view batches ``(B, V, C, *spatial)`` to embeddings ``(B, V, D)`` by running the views of all
    samples through the network as one ``(B * V, C, *spatial)`` batch; it also maps a single-view batch
    ``(B, C, *spatial)`` to ``(B, D)``. The embeddings are not normalised (the losses do that).

    Note: the projection head uses batch normalisation, so in training mode the ``B * V`` views share batch
    statistics; in eval mode each view is embedded independently.

    Args:
        backbone: a name from :data:`ENCODER_NAMES`, or an ``nn.Module`` mapping ``(N, C, *spatial)`` to
            ``(N, feature_dim)``.
        spatial_dims: 2 or 3.
        in_channels: input channels ``C``.
        projection_dim: embedding size ``D``.
        hidden_dim: hidden width of the projection head (defaults to the feature size).
        feature_dim: feature size of a custom ``backbone`` module (inferred for named backbones).
        backbone_kwargs: extra arguments of :func:`build_encoder` (e.g. ``{"widen_factor": 0.125}``).

    Example::

        net = ContrastiveEncoder("resnet10", spatial_dims=2, backbone_kwargs={"widen_factor": 0.125})
        net(torch.rand(8, 2, 1, 64, 64)).shape  # torch.Size([8, 2, 128])
        torch.save(net.encoder.state_dict(), "encoder.pt")
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        spatial_dims: int = 2,
        in_channels: int = 1,
        projection_dim: int = 128,
        hidden_dim: int | None = None,
        feature_dim: int | None = None,
        backbone_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"ContrastiveEncoder: spatial_dims must be 2 or 3, got {spatial_dims!r}.")
        if isinstance(backbone, nn.Module):
            if feature_dim is None:
                raise ValueError("ContrastiveEncoder: give feature_dim= with a custom backbone module.")
            if backbone_kwargs:
                raise ValueError("ContrastiveEncoder: backbone_kwargs only apply to a named backbone.")
            encoder, dim = backbone, int(feature_dim)
        else:
            encoder, dim = build_encoder(backbone, spatial_dims, in_channels, **dict(backbone_kwargs or {}))
            if feature_dim is not None and int(feature_dim) != dim:
                raise ValueError(
                    f"ContrastiveEncoder: feature_dim={feature_dim} but backbone {backbone!r} gives {dim} features."
                )
        self.spatial_dims: int = int(spatial_dims)
        self.in_channels: int = int(in_channels)
        self.feature_dim: int = dim
        self.projection_dim: int = int(projection_dim)
        self.encoder = encoder
        self.projector = ProjectionHead(dim, hidden_dim, projection_dim)

    def _check_input(self, x: torch.Tensor) -> bool:
        """True when ``x`` is multi-view ``(B, V, C, *spatial)``, False for ``(B, C, *spatial)``."""
        if x.dim() == self.spatial_dims + 3:
            multi_view = True
        elif x.dim() == self.spatial_dims + 2:
            multi_view = False
        else:
            raise ValueError(
                "ContrastiveEncoder: expected input (B, V, C, *spatial) or (B, C, *spatial) with "
                + str(self.spatial_dims)
                + " spatial dims, got shape "
                + str(list(x.shape))
            )
        if x.shape[-self.spatial_dims - 1] != self.in_channels:
            raise ValueError(
                "ContrastiveEncoder: expected "
                + str(self.in_channels)
                + " channel(s) at dim -"
                + str(self.spatial_dims + 1)
                + ", got shape "
                + str(list(x.shape))
            )
        return multi_view

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features: ``(B, V, C, *spatial) -> (B, V, F)`` or ``(B, C, *spatial) -> (B, F)``."""
        if self._check_input(x):
            b, v = x.shape[0], x.shape[1]
            features = self.encoder(x.flatten(0, 1))
            return features.reshape(b, v, features.shape[-1])
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings: ``(B, V, C, *spatial) -> (B, V, D)`` or ``(B, C, *spatial) -> (B, D)``."""
        if self._check_input(x):
            b, v = x.shape[0], x.shape[1]
            z = self.projector(self.encoder(x.flatten(0, 1)))
            return z.reshape(b, v, z.shape[-1])
        return self.projector(self.encoder(x))


class ProbeClassifier(nn.Module):
    """Encoder plus a linear classifier, for linear probing (``freeze=True``) or full fine-tuning.

    With ``freeze=True`` the encoder's parameters get ``requires_grad=False`` and the encoder stays in eval mode
    (``train()`` does not switch it back), so neither its weights nor its batch-norm statistics change: only the
    classifier learns. Maps ``(B, C, *spatial)`` to logits ``(B, num_classes)``. Scripts and traces
    (``torch.jit.script`` / ``torch.jit.trace``) for export with ``python -m monai.bundle ckpt_export``.

    Args:
        encoder: an ``nn.Module`` mapping ``(N, C, *spatial)`` to ``(N, feature_dim)``, a
            :class:`ContrastiveEncoder` (its ``.encoder`` is used), or a backbone name for :func:`build_encoder`.
        feature_dim: encoder feature size (inferred for a name or a :class:`ContrastiveEncoder`).
        num_classes: number of outputs (one logit per label for multi-label AUC).
        freeze: linear probe (True) or full fine-tune (False).
        spatial_dims: 2 or 3, for a named encoder.
        in_channels: input channels, for a named encoder.
        encoder_kwargs: extra arguments of :func:`build_encoder`, for a named encoder.
        dropout: dropout probability before the classifier.
    """

    def __init__(
        self,
        encoder: nn.Module | str,
        feature_dim: int | None = None,
        num_classes: int = 1,
        freeze: bool = True,
        spatial_dims: int = 2,
        in_channels: int = 1,
        encoder_kwargs: Mapping[str, Any] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inferred: int | None = None
        if isinstance(encoder, str):
            encoder, inferred = build_encoder(encoder, spatial_dims, in_channels, **dict(encoder_kwargs or {}))
        elif isinstance(encoder, ContrastiveEncoder):
            encoder, inferred = encoder.encoder, encoder.feature_dim
        elif not isinstance(encoder, nn.Module):
            raise ValueError(f"ProbeClassifier: encoder must be an nn.Module or a name, got {type(encoder).__name__}.")
        if feature_dim is None:
            if inferred is None:
                raise ValueError("ProbeClassifier: give feature_dim= with an encoder module.")
            feature_dim = inferred
        elif inferred is not None and int(feature_dim) != inferred:
            raise ValueError(f"ProbeClassifier: feature_dim={feature_dim} but the encoder gives {inferred} features.")
        if int(num_classes) < 1:
            raise ValueError(f"ProbeClassifier: num_classes must be >= 1, got {num_classes!r}.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"ProbeClassifier: dropout must be in [0, 1), got {dropout!r}.")
        self.feature_dim: int = int(feature_dim)
        self.num_classes: int = int(num_classes)
        self.freeze_encoder: bool = bool(freeze)
        self.encoder = encoder
        self.dropout = nn.Dropout(float(dropout))
        self.classifier = nn.Linear(self.feature_dim, self.num_classes)
        if self.freeze_encoder:
            for param in self.encoder.parameters():
                param.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> ProbeClassifier:
        """Set training mode; a frozen encoder stays in eval mode."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for images ``(B, C, *spatial)``."""
        return self.classifier(self.dropout(self.encoder(x)))


def to_device(network: nn.Module, device: str | torch.device) -> nn.Module:
    """Move ``network`` (in place) to ``device``; on a CPU, also to the channels-last layout of its convolutions.

    On a CPU, PyTorch's oneDNN convolutions, batch norms and max pools run faster on channels-last tensors
    (``torch.channels_last`` for 2D weights ``(O, I, H, W)``, ``torch.channels_last_3d`` for 3D). Measured with
    ``benchmarks/bench_layout.py``: a pretraining step of the shipped 2D and 3D networks about 1.3x to 2.1x
    faster. The values are unchanged: only the strides of the weights differ, and every op's output keeps the
    logical shape ``(N, C, *spatial)``. A network with both 2D and 3D weights, or on another device, keeps its
    layout.

    Returns:
        ``network`` itself.
    """
    device = torch.device(device)
    network = network.to(device)
    if device.type != "cpu":
        return network
    ranks = {p.dim() for p in network.parameters() if p.dim() >= 4}
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(ranks.pop()) if len(ranks) == 1 else None
    return network if layout is None else network.to(memory_format=layout)


def encoder_state_dict(
    checkpoint: Mapping[str, Any] | str | os.PathLike,
    prefix: str = "encoder.",
    container_keys: Sequence[str] = ("model", "network", "net", "state_dict"),
) -> dict[str, torch.Tensor]:
    """Extract the encoder's weights from a checkpoint, ready for ``encoder.load_state_dict``.

    Accepts a full :class:`ContrastiveEncoder` or :class:`ProbeClassifier` state dict (keys ``encoder.*``), an
    encoder-only state dict (``torch.save(net.encoder.state_dict())``), a MONAI ``CheckpointSaver`` file holding one
    of these under ``model``/``network``/``net``/``state_dict``, and keys prefixed ``module.`` by DDP.

    Args:
        checkpoint: the loaded checkpoint, or a path to it (loaded on CPU with ``weights_only=True``).
        prefix: key prefix of the encoder inside a full network's state dict.
        container_keys: keys under which a checkpoint file may nest the state dict.

    Returns:
        the encoder state dict (keys without ``prefix``).
    """
    source = None
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.fspath(checkpoint)
        if not os.path.isfile(source):
            raise ValueError(f"encoder_state_dict: no such checkpoint file {source!r}.")
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    where = f" in {source!r}" if source else ""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"encoder_state_dict: expected a state dict{where}, got {type(checkpoint).__name__}.")
    state: Mapping[str, Any] = checkpoint
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        nested = [k for k in container_keys if isinstance(state.get(k), Mapping)]
        if not nested:
            raise ValueError(
                f"encoder_state_dict: no state dict found{where}; top-level keys {list(state)[:10]}, "
                f"looked for {list(container_keys)}."
            )
        state = state[nested[0]]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    if prefix and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)
