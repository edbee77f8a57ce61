"""Data: the small real samples shipped with the package, and generated data with known answers.

* :func:`load_sample` / :func:`available_samples` - ``brain2d`` (an inter-subject 2D T1 pair) and ``brain3d``
  (a 3D template with a known random deformation), from ``data/samples``;
* :func:`unseen_brain_pairs` - the test set of real unseen brains (``brain2d_test``): 30 inter-subject 2D pairs of
  three brains never used in training, at five matched coronal planes;
* :mod:`.synthetic` - SynthMorph-style random label maps and intensities, random smooth diffeomorphisms,
  :func:`deform_sample` and :func:`synthetic_pair`.
* :mod:`.pairs` - :class:`PairDataset` / :func:`brain_pairs`: seeded training and evaluation pairs for the 2D
  models, and :func:`collate`.
* :mod:`.volumes` - :class:`VolumePairDataset`: seeded 3D training pairs for the small 3D models, generated from
  brain-like (:func:`brain_like`) and lung-like (:func:`lung_like`) label maps.
* :mod:`.learn2reg` - :func:`save_l2r_disp` / :func:`load_l2r_disp`: Learn2Reg displacement files.

Every loader returns the same sample dict: ``fixed``, ``moving`` (float ``(1, 1, *spatial)`` in [0, 1]),
``fixed_seg``, ``moving_seg`` (int64 ``(1, 1, *spatial)``), ``spacing`` (mm), ``labels``, ``label_names``,
``ids``, and ``true_disp`` when the deformation is known.
"""
from .pairs import PAIR_KEYS, PAIR_KINDS, SEED_RANGES, PairDataset, brain_pairs, collate, item_seed
from .volumes import SHIPPED_KINDS, VOLUME_KINDS, VolumePairDataset, brain_like, lung_like
from .samples import SAMPLES, TEST_PAIR_KEYS, available_samples, load_sample, sample_path, unseen_brain_pairs
from .synthetic import (
    Deformed,
    IntensityChange,
    apply_intensity_change,
    bias_field,
    deform_sample,
    random_deformation,
    random_intensities,
    random_intensity_change,
    random_label_map,
    random_velocity,
    smooth_noise,
    synthetic_pair,
)
from .nlst import NLST, normalise_nlst_name, read_keypoints
from .oasis import LABEL_PRESETS, OASIS, neurite_split_sizes
from .learn2reg import load_l2r_disp, save_l2r_disp
from .download import SOURCES, ChecksumError, DownloadError, Source, UnsafeArchiveError, download, safe_extract

__all__ = [
    "SAMPLES", "available_samples", "load_sample", "sample_path", "unseen_brain_pairs", "TEST_PAIR_KEYS",
    "Deformed", "IntensityChange", "apply_intensity_change", "bias_field", "deform_sample", "random_deformation",
    "random_intensities", "random_intensity_change", "random_label_map", "random_velocity", "smooth_noise",
    "synthetic_pair",
    "PairDataset", "brain_pairs", "collate", "item_seed", "SEED_RANGES", "PAIR_KINDS", "PAIR_KEYS",
    "VolumePairDataset", "VOLUME_KINDS", "SHIPPED_KINDS", "brain_like", "lung_like",
    "download", "SOURCES", "Source", "DownloadError", "ChecksumError", "UnsafeArchiveError", "safe_extract",
    "OASIS", "LABEL_PRESETS", "neurite_split_sizes", "NLST", "read_keypoints", "normalise_nlst_name",
    "save_l2r_disp", "load_l2r_disp",
]
