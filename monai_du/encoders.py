"""Loading an encoder, or its weights, from what a pretraining run or another model left on disk.

- :func:`load_encoder` loads a whole encoder mapping images ``(N, C, *spatial)`` to features ``(N, D)`` (or
  ``(N, D, ...)``): a TorchScript file, a monai_du export (``encoder.pt`` + ``encoder_info.json`` of
  :class:`monai_du.handlers.PretrainedEncoderExporter`), a MONAI bundle's network (config + network id +
  checkpoint) or a module. :func:`resolve_encoder` does the same and also returns what the source records (its input
  size, its files), for :func:`monai_du.priors.encoder_prior_table`.
- :func:`load_pretrained_encoder` loads a pretraining run's ``encoder.pt`` into ``network.encoder`` of a fine-tuning
  run; :func:`load_initial_weights` starts a pretraining run from a whole-network or encoder-only checkpoint. Both
  are called by the bundle configs, e.g.::

      network: $monai_du.networks.to_device(
          monai_du.encoders.load_initial_weights(@network_def, @init_checkpoint), @device)
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.bundle import ConfigParser

from monai_du.networks import build_encoder, encoder_state_dict, to_device

__all__ = [
    "LoadedEncoder",
    "resolve_encoder",
    "load_encoder",
    "load_pretrained_encoder",
    "load_initial_weights",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# a whole encoder: TorchScript, monai_du export, MONAI bundle network
# ---------------------------------------------------------------------------------------------------------------------
_EXPORT_INFO = "encoder_info.json"
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
_SPEC_KEYS = ("encoder", "bundle_config", "network_id", "checkpoint", "submodule")


def _describe(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{shown}{more}"


class LoadedEncoder(NamedTuple):
    """A loaded encoder, what it records about its input, and the files that define it (:func:`resolve_encoder`)."""

    module: torch.nn.Module
    spatial_size: list[int] | None
    spatial_dims: int | None
    source: str
    files: list[Path]
    image_loading: dict[str, Any] | None = None  # how its training loaded images (the bundles' ``image_loading``)


def _spatial_list(value: Any, dims: int | None) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return [int(value)] * (dims or 2)
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError):
        return None


def _load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        own, given = set(module.state_dict()), set(state)
        missing, unexpected = sorted(own - given), sorted(given - own)
        detail = (
            f"missing keys {_describe(missing)}; unexpected keys {_describe(unexpected)}"
            if missing or unexpected
            else str(err).strip().splitlines()[-1].strip()
        )
        raise ValueError(
            f"load_encoder: the weights in {str(source)!r} do not fit the {type(module).__name__} network: {detail}."
        ) from None


def _torchscript_encoder(path: Path) -> LoadedEncoder:
    try:
        with warnings.catch_warnings():  # the caller chose TorchScript; torch's deprecation notice is not theirs
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"load_encoder: {str(path)!r} is not a TorchScript file ({first}). A monai_du export needs "
            f"{_EXPORT_INFO} beside its encoder.pt; a bundle network needs its .yaml/.json config, a network id and "
            "a checkpoint."
        ) from None
    return LoadedEncoder(module, None, None, f"the TorchScript file {str(path)!r}", [path])


def _export_encoder(folder: Path) -> LoadedEncoder:
    info_path = folder / _EXPORT_INFO
    if not info_path.is_file():
        raise ValueError(
            f"load_encoder: {str(folder)!r} is not a monai_du export: no {_EXPORT_INFO} in it "
            "(monai_du.handlers.PretrainedEncoderExporter writes encoder.pt and encoder_info.json)."
        )
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"load_encoder: {str(info_path)!r} is not valid JSON: {err}.") from None
    if not isinstance(info, dict):
        raise ValueError(f"load_encoder: {str(info_path)!r} must hold a JSON object, got {type(info).__name__}.")
    weights = folder / str(info.get("encoder_file", "encoder.pt"))
    if not weights.is_file():
        raise ValueError(f"load_encoder: the export {str(folder)!r} has no weights file {weights.name!r}.")
    backbone, kwargs = info.get("backbone"), info.get("backbone_kwargs") or {}
    if not isinstance(backbone, str) or not isinstance(kwargs, dict):
        raise ValueError(
            f"load_encoder: {str(info_path)!r} needs a 'backbone' name (and optional 'backbone_kwargs' object) for "
            "monai_du.networks.build_encoder; export with PretrainedEncoderExporter(info={'backbone': ..., "
            f"'backbone_kwargs': ..., 'spatial_size': ...}}); found backbone={backbone!r}, backbone_kwargs={kwargs!r}."
        )
    raw_size = info.get("spatial_size")
    dims = info.get("spatial_dims")
    if dims is None:
        dims = len(raw_size) if isinstance(raw_size, (list, tuple)) else 2
    try:
        module, _ = build_encoder(backbone, int(dims), int(info.get("in_channels", 1)), **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"load_encoder: {str(info_path)!r} does not describe a backbone: {err}") from None
    _load_weights(module, encoder_state_dict(weights), weights)
    size = _spatial_list(raw_size, int(dims))
    loading = info.get("image_loading")
    return LoadedEncoder(module, size, int(dims), f"the monai_du export {str(folder)!r}", [info_path, weights],
                         dict(loading) if isinstance(loading, dict) else None)


def _is_export_weights(path: Path) -> bool:
    """Whether ``path`` is the weights file named by an ``encoder_info.json`` beside it."""
    info_path = path.parent / _EXPORT_INFO
    if not info_path.is_file():
        return False
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError):
        return path.name == "encoder.pt"
    return path.name == str(info.get("encoder_file", "encoder.pt")) if isinstance(info, dict) else False


def _bundle_encoder(
    configs: str | os.PathLike | Sequence[str | os.PathLike],
    network_id: str,
    checkpoint: str | os.PathLike | None,
) -> LoadedEncoder:
    files = [Path(configs)] if isinstance(configs, (str, os.PathLike)) else [Path(c) for c in configs]
    if not files:
        raise ValueError("load_encoder: give at least one bundle config file.")
    for file in files:
        if not file.is_file():
            raise ValueError(f"load_encoder: no such bundle config file {str(file)!r}.")
    where = ", ".join(str(f) for f in files)
    if checkpoint is None:
        raise ValueError(
            f"load_encoder: the bundle network {network_id!r} of {where} needs a checkpoint (a state dict file, or a "
            "checkpoint holding one under 'model')."
        )
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise ValueError(f"load_encoder: no such checkpoint file {str(ckpt)!r}.")
    parser = ConfigParser()
    parser.read_config([str(f) for f in files] if len(files) > 1 else str(files[0]))
    if network_id not in parser:
        top = parser.get()
        ids = list(top) if isinstance(top, dict) else []
        raise ValueError(
            f"load_encoder: no network id {network_id!r} in the bundle config {where}; its top-level ids are "
            f"{_describe(ids, limit=20)}."
        )
    try:
        network = parser.get_parsed_content(network_id, instantiate=True)
    except Exception as err:  # any error of the user's config: report it with the id and the file
        raise ValueError(f"load_encoder: could not build {network_id!r} of the bundle config {where}: {err}") from err
    if not isinstance(network, torch.nn.Module):
        raise ValueError(
            f"load_encoder: {network_id!r} of the bundle config {where} is a {type(network).__name__}, not a "
            "torch.nn.Module."
        )
    _load_weights(network, encoder_state_dict(ckpt, prefix=""), ckpt)
    size = _spatial_list(_optional_setting(parser, "spatial_size"), None)  # None: the caller gives image_size
    loading = _optional_setting(parser, "image_loading")  # None: the caller gives intensity
    return LoadedEncoder(
        network, size, len(size) if size else None, f"the bundle network {network_id!r} of {where}", [*files, ckpt],
        dict(loading) if isinstance(loading, Mapping) else None,
    )


def _optional_setting(parser: Any, key: str) -> Any:
    """A bundle config's parsed ``key``, or None when it is absent or needs the run's context to be parsed."""
    if key not in parser:
        return None
    try:
        return parser.get_parsed_content(key)
    except Exception:  # noqa: BLE001 - e.g. an expression that reads the run's data
        return None


def resolve_encoder(
    spec: Any,
    network_id: str = "network_def",
    checkpoint: str | os.PathLike | None = None,
    submodule: str | None = None,
) -> LoadedEncoder:
    """Load an encoder as :func:`load_encoder` does (same ``spec`` forms and errors), keeping what the source records.

    Returns:
        the module (as loaded, on CPU), its recorded ``spatial_size`` and ``spatial_dims`` (None when the source does
        not record them), a description of the source for messages, and the files that define it (their content keys
        a cached prior table). A :class:`LoadedEncoder` is returned as it is.
    """
    if isinstance(spec, LoadedEncoder):
        return spec
    if isinstance(spec, Mapping):
        unknown = [k for k in spec if k not in _SPEC_KEYS]
        if unknown or ("encoder" in spec) == ("bundle_config" in spec):
            raise ValueError(
                f"load_encoder: a mapping spec has the keys {list(_SPEC_KEYS)}, with exactly one of 'encoder' (a "
                f"TorchScript file or monai_du export) and 'bundle_config'; got keys {list(spec)}."
            )
        network_id = str(spec.get("network_id") or network_id)
        checkpoint = spec.get("checkpoint", checkpoint)
        submodule = spec.get("submodule", submodule)
        if "encoder" in spec:
            return resolve_encoder(spec["encoder"], network_id=network_id, checkpoint=checkpoint, submodule=submodule)
        resolved = _bundle_encoder(spec["bundle_config"], network_id, checkpoint)
    elif isinstance(spec, torch.nn.Module):
        resolved = LoadedEncoder(spec, None, None, f"the {type(spec).__name__} module", [])
    elif isinstance(spec, (list, tuple)):
        resolved = _bundle_encoder(spec, network_id, checkpoint)
    elif isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.exists():
            raise ValueError(f"load_encoder: no such encoder file or folder {str(path)!r}.")
        if path.is_file() and path.name.lower().endswith(_CONFIG_SUFFIXES) and path.name != _EXPORT_INFO:
            resolved = _bundle_encoder(path, network_id, checkpoint)
        else:
            if checkpoint is not None:
                raise ValueError(
                    f"load_encoder: a checkpoint goes with a bundle config; {str(path)!r} holds its own weights."
                )
            if path.is_dir():
                resolved = _export_encoder(path)
            elif path.name == _EXPORT_INFO or _is_export_weights(path):
                resolved = _export_encoder(path.parent)
            else:
                resolved = _torchscript_encoder(path)
    else:
        raise ValueError(
            "load_encoder: give a TorchScript file, a monai_du export folder (or its encoder.pt), a bundle config "
            f"(with network_id and checkpoint), a mapping {list(_SPEC_KEYS)} or a torch.nn.Module; got "
            f"{type(spec).__name__}."
        )
    if submodule:
        module = resolved.module
        for part in str(submodule).split("."):
            child = getattr(module, part, None)
            if not isinstance(child, torch.nn.Module):
                raise ValueError(f"load_encoder: {resolved.source} has no submodule {submodule!r} (at {part!r}).")
            module = child
        resolved = resolved._replace(module=module, source=f"{resolved.source}, submodule {submodule!r}")
    return resolved


def load_encoder(
    spec: Any,
    network_id: str = "network_def",
    checkpoint: str | os.PathLike | None = None,
    submodule: str | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Load an encoder mapping images ``(N, C, *spatial)`` to features ``(N, D)`` (or ``(N, D, ...)``).

    ``spec`` is one of:

    - the path of a **TorchScript** file (``torch.jit.load``);
    - a **monai_du export**: the folder written by :class:`monai_du.handlers.PretrainedEncoderExporter`, or its
      ``encoder.pt`` or ``encoder_info.json``. The backbone is rebuilt with :func:`monai_du.networks.build_encoder`
      from the info's ``backbone``, ``backbone_kwargs``, ``spatial_dims`` and ``in_channels``, and the state dict
      of ``encoder.pt`` is loaded into it;
    - a **MONAI bundle's network**: the path of a bundle config (``.yaml``, ``.yml``, ``.json``; a list of them is
      merged as ``monai.bundle`` merges ``--config_file``), read with :class:`monai.bundle.ConfigParser`;
      ``network_id`` is instantiated and the state dict in ``checkpoint`` loaded into it (a plain state dict, or a
      checkpoint holding it under ``model``, ``network``, ``net`` or ``state_dict``, as the monai_du bundles'
      checkpoints do; DDP's ``module.`` prefix is removed). The mapping
      ``{"bundle_config": ..., "network_id": ..., "checkpoint": ..., "submodule": ...}`` says the same;
    - a ``torch.nn.Module`` (returned as it is).

    Args:
        spec: see above.
        network_id: the bundle config id of the network (default ``network_def``).
        checkpoint: the bundle network's weights (bundle form only).
        submodule: a dotted attribute of the loaded network to use instead, e.g. ``"encoder"`` for the backbone of a
            :class:`monai_du.networks.ContrastiveEncoder` (whose forward gives the projection head's output).
        device: device of the returned module.

    Returns:
        the module, in eval mode, on ``device``.

    Raises:
        ValueError: for a missing file or folder, a file that is none of these forms, an unknown network id, or
            weights that do not fit, each naming the file or id.
    """
    resolved = resolve_encoder(spec, network_id=network_id, checkpoint=checkpoint, submodule=submodule)
    if isinstance(spec, torch.nn.Module) and not submodule:
        return spec
    return to_device(resolved.module, device).eval()


# ---------------------------------------------------------------------------------------------------------------------
# weights into a network of a bundle run
# ---------------------------------------------------------------------------------------------------------------------
def load_pretrained_encoder(
    network: torch.nn.Module, pretrained: str | os.PathLike | None, require: bool = False, mode: str = ""
) -> torch.nn.Module:
    """Load the encoder weights of a pretraining run into ``network.encoder`` (strict), for the fine-tune bundles.

    Args:
        network: a :class:`~monai_du.networks.ProbeClassifier` (anything with an ``encoder``).
        pretrained: ``encoder.pt`` of the pretrain bundle, or any checkpoint
            :func:`~monai_du.networks.encoder_state_dict` reads; None / ``"null"`` / ``""`` keeps the random
            initialisation on purpose.
        require: a missing file is an error instead of a warning.
        mode: run mode, for the log line ("linear_probe", "finetune").

    Returns:
        ``network``.
    """
    if pretrained is None or str(pretrained).lower() in ("", "null", "none"):
        logger.warning(f"mode={mode}: no pretrained encoder requested; the encoder starts from RANDOM initialisation.")
        return network
    if not os.path.isfile(pretrained):
        if require:
            raise ValueError(f"pretrained encoder file {os.fspath(pretrained)!r} not found (require_pretrained=true).")
        logger.warning(
            f"mode={mode}: pretrained encoder file {os.fspath(pretrained)!r} not found; the encoder starts from RANDOM "
            "initialisation. Run the pretrain bundle first, set `pretrained` to its models/encoder.pt, or set "
            "require_pretrained=true to make this an error."
        )
        return network
    result = network.encoder.load_state_dict(encoder_state_dict(pretrained))
    logger.info(f"mode={mode}: loaded the pretrained encoder from {os.fspath(pretrained)}: {result}")
    return network


def load_initial_weights(network: torch.nn.Module, checkpoint: str | os.PathLike | None) -> torch.nn.Module:
    """Start a pretraining run from earlier weights: a whole-network checkpoint (``model.pt``, or a
    ``checkpoint_epoch=N.pt`` holding it under ``model``) loads into ``network``; an encoder-only file
    (``encoder.pt``) loads into ``network.encoder`` and leaves the projection head as initialised.

    Args:
        network: a :class:`~monai_du.networks.ContrastiveEncoder`.
        checkpoint: the file, or None to keep the initialisation.

    Returns:
        ``network``.
    """
    if checkpoint is None or str(checkpoint).lower() in ("", "null", "none"):
        return network
    if not os.path.isfile(checkpoint):
        raise ValueError(f"init_checkpoint {os.fspath(checkpoint)!r} does not exist.")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if any(k.startswith("encoder.") for k in state):
        network.load_state_dict(state)
    else:
        network.encoder.load_state_dict(encoder_state_dict(state))
    logger.info(f"initial weights loaded from {os.fspath(checkpoint)}")
    return network
