"""predict_classifier end to end on a tiny checkpoint saved here in the hvdtrain contract format."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from classification.checkpoint import inference_config, load_for_inference
from classification.data import load_rgb
from classification.models import build_model
from classification.synthetic import generate
from jobs import predict_classifier

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pred")
    generate(tmp / "us", n_per_class=2, size=48, seed=0, dup_fraction=0.0)
    torch.manual_seed(0)
    model = build_model("small_cnn", 3, dropout=0.5)
    config = {
        "model": "small_cnn",
        "epochs": 1,
        **inference_config("small_cnn", ["benign", "malignant", "normal"], 0.5, image_size=40),
    }
    ckpt = {
        "model": model.state_dict(),
        "optimizer": {},
        "schedule": {},
        "scaler": {},
        "epoch": 0,
        "step": 1,
        "best_metric": 0.5,
        "rng": [],
        "config": config,
    }
    torch.save(ckpt, tmp / "best.pt")
    return tmp, model.eval()


def test_predict_writes_csv(setup, capsys):
    tmp, model = setup
    images = sorted(p for p in (tmp / "us" / "benign").glob("*.png") if "mask" not in p.name)
    out = tmp / "probs.csv"
    assert (
        predict_classifier.main(
            ["--checkpoint", str(tmp / "best.pt"), *map(str, images), str(tmp / "us" / "normal"), "--out", str(out)]
        )
        == 0
    )
    rows = list(csv.DictReader(out.open()))
    normals = [p for p in (tmp / "us" / "normal").glob("*.png") if "mask" not in p.name]
    assert len(rows) == len(images) + len(normals)  # the folder's masks are skipped
    assert list(rows[0]) == ["path", "predicted", "p_benign", "p_malignant", "p_normal"]
    _, _, tf = load_for_inference(tmp / "best.pt")
    with torch.no_grad():
        ref = torch.softmax(model(tf(load_rgb(images[0]))[None]), dim=1)[0]
    got = torch.tensor([float(rows[0][f"p_{c}"]) for c in ("benign", "malignant", "normal")])
    assert torch.allclose(got, ref, atol=1e-5)
    assert rows[0]["predicted"] == ["benign", "malignant", "normal"][int(ref.argmax())]
    assert "predicted" in capsys.readouterr().out


def test_unreadable_image_named(setup, capsys):
    tmp, _ = setup
    bad = tmp / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    out = tmp / "never.csv"
    assert predict_classifier.main(["--checkpoint", str(tmp / "best.pt"), str(bad), "--out", str(out)]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert not out.exists()
    assert predict_classifier.main(["--checkpoint", str(tmp / "none.pt"), str(bad)]) == 2
    assert "none.pt" in capsys.readouterr().err


def test_module_entry_point(setup):
    tmp, _ = setup
    image = next(p for p in (tmp / "us" / "malignant").glob("*.png") if "mask" not in p.name)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.predict_classifier",
            "--checkpoint",
            str(tmp / "best.pt"),
            str(image),
            "--out",
            str(tmp / "cli.csv"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert len(list(csv.DictReader((tmp / "cli.csv").open()))) == 1
