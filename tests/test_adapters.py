"""Tests for monai_du.data.adapters: the packaged adapters are the one source of truth for data_manifests/*.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from monai_du.data.adapters import ADAPTERS, adapter_names, get_adapter, write_adapter_files
from monai_du.data.tables import load_adapter

DATA_MANIFESTS = Path(__file__).resolve().parents[1] / "data_manifests"
REQUIRED = {"chexpert", "nih_cxr14", "mimic_cxr", "padchest", "openbhb", "abide", "ixi"}


def test_every_required_dataset_has_an_adapter():
    assert REQUIRED <= set(adapter_names())


def test_data_manifests_copies_equal_the_packaged_adapters():
    files = {p.stem: p for p in DATA_MANIFESTS.glob("*.yaml")}
    assert set(files) == set(ADAPTERS), "run: python -m monai_du.data.adapters data_manifests"
    for name, path in files.items():
        text = path.read_text(encoding="utf-8")
        assert yaml.safe_load(text) == ADAPTERS[name], f"{path} differs from monai_du/data/adapters.py; regenerate it"
        assert "monai_du/data/adapters.py" in text.splitlines()[1]


def test_regenerated_files_parse_back_to_the_adapters(tmp_path):
    written = write_adapter_files(tmp_path)
    assert [p.stem for p in written] == adapter_names()
    for path in written:
        assert yaml.safe_load(path.read_text(encoding="utf-8")) == ADAPTERS[path.stem]


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_packaged_and_file_adapters_validate_identically(name):
    assert load_adapter(name) == load_adapter(DATA_MANIFESTS / f"{name}.yaml")


def test_get_adapter_returns_a_copy():
    adapter = get_adapter("chexpert")
    adapter["fields"]["site"] = {"value": "elsewhere"}
    assert ADAPTERS["chexpert"]["fields"]["site"] == {"value": "Stanford"}
    with pytest.raises(KeyError, match="chexpert"):
        get_adapter("unknown")


def test_readme_documents_every_adapter():
    readme = (DATA_MANIFESTS / "README.md").read_text(encoding="utf-8")
    for name in ADAPTERS:
        assert f"`{name}`" in readme
