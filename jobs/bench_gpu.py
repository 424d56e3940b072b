"""One-GPU benchmark: U-Net voxels/s, classifier images/s, allreduce bandwidth, data wait and peak memory.

    make bench-gpu                         # = python -m jobs.bench_gpu (on one H100/H200: about 5-8 minutes)
    python -m jobs.bench_gpu --dry-run     # every code path with tiny sizes on the CPU (CI runs this)
    python -m jobs.bench_gpu --skip-build --seconds 10 --json runs/bench_gpu.json

What it does, in order (a section that fails prints why and the others still run; the exit status is 1 then):
1. Horovod: imports it in a child process and checks for NCCL operations; on a GPU without them it builds Horovod
   with NCCL (`HVDTRAIN_REQUIRE_NCCL=1 bash scripts/build_horovod.sh`; `--skip-build` only reports).
2. 3D U-Net training through `hvdtrain.fit` with bf16 autocast, channels_last_3d and cudnn.benchmark, fed by a
   pinned-memory loader with persistent workers: voxels/s, data-wait share, peak GPU memory. Beside it MONAI's
   `UNet` (same patch, batch, loss and optimizer, a plain loop) when `monai` imports.
3. ResNet50 and MobileNetV2 training images/s: `hvdtrain.fit` against the plain torchvision-style loop (the same
   precision and memory format, so the difference is the loop's own cost).
4. Allreduce algorithm bandwidth at one rank: Horovod (NCCL on a GPU) against torch.distributed (NCCL; Gloo on the
   CPU), world size 1. With one rank NCCL's bus bandwidth is 0 by definition, so size / time is printed.

The data are random tensors made in memory (the input pipeline of the real jobs is measured by `jobs.bench_unet`
and `jobs.bench_classifier`); each figure is from the last of two epochs (the first pays for cuDNN's autotuning).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from hvdtrain import Run, RunPaths, TrainConfig, data, dist, fit
from hvdtrain.fastpath import memory_format_for
from hvdtrain.loop import autocast_dtype
from hvdtrain.metrics import MeanMetric

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    """Problem sizes: the real ones for a GPU, tiny ones for `--dry-run` on the CPU."""

    patch: tuple[int, int, int]
    unet_batch: int
    unet_features: int
    unet_depth: int
    image: int
    cls_batch: int
    steps: int  # optimizer steps per epoch
    workers: int
    allreduce_mib: tuple[int, ...]

    @staticmethod
    def for_run(dry_run: bool) -> Sizes:
        if dry_run:
            return Sizes((16, 16, 16), 2, 4, 2, 32, 2, 2, 0, (1,))  # no loader workers: seconds each to start
        return Sizes((128, 128, 128), 2, 32, 4, 224, 128, 30, 4, (16, 64, 256))


class RandomPairs(Dataset):
    """`n` (input, target) pairs of fixed shapes, made once (the loader, not the generator, is what is timed)."""

    def __init__(self, n: int, x_shape: tuple[int, ...], target: Callable[[torch.Generator], torch.Tensor]):
        g = torch.Generator().manual_seed(0)
        self.items = [(torch.randn(x_shape, generator=g), target(g)) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loss_eval_fn(loss_fn: nn.Module) -> Callable:
    def eval_fn(model: nn.Module, batch, device: torch.device, metric: MeanMetric) -> None:
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        out = model(x)
        metric.update(float(loss_fn(out[0] if isinstance(out, list) else out, y)) * len(x), len(x))

    return eval_fn


def fit_throughput(
    model: nn.Module,
    ds: Dataset,
    step_fn: Callable,
    loss_fn: nn.Module,
    batch: int,
    workers: int,
    device: torch.device,
    run_dir: Path,
) -> dict:
    """Samples/s, data-wait share and peak memory of `hvdtrain.fit`'s last epoch (of two)."""
    cfg = TrainConfig(
        run_dir=str(run_dir),
        epochs=2,
        batch_size_per_gpu=batch,
        lr=1e-3,
        lr_rule="none",
        warmup_epochs=0,
        schedule="constant",
        optimizer="adamw",
        amp="auto",
        channels_last=True,
        cudnn_benchmark=True,
        num_workers=workers,
        eval_every=2,
        progress=False,
    )
    train = data.train_loader(ds, batch, num_workers=workers)
    val = data.eval_loader(torch.utils.data.Subset(ds, range(batch)), batch)
    _reset_peak(device)
    fit(
        Run(
            model, train, val, step_fn, _loss_eval_fn(loss_fn), partial(MeanMetric, "loss"), monitor="loss", mode="min"
        ),
        cfg,
    )
    records = [json.loads(line) for line in RunPaths(run_dir).metrics.read_text().splitlines()]
    last = [r for r in records if r["split"] == "train"][-1]
    share = last["data_s"] / last["time_s"]
    return {"samples_per_s": last["samples_per_s"], "data_share": share, "peak_gb": _peak_gb(device)}


def plain_throughput(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, steps: int, device: torch.device
) -> dict:
    """Samples/s of a plain loop (autocast, channels-last, AdamW) on one resident batch, after 3 warm-up steps."""
    fmt = memory_format_for(model)
    model.to(device=device, memory_format=fmt).train()
    x, y = x.to(device).contiguous(memory_format=fmt) if x.dim() > 3 else x.to(device), y.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    amp = autocast_dtype("auto", device)
    _reset_peak(device)
    for i in range(steps + 3):
        if i == 3:
            _sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return {"samples_per_s": steps * len(x) / (time.perf_counter() - t0), "peak_gb": _peak_gb(device)}


def unet_section(sz: Sizes, device: torch.device, tmp: Path) -> dict:
    """Our U-Net through hvdtrain.fit, and MONAI's UNet in a plain loop when monai imports."""
    from segmentation.config import UNetConfig
    from segmentation.engine import build_model, make_loss, make_step_fn, model_kwargs

    cfg = UNetConfig(
        features=sz.unet_features, depth=sz.unet_depth, patch_size=sz.patch, global_dice=False, deep_supervision=False
    )
    loss_fn = make_loss(cfg)
    n = sz.steps * sz.unet_batch
    ds = RandomPairs(n, (1, *sz.patch), lambda g: (torch.rand((1, *sz.patch), generator=g) > 0.95).float())
    vox = math.prod(sz.patch)
    torch.manual_seed(0)
    ours = fit_throughput(
        build_model(model_kwargs(cfg)),
        ds,
        make_step_fn(loss_fn),
        loss_fn,
        sz.unet_batch,
        sz.workers,
        device,
        tmp / "unet",
    )
    out = {"ours": {**ours, "voxels_per_s": ours["samples_per_s"] * vox}}
    try:
        from monai.networks.nets import UNet  # optional: installed by `make bench-gpu` only
    except ImportError as e:
        out["monai"] = {"skipped": f"monai does not import ({e}); `pip install monai` to compare"}
        return out
    f = sz.unet_features
    levels = sz.unet_depth + 1  # the same number of resolutions as ours
    chans = tuple(f * 2**i for i in range(levels))
    monai = UNet(3, 1, 1, channels=chans, strides=(2,) * (levels - 1), num_res_units=2, norm="instance")
    x = torch.stack([ds[i][0] for i in range(sz.unet_batch)])
    y = torch.stack([ds[i][1] for i in range(sz.unet_batch)])
    m = plain_throughput(monai, x, y, loss_fn, sz.steps, device)
    out["monai"] = {**m, "voxels_per_s": m["samples_per_s"] * vox}
    return out


def classifier_section(name: str, sz: Sizes, device: torch.device, tmp: Path) -> dict:
    """`name` (torchvision) trained by hvdtrain.fit and by the plain loop, 3 classes, images/s."""
    import torchvision

    from classification.engine import make_step_fn
    from classification.models import build_model

    loss_fn = nn.CrossEntropyLoss()
    ds = RandomPairs(sz.steps * sz.cls_batch, (3, sz.image, sz.image), lambda g: torch.randint(3, (), generator=g))
    torch.manual_seed(0)
    ours = fit_throughput(
        build_model(name, 3), ds, make_step_fn(loss_fn), loss_fn, sz.cls_batch, sz.workers, device, tmp / name
    )
    x = torch.stack([ds[i][0] for i in range(sz.cls_batch)])
    y = torch.stack([ds[i][1] for i in range(sz.cls_batch)])
    plain = plain_throughput(torchvision.models.get_model(name, num_classes=3), x, y, loss_fn, sz.steps, device)
    return {"ours": ours, "plain": plain}


def _time_op(fn: Callable[[], None], device: torch.device, min_time: float) -> float:
    for _ in range(3):
        fn()
    _sync(device)
    t0, n = time.perf_counter(), 0
    while n < 5 or time.perf_counter() - t0 < min_time:
        fn()
        n += 1
        if n % 5 == 0:
            _sync(device)
    _sync(device)
    return (time.perf_counter() - t0) / n


def allreduce_worker(out: Path, mib: list[int], device_name: str, min_time: float) -> None:
    """In a child process: Horovod and torch.distributed allreduce at world size 1 (size / time, GB/s)."""
    import horovod.torch as hvd  # the benchmark measures Horovod itself
    import torch.distributed as tdist

    device = torch.device(device_name)
    hvd.init()
    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        tdist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
        rows = []
        for m in mib:
            t = torch.ones((m << 20) // 4, device=device)
            h = _time_op(lambda t=t, m=m: hvd.allreduce_(t, op=hvd.Sum, name=f"ar{m}"), device, min_time)
            d = _time_op(lambda t=t: tdist.all_reduce(t), device, min_time)
            rows.append({"mib": m, "horovod_gbps": (m << 20) / h / 1e9, "torch_gbps": (m << 20) / d / 1e9})
        tdist.destroy_process_group()
    result = {"horovod_nccl": bool(hvd.nccl_built()), "torch_backend": backend, "rows": rows}
    out.write_text(json.dumps(result))


def allreduce_section(sz: Sizes, device: torch.device, tmp: Path, min_time: float) -> dict:
    out = tmp / "allreduce.json"
    cmd = [
        sys.executable,
        "-m",
        "jobs.bench_gpu",
        "--allreduce-worker",
        str(out),
        "--device",
        device.type,
        "--mib",
        ",".join(map(str, sz.allreduce_mib)),
        "--seconds",
        str(min_time),
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if p.returncode != 0 or not out.is_file():
        raise RuntimeError(f"allreduce child exited {p.returncode}:\n{p.stdout[-1500:]}{p.stderr[-1500:]}")
    return json.loads(out.read_text())


def horovod_status() -> dict:
    """What the installed Horovod offers, from a child process (a broken install cannot take this one down)."""
    code = "import json, numpy, horovod.torch as h; print(json.dumps({'nccl': bool(h.nccl_built()), 'mpi': "
    code += "bool(h.mpi_built()), 'gloo': bool(h.gloo_built())}))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def ensure_horovod(device: torch.device, dry_run: bool, skip_build: bool) -> dict:
    """Horovod's features; on a GPU without NCCL operations, build them (unless dry-run or --skip-build)."""
    status = horovod_status()
    need_nccl = device.type == "cuda" or dry_run
    missing = "error" in status or (need_nccl and not status.get("nccl"))
    cmd = ["bash", "scripts/build_horovod.sh"]
    if not missing:
        return status
    why = status.get("error") or "Horovod has no NCCL operations"
    if dry_run or skip_build:
        print(f"horovod: {why}; would run: HVDTRAIN_REQUIRE_NCCL=1 PYTHON={sys.executable} {' '.join(cmd)}", flush=True)
        return {**status, "build": "skipped"}
    print(f"horovod: {why}; building it (scripts/build_horovod.sh, 2-5 minutes)", flush=True)
    env = {**os.environ, "HVDTRAIN_REQUIRE_NCCL": "1", "PYTHON": sys.executable}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
        return {**status, "build": f"failed (exit {p.returncode}):\n{tail}"}
    return {**horovod_status(), "build": "built"}


def _fmt(v: float | None, spec: str = ",.0f", unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{unit}"


def report(res: dict, device: torch.device) -> None:
    """The figures, one line each (peak memory: torch's allocator, this process)."""
    print(f"\n== bench_gpu on {res['device']} (bf16 autocast: {res['amp']}; channels-last; cudnn.benchmark) ==")
    u = res.get("unet", {})
    if "ours" in u:
        o = u["ours"]
        print(
            f"U-Net {res['sizes']['patch']} x batch {res['sizes']['unet_batch']}: ours {_fmt(o['voxels_per_s'])} "
            f"voxels/s, data wait {o['data_share']:.1%}, peak {_fmt(o['peak_gb'], '.2f', ' GB')}"
        )
        m = u.get("monai", {})
        if "skipped" in m:
            print(f"  MONAI UNet: {m['skipped']}")
        else:
            peak = _fmt(m["peak_gb"], ".2f", " GB")
            print(f"  MONAI UNet (plain loop): {_fmt(m['voxels_per_s'])} voxels/s, peak {peak}")
    for name in ("resnet50", "mobilenet_v2"):
        c = res.get(name)
        if c:
            o, p = c["ours"], c["plain"]
            print(
                f"{name}: ours {o['samples_per_s']:,.1f} images/s (data wait {o['data_share']:.1%}, peak "
                f"{_fmt(o['peak_gb'], '.2f', ' GB')}), plain loop {p['samples_per_s']:,.1f} images/s, ratio "
                f"{o['samples_per_s'] / p['samples_per_s']:.2f}"
            )
    a = res.get("allreduce")
    if a:
        print(
            f"allreduce, 1 rank, size / time: Horovod (NCCL built: {a['horovod_nccl']}) vs torch.distributed "
            f"({a['torch_backend']})"
        )
        for r in a["rows"]:
            print(f"  {r['mib']:>4} MiB: Horovod {r['horovod_gbps']:8.1f} GB/s | torch {r['torch_gbps']:8.1f} GB/s")
    for name, err in res["errors"].items():
        print(f"FAILED {name}: {err}")


def run_all(a: argparse.Namespace, device: torch.device, sz: Sizes) -> dict:
    res: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        "amp": str(autocast_dtype("auto", device)),
        "sizes": asdict(sz),
        "errors": {},
    }
    res["horovod"] = ensure_horovod(device, a.dry_run, a.skip_build)
    print(f"horovod: {res['horovod']}", flush=True)
    sections: dict[str, Callable[[Path], dict]] = {
        "unet": lambda tmp: unet_section(sz, device, tmp),
        "resnet50": lambda tmp: classifier_section("resnet50", sz, device, tmp),
        "mobilenet_v2": lambda tmp: classifier_section("mobilenet_v2", sz, device, tmp),
        "allreduce": lambda tmp: allreduce_section(sz, device, tmp, a.seconds),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in sections.items():
            if a.only and name not in a.only.split(","):
                continue
            t0 = time.perf_counter()
            try:
                res[name] = fn(Path(tmp))
            except Exception as e:  # report every section; the exit status says one failed
                res["errors"][name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every code path with tiny sizes on the CPU")
    p.add_argument("--skip-build", action="store_true", help="report a Horovod without NCCL instead of building it")
    p.add_argument("--only", default="", help="comma-separated sections: unet,resnet50,mobilenet_v2,allreduce")
    p.add_argument("--seconds", type=float, default=1.0, help="seconds per allreduce size (default 1)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--allreduce-worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--mib", default="16", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.allreduce_worker:
        allreduce_worker(a.allreduce_worker, [int(m) for m in a.mib.split(",")], a.device, a.seconds)
        return {}
    if not a.dry_run and not torch.cuda.is_available():
        raise SystemExit(
            f"bench_gpu: no CUDA GPU visible (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}; "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Install a CUDA build of torch "
            "on a GPU machine, or run `python -m jobs.bench_gpu --dry-run` to check the code paths on the CPU."
        )
    if a.dry_run:
        a.seconds = min(a.seconds, 0.05)
    dist.init(threads=1 if a.dry_run else None)  # the dry run shares CI's cores
    device = torch.device("cuda", 0) if not a.dry_run else torch.device("cpu")
    sz = Sizes.for_run(a.dry_run)
    t0 = time.perf_counter()
    res = run_all(a, device, sz)
    report(res, device)
    print(f"bench_gpu: {time.perf_counter() - t0:.0f} s in all")
    if a.json:
        tmp = a.json.with_suffix(".tmp")
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, a.json)
    if res["errors"]:
        raise SystemExit(f"bench_gpu: {len(res['errors'])} section(s) failed: {', '.join(res['errors'])}")
    return res


if __name__ == "__main__":
    main()
