"""The pieces `hvdtrain.fit` takes for the U-Net, and prediction on NIfTI files.

Checkpoint `config` layout (written by `checkpoint_config`, read by `model_from_checkpoint` and `jobs.predict`):

    config = {
        ...every UNetConfig field...,
        "model": {"in_channels", "out_channels", "features", "depth", "norm", "dropout", "deep_supervision",
                  "max_features", "residual", "top_features"[, "stem"]},   # UNet3D(**config["model"])
        "preprocess": {"target_spacing", "window", "normalize"},   # PreprocessParams.from_dict(...)
        "inference": {"roi_size", "overlap", "sw_batch_size", "threshold", "activation", "tta_flips", "postprocess"},
    }

Typical job (every rank):

    cfg = parse_config(UNetConfig); dist.init(cfg.threads or None)
    train_cases, val_cases = prepare_data(cfg)                 # preprocessing shared by the ranks, cached
    run = build_run(cfg, train_cases, val_cases)               # model, loaders, step/eval functions, metric
    summary = fit(run, cfg); values, metric, ckpt = evaluate_best(run, cfg)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from hvdtrain import SplitStep, batching, data, dist, pooling, seeding
from hvdtrain.config import to_dict
from hvdtrain.run import Run

from .config import UNetConfig
from .inference import predict_probabilities
from .io import Case, EmptyDatasetError, list_cases, read_image
from .losses import DeepSupervisionLoss, DiceLoss
from .metrics import DiceMetric
from .postprocess import postprocess_mask
from .preprocess import (
    CachedCase,
    PreprocessParams,
    air_value,
    invert_to_original,
    preprocess_arrays,
    preprocess_dataset,
    spacing_of,
)
from .sampling import Augment, PatchDataset, VolumeDataset
from .unet import UNet3D
from .validate import check_volume

__all__ = [
    "model_kwargs",
    "preprocess_params",
    "inference_params",
    "checkpoint_config",
    "build_model",
    "case_group",
    "split_cases",
    "prepare_data",
    "patch_dataset",
    "make_loss",
    "make_step_fn",
    "make_eval_fn",
    "build_run",
    "Predictor",
    "model_from_checkpoint",
]


def model_kwargs(cfg: UNetConfig) -> dict[str, Any]:
    """`UNet3D` constructor arguments from the config (stored as `config["model"]`)."""
    return {
        "in_channels": 1,
        "out_channels": 1,
        "features": cfg.features,
        "depth": cfg.depth,
        "norm": cfg.norm,
        "dropout": cfg.dropout,
        "deep_supervision": cfg.deep_supervision,
        "max_features": 320,
        "residual": cfg.residual,
        "top_features": cfg.top_features,
        # Only when set: checkpoints written before the option (no "stem" key) keep resuming.
        **({"stem": cfg.stem} if cfg.stem != 1 else {}),
    }


def preprocess_params(cfg: UNetConfig) -> PreprocessParams:
    return PreprocessParams(tuple(cfg.target_spacing), tuple(cfg.window), cfg.normalize)


def inference_params(cfg: UNetConfig) -> dict[str, Any]:
    """Sliding-window settings stored as `config["inference"]`."""
    return {
        "roi_size": list(cfg.patch_size),
        "overlap": cfg.sw_overlap,
        "sw_batch_size": cfg.sw_batch_size,
        "threshold": cfg.threshold,
        "activation": "sigmoid",
        "tta_flips": [0, 1, 2] if cfg.tta else [],
        "postprocess": cfg.postprocess,
    }


def checkpoint_config(cfg: UNetConfig) -> dict[str, Any]:
    """The `config` dict for `hvdtrain.fit` (config.json and checkpoints): flat fields + model/preprocess/inference."""
    return {
        **to_dict(cfg),
        "model": model_kwargs(cfg),
        "preprocess": preprocess_params(cfg).to_dict(),
        "inference": inference_params(cfg),
    }


def build_model(kwargs: dict[str, Any]) -> UNet3D:
    return UNet3D(**kwargs)


def case_group(case_id: str, pattern: str) -> str:
    """The split group of a case: the first capture (or the whole match) of `pattern`; the case itself if empty."""
    if not pattern:
        return case_id
    m = re.search(pattern, case_id)
    if m is None:
        raise ValueError(f"--split-group {pattern!r} does not match case {case_id!r}")
    return m.group(1) if m.groups() else m.group(0)


def split_cases(
    root: str | Path, val_fraction: float = 0.2, seed: int = 0, group: str = ""
) -> tuple[list[Case], list[Case]]:
    """(train, validation) cases: the dataset's own validation list if it has one, else a seeded random split.

    With `group` (a regex on the case id, e.g. `^(LIDC-IDRI-\\d+)` for the patient) whole groups go to one side,
    so no patient's nodules are on both; groups are drawn in a seeded order until the validation share is reached.
    """
    train = list_cases(root, "train")
    try:
        return train, list_cases(root, "val")
    except EmptyDatasetError:
        pass
    if len(train) < 2:
        raise EmptyDatasetError(f"{root}: {len(train)} labelled case(s); need at least 2 to hold one out")
    groups = [case_group(c.case_id, group) for c in train]
    names = list(dict.fromkeys(groups))  # first-appearance order: ungrouped splits stay as they were
    if len(names) < 2:
        raise EmptyDatasetError(f"{root}: all {len(train)} cases fall in one --split-group {group!r}")
    n_val = min(len(train) - 1, max(1, round(val_fraction * len(train))))
    val_groups: set[str] = set()
    taken = 0
    for i in np.random.default_rng(seed).permutation(len(names)):
        if taken >= n_val or len(val_groups) == len(names) - 1:
            break
        val_groups.add(names[i])
        taken += groups.count(names[i])
    return [c for c, g in zip(train, groups) if g not in val_groups], [
        c for c, g in zip(train, groups) if g in val_groups
    ]


def prepare_data(cfg: UNetConfig, progress: bool | None = None) -> tuple[list[CachedCase], list[CachedCase]]:
    """Split, preprocess (ranks share the cases; cached across runs) and return (train, validation) entries.

    A collective: call on every rank (it ends with a barrier so every entry is on disk when it returns).
    """
    d = dist.info()
    train, val = split_cases(cfg.data, cfg.val_fraction, cfg.split_seed, cfg.split_group)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.data) / "preprocessed"
    params = preprocess_params(cfg)
    show = dist.is_main() if progress is None else progress
    cases = train + val
    entries = preprocess_dataset(cases, cache, params, shard=(d.rank, d.size), progress=show)
    dist.barrier()  # hvd: every rank's share is written before anyone reads another's
    return entries[: len(train)], entries[len(train) :]


def patch_dataset(cfg: UNetConfig, cases: Sequence[CachedCase]) -> PatchDataset:
    augment = Augment(enabled=cfg.augment, intensity_scale=cfg.intensity_scale, intensity_shift=cfg.intensity_shift)
    pad = air_value(cfg.normalize)  # None after z-score: each volume's own minimum
    return PatchDataset(
        cases, cfg.patch_size, cfg.samples_per_volume, cfg.fg_share, augment, cfg.seed, pad, cfg.small_volume
    )


def make_loss(cfg: UNetConfig, reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> nn.Module:
    """Dice (+ BCE) loss, wrapped for deep supervision; global-batch Dice when `cfg.global_dice`.

    `reduce_fn` defaults to a `hvdtrain.pooling.GlobalStats` when `cfg.global_dice and cfg.batch_dice`: the Dice of
    the whole global batch, over ranks, accumulation steps and simulated GPUs alike.
    """
    if reduce_fn is None and cfg.global_dice and cfg.batch_dice:
        reduce_fn = pooling.GlobalStats()
    dice = DiceLoss("sigmoid", cfg.batch_dice, cfg.smooth, cfg.smooth, cfg.ce_weight, reduce_fn=reduce_fn)
    return DeepSupervisionLoss(dice)


def make_step_fn(loss_fn: nn.Module) -> SplitStep:
    """`step_fn(model, (image, label), device) -> (local loss, patches)` for `hvdtrain.fit`, in two halves.

    It carries the loss's `GlobalStats` (or None) as `step_fn.global_stats`, for the trainer's statistics pass.
    """

    def prepare(batch: Any, device: torch.device):
        image, label = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        return image, {}, lambda out: (loss_fn(out, label), int(image.shape[0]))

    reduce_fn = getattr(getattr(loss_fn, "loss", loss_fn), "reduce_fn", None)
    return SplitStep(prepare, reduce_fn if isinstance(reduce_fn, pooling.GlobalStats) else None)


def make_eval_fn(cfg: UNetConfig) -> Callable[[nn.Module, Any, torch.device, DiceMetric], None]:
    """`eval_fn(model, (image, label, case_ids), device, metric)`: sliding-window inference of whole volumes.

    Dice is measured on the preprocessed grid (nnU-Net's validation does the same during training);
    `jobs.predict` scores on the original grid.
    """

    inf = inference_params(cfg)
    # The preprocessed grid's spacing when every axis is resampled; else voxel units for "nearest the centre".
    grid_spacing = tuple(cfg.target_spacing) if all(t > 0 for t in cfg.target_spacing) else None

    def eval_fn(model: nn.Module, batch: Any, device: torch.device, metric: DiceMetric) -> None:
        images, labels, case_ids = batch
        for image, label, case_id in zip(images, labels, case_ids):
            pad = air_value(cfg.normalize, image)  # air outside the volume
            prob = predict_probabilities(
                model,
                image,
                cfg.patch_size,
                cfg.sw_overlap,
                cfg.sw_batch_size,
                device=device,
                pad_value=pad,
                tta_flips=inf["tta_flips"],
            )
            mask = postprocess_mask(prob > cfg.threshold, cfg.postprocess, grid_spacing)
            metric.update(case_id, mask, label[0].numpy())

    return eval_fn


def build_run(cfg: UNetConfig, train_cases: Sequence[CachedCase], val_cases: Sequence[CachedCase]) -> Run:
    """The U-Net's run for `hvdtrain.fit`, shared by `jobs.train_unet` and `jobs.tune` (every rank builds it)."""
    cfg = batching.resolve(cfg, dist.info().size)  # --global-batch: per-GPU batch and accumulation for this size
    train = data.train_loader_for(patch_dataset(cfg, train_cases), cfg)
    val = data.eval_loader(VolumeDataset(val_cases), 1, cfg.num_workers)
    seeding.seed_init(cfg.seed)  # the same initial weights on every rank (trials compare fairly); training reseeds
    model = build_model(model_kwargs(cfg))
    step_fn = make_step_fn(make_loss(cfg))
    return Run(model, train, val, step_fn, make_eval_fn(cfg), DiceMetric, checkpoint_config(cfg), cfg.monitor, "max")


def _config_section(config: dict[str, Any], key: str, path: str | Path) -> dict[str, Any]:
    """`config[key]` of a checkpoint that `jobs.train_unet` wrote; a clear error for any other file."""
    from hvdtrain.checkpoint import CheckpointError

    if not isinstance(config.get(key), dict):
        raise CheckpointError(f"{path}: not a U-Net checkpoint (its config has no {key!r} section)")
    return dict(config[key])


@dataclass
class Predictor:
    """A trained U-Net with the preprocessing and sliding-window settings it was trained with."""

    model: nn.Module
    params: PreprocessParams
    roi_size: tuple[int, int, int]
    overlap: float = 0.5
    sw_batch_size: int = 2
    threshold: float = 0.5
    device: torch.device = torch.device("cpu")
    tta_flips: tuple[int, ...] = ()
    postprocess: str = "none"
    run_config: dict[str, Any] = field(default_factory=dict)  # the training run's config (its split, its data)

    def probabilities(self, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """Foreground probability on the original grid of `image` (voxels as stored, with its affine)."""
        img, _, geometry = preprocess_arrays(image, affine, None, self.params)
        pad = air_value(self.params.normalize, img)
        prob = predict_probabilities(
            self.model,
            img,
            self.roi_size,
            self.overlap,
            self.sw_batch_size,
            device=self.device,
            pad_value=pad,
            tta_flips=self.tta_flips,
        )
        return invert_to_original(prob, geometry)

    def mask(self, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """uint8 mask on the original grid of `image`: threshold, then the checkpoint's post-processing."""
        mask = postprocess_mask(
            self.probabilities(image, affine) > self.threshold, self.postprocess, spacing_of(affine)
        )
        return mask.astype(np.uint8)

    def predict_file(self, path: str | Path) -> tuple[nib.Nifti1Image, np.ndarray]:
        """(source as NIfTI (any format `read_image` reads), uint8 mask on its grid)."""
        nifti, data = read_image(path)
        check_volume(data, nifti.affine, path)
        return nifti, self.mask(data, nifti.affine)


def model_from_checkpoint(
    path: str | Path, device: torch.device | str = "cpu", overlap: float | None = None
) -> Predictor:
    """Load a checkpoint written by `hvdtrain.fit` with `checkpoint_config(cfg)` as its config."""
    from hvdtrain import checkpoint

    ckpt = checkpoint.load(Path(path))
    config = ckpt.get("config") or {}
    model = build_model(_config_section(config, "model", path))
    model.load_state_dict(ckpt["model"])
    device = torch.device(device)
    model.to(device).eval()
    inf = _config_section(config, "inference", path)
    return Predictor(
        model,
        PreprocessParams.from_dict(_config_section(config, "preprocess", path)),
        tuple(int(r) for r in inf["roi_size"]),
        float(inf["overlap"] if overlap is None else overlap),
        int(inf["sw_batch_size"]),
        float(inf["threshold"]),
        device,
        tuple(int(a) for a in inf.get("tta_flips", ())),  # checkpoints from before TTA have neither key
        str(inf.get("postprocess", "none")),
        config,
    )
