"""jobs.bench_peers runs its shared loop and writes its table, CSV and plot (our U-Net only: MONAI is optional)."""

from __future__ import annotations

import csv

from jobs import bench_peers
from segmentation.phantoms import PhantomSpec, write_decathlon

SPEC = PhantomSpec(shape=(32, 32, 16), spacing=(2.0, 2.0, 2.5), diameter_mm=(8.0, 12.0), nodules=(1, 1))


def test_ours_trains_for_its_budget_and_writes_the_table(tmp_path, capsys):
    data = tmp_path / "ph"
    write_decathlon(data, n_train=4, n_val=2, n_test=0, seed=0, spec=SPEC)
    preset = tmp_path / "p.yaml"
    preset.write_text(
        "patch_size: [16, 16, 16]\nfeatures: 4\ndepth: 2\nsamples_per_volume: 2\nlr: 0.01\n"
        "postprocess: center_component\nsw_overlap: 0.0\n"
    )
    out = tmp_path / "out"
    rows = bench_peers.main(
        ["--config", str(preset), "--data", str(data), "--cache-dir", str(tmp_path / "c"), "--models", "ours",
         "--minutes", "0.05", "--evals", "2", "--threads", "1", "--out", str(out),
         "--preset-flags", "--top-features 2 --residual --deep-supervision"]
    )  # fmt: skip
    assert [r["model"] for r in rows] == ["ours", "ours"]
    assert rows[0]["train_s"] < rows[1]["train_s"] and rows[1]["train_s"] >= 3.0
    assert all(0.0 <= r["dice"] <= 1.0 and 0.0 <= r["dice_post"] <= 1.0 for r in rows)
    with open(out / "peers.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert "| ours |" in (out / "peers.md").read_text()
    assert (out / "peers.png").stat().st_size > 1000
    from segmentation.unet import UNet3D

    net = UNet3D(features=4, depth=2, top_features=2, residual=True, deep_supervision=True)
    variant = sum(p.numel() for p in net.parameters())
    # --preset-flags reached the model, deep supervision (a list of outputs in training) included
    assert f"ours: {variant / 1e6:.3f} M parameters (deep supervision)" in capsys.readouterr().out


def test_lr_warms_up_then_decays_to_zero_over_the_budget():
    from segmentation.config import UNetConfig

    cfg = UNetConfig(lr=0.01)
    lrs = [bench_peers.lr_at(cfg, f) for f in (0.0, 0.01, 0.02, 0.5, 1.0)]
    assert lrs[0] < lrs[1] < lrs[2] == 0.01 and lrs[3] < 0.01 and abs(lrs[4]) < 1e-12
