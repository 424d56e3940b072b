"""Predicted time per epoch, speedup and efficiency at 1..64 GPUs, with every assumption printed.

    python -m jobs.predict_scaling --profile study_p100_edr --step-time 0.42 --grad-bytes 7.6e7 --samples 800 --batch 2

`--step-time` is forward + backward of one optimizer step at the per-GPU batch, on the target GPU, unless
`--measured-on PROFILE` says where it was measured (then it is scaled by relative throughput). Profile fields can
be overridden with the flags below, or a whole profile given as a YAML/JSON file to --profile.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from scaling.perfmodel import (
    DEFAULT_GPUS,
    PROFILES,
    assumption_lines,
    derive,
    format_prediction,
    get_profile,
    predict_table,
)

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
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.predict_scaling", description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="study_p100_edr", help=f"{', '.join(PROFILES)} or a .yaml/.json file")
    p.add_argument("--step-time", type=float, required=True, help="compute seconds per optimizer step on one GPU")
    p.add_argument("--grad-bytes", type=float, required=True, help="gradient bytes allreduced per step")
    p.add_argument("--samples", type=float, required=True, help="training samples per epoch")
    p.add_argument("--batch", type=int, required=True, help="samples per GPU per micro-batch")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--measured-on", default=None, help="profile the step time was measured on (default: the target)")
    p.add_argument("--fp16-allreduce", action="store_true", help="halve the allreduced bytes (fp16 compression)")
    p.add_argument("--hierarchical", choices=("profile", "on", "off"), default="profile", help="allreduce across nodes")
    p.add_argument("--gpus", default=",".join(map(str, DEFAULT_GPUS)), help="GPU counts")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    for name, typ in _OVERRIDES.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None, help=f"override the profile's {name}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        profile = get_profile(a.profile)
        changes = {k: getattr(a, k) for k in _OVERRIDES if getattr(a, k) is not None}
        if a.hierarchical != "profile":
            changes["hierarchical"] = a.hierarchical == "on"
        for k, v in changes.items():
            flag = "--hierarchical" if k == "hierarchical" else f"--{k.replace('_', '-')}"
            profile = derive(profile, f"command line: {flag} {a.hierarchical if k == 'hierarchical' else v}", **{k: v})
        if changes:
            profile = replace(profile, name=f"{profile.name}+custom")
        grad_bytes = a.grad_bytes / 2 if a.fp16_allreduce else a.grad_bytes
        gpus = [int(g) for g in a.gpus.split(",")]
        rows = predict_table(profile, a.step_time, grad_bytes, a.samples, a.batch, gpus, a.accum, a.measured_on)
        lines = assumption_lines(profile, a.step_time, grad_bytes, a.samples, a.batch, a.accum, a.measured_on)
    except (KeyError, ValueError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) else e  # KeyError's str() adds quotes
        print(f"predict_scaling: error: {msg}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    if changes:
        lines.insert(1, f"  overridden from the command line: {changes}")
    if a.fp16_allreduce:
        lines.append(f"fp16 allreduce: {a.grad_bytes:g} bytes of gradients sent as {grad_bytes:g}")
    print("\n".join(["assumptions:", *lines, "", format_prediction(rows), ""]))
    last = rows[-1]
    print(f"predicted efficiency at {last['gpus']} GPUs on {profile.name}: {last['efficiency']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
