"""Class probabilities of images from a trained classifier checkpoint.

    python -m jobs.predict_classifier --checkpoint RUN/fold_0/checkpoints/best.pt IMAGES... [--out probs.csv]

IMAGES are files or folders (searched recursively; mask files are skipped). Prints one line per image and writes
a CSV with columns `path, predicted, p_<class>...`. An unreadable image stops the run before anything is written,
with an error naming the file.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from classification.checkpoint import CheckpointError, load_for_inference
from classification.data import DataError, list_images, load_rgb


@torch.no_grad()
def predict(
    checkpoint: str | Path, images: list[str | Path], batch_size: int = 16, device: str = "cpu"
) -> tuple[list[str], list[Path], torch.Tensor]:
    """(class names, image paths, (N, C) probabilities) for the images (folders expanded, masks skipped)."""
    model, class_names, transform = load_for_inference(checkpoint, device)
    paths = list_images(images)
    if not paths:
        raise DataError(f"no images found in {', '.join(map(str, images))}")
    probs = []
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([transform(load_rgb(p)) for p in paths[start : start + batch_size]])
        probs.append(torch.softmax(model(batch.to(device)).float(), dim=1).cpu())
    return class_names, paths, torch.cat(probs)


def write_csv(path: str | Path, class_names: list[str], paths: list[Path], probs: torch.Tensor) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "predicted", *[f"p_{c}" for c in class_names]])
        for p, row in zip(paths, probs.tolist()):
            w.writerow([str(p), class_names[max(range(len(row)), key=row.__getitem__)], *[f"{v:.6f}" for v in row]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a best.pt / last.pt written by the classifier job")
    ap.add_argument("images", nargs="+", help="image files or folders")
    ap.add_argument("--out", default="probs.csv", help="CSV to write (path, predicted, p_<class>...)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    try:
        class_names, paths, probs = predict(args.checkpoint, args.images, args.batch_size, args.device)
    except (FileNotFoundError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max(len(str(p)) for p in paths)
    print(f"{'image':<{width}}  {'predicted':<12} " + " ".join(f"{c:>10}" for c in class_names))
    for p, row in zip(paths, probs.tolist()):
        pred = class_names[max(range(len(row)), key=row.__getitem__)]
        print(f"{str(p):<{width}}  {pred:<12} " + " ".join(f"{v:>10.4f}" for v in row))
    write_csv(args.out, class_names, paths, probs)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
