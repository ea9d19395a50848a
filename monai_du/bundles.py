"""The shipped MONAI bundles: where they are, their method files, and what each method file declares.

The bundles of the repository's ``bundles/`` folder install with the package (package data ``monai_du.bundle_files``),
so an installed wheel finds them without a clone::

    monai-du bundle path cxr            # the folder of the CXR pretrain bundle
    monai-du bundle copy cxr ./my_cxr   # a copy to edit and run with python -m monai.bundle run

A method is one YAML file in the pretrain bundle's ``configs/methods/``. Besides the bundle ids it overrides, it
declares itself:

- ``method_name``: the name printed in tables;
- ``method_order``: its place in a comparison's default table (null: not compared by default);
- ``method_stages`` (a composite method only): a list of runs, each ``{method: KEY, share: FRACTION}`` of the epochs;
  a later stage may set ``init_from_previous: true`` (start from the previous stage's weights) and
  ``prior_from_previous: true`` (its prior table is the previous stage's encoder's embeddings).

This module reads those files and nothing else: :mod:`monai_du.compare`, :mod:`monai_du.audit` and
:mod:`monai_du.bundle_priors` import it, and it imports none of them.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "FINETUNE_BUNDLES",
    "PRETRAIN_BUNDLES",
    "SHIPPED_BUNDLES",
    "MethodSpec",
    "Stage",
    "bundle_path",
    "check_overrides",
    "composite_run_error",
    "copy_bundle",
    "default_methods",
    "finetune_bundle_for",
    "kernel_methods",
    "method_files",
    "method_settings",
    "method_spec",
    "prior_table_setting",
    "shipped_bundle",
    "shipped_bundles_root",
    "stage_files",
]

#: Pretrain bundles by modality key.
PRETRAIN_BUNDLES: dict[str, str] = {"cxr": "cxr_du_pretrain", "brain": "brain_mri_du_pretrain"}

#: The shipped fine-tune bundle of each shipped pretrain bundle folder.
FINETUNE_BUNDLES: dict[str, str] = {"cxr_du_pretrain": "cxr_finetune", "brain_mri_du_pretrain": "brain_mri_finetune"}

#: Every shipped bundle folder name.
SHIPPED_BUNDLES: tuple[str, ...] = ("cxr_du_pretrain", "cxr_finetune", "brain_mri_du_pretrain", "brain_mri_finetune")

_PACKAGE_DATA = "monai_du.bundle_files"
_DECLARATIONS = ("method_name", "method_order", "method_stages")
_COMPOSITE_KEYS = (*_DECLARATIONS, "run")  # a composite's "run" refuses a direct run (composite_run_error)


def shipped_bundles_root() -> Path:
    """The folder holding the shipped bundles: the installed package data, or the clone's ``bundles/`` in an
    editable install (both are the same package ``monai_du.bundle_files``).

    Raises:
        ValueError: when the package was installed without its bundles.
    """
    source_tree = Path(__file__).resolve().parents[1]
    if (source_tree / "pyproject.toml").is_file() and (source_tree / "bundles" / "__init__.py").is_file():
        return source_tree / "bundles"  # imported from a clone (also without installing it)
    spec = importlib.util.find_spec(_PACKAGE_DATA)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(location) / PRETRAIN_BUNDLES["cxr"] / "configs").is_dir():
            return Path(location)
    raise ValueError(f"the shipped bundles ({_PACKAGE_DATA}) are not installed with monai_du; reinstall the package.")


def shipped_bundle(name: str) -> Path:
    """A shipped bundle's folder, by modality key (``cxr``, ``brain``: the pretrain bundles) or folder name
    (:data:`SHIPPED_BUNDLES`)."""
    folder = PRETRAIN_BUNDLES.get(name, name)
    if folder not in SHIPPED_BUNDLES:
        raise ValueError(f"unknown bundle {name!r}: choose from {sorted(PRETRAIN_BUNDLES) + list(SHIPPED_BUNDLES)}.")
    return shipped_bundles_root() / folder


def bundle_path(bundle: str | os.PathLike) -> Path:
    """The pretrain bundle folder: a modality key of :data:`PRETRAIN_BUNDLES` or the folder of a bundle (a user's
    copy).

    Raises:
        ValueError: naming the folder, when it holds no ``configs/train.yaml``.
    """
    path = shipped_bundle(str(bundle)) if str(bundle) in PRETRAIN_BUNDLES else Path(bundle).expanduser()
    if not (path / "configs" / "train.yaml").is_file():
        raise ValueError(
            f"bundle {str(bundle)!r}: no configs/train.yaml under {path}. Pass 'cxr', 'brain', or the folder of a "
            "pretrain bundle (monai-du bundle copy cxr DIR makes one)."
        )
    return path


def copy_bundle(name: str, destination: str | os.PathLike) -> Path:
    """Copy a shipped bundle to ``destination`` (which must not exist yet) to edit and run it there.

    Returns:
        the new bundle folder.
    """
    source = shipped_bundle(name)
    target = Path(destination).expanduser()
    if target.exists():
        raise ValueError(f"{target} exists already: give a new folder to copy the bundle {name!r} into.")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "models", "eval", "logs", "data"))
    return target


# ---------------------------------------------------------------------------------------------------------------------
# method files
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One run of a composite method: a method key, its share of the epochs, and what it takes from the stage
    before it."""

    method: str
    share: float
    init_from_previous: bool = False
    prior_from_previous: bool = False


@dataclass(frozen=True)
class MethodSpec:
    """What a method file declares.

    Attributes:
        key: the method key (the file's stem).
        name: the printed name.
        order: the place in a comparison's default table, or None (not compared by default).
        stages: the runs of a composite method; empty for a single run of the file itself.
        path: the method file.
    """

    key: str
    name: str
    order: int | None
    stages: tuple[Stage, ...]
    path: Path


def method_settings(path: str | os.PathLike) -> Mapping[str, Any]:
    """The ids a method file sets, as written (empty for an empty file).

    Raises:
        ValueError: naming the file, when it does not parse or holds no mapping.
    """
    path = Path(path)
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"method file {path} does not parse: {first}") from None
    if content is None:
        return {}
    if not isinstance(content, Mapping):
        raise ValueError(f"method file {path} must hold a mapping of bundle ids, got {type(content).__name__}.")
    return content


def _stages(value: Any, path: Path) -> tuple[Stage, ...]:
    if value is None:
        return ()
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) < 2:
        raise ValueError(f"method file {path}: method_stages must list at least two stages, got {value!r}.")
    stages = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or "method" not in item or "share" not in item:
            raise ValueError(f"method file {path}: stage {i} must be a mapping with 'method' and 'share', "
                             f"got {item!r}.")
        unknown = set(item) - {"method", "share", "init_from_previous", "prior_from_previous"}
        if unknown:
            raise ValueError(f"method file {path}: stage {i} has unknown keys {sorted(unknown)}.")
        stages.append(Stage(str(item["method"]), float(item["share"]), bool(item.get("init_from_previous", False)),
                            bool(item.get("prior_from_previous", False))))
    total = sum(stage.share for stage in stages)
    if any(stage.share <= 0 for stage in stages) or abs(total - 1.0) > 1e-9:
        raise ValueError(f"method file {path}: stage shares must be positive and add up to 1, got "
                         f"{[s.share for s in stages]}.")
    if stages[0].init_from_previous or stages[0].prior_from_previous:
        raise ValueError(f"method file {path}: the first stage has no previous stage to take weights or a prior from.")
    return tuple(stages)


def method_spec(path: str | os.PathLike) -> MethodSpec:
    """The declarations of a method file (a user's file without ``method_name`` is named by its stem)."""
    path = Path(path)
    settings = method_settings(path)
    order = settings.get("method_order")
    if order is not None and (isinstance(order, bool) or not isinstance(order, int)):
        raise ValueError(f"method file {path}: method_order must be a whole number or null, got {order!r}.")
    stages = _stages(settings.get("method_stages"), path)
    if stages and set(settings) - set(_COMPOSITE_KEYS):
        raise ValueError(f"method file {path}: a composite method (method_stages) sets no bundle ids of its own; "
                         f"found {sorted(set(settings) - set(_COMPOSITE_KEYS))}.")
    return MethodSpec(key=path.stem, name=str(settings.get("method_name") or path.stem), order=order, stages=stages,
                      path=path)


def _shipped_specs(bundle: Path) -> dict[str, MethodSpec]:
    return {path.stem: method_spec(path) for path in sorted((bundle / "configs" / "methods").glob("*.yaml"))}


def default_methods(bundle: str | os.PathLike) -> tuple[str, ...]:
    """The methods of a comparison by default, in table order (``method_order``)."""
    specs = _shipped_specs(bundle_path(bundle))
    return tuple(sorted((key for key, spec in specs.items() if spec.order is not None),
                        key=lambda key: (specs[key].order, key)))


def method_files(
    bundle: str | os.PathLike, methods: Sequence[str], extra: Sequence[str | os.PathLike] = ()
) -> dict[str, MethodSpec]:
    """The method files of a comparison.

    Args:
        bundle: the pretrain bundle (a modality key or a folder).
        methods: method keys of the bundle's ``configs/methods/``.
        extra: the user's own method files; each becomes a method keyed by its file stem.

    Returns:
        ``{key: MethodSpec}`` in the given order; every stage of a composite method is checked to exist.

    Raises:
        ValueError: an unknown method (naming the choices), a method file that does not parse, a key given twice.
    """
    folder = bundle_path(bundle)
    shipped = _shipped_specs(folder)
    out: dict[str, MethodSpec] = {}
    for key in methods:
        if key not in shipped:
            raise ValueError(f"unknown method {key!r}: choose from {sorted(shipped)}, or pass your own with "
                             "--method-config.")
        out[key] = shipped[key]
    for item in extra:
        path = Path(item).expanduser()
        if not path.is_file():
            raise ValueError(f"method file {path} does not exist.")
        if path.stem in out:
            raise ValueError(f"method file {path}: the method {path.stem!r} is given twice.")
        out[path.stem] = method_spec(path)
    for spec in out.values():
        for stage in spec.stages:
            if stage.method not in shipped or shipped[stage.method].stages:
                raise ValueError(f"method file {spec.path}: stage {stage.method!r} is not a single-run method of "
                                 f"{folder / 'configs' / 'methods'}.")
    return out


def composite_run_error(method: str, stages: Sequence[Mapping[str, Any]]) -> None:
    """Raise the error of a composite method run by hand (its file's ``run``): its stages are separate runs.

    Raises:
        ValueError: naming the stages and how to run them.
    """
    names = " then ".join(str(stage.get("method")) for stage in stages)
    raise ValueError(f"method {method!r} is made of separate runs ({names}): monai-du compare runs them in turn "
                     f"(--methods {method}); by hand, run each stage's method file as its comment says.")


def stage_files(bundle: str | os.PathLike, spec: MethodSpec) -> list[Path]:
    """The method file of each run of ``spec``: its stages' files, or the file itself."""
    folder = bundle_path(bundle) / "configs" / "methods"
    return [folder / f"{stage.method}.yaml" for stage in spec.stages] if spec.stages else [spec.path]


def kernel_methods(bundle: str | os.PathLike) -> list[str]:
    """The method keys of the bundle whose file sets a kernel (not null), sorted."""
    folder = bundle_path(bundle) / "configs" / "methods"
    return [path.stem for path in sorted(folder.glob("*.yaml")) if method_settings(path).get("kernel") is not None]


def prior_table_setting(bundle: str | os.PathLike, method: str) -> tuple[bool, bool]:
    """Whether a method file of the bundle reads a ``prior_table``, and whether it builds one itself (a non-null
    default, e.g. ``kdu_gen``'s VAE table) rather than needing one (``kdu_encoder``)."""
    path = bundle_path(bundle) / "configs" / "methods" / f"{method}.yaml"
    settings = method_settings(path) if path.is_file() else {}
    return "prior_table" in settings, settings.get("prior_table") is not None


# ---------------------------------------------------------------------------------------------------------------------
# overrides: data, never code
# ---------------------------------------------------------------------------------------------------------------------
_CODE_PREFIXES = ("$", "@", "%")  # MONAI's config parser evaluates, references or reads a macro for these


def _code_in(value: Any) -> str | None:
    """The first part of ``value`` that MONAI's config parser would run or resolve, or None for plain data."""
    if isinstance(value, str):
        return value if value.startswith(_CODE_PREFIXES) else None
    if isinstance(value, Mapping):
        if "_target_" in value:
            return f"_target_: {value['_target_']}"
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return next((found for found in map(_code_in, value) if found is not None), None)
    return None


def _check_type(key: str, value: Any, default: Any) -> None:
    """A value of the kind the bundle's own setting has: a number for a number, a list for a list, true/false for a
    flag (an expression or a null default takes anything)."""
    if isinstance(default, str) and default.startswith(_CODE_PREFIXES) or default is None or value is None:
        return
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, (int, float)):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, (list, tuple)):
        ok, kind = isinstance(value, (list, tuple)), "a list"
    elif isinstance(default, Mapping):
        ok, kind = isinstance(value, Mapping), "a mapping"
    else:
        return
    if not ok:
        raise ValueError(f"override {key!r}: expected {kind} like the bundle's {default!r}, got {value!r}.")


def check_overrides(bundle: str | os.PathLike, overrides: Mapping[str, Any],
                    method_paths: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
    """Check a user's bundle overrides before any run: every id exists, and every value is data.

    Args:
        bundle: the pretrain bundle (a modality key or a folder).
        overrides: ``{id: value}`` (``--set ID=VALUE``; nested ids with ``#``).
        method_paths: the user's own method files, whose ids count as known.

    Returns:
        the overrides, as a dict.

    Raises:
        ValueError: an id that neither ``configs/train.yaml`` nor a method file sets (naming the closest ids), a value
            of another kind than the bundle's own (text for a number, ...), or a value that MONAI's config parser
            would run as code: a string starting with ``$``, ``@`` or ``%``, or a
            mapping with ``_target_`` (write such settings in a method file of your own, ``--method-config``).
    """
    from monai.bundle import ConfigParser

    folder = bundle_path(bundle)
    known = ConfigParser()
    known.read_config(str(folder / "configs" / "train.yaml"))
    for path in [*sorted((folder / "configs" / "methods").glob("*.yaml")), *map(Path, method_paths)]:
        for key, value in method_settings(path).items():
            if key not in _DECLARATIONS and key not in known:
                known[key] = value
    ids = [str(k) for k in known.get()]
    for key, value in overrides.items():
        if str(key) not in known:
            close = difflib.get_close_matches(str(key), ids, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see configs/train.yaml for the ids"
            raise ValueError(f"override {key!r}: the bundle {folder.name} has no such id{hint}")
        _check_type(str(key), value, known.get(str(key)))
        code = _code_in(value)
        if code is not None:
            raise ValueError(f"override {key!r}: {code!r} would run as code in the bundle config; values are data "
                             "only (put expressions in a method file of your own, --method-config).")
    return dict(overrides)


def pool_run_split(seed: int) -> dict[str, Any]:
    """The bundle ids of a run on an unlabelled pool: every row is pretraining data (``seed`` seeds the weights and
    views). ``monai-du compare --pool`` and ``monai-du audit --pool`` both set them."""
    return {"split_fractions": {"train": 1.0}, "split_seed": int(seed), "pretrain_split": "train"}


def finetune_bundle_for(pretrain_bundle: str | os.PathLike) -> Path:
    """The shipped fine-tune bundle that fits a pretrain bundle: by its folder name for a shipped one, else by its
    number of spatial dimensions (``spatial_size``: 2 for chest X-rays, 3 for brain MRI)."""
    folder = bundle_path(pretrain_bundle)
    name = FINETUNE_BUNDLES.get(folder.name)
    if name is None:
        with open(folder / "configs" / "train.yaml", encoding="utf-8") as stream:
            spatial = (yaml.safe_load(stream) or {}).get("spatial_size")
        if not isinstance(spatial, list) or len(spatial) not in (2, 3):
            raise ValueError(f"bundle {folder}: cannot tell its fine-tune bundle (spatial_size {spatial!r} is not a "
                             "list of 2 or 3 sizes); pass the fine-tune bundle's folder.")
        name = FINETUNE_BUNDLES["cxr_du_pretrain" if len(spatial) == 2 else "brain_mri_du_pretrain"]
    return shipped_bundle(name)
