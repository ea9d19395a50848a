#!/usr/bin/env bash
# The plugin as a user installs it: build the wheel, install it into a fresh virtualenv, and from a folder without
# the source tree run `monai-du demo --help`, `monai-du bundle path`, a 1-epoch `monai-du compare` on a small
# manifest, a 1-epoch `python -m monai.bundle run` of the installed bundle (which must not write into
# site-packages), and MONAI's verify_metadata on every bundle.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1

python3 -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$repo"
wheel="$(ls "$work"/dist/monai_du-*.whl)"
echo "wheel: $(basename "$wheel") ($(du -h "$wheel" | cut -f1))"
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install --quiet "torch==2.13.0"
"$py" -m pip install --quiet "$wheel" jsonschema

run="$work/run"
mkdir -p "$run"
cd "$run"  # no source tree here: everything comes from the installed wheel
"$py" - <<'EOF'
import monai_du
from pathlib import Path
site = Path(monai_du.__file__).parent
assert "site-packages" in str(site), f"monai_du imported from {site}, not from the installed wheel"
print(f"monai_du {monai_du.__version__} from {site}")
EOF
"$work/venv/bin/monai-du" demo --help | head -n 3
bundle="$("$work/venv/bin/monai-du" bundle path cxr)"
echo "monai-du bundle path cxr: $bundle"
case "$bundle" in *site-packages/monai_du/bundle_files/cxr_du_pretrain) ;; *) echo "not the installed bundle"; exit 1;; esac

# a small manifest: 160 images of the real cohort shipped in the package
"$py" - <<'EOF'
import pandas as pd
from monai_du.data.real_cohort import nih_cxr_dev_manifest
manifest = nih_cxr_dev_manifest()
df = pd.read_csv(manifest)
patients = df["patient_id"].drop_duplicates().iloc[:60]
small = df[df["patient_id"].isin(patients)].copy()
small["image"] = [str(manifest.parent / p) for p in small["image"]]
small.to_csv("small_manifest.csv", index=False)
print(f"small manifest: {len(small)} images of {small['patient_id'].nunique()} patients")
EOF
"$work/venv/bin/monai-du" compare --manifest small_manifest.csv --label no_finding --methods random du --seeds 0 \
    --epochs 1 --batch-size 32 --label-sizes 10 --label-draws 1 --n-bootstrap 20 --no-plots --no-audit --quiet \
    --out compare_out --set num_workers=0
test -f compare_out/results.csv

# MONAI's own runner on the installed bundle, with no --bundle_root: the run goes to ./cxr_du_pretrain
"$py" -m monai.bundle run --config_file "['$bundle/configs/train.yaml','$bundle/configs/methods/du.yaml']" \
    --manifest "$run/small_manifest.csv" --dataset_dir "$run" --max_epochs 1 --batch_size 32 --num_workers 0 \
    > bundle_run.log 2>&1 || { tail -n 30 bundle_run.log; exit 1; }
test -f cxr_du_pretrain/models/encoder.pt
if find "$(dirname "$bundle")" -name models -o -name eval | grep -q .; then
    echo "a run wrote inside site-packages"; exit 1
fi
echo "monai.bundle run of the installed bundle: $run/cxr_du_pretrain/models/encoder.pt"

schema="$repo/../shared/monai/meta_schema_20240725.json"
if [ -f "$schema" ]; then
    for name in cxr_du_pretrain cxr_finetune brain_mri_du_pretrain brain_mri_finetune; do
        folder="$("$work/venv/bin/monai-du" bundle path "$name")"
        "$py" -m monai.bundle verify_metadata --meta_file "$folder/configs/metadata.json" --filepath "$schema" \
            --hash_val 06954cad2cc5d3784e72077ac76f0fc8 > verify.log 2>&1 || { cat verify.log; exit 1; }
        echo "verify_metadata $name: ok"
    done
else
    echo "verify_metadata skipped: no MONAI schema at $schema (it is not part of the project)"
fi
echo "wheel check: passed"
