"""Near-duplicate grouping with a perceptual hash, so that duplicates never straddle train and validation.

BUSI holds duplicated and near-duplicated images (re-exported, slightly shifted or cropped frames of the same
lesion). A random split puts copies on both sides and inflates validation scores. We hash every image (DCT pHash:
the signs of the low-frequency DCT coefficients of a 32x32 grey thumbnail versus their median) and join pairs
whose hashes differ in at most `threshold` of 64 bits (union-find, so chains join too). The group ids are the
`groups` of a grouped k-fold.

pHash alone is fragile on ultrasound: speckle spreads the image's energy over many similar DCT coefficients, so
a copy moved by one pixel can flip 4-12 bits while unrelated scans of similar anatomy differ by as few as 8-14.
So pairs within a looser `candidate_bits` are also checked with a speckle fingerprint: the normalised
cross-correlation of high-pass 64x64 thumbnails, maximised over shifts of +-2 thumbnail pixels. Speckle is unique
to an acquisition, so copies of one frame correlate strongly (0.4-0.95 on the synthetic set) and different frames
do not (below 0.2), whatever their layout, black borders or brightness.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from .data import load_rgb

__all__ = [
    "phash",
    "phash_image",
    "detail_thumbnail",
    "shifted_correlation",
    "hamming_matrix",
    "group_pairs",
    "group_by_hash",
    "DuplicateReport",
    "find_duplicates",
]

log = logging.getLogger(__name__)


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: `D @ x` is the DCT of the vector `x`."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


def phash_image(img: Image.Image, hash_size: int = 8, highfreq_factor: int = 4) -> np.ndarray:
    """DCT perceptual hash of a PIL image as a bool vector of `hash_size**2` bits.

    The image is reduced to a (hash_size*highfreq_factor)^2 grey thumbnail, so speckle and small shifts barely
    change the low-frequency coefficients that the hash keeps.
    """
    n = hash_size * highfreq_factor
    grey = np.asarray(img.convert("L").resize((n, n), Image.Resampling.LANCZOS), dtype=np.float64)
    d = _dct_matrix(n)
    coeffs = (d @ grey @ d.T)[:hash_size, :hash_size]
    # The DC term is the mean brightness: leave it out of the median so a brighter copy hashes the same.
    med = np.median(coeffs.ravel()[1:])
    return (coeffs > med).ravel()


def phash(path: str | Path, hash_size: int = 8) -> np.ndarray:
    """`phash_image` of a file (any mode; unreadable files raise `ImageReadError` naming them)."""
    return phash_image(load_rgb(path), hash_size)


def _pack(bits: np.ndarray) -> np.ndarray:
    """(N, B) bool -> (N, ceil(B/64)) uint64, for fast XOR + popcount distances."""
    n, b = bits.shape
    words = -(-b // 64)
    padded = np.zeros((n, words * 64), dtype=bool)
    padded[:, :b] = bits
    return np.packbits(padded, axis=1).view(">u8").astype(np.uint64)


def hamming_matrix(bits: np.ndarray, other: np.ndarray | None = None) -> np.ndarray:
    """Pairwise Hamming distances between the rows of two (N, B) bool hash arrays."""
    a = _pack(np.asarray(bits, dtype=bool))
    b = a if other is None else _pack(np.asarray(other, dtype=bool))
    return np.bitwise_count(a[:, None, :] ^ b[None, :, :]).sum(axis=2).astype(np.int64)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]  # path halving
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def detail_thumbnail(img: Image.Image, size: int = 64, sigma: float = 2.0) -> np.ndarray:
    """The speckle-scale detail of a grey `size`x`size` thumbnail (thumbnail minus its blur), float32."""
    t = np.asarray(img.convert("L").resize((size, size), Image.Resampling.BOX), dtype=np.float64)
    return (t - gaussian_filter(t, sigma)).astype(np.float32)


def shifted_correlation(a: np.ndarray, b: np.ndarray, reach: int = 2) -> np.ndarray:
    """Max over shifts within `reach` pixels of the normalised cross-correlation of pairs of images.

    Args:
        a, b: (P, n, n) arrays, pair p being (a[p], b[p]).

    Returns:
        (P,) correlations in [-1, 1].
    """
    n = a.shape[-1]
    best = np.full(len(a), -1.0)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            x = a[:, max(0, dy) : n + min(0, dy), max(0, dx) : n + min(0, dx)].reshape(len(a), -1)
            y = b[:, max(0, -dy) : n + min(0, -dy), max(0, -dx) : n + min(0, -dx)].reshape(len(b), -1)
            x = x - x.mean(axis=1, keepdims=True)
            y = y - y.mean(axis=1, keepdims=True)
            den = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
            c = np.divide((x * y).sum(axis=1), den, out=np.zeros(len(a)), where=den > 0)
            best = np.maximum(best, c)
    return best


def group_pairs(n: int, pairs: np.ndarray) -> np.ndarray:
    """Group ids (0.., numbered by first member) of the connected components of `pairs` (K, 2) over n items."""
    uf = _UnionFind(n)
    for i, j in np.asarray(pairs, dtype=np.int64).reshape(-1, 2):
        uf.union(int(i), int(j))
    roots = [uf.find(i) for i in range(n)]
    renumber: dict[int, int] = {}
    return np.array([renumber.setdefault(r, len(renumber)) for r in roots], dtype=np.int64)


def _close_pairs(bits: np.ndarray, max_bits: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(pairs i < j with Hamming distance <= max_bits, their distances); memory stays at chunk x N."""
    pairs, dists = [], []
    for start in range(0, len(bits), chunk):
        d = hamming_matrix(bits[start : start + chunk], bits)
        rows, cols = np.nonzero(d <= max_bits)
        keep = cols > rows + start
        pairs.append(np.stack([rows[keep] + start, cols[keep]], axis=1))
        dists.append(d[rows[keep], cols[keep]])
    return np.concatenate(pairs), np.concatenate(dists)


def group_by_hash(bits: np.ndarray, threshold: int) -> np.ndarray:
    """Group ids joining every pair of hashes within `threshold` bits, transitively (no speckle check)."""
    bits = np.asarray(bits, dtype=bool)
    return group_pairs(len(bits), _close_pairs(bits, threshold)[0])


@dataclass
class DuplicateReport:
    """Near-duplicate groups of a dataset.

    Attributes:
        groups: group id per image (the `groups` argument of a grouped k-fold).
        threshold: pHash bits within which two images are duplicates outright.
        candidate_bits, min_correlation: pairs within `candidate_bits` whose speckle correlation reaches
            `min_correlation` are duplicates too (candidate_bits <= threshold: no speckle check).
        pairs: (K, 2) duplicate pairs found; `by_speckle` marks the ones only the speckle check found.
        duplicate_groups: image indices of each group with two or more members.
        mixed_label_groups: those whose members carry different labels (label conflicts, as BUSI has).
    """

    groups: np.ndarray
    threshold: int
    bits: int
    candidate_bits: int = 0
    min_correlation: float = 1.0
    pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    by_speckle: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    duplicate_groups: list[list[int]] = field(default_factory=list)
    mixed_label_groups: list[list[int]] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return len(self.groups)

    @property
    def n_groups(self) -> int:
        return int(self.groups.max()) + 1 if len(self.groups) else 0

    @property
    def n_in_duplicate_groups(self) -> int:
        return sum(len(g) for g in self.duplicate_groups)

    @property
    def n_redundant(self) -> int:
        """Images that a deduplication keeping one per group would drop."""
        return self.n_images - self.n_groups

    def summary(self) -> dict[str, float]:
        return {
            "images": self.n_images,
            "groups": self.n_groups,
            "duplicate_groups": len(self.duplicate_groups),
            "images_in_duplicate_groups": self.n_in_duplicate_groups,
            "redundant_images": self.n_redundant,
            "largest_group": max((len(g) for g in self.duplicate_groups), default=1),
            "mixed_label_groups": len(self.mixed_label_groups),
            "pairs_by_hash": int((~self.by_speckle).sum()),
            "pairs_by_speckle": int(self.by_speckle.sum()),
            "threshold": self.threshold,
            "hash_bits": self.bits,
            "candidate_bits": self.candidate_bits,
            "min_correlation": self.min_correlation,
        }

    def describe(self) -> str:
        s = self.summary()
        return (
            f"near-duplicates: {s['duplicate_groups']} groups hold {s['images_in_duplicate_groups']} of "
            f"{s['images']} images ({s['redundant_images']} redundant, largest group {s['largest_group']}; "
            f"{s['pairs_by_hash']} pairs by pHash <= {s['threshold']}/{s['hash_bits']} bits, "
            f"{s['pairs_by_speckle']} more by speckle correlation >= {s['min_correlation']}); "
            f"{s['mixed_label_groups']} group(s) mix labels"
        )


def find_duplicates(
    paths: Sequence[str | Path],
    labels: Sequence[int] | None = None,
    threshold: int = 6,
    hash_size: int = 8,
    candidate_bits: int = 20,
    min_correlation: float = 0.35,
) -> DuplicateReport:
    """Hash every image, group near-duplicates and report them (logged at INFO, label conflicts at WARNING).

    Args:
        paths: the images.
        labels: their labels, to flag groups that mix classes (kept together all the same).
        threshold: pHash Hamming distance (of `hash_size**2` bits) within which two images are duplicates.
            0 finds exact and re-encoded copies; 4-8 also most re-noised ones; above ~10 unrelated scans join.
        hash_size: bits per side of the hash.
        candidate_bits: pairs within this distance are also compared by speckle correlation (0: pHash only).
        min_correlation: speckle correlation that makes a candidate pair a duplicate.
    """
    if not paths:
        raise ValueError("find_duplicates needs at least one image")
    images = [load_rgb(p) for p in paths]
    bits = np.stack([phash_image(im, hash_size) for im in images])
    pairs, dist = _close_pairs(bits, max(threshold, candidate_bits))
    keep = dist <= threshold
    speckle = np.zeros(len(pairs), dtype=bool)
    if candidate_bits > threshold and (~keep).any():
        thumbs = np.stack([detail_thumbnail(im) for im in images])
        cand = np.nonzero(~keep)[0]
        for start in range(0, len(cand), 4096):  # bounded memory for large candidate sets
            c = cand[start : start + 4096]
            corr = shifted_correlation(thumbs[pairs[c, 0]], thumbs[pairs[c, 1]])
            speckle[c] = corr >= min_correlation
    found = keep | speckle
    groups = group_pairs(len(paths), pairs[found])
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(int(g), []).append(i)
    dup = [m for m in members.values() if len(m) > 1]
    mixed = [m for m in dup if labels is not None and len({int(labels[i]) for i in m}) > 1]
    report = DuplicateReport(
        groups,
        threshold,
        hash_size * hash_size,
        candidate_bits,
        min_correlation,
        pairs[found],
        speckle[found],
        dup,
        mixed,
    )
    log.info(report.describe())
    for m in mixed:
        log.warning("near-duplicates with different labels (kept in one fold): %s", ", ".join(str(paths[i]) for i in m))
    return report
