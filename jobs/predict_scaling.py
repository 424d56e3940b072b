"""Predicted time per epoch, speedup and efficiency at 1..64 GPUs, with every assumption printed.

    python -m jobs.predict_scaling --profile study_p100_edr --step-time 0.42 --grad-bytes 7.6e7 --samples 800 --batch 2
    python -m jobs.predict_scaling --profile study_p100_edr ... --global-batch 64 --max-batch-per-gpu 4
    python -m jobs.predict_scaling --profile cpu_this_machine --calibrate-from runs/bench/runs --global-batch 16

`--step-time` is forward + backward of one optimizer step at the per-GPU batch, on the target GPU, unless
`--measured-on PROFILE` says where it was measured (then it is scaled by relative throughput). Profile fields can
be overridden with the flags below, or a whole profile given as a YAML/JSON file to --profile.

Weak scaling (the per-GPU batch fixed, the global batch growing with N) is always printed; `--global-batch G` adds
strong scaling beside it: G fixed, G / N samples per GPU per step, in micro-batches of at most
`--max-batch-per-gpu` with gradient accumulation for the rest. `--calibrate-from RUN_DIR...` takes the step time,
gradient bytes, samples and batch from the real runs there (flags still override them) and, for
`cpu_this_machine`, the latency and bandwidth fitted to the runs at `--fit-ranks` (default all), printing the
fit's error on each run.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from scaling.perfmodel import (
    DEFAULT_GPUS,
    PROFILES,
    MachineProfile,
    assumption_lines,
    derive,
    format_prediction,
    get_profile,
    parse_ranks,
    predict_strong_table,
    predict_table,
    strong_assumption_lines,
)
from scaling.report import ModelInputs, inputs_from_runs
from scaling.runs import RunFolderError

# Profile fields settable from the command line: flag -> (field, type).
_OVERRIDES = {
    "gpus_per_node": int,
    "intra_bw_gbs": float,
    "intra_latency_us": float,
    "nic_bw_gbs": float,
    "nics_per_node": int,
    "inter_latency_us": float,
    "fusion_mb": float,
    "cycle_ms": float,
    "overlap": float,
    "relative_throughput": float,
    "contention": float,
    "step_cv": float,
}
_INPUTS = ("step_time", "grad_bytes", "samples", "batch")  # needed unless --calibrate-from supplies them


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.predict_scaling", description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="study_p100_edr", help=f"{', '.join(PROFILES)} or a .yaml/.json file")
    p.add_argument("--step-time", type=float, help="compute seconds per optimizer step on one GPU")
    p.add_argument("--grad-bytes", type=float, help="gradient bytes allreduced per step")
    p.add_argument("--samples", type=float, help="training samples per epoch")
    p.add_argument("--batch", type=int, help="samples per GPU per micro-batch (the step time's batch)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--measured-on", default=None, help="profile the step time was measured on (default: the target)")
    p.add_argument("--small-allreduces", type=float, default=0.0, help="small collectives per step besides gradients")
    p.add_argument("--fp16-allreduce", action="store_true", help="halve the allreduced bytes (fp16 compression)")
    p.add_argument("--hierarchical", choices=("profile", "on", "off"), default="profile", help="allreduce across nodes")
    p.add_argument("--gpus", default=",".join(map(str, DEFAULT_GPUS)), help="GPU counts")
    p.add_argument("--global-batch", type=int, help="strong scaling: this global batch at every GPU count")
    p.add_argument("--max-batch-per-gpu", type=int, help="strong scaling: largest micro-batch; the rest accumulates")
    p.add_argument("--calibrate-from", nargs="+", metavar="RUN_DIR", help="take inputs and CPU numbers from runs")
    p.add_argument("--fit-ranks", default="all", help="with --calibrate-from: world sizes to fit on ('1,2' or all)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    for name, typ in _OVERRIDES.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None, help=f"override the profile's {name}")
    return p.parse_args(argv)


def _inputs(a: argparse.Namespace) -> tuple[ModelInputs, MachineProfile, list[str]]:
    """The prediction inputs, the profile (calibrated for cpu_this_machine) and the calibration's lines."""
    profile = get_profile(a.profile)
    if not a.calibrate_from:
        missing = [f"--{k.replace('_', '-')}" for k in _INPUTS if getattr(a, k) is None]
        if missing:
            raise ValueError(f"pass {', '.join(missing)} (or --calibrate-from RUN_DIR... to take them from runs)")
        inputs = ModelInputs(a.step_time, a.grad_bytes, a.samples, a.batch, a.accum, a.measured_on, a.small_allreduces)
        return inputs, profile, []
    given = {k: getattr(a, k) for k in _INPUTS}
    inputs, cal, lines = inputs_from_runs(a.calibrate_from, parse_ranks(a.fit_ranks), **given)
    on = a.measured_on if a.step_time is not None else inputs.measured_on
    if profile.name == "cpu_this_machine":
        on = None if on == "cpu_this_machine" else on  # measured here: no scaling
        profile = cal.profile if cal is not None else profile
    inputs = replace(inputs, measured_on=on)
    lines = [*lines, *(f"  source of {k}: {v}" for k, v in inputs.sources.items())]
    return inputs, profile, lines


def _overridden(a: argparse.Namespace, profile: MachineProfile) -> tuple[MachineProfile, dict]:
    changes = {k: getattr(a, k) for k in _OVERRIDES if getattr(a, k) is not None}
    if a.hierarchical != "profile":
        changes["hierarchical"] = a.hierarchical == "on"
    for k, v in changes.items():
        flag = "--hierarchical" if k == "hierarchical" else f"--{k.replace('_', '-')}"
        profile = derive(profile, f"command line: {flag} {a.hierarchical if k == 'hierarchical' else v}", **{k: v})
    return (replace(profile, name=f"{profile.name}+custom") if changes else profile), changes


def predict(a: argparse.Namespace) -> tuple[MachineProfile, list[dict], list[dict], list[str]]:
    """(profile, weak-scaling rows, strong-scaling rows or [], assumption lines) for the parsed flags."""
    inputs, profile, cal_lines = _inputs(a)
    profile, changes = _overridden(a, profile)
    grad = inputs.grad_bytes / 2 if a.fp16_allreduce else inputs.grad_bytes
    gpus = [int(g) for g in a.gpus.split(",")]
    common = (inputs.samples_per_epoch, inputs.batch_per_gpu)
    rows = predict_table(
        profile,
        inputs.compute_step_s,
        grad,
        *common,
        gpus,
        inputs.accum,
        inputs.measured_on,
        None,
        inputs.small_allreduces,
    )
    lines = assumption_lines(profile, inputs.compute_step_s, grad, *common, inputs.accum, inputs.measured_on)
    if changes:
        lines.insert(1, f"  overridden from the command line: {changes}")
    if a.fp16_allreduce:
        lines.append(f"fp16 allreduce: {inputs.grad_bytes:g} bytes of gradients sent as {grad:g}")
    lines.append(f"small collectives per step besides the gradients: {inputs.small_allreduces:g}")
    strong: list[dict] = []
    if a.global_batch is not None:
        per_sample = inputs.compute_step_s / (inputs.batch_per_gpu * inputs.accum)
        strong = predict_strong_table(
            profile,
            per_sample,
            grad,
            inputs.samples_per_epoch,
            a.global_batch,
            gpus,
            a.max_batch_per_gpu,
            inputs.measured_on,
            inputs.small_allreduces,
        )
        lines += strong_assumption_lines(a.global_batch, a.max_batch_per_gpu, per_sample)
    return profile, rows, strong, lines + cal_lines


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        profile, rows, strong, lines = predict(a)
    except (KeyError, ValueError, FileNotFoundError, RunFolderError) as e:
        msg = e.args[0] if isinstance(e, KeyError) else e  # KeyError's str() adds quotes
        print(f"predict_scaling: error: {msg}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(rows + strong, indent=1))  # each row says its "scaling": weak or strong
        return 0
    print("\n".join(["assumptions:", *lines, "", "weak scaling (per-GPU batch fixed):", format_prediction(rows), ""]))
    if strong:
        print("\n".join([f"strong scaling (global batch {a.global_batch} fixed):", format_prediction(strong), ""]))
    print(f"predicted efficiency at {rows[-1]['gpus']} GPUs on {profile.name}: {rows[-1]['efficiency']:.1%} (weak)")
    if strong:
        print(
            f"predicted efficiency at {strong[-1]['gpus']} GPUs on {profile.name}: {strong[-1]['efficiency']:.1%}"
            f" (strong, global batch {a.global_batch})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
