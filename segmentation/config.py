"""The U-Net job's config: `hvdtrain.TrainConfig` plus data, preprocessing, sampling, model, loss and inference.

Presets: `jobs/configs/unet_lung.yaml` (GPU, real CT or the default phantoms), `jobs/configs/unet_demo.yaml`
(the CPU demo on `python -m jobs.make_phantoms OUT --preset demo`).
"""

from __future__ import annotations

from dataclasses import dataclass

from hvdtrain.config import TrainConfig, arg

from .postprocess import POSTPROCESS
from .unet import NORMS

__all__ = ["UNetConfig"]


@dataclass(frozen=True)
class UNetConfig(TrainConfig):
    """3D U-Net lung-nodule segmentation (Decathlon or plain NIfTI layout) under Horovod."""

    run_dir: str = arg("runs/unet", "run folder: config.json, metrics.jsonl, checkpoints/, per_case_dice.csv")
    epochs: int = arg(100, "training epochs (one epoch = samples_per_volume patches of every training case)")
    batch_size_per_gpu: int = arg(2, "patches per rank per micro-batch")
    lr: float = arg(3e-4, "base learning rate for one GPU's batch; scaled by --lr-rule")
    lr_rule: str = arg("sqrt", "LR scaling in GPUs x accumulation", ("none", "linear", "sqrt"))
    schedule: str = arg("poly", "LR schedule after warmup", ("cosine", "step", "plateau", "poly", "constant"))
    weight_decay: float = arg(1e-5, "weight decay")
    # data
    data: str = arg("data/phantoms", "dataset folder: Decathlon (dataset.json) or plain (images/ + labels/)")
    cache_dir: str = arg("", "preprocessed .npy cache (default: DATA/preprocessed)")
    val_fraction: float = arg(0.2, "held-out share of the training cases when the dataset has no 'validation' list")
    split_seed: int = arg(0, "seed of that train/validation split (kept apart from --seed)")
    split_group: str = arg("", "regex on the case id whose match keeps cases together in that split (e.g. the patient)")
    # preprocessing (saved as config["preprocess"] in checkpoints; prediction repeats it)
    target_spacing: tuple[float, float, float] = arg((0.0, 0.0, 0.0), "resample to this spacing in mm, x y z (0: keep)")
    window: tuple[float, float] = arg((-1000.0, 400.0), "HU window: clip to low high")
    normalize: str = arg("minmax", "intensity normalisation after the window", ("minmax", "zscore"))
    # patches
    patch_size: tuple[int, int, int] = arg((96, 96, 48), "training patch and sliding window, voxels x y z")
    samples_per_volume: int = arg(4, "patches drawn from each training case per epoch")
    fg_share: float = arg(0.5, "share of patches centred on a foreground voxel")
    small_volume: str = arg("error", "a volume smaller than the patch: stop with an error, or pad it", ("error", "pad"))
    augment: bool = arg(True, "flips, axial 90-degree rotations, intensity scale/shift")
    intensity_scale: float = arg(0.1, "augmentation: multiply intensities by U(1-s, 1+s)")
    intensity_shift: float = arg(0.05, "augmentation: add U(-s, s) to intensities")
    # model (saved as config["model"])
    features: int = arg(16, "U-Net channels at the first level (doubled per level)")
    depth: int = arg(4, "U-Net downsamplings")
    norm: str = arg("instance", "normalisation layers", NORMS)
    dropout: float = arg(0.0, "Dropout3d probability in every block")
    deep_supervision: bool = arg(False, "extra loss heads on the lower decoder levels")
    residual: bool = arg(False, "residual blocks (conv-norm-act-conv-norm + skip)")
    top_features: int = arg(0, "channels of the full-resolution level only (0: --features); fewer is cheaper")
    stem: int = arg(1, "2: a strided first and transposed last convolution, blocks at half resolution or below", (1, 2))
    # loss
    batch_dice: bool = arg(True, "Dice over the whole batch (nnU-Net) instead of per sample")
    global_dice: bool = arg(True, "with batch Dice: allreduce tp/fp/fn so the Dice is over the global batch")
    ce_weight: float = arg(1.0, "weight of the binary cross-entropy added to the Dice loss (0: Dice only)")
    smooth: float = arg(1e-5, "Dice smoothing added to numerator and denominator")
    # validation / inference (saved as config["inference"])
    sw_overlap: float = arg(0.5, "sliding-window overlap in [0, 1)")
    sw_batch_size: int = arg(2, "windows per forward pass")
    threshold: float = arg(0.5, "probability threshold of the predicted mask")
    tta: bool = arg(False, "test-time augmentation: average the predictions of the 8 mirrorings of X, Y, Z")
    postprocess: str = arg("none", "mask post-processing: keep the component at/nearest the centre", POSTPROCESS)
    monitor: str = arg("dice", "validation value that picks the best checkpoint", ("dice", "dice_global"))
