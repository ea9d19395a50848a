"""Audit candidate priors before pretraining: which prior can help kernel DU on *your* labels?

Kernel DU replaces each centroid by its conditional-mean estimate ``c = (K + lam I)^-1 K mu`` given the batch's priors.
A prior helps only when (a) its batch kernel sits between the two degenerate ends, and (b) it carries
information about the diagnosis that augmentations cannot create. Both can be measured before any training, from the
manifest and the few labels a user has. For each candidate prior this package reports:

- **The batch kernel** at the bundle's batch size and sampler: the kernel ``K + instance_weight * I`` that the loss
  builds, on ``n_batches`` batches drawn by :class:`~monai_du.data.samplers.AttributeBatchSampler`. Its effective
  rank and mean off-diagonal value (:func:`~monai_du.kernels.kernel_summary`, as the loss logs them), and the degrees
  of freedom of the centroid smoother ``trace((K + lam I)^-1 K)`` (``B`` for plain DU), averaged over the batches.
- **Its information about each label**, on the labelled rows (label 0 or 1; NaN and -1 rows are left out):

  - the centred kernel-target alignment ``KTA = <HKH, HLH>_F / (||HKH||_F ||HLH||_F)`` and the (biased) HSIC
    ``tr(K H L H) / (n - 1)^2``, with ``H = I - 11^T / n`` and the label kernel ``L[i, j] = [y_i == y_j]``
    (:func:`centred_kta`, :func:`hsic`). Here ``K`` is the prior kernel alone, over all labelled rows;
  - a permutation p-value of the HSIC (:func:`permutation_pvalue`). Images of one patient share their labels and
    most of their prior, so permuting single images would make the null far too narrow. Labels are permuted **at
    the patient level**: a patient's label vector is exchanged whole with that of another patient holding as many
    labelled images (patients with a unique count stay in place: the test stays exact, with a little less power).
    That null keeps the within-patient agreement and tests what the prior says *between* patients. A kernel that is
    zero between patients (patient x time) says nothing between patients; for it the null is that labels do not
    follow the patient, and single images are permuted (column ``null`` says which);
  - the patient-grouped cross-validated AUC of predicting the label from the prior alone: out-of-fold
    Nadaraya-Watson scores ``sum_j K_ij y_j / sum_j K_ij`` over the training folds' rows (negative kernel values
    clipped to 0), folds from :func:`~monai_du.evaluation.patient_grouped_splits` grouped by patient
    (:func:`grouped_cv_auc`), and its chance level ``auc_chance``: the ``AUC_CHANCE_QUANTILE`` quantile of the same
    CV AUC under the permutations of the p-value (:func:`cv_auc_chance_level`). With a few hundred patients a prior
    that knows nothing reaches a CV AUC of 0.6 by chance now and then; the chance level says how far chance goes.

A verdict follows (:func:`audit_verdict`), tested in this order with the documented thresholds below:

- ``"near identity: equals plain DU"``: effective rank at least ``IDENTITY_RANK_FRACTION`` of the batch size and
  mean off-diagonal at most ``IDENTITY_MEAN_OFFDIAG``;
- ``"too coarse: will average groups"`` when the batch kernel is nearly constant (mean off-diagonal above
  ``CONSTANT_MEAN_OFFDIAG``, e.g. a site kernel on within-site batches): it cannot tell a batch's images apart;
- ``"informative"``: p-value at most ``P_VALUE_ALPHA``, or CV AUC above ``0.5 + CHANCE_AUC_MARGIN`` and above its
  chance level ``auc_chance``. A coarse kernel (below) whose groups follow the label is informative too: kernel DU
  then pools images of the same label, which is what a prior is for;
- ``"too coarse: will average groups"``: effective rank below ``COARSE_RANK_FRACTION`` of the batch size, or mean
  off-diagonal above ``COARSE_MEAN_OFFDIAG``: kernel DU pulls whole groups of centroids to their mean, and the groups
  do not follow the label;
- ``"uninformative of your labels"`` otherwise.

The ranked table orders the verdicts as :data:`VERDICTS` (informative, near identity, uninformative, too coarse):
informative priors by KTA (their alignment with the label over every labelled pair, within and between patients;
the CV AUC sees only what a prior says between patients, and is 0.5 by construction for a patient kernel), the
others by their ``pooled`` share ``1 - trace((K_b + lam I)^-1 K_b) / B`` (least
first: the share of the centroids kernel DU replaces by pooling), since a prior that does not follow the label can
only cost.

Candidates: with a pretrain bundle (:func:`run_audit`, ``monai-du audit``; :func:`bundle_candidates`), each method
file of the bundle that sets a kernel (``kdu_attr``, ``kdu_patient``, ``kdu_gen``, ``kdu_encoder``, ``yaware``) is a
candidate built by the bundle itself: the kernel its run fits, its prior vector, and batches of its own sampler, with
its ``lam`` and ``instance_weight``. Besides them, and without a bundle (:func:`default_candidates`): each attribute
among age (RBF, neighbourhood-scale ``"knn"`` bandwidth fitted for the batch size and sampler, as the bundles do), sex,
site and view (categorical), and without a bundle also age x sex, patient x time (when the manifest has
``patient_id`` and ``study_offset_days`` or ``follow_up``) and one candidate per prior table (an RBF with the
``"knn"`` bandwidth).

Two inputs, as ``monai-du compare --pool`` takes them (:func:`run_audit` ``pool=``, :func:`audit_priors`
``pool_df=``, ``monai-du audit --pool``): the batch kernel's statistics come from the pool, each candidate's kernel
fitted on the pool's priors and its batches drawn there by the sampler a run on the pool uses, and the label
statistics from the labelled manifest's rows, their priors encoded by the encoder fitted on the pool and read by the
same fitted kernel. A labelled category the pool lacks is a category of its own, similar only to itself, and said
(``attrs["notes"]``); the pool's images of labelled patients are removed first, as
:func:`monai_du.data.splits.pool_without_patients` removes them.

Submodules (every public name is importable from :mod:`monai_du.audit`):

- :mod:`monai_du.audit.statistics`: the label statistics (:func:`centred_kta`, :func:`hsic`,
  :func:`permutation_pvalue`, :func:`grouped_cv_auc`, :func:`cv_auc_chance_level`) and the batch kernel's
  (:func:`batch_kernel_stats`);
- :mod:`monai_du.audit.verdicts`: the thresholds, :data:`VERDICTS`, :func:`audit_verdict`, the ranking and
  :func:`format_audit`;
- :mod:`monai_du.audit.candidates`: :class:`PriorCandidate`, :func:`default_candidates` and
  :func:`bundle_candidates`;
- :mod:`monai_du.audit.run`: :func:`audit_priors`, :func:`run_audit` and :func:`write_audit`.

Python::

    df = audit_priors(manifest_df, labels=["label_no_finding"], prior_tables={"vae": "prior_table.csv"})
    print(format_audit(df))

Command line (the bundle's methods, the attributes, and an encoder prior through the ``kdu_encoder`` method)::

    monai-du audit --manifest M.csv --label label_no_finding --prior-table du_encoder=enc_prior.csv --out report/
    monai-du audit --manifest labelled.csv --label label_no_finding --pool pool.csv --out report/
"""

from __future__ import annotations

from monai_du.audit.candidates import (
    ATTRIBUTE_COLUMNS,
    TIME_COLUMNS,
    PriorCandidate,
    bundle_candidates,
    default_candidates,
)
from monai_du.audit.run import (
    MAX_LABELLED_ROWS,
    audit_priors,
    run_audit,
    write_audit,
)
from monai_du.audit.statistics import (
    AUC_CHANCE_QUANTILE,
    CV_FOLDS,
    batch_kernel_stats,
    centred_kta,
    cv_auc_chance_level,
    grouped_cv_auc,
    hsic,
    permutation_pvalue,
)
from monai_du.audit.verdicts import (
    CHANCE_AUC_MARGIN,
    COARSE_MEAN_OFFDIAG,
    COARSE_RANK_FRACTION,
    CONSTANT_MEAN_OFFDIAG,
    IDENTITY_MEAN_OFFDIAG,
    IDENTITY_RANK_FRACTION,
    P_VALUE_ALPHA,
    VERDICT_COARSE,
    VERDICT_IDENTITY,
    VERDICT_INFORMATIVE,
    VERDICT_UNINFORMATIVE,
    VERDICTS,
    audit_verdict,
    format_audit,
)

__all__ = [
    "COARSE_RANK_FRACTION",
    "COARSE_MEAN_OFFDIAG",
    "CONSTANT_MEAN_OFFDIAG",
    "IDENTITY_RANK_FRACTION",
    "IDENTITY_MEAN_OFFDIAG",
    "P_VALUE_ALPHA",
    "CHANCE_AUC_MARGIN",
    "AUC_CHANCE_QUANTILE",
    "MAX_LABELLED_ROWS",
    "CV_FOLDS",
    "TIME_COLUMNS",
    "ATTRIBUTE_COLUMNS",
    "VERDICT_COARSE",
    "VERDICT_IDENTITY",
    "VERDICT_UNINFORMATIVE",
    "VERDICT_INFORMATIVE",
    "VERDICTS",
    "PriorCandidate",
    "default_candidates",
    "batch_kernel_stats",
    "centred_kta",
    "hsic",
    "permutation_pvalue",
    "grouped_cv_auc",
    "cv_auc_chance_level",
    "audit_priors",
    "audit_verdict",
    "format_audit",
    "write_audit",
    "run_audit",
    "bundle_candidates",
]
