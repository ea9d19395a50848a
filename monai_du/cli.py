"""The ``monai-du`` command (also ``python -m monai_du.cli``).

Subcommands:

- ``monai-du demo``: the comparison on the embedded demo cohort (:func:`monai_du.demo.run_demo`)::

      monai-du demo                                   # chest X-rays, default budget (~10 min on 2 CPU cores)
      monai-du demo --modality brain --seeds 0 1 2    # 3D brain MRI variant (also reports age MAE)
      monai-du demo --n 2000 --epochs 30 --out big    # larger budget
      monai-du demo --sweep                           # + effect of instance weight, bandwidth, sampler (seed 0)

- ``monai-du prior``: train (or load) a MONAI autoencoder on a manifest's images and write the generative prior
  table keyed by image path (:func:`monai_du.priors.build_prior_table`)::

      monai-du prior --manifest data/manifest.csv --out data/prior_table.csv --epochs 5 --latent-dim 16
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


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from monai_du.demo import METHODS

    p = sub.add_parser(
        "demo",
        help="compare random init, plain DU, kernel DU (age x sex / generative prior) and y-Aware InfoNCE",
        description=(
            "Generate the demo cohort, split it by patient, pretrain every method on an equal budget (same encoder, "
            "initial weights, epochs, batch size, augmentations), and report linear-probe AUC with a bootstrap CI, "
            "site leakage and wall time, averaged over seeds. Writes a report folder with results.csv/json and "
            "PNG plots. "
            "Unset sizes take the modality's defaults (cxr: 640 images of 64 px, 20 epochs, batch 64; brain: 240 "
            "volumes of 32^3, 15 epochs, batch 32)."
        ),
    )
    p.add_argument("--modality", choices=("cxr", "brain"), default="cxr", help="2D chest X-rays or 3D brain MRI")
    p.add_argument("--n", type=_positive_int, default=None, help="number of images in the cohort")
    p.add_argument("--image-size", type=_positive_int, default=None, help="image side in pixels / voxels")
    p.add_argument("--epochs", type=_non_negative_int, default=None, help="pretraining epochs of every method")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="pretraining batch size of every method")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (split, initial weights, views)")
    p.add_argument("--out", default="monai_du_demo", help="report folder (default: ./monai_du_demo)")
    p.add_argument("--cohort-seed", type=int, default=0, help="seed of the generated cohort")
    p.add_argument("--label", default=None, help="primary label for the AUC column (cxr: effusion; brain: lesion)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="methods to compare")
    p.add_argument("--lam", type=float, default=0.01, help="kernel DU ridge lam (> 0)")
    p.add_argument("--instance-weight", type=float, default=0.05, help="kernel DU instance term eta (>= 0)")
    p.add_argument("--bandwidth", type=_bandwidth, default="knn",
                   help="RBF bandwidth: knn, median, scott, silverman or a number")
    p.add_argument("--knn-k", type=_positive_int, default=5, help="neighbour rank of the knn bandwidth rule")
    p.add_argument("--knn-mixed-batches", action="store_true",
                   help="fit the knn bandwidth on random batches even for site-conditioned batches")
    p.add_argument("--gen-kernel", choices=("rbf", "cosine"), default="rbf", help="kernel on the generative prior")
    p.add_argument("--gen-latent-dim", type=_positive_int, default=16, help="autoencoder latent size")
    p.add_argument("--gen-epochs", type=_non_negative_int, default=5, help="autoencoder training epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of every method")
    p.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="random-crop side fraction of the augmentations (default: the modality's)")
    p.add_argument("--widen-factor", type=float, default=0.125, help="channel multiplier of the ResNet10 encoder")
    p.add_argument("--test-fraction", type=float, default=0.3, help="share of patients held out for the probes")
    p.add_argument("--n-bootstrap", type=_non_negative_int, default=1000, help="bootstrap resamples of the AUC CI")
    p.add_argument("--sweep", action="store_true",
                   help="also measure instance weight, bandwidth and sampler (first seed)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="training device, e.g. cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="print only the final table and verdict")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from monai_du.demo import DemoConfig, run_demo

    config = DemoConfig(
        modality=args.modality, n=args.n, image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
        seeds=tuple(args.seeds), out=args.out, cohort_seed=args.cohort_seed, label=args.label,
        methods=tuple(args.methods),
        lam=args.lam, instance_weight=args.instance_weight, bandwidth=args.bandwidth, knn_k=args.knn_k,
        knn_within_sites=not args.knn_mixed_batches,
        gen_kernel=args.gen_kernel, gen_latent_dim=args.gen_latent_dim, gen_epochs=args.gen_epochs,
        learning_rate=args.lr, crop_scale=args.crop_scale, widen_factor=args.widen_factor,
        test_fraction=args.test_fraction, n_bootstrap=args.n_bootstrap, sweep=args.sweep, plots=not args.no_plots,
        threads=args.threads, device=args.device,
    )
    if args.quiet:
        result = run_demo(config, log=None)
        print(result["table"])
        print()
        print("\n".join(result["verdict"]))
    else:
        run_demo(config, log=lambda line: print(line, flush=True))
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
    enc.add_argument("--intensity", choices=("minmax", "percentile"), default="minmax",
                     help="intensity scaling as the encoder was trained with (2D bundles: minmax; brain: percentile)")
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``monai-du`` with its ``demo`` and ``prior`` subcommands."""
    parser = argparse.ArgumentParser(
        prog="monai-du",
        description="Contrastive pretraining with prior knowledge (decoupled uniformity) for medical images, on MONAI.",
    )
    from monai_du import __version__

    parser.add_argument("--version", action="version", version=f"monai_du {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,prior}")
    _add_demo(sub)
    _add_prior(sub)
    _add_cache(sub)
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
