"""The ``monai-du`` command (also ``python -m monai_du.cli``).

Subcommands:

- ``monai-du compare``: does a prior help on your data? Every method is a run of the pretrain bundle
  (:func:`monai_du.compare.run_compare`)::

      monai-du compare --manifest M.csv --dataset-dir D --label label_effusion --seeds 0 1 2 --epochs 30
      monai-du compare --manifest M.csv --label no_finding --methods du kdu_patient --method-config my.yaml

- ``monai-du demo``: ``compare`` on the embedded cohort (:func:`monai_du.demo.run_demo`)::

      monai-du demo                                   # 498 real NIH chest X-rays, default budget
      monai-du demo --modality brain                  # 136 real IXI T1 brain MRIs: sex AUC, age MAE

- ``monai-du prior``: train (or load) a MONAI autoencoder on a manifest's images and write the generative prior
  table keyed by image path (:func:`monai_du.priors.build_prior_table`)::

      monai-du prior --manifest data/manifest.csv --out data/prior_table.csv --epochs 5 --latent-dim 16
      monai-du prior --manifest data/manifest.csv --out enc.csv --encoder runs/du/models   # any encoder

- ``monai-du audit``: which candidate prior will help, before pretraining (:mod:`monai_du.audit`).
- ``monai-du cache``: decode a manifest's images once into a training-size cache (:mod:`monai_du.data.cache`).
- ``monai-du bundle``: where the shipped bundles are installed, or a copy to edit (:mod:`monai_du.bundles`)::

      monai-du bundle path cxr
      monai-du bundle copy cxr ./my_cxr_bundle
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _bandwidth(text: str) -> float | str:
    from monai_du.kernels import BANDWIDTH_RULES

    if text in BANDWIDTH_RULES:
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a rule {BANDWIDTH_RULES} or a positive number, got {text!r}"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _add_budget(p: argparse.ArgumentParser) -> None:
    """The options that ``compare`` and ``demo`` share: methods, seeds, budget, report. Their defaults are the
    library's (:class:`~monai_du.compare.CompareConfig`, :func:`~monai_du.demo.demo_config`): an option left out is
    not passed on."""
    p.add_argument("--methods", nargs="+", default=None,
                   help="method keys: the bundle's configs/methods/<key>.yaml (default: compare runs every method "
                        "with a method_order, demo runs monai_du.demo.DEMO_METHODS)")
    p.add_argument("--method-config", nargs="+", default=None, metavar="FILE",
                   help="your own method override file(s); each is a method named by its file stem")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="distinct seeds >= 0 (split, initial weights, views); default 0 1 2")
    p.add_argument("--epochs", type=int, default=None,
                   help="pretraining epochs of every method (default: the bundle's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="pretraining batch size of every method (default: the bundle's)")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="share of patients held out for the probes (default 0.3)")
    p.add_argument("--label-sizes", type=int, nargs="+", default=None,
                   help="labelled training patients of the label-efficiency curve (all of them is always added)")
    p.add_argument("--label-draws", type=int, default=None,
                   help="draws per label-efficiency size (compare: 5, demo: 3)")
    p.add_argument("--n-bootstrap", type=int, default=None, help="bootstrap resamples of the AUC CI (default 1000)")
    p.add_argument("--set", nargs="+", default=[], metavar="ID=VALUE",
                   help="bundle overrides for every run, e.g. num_workers=0 learning_rate=0.0005 (values as YAML data)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-audit", action="store_true",
                   help="skip the audit of the compared kernel methods' priors (written to OUT/audit)")
    p.add_argument("--quiet", action="store_true", help="print only the final report")


def _overrides(items: Sequence[str]) -> dict:
    """``ID=VALUE`` items as ``{id: value}``, each value read as YAML data."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects ID=VALUE, got {item!r}.")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            first = str(err).strip().splitlines()[0]
            raise ValueError(f"--set {key}: the value {value!r} is not valid YAML ({first}).") from None
    return out


def _budget(args: argparse.Namespace) -> dict:
    """The shared options given on the command line, as CompareConfig / demo_config arguments; the others keep the
    library's defaults."""
    given = {"methods": args.methods, "method_configs": args.method_config, "seeds": args.seeds,
             "epochs": args.epochs, "batch_size": args.batch_size, "test_fraction": args.test_fraction,
             "label_draws": args.label_draws, "n_bootstrap": args.n_bootstrap,
             "label_sizes": (*args.label_sizes, None) if args.label_sizes else None}
    return {**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None},
            "overrides": _overrides(args.set), "plots": not args.no_plots, "audit": not args.no_audit}


def _printers(quiet: bool) -> tuple:
    """``(log, progress)`` for run_compare: lines, and on a terminal one status line redrawn after each epoch."""
    if quiet:
        return None, None
    live = sys.stdout.isatty()

    def log(line: str) -> None:
        print(("\r\033[K" if live else "") + line, flush=True)

    def progress(line: str) -> None:
        print("\r\033[K" + line, end="", flush=True)

    return log, progress if live else None


def _print_result(result: dict, quiet: bool) -> None:
    if quiet:
        print(result["table"])
        print()
        print(result["efficiency_table"])
        print()
        print("\n".join(result["verdict"]))
        if result.get("audit"):
            print("\n".join(result["audit"]))


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="does a prior help on your data? pretrain every method with the bundle, probe, report",
        description=(
            "Split the manifest's patients, pretrain every method with the pretrain bundle on the same budget (one "
            "bundle_root per method and seed under OUT/runs), probe the frozen encoders on the label (linear probe "
            "with C chosen by inner patient-grouped CV, kNN, site leakage, label efficiency) and write the table, "
            "verdict, CSV/JSON and plots to OUT. A killed comparison resumes without redoing finished runs."
        ),
    )
    p.add_argument("--manifest", required=True, help="manifest file (.csv, .csv.gz, .tsv, .parquet)")
    p.add_argument("--dataset-dir", default=None, help="folder of relative image paths (default: the manifest's)")
    p.add_argument("--label", required=True,
                   help="label column to probe (label_x or x; 0/1, or M/F for sex with male = 1)")
    p.add_argument("--age", default=None, metavar="COLUMN",
                   help="also regress this column of ages from the frozen features (ridge, L2 by inner CV): age MAE "
                        "in years with a patient-bootstrap CI, and the mean-age predictor as the floor")
    p.add_argument("--bundle", default=None,
                   help="pretrain bundle: cxr, brain, or the folder of a bundle (default: cxr)")
    p.add_argument("--out", default=None, help="report folder (default: ./monai_du_compare)")
    pool = p.add_argument_group("a large unlabelled pool to pretrain on (then --manifest is the labelled cohort)")
    pool.add_argument("--pool", default=None,
                      help="pool manifest: pretrain on it; the probes are cross-fitted over every labelled patient")
    pool.add_argument("--pool-dataset-dir", default=None, help="folder of the pool's relative image paths")
    pool.add_argument("--keep-labelled-in-pool", action="store_true",
                      help="keep pool images of the labelled patients (default: removed, and counted)")
    pool.add_argument("--folds", type=int, default=None, help="cross-fitting folds of the probes (default 5)")
    pool.add_argument("--pool-sizes", type=int, nargs="+", default=None, metavar="N",
                      help="also compare at these pool sizes (nested subsets by patient, same epochs) and print AUC "
                           "against pool size (OUT/pool_curve.*)")
    tune = p.add_argument_group("fine-tuning end to end (off by default: methods x seeds x splits x sizes more runs)")
    tune.add_argument("--finetune", action="store_true",
                      help="also fine-tune every encoder through the fine-tune bundle on the probes' splits and label "
                           "sizes, and print that table beside the probes' (OUT/finetune.*)")
    tune.add_argument("--finetune-sizes", type=int, nargs="+", default=None, metavar="N",
                      help="labelled training patients of the fine-tune runs (all of them is always added; default: "
                           "the label sizes)")
    tune.add_argument("--finetune-epochs", type=int, default=None, help="epochs of each fine-tune run "
                      "(default: the fine-tune bundle's)")
    tune.add_argument("--finetune-bundle", default=None,
                      help="the fine-tune bundle's folder (default: the shipped one that fits --bundle)")
    tune.add_argument("--finetune-set", nargs="+", default=[], metavar="ID=VALUE",
                      help="fine-tune bundle overrides for every fine-tune run, e.g. batch_size=32 (YAML data)")
    _add_budget(p)
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from monai_du.compare import CompareConfig, run_compare

    given = {k: v for k, v in (("dataset_dir", args.dataset_dir), ("bundle", args.bundle), ("out", args.out),
                               ("pool", args.pool), ("pool_dataset_dir", args.pool_dataset_dir),
                               ("folds", args.folds), ("age", args.age)) if v is not None}
    if args.keep_labelled_in_pool:
        given["keep_labelled_in_pool"] = True
    if args.finetune:
        given.update(finetune=True, finetune_overrides=_overrides(args.finetune_set))
        given.update({k: v for k, v in (("finetune_epochs", args.finetune_epochs),
                                        ("finetune_bundle", args.finetune_bundle)) if v is not None})
        if args.finetune_sizes:
            given["finetune_sizes"] = (*args.finetune_sizes, None)
    elif args.finetune_sizes or args.finetune_epochs or args.finetune_bundle or args.finetune_set:
        raise ValueError("--finetune-sizes, --finetune-epochs, --finetune-bundle and --finetune-set go with "
                         "--finetune.")
    config = CompareConfig(manifest=args.manifest, label=args.label, **given, **_budget(args))
    log, progress = _printers(args.quiet)
    if args.pool_sizes:
        from monai_du.pool_curve import run_pool_curve

        curve = run_pool_curve(config, args.pool_sizes, log=log, progress=progress)
        if args.quiet:
            print(curve["table"])
        return 0
    result = run_compare(config, log=log, progress=progress)
    _print_result(result, args.quiet)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="monai-du compare on an embedded cohort (498 real NIH chest X-rays, or 136 real IXI brain MRIs)",
        description=(
            "Run monai-du compare on an embedded cohort: the real NIH ChestX-ray14 images shipped in the package "
            "(label No Finding, 10 epochs, batch 64) or, with --modality brain, the shipped IXI T1 brain MRIs (label "
            "sex and age regressed, 15 epochs, batch 32, age as the prior). Every method is a run of the pretrain "
            "bundle."
        ),
    )
    p.add_argument("--modality", choices=("cxr", "brain"), default=None,
                   help="2D chest X-rays or 3D brain MRI (default: cxr)")
    p.add_argument("--out", default=None, help="report folder (default: ./monai_du_demo)")
    _add_budget(p)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from monai_du.demo import run_demo

    given = {k: v for k, v in (("modality", args.modality), ("out", args.out)) if v is not None}
    log, progress = _printers(args.quiet)
    result = run_demo(log=log, progress=progress, **given, **_budget(args))
    _print_result(result, args.quiet)
    return 0


def _add_prior(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prior",
        help="write a prior table keyed by image path: from a MONAI autoencoder, or from any encoder",
        description=(
            "Write a prior table keyed by the manifest's image path: column 'image' plus gen_0 .. gen_{k-1} (.csv, "
            ".csv.gz, or .parquet with pyarrow). By default a small MONAI VarAutoEncoder is trained on the "
            "pretraining split (or loaded with --checkpoint) and every manifest image is encoded to its latent mean. "
            "With --encoder (a TorchScript file, or a monai_du export: a folder with encoder.pt and "
            "encoder_info.json) or --bundle-config/--network-id/--checkpoint (a MONAI bundle's network), that "
            "encoder's features of the pretraining split's images are written instead; --split all encodes every "
            "row. A prior computed on held-out patients leaks nothing about their labels, but keeping to the split "
            "the pretraining bundles read is the safe default. Use the table as the kernel prior with "
            "monai_du.priors.attach_prior_table and generative_prior_kernel, or the pretrain bundle's prior_table id."
        ),
    )
    p.add_argument("--manifest", required=True, help="manifest file (.csv, .csv.gz, .tsv, .parquet)")
    p.add_argument("--out", required=True, help="prior table to write (.csv, .csv.gz or .parquet)")
    p.add_argument("--root", default=None, help="folder of relative image paths (default: the manifest's folder)")
    p.add_argument("--modality", choices=("2d", "3d", "cxr", "brain"), default=None,
                   help="2D images or 3D volumes (default: 2d, or the encoder's spatial dims)")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="side the images are resized to (autoencoder: a multiple of 8, default 32; encoder: default "
                        "the spatial_size in encoder_info.json or the bundle config)")
    p.add_argument("--split", "--train-split", dest="split", default="train",
                   help="patient split used: the autoencoder is fitted on it (all rows are encoded), an encoder "
                        "encodes it only; 'all' for every row (default: train). A manifest 'split' column is used as "
                        "it is, otherwise patients are split as the bundles split them")
    p.add_argument("--split-fractions", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"), default=None,
                   help="fractions of patients per split when the manifest has no 'split' column (default 0.8 0.1 0.1)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the patient split (default 0, as the bundles)")
    enc = p.add_argument_group("a prior from any encoder")
    enc.add_argument("--encoder", default=None,
                     help="TorchScript file, or monai_du export (folder with encoder.pt + encoder_info.json, or its "
                          "encoder.pt)")
    enc.add_argument("--bundle-config", nargs="+", default=None,
                     help="MONAI bundle config file(s) defining the network (merged in order)")
    enc.add_argument("--network-id", default="network_def", help="the network's id in the bundle config")
    enc.add_argument("--submodule", default=None,
                     help="use this attribute of the network, e.g. 'encoder' for a ContrastiveEncoder's backbone")
    enc.add_argument("--intensity", choices=("auto", "minmax", "percentile"), default="auto",
                     help="intensity scaling as the encoder was trained with (default auto: what the export or bundle "
                          "records in image_loading, else minmax; 2D bundles: minmax; brain: percentile)")
    enc.add_argument("--pool", choices=("mean", "flatten"), default="mean",
                     help="how an output (N, D, ...) becomes (N, D)")
    vae = p.add_argument_group("the autoencoder")
    vae.add_argument("--latent-dim", type=_positive_int, default=16, help="embedding size k")
    vae.add_argument("--epochs", type=_non_negative_int, default=5, help="training epochs")
    vae.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    vae.add_argument("--kl-weight", type=float, default=1e-3, help="weight of the KL term")
    vae.add_argument("--save-checkpoint", default=None, help="save the trained autoencoder here")
    vae.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--checkpoint", default=None,
                   help="with --bundle-config: the network's weights (a state dict, or a checkpoint holding one under "
                        "'model'); otherwise: load this autoencoder instead of training one")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="images per step (autoencoder training: default 32; encoder forward passes: default 64)")
    p.add_argument("--device", default="cpu", help="device, e.g. cpu or cuda")
    p.set_defaults(func=_run_prior)


def _run_prior(args: argparse.Namespace) -> int:
    from monai_du.priors import build_encoder_prior_table, build_prior_table

    log = lambda line: print(line, flush=True)  # noqa: E731
    split = args.split
    fractions = None
    if args.split_fractions is not None:
        fractions = dict(zip(("train", "val", "test"), args.split_fractions))
    if args.encoder is not None and args.bundle_config is not None:
        raise ValueError("give --encoder or --bundle-config, not both.")
    if args.encoder is not None or args.bundle_config is not None:
        if args.encoder is not None:
            if args.checkpoint is not None:
                raise ValueError(f"--checkpoint goes with --bundle-config; {args.encoder} holds its own weights.")
            encoder = {"encoder": args.encoder, "submodule": args.submodule}
        else:
            encoder = {"bundle_config": args.bundle_config, "network_id": args.network_id,
                       "checkpoint": args.checkpoint, "submodule": args.submodule}
        build_encoder_prior_table(
            args.manifest, args.out, encoder, log=log, root=args.root, split=split, image_size=args.image_size,
            modality=args.modality, intensity=args.intensity, batch_size=args.batch_size or 64, device=args.device,
            fractions=fractions, split_seed=args.split_seed, pool=args.pool,
        )
        return 0
    build_prior_table(
        args.manifest, args.out, root=args.root, modality=args.modality or "2d", image_size=args.image_size or 32,
        latent_dim=args.latent_dim, epochs=args.epochs, batch_size=args.batch_size or 32, learning_rate=args.lr,
        kl_weight=args.kl_weight, split=split, fractions=fractions, split_seed=args.split_seed,
        checkpoint=args.checkpoint, save_checkpoint=args.save_checkpoint, seed=args.seed, device=args.device,
        log=log,
    )
    return 0


def _add_audit(sub: argparse._SubParsersAction) -> None:
    from monai_du.data.samplers import SAMPLER_MODES

    p = sub.add_parser(
        "audit",
        help="which prior will help? rank candidate priors on a manifest against a few labels, before pretraining",
        description=(
            "For each candidate prior (every kernel method of the pretrain bundle, built by the bundle with its own "
            "kernel, sampler, lam and instance weight; each attribute among age, sex, site and view; and every "
            "--prior-table), report the batch kernel's effective rank and mean off-diagonal value at the training "
            "batch size, and its information about each label: centred kernel-target alignment, HSIC with a "
            "patient-level permutation p-value, and the patient-grouped CV AUC of the prior alone. Prints a ranked "
            "table with a verdict per prior (too coarse / near identity / uninformative / informative) and writes "
            "audit.csv, audit.json and audit.txt to --out (monai_du.audit.audit_priors). With --pool, the two "
            "inputs of compare --pool: kernels and batches from the pool, label statistics from --manifest."
        ),
    )
    p.add_argument("--manifest", required=True, help="manifest file (.csv, .csv.gz, .tsv, .parquet)")
    p.add_argument("--dataset-dir", default=None, help="folder of relative image paths (default: the manifest's)")
    p.add_argument("--label", action="append", required=True, help="label column (repeat for several)")
    p.add_argument("--prior-table", action="append", default=[], metavar="NAME=PATH",
                   help="a prior table (image + gen_* columns) for every manifest image: NAME kdu_gen or "
                        "kdu_encoder gives that method its table; any other NAME is audited through kdu_encoder "
                        "(repeatable)")
    p.add_argument("--bundle", default=None,
                   help="pretrain bundle whose kernel methods are audited with their own kernel, sampler, lam and "
                        "instance weight: cxr, brain, a bundle folder, or none (generic candidates only); default cxr")
    p.add_argument("--methods", nargs="+", default=None,
                   help="the bundle's methods to audit (default: every method file that sets a kernel)")
    p.add_argument("--set", nargs="+", default=[], metavar="ID=VALUE",
                   help="bundle overrides for every method, as compare --set, e.g. time_column=study_offset_days")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default 64)")
    p.add_argument("--sampler-mode", choices=SAMPLER_MODES, default=None,
                   help="sampler of the single-attribute and prior-table candidates (default: within site when the "
                        "manifest has several sites, else random); the bundle's methods use their own")
    p.add_argument("--sampler-attribute", default=None,
                   help="manifest column of the sampler's groups (default: site; patient_id for pk)")
    p.add_argument("--images-per-patient", type=_positive_int, default=None, help="K of the pk sampler")
    p.add_argument("--sampler-order", default=None, metavar="COLUMN",
                   help="pk: a block's K images are consecutive in this column (e.g. follow_up), as the bundles' "
                        "sampler_order")
    p.add_argument("--n-batches", type=int, default=None,
                   help="batches the kernel statistics average over (default 20)")
    p.add_argument("--n-permutations", type=int, default=None, help="permutations of the p-value (default 999)")
    p.add_argument("--lam", type=float, default=None,
                   help="kernel DU ridge lam (> 0) of the generic candidates (default 0.01)")
    p.add_argument("--instance-weight", type=float, default=None,
                   help="kernel DU instance term (>= 0) of the generic candidates (default 0.05)")
    p.add_argument("--knn-k", type=int, default=None, help="neighbour rank of the knn bandwidth rule (default 5)")
    p.add_argument("--seed", type=int, default=None, help="seed of batches, permutations and folds (default 0)")
    p.add_argument("--out", default=None, help="report folder (audit.csv, audit.json, audit.txt)")
    pool = p.add_argument_group("two inputs, as compare --pool: kernels and batches from the pool, label statistics "
                                "from --manifest's labelled rows")
    pool.add_argument("--pool", default=None,
                      help="pool manifest that pretraining reads: each prior's kernel is fitted and its batches drawn "
                           "there, its label statistics come from --manifest (encoded as the pool's rows)")
    pool.add_argument("--pool-dataset-dir", default=None, help="folder of the pool's relative image paths")
    pool.add_argument("--keep-labelled-in-pool", action="store_true",
                      help="keep pool images of the labelled patients (default: removed, and counted, as compare does)")
    p.set_defaults(func=_run_audit)


def _run_audit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from monai_du.audit import format_audit, run_audit

    tables = {}
    for item in args.prior_table:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name.split(".")[0], item
        if not name or not path:
            raise ValueError(f"--prior-table expects NAME=PATH, got {item!r}.")
        if name in tables:
            raise ValueError(f"--prior-table name {name!r} is given twice.")
        tables[name] = path
    given = {name: getattr(args, name) for name in (
        "batch_size", "sampler_mode", "sampler_attribute", "images_per_patient", "sampler_order", "n_batches",
        "n_permutations", "lam", "instance_weight", "knn_k", "seed", "methods") if getattr(args, name) is not None}
    if args.bundle is not None:
        given["bundle"] = None if str(args.bundle).lower() == "none" else args.bundle
    if args.keep_labelled_in_pool:
        given["keep_labelled_in_pool"] = True
    result = run_audit(args.manifest, args.label, dataset_dir=args.dataset_dir, prior_tables=tables, out=args.out,
                       bundle_overrides=_overrides(args.set), pool=args.pool, pool_dataset_dir=args.pool_dataset_dir,
                       **given)
    print(format_audit(result))
    if args.out is not None:
        print(f"\nwrote {args.out}/audit.csv, audit.json and audit.txt")
    return 0


def _add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache",
        help="decode every manifest image once into a training-size cache",
        description=(
            "Decode, normalise and resize every image of the manifest once, with the package's loading pipeline "
            "(monai_du.data.loading.load_image_transforms), into OUT/<settings key>/, one .npy per image keyed by its "
            "path; the key hashes the preprocessing settings and versions, so a changed setting never reads old "
            "images. Restartable (a killed build goes on where it stopped) and parallel (--num-workers). Unreadable "
            "images are skipped and listed with the reason in OUT/<settings key>/skipped.csv. Train from it with "
            "monai_du.data.cache.cached_load_transforms(OUT, <the same settings>) in place of load_image_transforms."
        ),
    )
    p.add_argument("--manifest", required=True, help="manifest file (.csv, .csv.gz, .tsv, .parquet)")
    p.add_argument("--out", required=True, help="cache folder (one subfolder per preprocessing settings)")
    p.add_argument("--spatial-size", type=_positive_int, nargs="+", required=True,
                   help="training size: one value for every axis, or one per axis")
    p.add_argument("--modality", choices=("2d", "3d", "cxr", "brain"), default="2d", help="2D images or 3D volumes")
    p.add_argument("--num-workers", type=_non_negative_int, default=0, help="worker processes (0: this process)")
    p.add_argument("--root", default=None, help="folder of relative image paths (default: the manifest's folder)")
    p.add_argument("--intensity", choices=("minmax", "percentile", "none"), default="minmax",
                   help="intensity scaling to [0, 1] (the brain bundles use percentile)")
    p.add_argument("--size-mode", choices=("resize", "longest", "pad_crop"), default="resize",
                   help="how to reach the size")
    p.add_argument("--store-dtype", choices=("float32", "float16"), default="float32", help="dtype on disk")
    p.add_argument("--report", default=None, help="also write the skip report (CSV) here")
    p.add_argument("--overwrite", action="store_true", help="decode and store every image again")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=_run_cache)


def _run_cache(args: argparse.Namespace) -> int:
    from monai_du.data.cache import build_image_cache

    size = args.spatial_size[0] if len(args.spatial_size) == 1 else tuple(args.spatial_size)
    intensity = None if args.intensity == "none" else args.intensity
    result = build_image_cache(
        args.manifest, args.out, root=args.root, modality=args.modality, spatial_size=size, size_mode=args.size_mode,
        intensity=intensity, store_dtype=args.store_dtype, num_workers=args.num_workers, overwrite=args.overwrite,
        report_path=args.report, progress=args.progress,
    )
    print(
        f"cache {result.folder} (settings key {result.key}): {result.n_cached} of {result.n_images} images cached "
        f"({result.n_built} built, {result.n_existing} already cached); skipped {len(result.skipped)}, listed in "
        f"{result.report_path}; {result.seconds:.1f} s"
    )
    print(
        f"train from it: monai_du.data.cache.cached_load_transforms({args.out!r}, modality={args.modality!r}, "
        f"spatial_size={size!r}, size_mode={args.size_mode!r}, intensity={intensity!r}, "
        f"store_dtype={args.store_dtype!r})"
    )
    return 0


def _add_bundle(sub: argparse._SubParsersAction) -> None:
    from monai_du.bundles import PRETRAIN_BUNDLES, SHIPPED_BUNDLES

    names = sorted(PRETRAIN_BUNDLES) + list(SHIPPED_BUNDLES)
    p = sub.add_parser(
        "bundle",
        help="where the shipped MONAI bundles are installed, or a copy of one to edit and run",
        description=(
            "The MONAI bundles ship inside the package. 'path NAME' prints a bundle's folder (to pass its config "
            "files to python -m monai.bundle run, with --bundle_root a folder of yours); 'copy NAME DIR' copies it "
            f"to DIR, a new folder, to edit and run there. NAME: {', '.join(names)} (cxr and brain are the "
            "pretrain bundles)."
        ),
    )
    p.add_argument("action", choices=("path", "copy"), help="print the folder, or copy it")
    p.add_argument("name", choices=names, metavar="NAME", help=f"the bundle: {', '.join(names)}")
    p.add_argument("destination", nargs="?", default=None, help="copy: the new folder")
    p.set_defaults(func=_run_bundle)


def _run_bundle(args: argparse.Namespace) -> int:
    from monai_du.bundles import copy_bundle, shipped_bundle

    if args.action == "path":
        if args.destination is not None:
            raise ValueError("bundle path takes no destination; did you mean bundle copy?")
        print(shipped_bundle(args.name))
        return 0
    if args.destination is None:
        raise ValueError("bundle copy needs a destination folder: monai-du bundle copy NAME DIR.")
    print(copy_bundle(args.name, args.destination))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``monai-du`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="monai-du",
        description="Contrastive pretraining with prior knowledge (decoupled uniformity) for medical images, on MONAI.",
    )
    from monai_du import __version__

    parser.add_argument("--version", action="version", version=f"monai_du {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,compare,audit,prior,cache,bundle}")
    _add_demo(sub)
    _add_compare(sub)
    _add_prior(sub)
    _add_cache(sub)
    _add_audit(sub)
    _add_bundle(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``monai-du`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except ValueError as err:  # bad settings or data: one clear line, not a traceback
        print(f"monai-du {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
