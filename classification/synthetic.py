"""A synthetic, BUSI-like breast-ultrasound dataset for tests and demos (no real data needed).

Each image is a layered tissue echogenicity map (skin, subcutaneous fat with lobules and Cooper's ligaments,
fibroglandular tissue, pectoral muscle), attenuated with depth and multiplied by Rayleigh speckle:

* normal: no lesion (sometimes a small, faint fat lobule);
* benign: a smooth, oval, wider-than-tall, hypoechoic (dark) lesion with posterior acoustic enhancement;
* malignant: an irregular, spiculated, taller-than-wide, heterogeneous dark lesion with posterior shadowing
  (sometimes an echogenic halo and microcalcifications).

Files follow BUSI: `ROOT/<class>/<class> (<n>).png` with `<class> (<n>)_mask.png` beside each image (empty for
normal images) and `_mask_1.png` for a second lesion. The classes are imbalanced like BUSI (benign > malignant >
normal: 56 % / 27 % / 17 %), and about `dup_fraction` of each class are near-duplicates (a shifted, re-noised,
re-gained copy of another image of the same class, under a different number, as in BUSI). `synthetic_info.json`
at ROOT lists the duplicate pairs and the counts (the data scanner ignores files at ROOT).

Everything is drawn from `numpy.random.default_rng` seeded per image from `seed`, so a seed gives the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter
from scipy.ndimage import shift as nd_shift
from scipy.special import expit

__all__ = ["CLASSES", "BUSI_SHARES", "class_counts", "render_case", "speckle", "generate"]

CLASSES = ("benign", "malignant", "normal")
BUSI_SHARES = {"benign": 437 / 780, "malignant": 210 / 780, "normal": 133 / 780}


@dataclass
class _Case:
    tissue: np.ndarray  # (H, W) echogenicity before speckle, >= 0
    masks: list[np.ndarray]  # one bool (H, W) per lesion


def class_counts(n_per_class: int) -> dict[str, int]:
    """Images per class for `3 * n_per_class` images in BUSI's proportions (at least 5 each, for 5 folds)."""
    total = 3 * n_per_class
    counts = {c: max(5, round(total * BUSI_SHARES[c])) for c in ("malignant", "normal")}
    counts["benign"] = max(5, total - sum(counts.values()))
    return {c: counts[c] for c in CLASSES}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length `sigma` pixels."""
    f = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return f / (f.std() + 1e-12)


def _wavy(rng: np.random.Generator, x: np.ndarray, base: float, amp: float) -> np.ndarray:
    """A boundary depth (fraction of height) that undulates across the image."""
    out = np.full_like(x, base)
    for k in (1, 2, 3):
        out += amp / k * np.sin(2 * np.pi * (k * rng.uniform(0.5, 1.5) * x + rng.uniform(0, 1)))
    return out


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Layered breast tissue echogenicity (H, W), roughly in [0, 1]."""
    y = np.linspace(0, 1, h)[:, None] * np.ones((1, w))
    x = np.ones((h, 1)) * np.linspace(0, 1, w)[None, :]
    skin = _wavy(rng, x[0], rng.uniform(0.03, 0.06), 0.005)
    fat_end = _wavy(rng, x[0], rng.uniform(0.18, 0.32), 0.03)
    gland_end = _wavy(rng, x[0], rng.uniform(0.68, 0.82), 0.04)
    muscle_end = _wavy(rng, x[0], rng.uniform(0.88, 0.97), 0.02)
    tex = _smooth_noise(rng, (h, w), (h * 0.02, w * 0.035))
    lobules = _smooth_noise(rng, (h, w), w * 0.05)
    fat = rng.uniform(0.28, 0.4) * (1 + 0.25 * lobules)
    gland = rng.uniform(0.55, 0.75) * (1 + 0.2 * tex)
    stripes = 1 + 0.25 * np.sin(2 * np.pi * y * rng.uniform(25, 45) + 2 * _smooth_noise(rng, (h, w), w * 0.1))
    muscle = rng.uniform(0.38, 0.5) * stripes
    deep = rng.uniform(0.15, 0.25) * (1 + 0.2 * tex)
    img = np.where(y < skin, rng.uniform(0.8, 1.0), fat)
    img = np.where(y >= fat_end, gland, img)
    img = np.where(y >= gland_end, muscle, img)
    img = np.where(y >= muscle_end, deep, img)
    # Cooper's ligaments: a few thin bright arcs through the fat.
    lig = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(lig)
    for _ in range(rng.integers(2, 5)):
        x0 = rng.uniform(0, w)
        pts = [
            (x0 + w * 0.15 * np.sin(t * 3 + rng.uniform(0, 6)) + t * rng.uniform(-0.3, 0.3) * w, t * h * 0.35)
            for t in np.linspace(0.05, 1, 8)
        ]
        draw.line(pts, fill=255, width=1)
    img = img + 0.35 * gaussian_filter(np.asarray(lig, dtype=np.float64) / 255, 0.6) * (y < fat_end + 0.05)
    # Depth attenuation imperfectly corrected by time-gain compensation, and an overall gain.
    img *= (1 - rng.uniform(0.1, 0.35) * y) * rng.uniform(0.85, 1.15)
    return np.clip(img, 0, None)


def _polar(h: int, w: int, cx: float, cy: float, a: float, b: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Normalised radius and angle of every pixel around an ellipse (a, b: semi-axes in pixels)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * dx + s * dy) / a, (-s * dx + c * dy) / b
    return np.hypot(u, v), np.arctan2(v, u)


def _posterior(img: np.ndarray, mask: np.ndarray, gain: float, length: float, rng: np.random.Generator) -> np.ndarray:
    """Multiply the tissue below the lesion by `1 + gain * decay` (gain > 0 enhancement, < 0 shadowing)."""
    h, w = mask.shape
    present = mask.any(axis=0)
    if not present.any():
        return img
    bottom = np.where(present, h - 1 - np.argmax(mask[::-1], axis=0), 0).astype(np.float64)
    # Column weight: the lesion's thickness in each column, softened so the effect has no hard side edges.
    weight = gaussian_filter(np.clip(mask.sum(axis=0) / max(mask.sum(axis=0).max(), 1), 0, 1) ** 0.5, w * 0.01)
    yy = np.arange(h, dtype=np.float64)[:, None]
    depth = (yy - bottom[None, :]) / h
    decay = np.where(depth > 0, np.exp(-depth / length), 0.0) * np.clip(depth * h / 2, 0, 1)
    factor = 1 + gain * weight[None, :] * decay * (1 + 0.15 * _smooth_noise(rng, (h, w), w * 0.02))
    return img * np.clip(factor, 0.05, None)


def _lesion(rng: np.random.Generator, img: np.ndarray, kind: str, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Draw one lesion of `kind` ('benign', 'malignant' or 'lobule') into `img`; returns (image, mask)."""
    h, w = img.shape
    if kind == "malignant":
        height = rng.uniform(0.2, 0.34) * h * scale
        width = height * rng.uniform(0.65, 1.0)  # taller than wide: grows across tissue planes
        angle = rng.uniform(-0.25, 0.25)
    elif kind == "benign":
        height = rng.uniform(0.12, 0.22) * h * scale
        width = height * rng.uniform(1.25, 2.1)  # wider than tall: parallel to the skin
        angle = rng.uniform(-0.2, 0.2)
    else:
        height = rng.uniform(0.05, 0.08) * h
        width = height * rng.uniform(1.3, 2.0)
        angle = rng.uniform(-0.2, 0.2)
    cx = rng.uniform(0.3, 0.7) * w
    cy = (rng.uniform(0.38, 0.55) if kind != "lobule" else rng.uniform(0.12, 0.2)) * h
    rho, theta = _polar(h, w, cx, cy, width / 2, height / 2, angle)
    r = np.ones_like(theta)
    if kind == "malignant":
        # Irregular, angular margin: several random harmonics of the boundary radius.
        for k in range(3, 10):
            r += rng.uniform(0.02, 0.1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    elif kind == "benign":
        for k in (2, 3):  # gentle lobulation at most
            r += rng.uniform(0.0, 0.04) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    edge = 0.04 if kind != "malignant" else 0.02
    inside = expit((r - rho) / edge)
    mask = rho < r
    if kind == "lobule":
        return img * (1 - 0.45 * inside), mask
    level = rng.uniform(0.06, 0.18) if kind == "benign" else rng.uniform(0.05, 0.16)
    hetero = 0.25 if kind == "benign" else 0.6
    interior = level * np.clip(1 + hetero * _smooth_noise(rng, (h, w), max(1.0, width * 0.08)), 0.1, None)
    if kind == "malignant":
        if rng.random() < 0.6:  # echogenic halo around the margin
            halo = np.exp(-(((rho - r) / 0.18) ** 2)) * (rho > r)
            img = img * (1 + rng.uniform(0.4, 0.9) * halo)
        spic = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(spic)
        for t in rng.uniform(0, 2 * np.pi, rng.integers(4, 11)):
            length = rng.uniform(0.3, 0.9)
            pts = []
            for frac in (0.85, 1.0 + length):  # from just inside the margin outwards
                u, v = frac * np.cos(t) * width / 2, frac * np.sin(t) * height / 2
                pts.append((cx + np.cos(angle) * u - np.sin(angle) * v, cy + np.sin(angle) * u + np.cos(angle) * v))
            draw.line(pts, fill=255, width=int(rng.integers(1, 3)))
        spic_map = gaussian_filter(np.asarray(spic, dtype=np.float64) / 255, 0.5)
        img = img * (1 - 0.75 * np.clip(spic_map * 1.5, 0, 1))
        if rng.random() < 0.4:  # microcalcifications: a few bright specks inside
            for _ in range(rng.integers(3, 8)):
                ys, xs = np.nonzero(mask)
                j = rng.integers(len(ys))
                interior[ys[j], xs[j]] += rng.uniform(0.6, 1.0)
    img = img * (1 - inside) + interior * inside
    if kind == "benign":
        img = _posterior(img, mask, rng.uniform(0.35, 0.8), rng.uniform(0.12, 0.3), rng)
    else:
        img = _posterior(img, mask, -rng.uniform(0.45, 0.8), rng.uniform(0.3, 0.8), rng)
    return img, mask


def render_case(rng: np.random.Generator, kind: str, h: int, w: int, second_lesion: bool = False) -> _Case:
    """Tissue echogenicity (before speckle) and lesion masks of one image of class `kind`."""
    img = _background(rng, h, w)
    masks: list[np.ndarray] = []
    if kind == "normal":
        if rng.random() < 0.35:  # a faint fat lobule: dark-ish and oval, but small and near the skin
            img, _ = _lesion(rng, img, "lobule")
    else:
        img, m = _lesion(rng, img, kind)
        masks.append(m)
        if second_lesion:
            img, m2 = _lesion(rng, img, kind, scale=0.6)
            masks.append(m2 & ~masks[0])
    return _Case(img, masks)


def speckle(rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    """Multiplicative Rayleigh speckle (laterally elongated), log-like compression, 8-bit grey image."""
    h, w = tissue.shape
    re = gaussian_filter(rng.standard_normal((h, w)), (0.6, 1.1))
    im = gaussian_filter(rng.standard_normal((h, w)), (0.6, 1.1))
    env = np.hypot(re, im)  # Rayleigh-distributed envelope of a complex Gaussian field
    env /= env.mean()
    out = tissue * env
    out = (out / 1.4) ** 0.8  # mild display compression: dark lesions stay dark but textured
    out += 0.015 * rng.standard_normal((h, w))
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def _near_copy(
    img: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    """A near-duplicate as BUSI has them: the same frame moved by a few pixels, re-gained and re-noised."""
    reach = max(1, round(img.shape[1] / 64))  # up to ~1.5 % of the width
    dy, dx = (int(v) for v in rng.integers(-reach, reach + 1, size=2))
    moved = nd_shift(img.astype(np.float64), (dy, dx), order=0, mode="nearest")
    noisy = moved * rng.uniform(0.93, 1.07) + rng.normal(0, rng.uniform(1, 4), img.shape)
    out = (np.clip(noisy, 0, 255) + 0.5).astype(np.uint8)
    return out, [nd_shift(m.astype(np.uint8), (dy, dx), order=0, mode="constant").astype(bool) for m in masks]


def _save(out: Path, name: str, img: np.ndarray, masks: list[np.ndarray]) -> None:
    Image.fromarray(img).save(out / f"{name}.png")
    h, w = img.shape
    first = masks[0] if masks else np.zeros((h, w), dtype=bool)
    Image.fromarray((first * 255).astype(np.uint8)).save(out / f"{name}_mask.png")
    for j, m in enumerate(masks[1:], start=1):
        Image.fromarray((m * 255).astype(np.uint8)).save(out / f"{name}_mask_{j}.png")


def generate(
    out_dir: str | Path,
    n_per_class: int = 40,
    size: int = 128,
    seed: int = 0,
    dup_fraction: float = 0.1,
    second_lesion_fraction: float = 0.08,
) -> dict:
    """Write a synthetic BUSI-like dataset to `out_dir`; returns (and writes to `synthetic_info.json`) its summary.

    Args:
        out_dir: created if needed; existing files of the same names are overwritten.
        n_per_class: average images per class (3 * n_per_class in all, split in BUSI's proportions).
        size: image width in pixels; heights vary between 75 % and 100 % of it, as scans do.
        seed: the whole dataset is a function of `seed` and the arguments.
        dup_fraction: share of each class that are near-duplicates of another image of that class.
        second_lesion_fraction: share of lesion images with a second, smaller lesion (`_mask_1.png`).

    Returns:
        `{"counts": {class: n}, "duplicates": [[original, copy], ...] (paths relative to out_dir),
        "second_lesion": [...], "seed", "size"}`.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if n_per_class < 2:
        raise ValueError(f"n_per_class must be at least 2, got {n_per_class}")
    out_dir = Path(out_dir)
    info: dict = {
        "counts": class_counts(n_per_class),
        "duplicates": [],
        "second_lesion": [],
        "seed": seed,
        "size": size,
    }
    for ci, kind in enumerate(CLASSES):
        folder = out_dir / kind
        folder.mkdir(parents=True, exist_ok=True)
        count = info["counts"][kind]
        n_dup = int(round(count * dup_fraction))
        plan_rng = np.random.default_rng([seed, ci, 10**6])
        # Image numbers are shuffled so copies do not sit next to their originals in the file order.
        numbers = plan_rng.permutation(count) + 1
        originals: list[tuple[str, np.ndarray, list[np.ndarray]]] = []
        for i in range(count - n_dup):
            rng = np.random.default_rng([seed, ci, i])
            h = int(round(size * rng.uniform(0.75, 1.0)))
            two = kind != "normal" and rng.random() < second_lesion_fraction
            case = render_case(rng, kind, h, size, two)
            name = f"{kind} ({numbers[i]})"
            img = speckle(rng, case.tissue)
            _save(folder, name, img, case.masks)
            originals.append((name, img, case.masks))
            if two:
                info["second_lesion"].append(f"{kind}/{name}.png")
        for j in range(n_dup):
            rng = np.random.default_rng([seed, ci, count + j])
            src_name, src_img, src_masks = originals[int(rng.integers(len(originals)))]
            name = f"{kind} ({numbers[count - n_dup + j]})"
            _save(folder, name, *_near_copy(src_img, src_masks, rng))
            info["duplicates"].append([f"{kind}/{src_name}.png", f"{kind}/{name}.png"])
    (out_dir / "synthetic_info.json").write_text(json.dumps(info, indent=1))
    return info
