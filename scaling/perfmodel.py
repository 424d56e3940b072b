"""A performance model for Horovod data parallelism: time per epoch, speedup and efficiency at 1..64 GPUs.

One optimizer step on p GPUs costs the measured compute (forward + backward at the per-GPU batch) plus the part
of the gradient allreduce that is not hidden behind the backward pass::

    ring (one node, p GPUs):   T = 2(p-1)/p * n / B_intra + 2(p-1) * a_intra
    flat ring across nodes:    T = 2(p-1)/p * n / min(B_intra, B_node) + 2(p-1) * a_inter
    hierarchical (g GPUs per node, m nodes; Horovod HOROVOD_HIERARCHICAL_ALLREDUCE):
        T = 2 * [(g-1)/g * n / B_intra + (g-1) * a_intra]      intra-node reduce-scatter + allgather
            + 2(m-1)/m * n / B_node + 2(m-1) * a_inter           inter-node allreduce of the g shards in parallel

with n the gradient bytes of one fusion buffer (Horovod tensor fusion packs the gradients into buffers of at most
`fusion_mb`, so the latency term is paid once per buffer), B_node = nic bandwidth x min(NICs, GPUs per node).
Only `1 - overlap` of the allreduce adds to the step, and never less than what sticks out past the backward pass;
the last gradients wait on average half a Horovod cycle before they are seen. Efficiency is
`throughput_p / (p * throughput_1)` (the definition in the reference notes, horovod.md section 2), which here equals
`step_1 / step_p`. Data loading and evaluation are outside the model.

Ranks that share a node may also slow each other's compute (on a CPU host they share the memory bus and the last
level cache): with more than one rank on a node, the compute of one GPU alone is multiplied by the profile's
`contention` factor, measured by an independent probe (`python -m jobs.bench_contention`) and 1 for GPUs, which
do not share their compute.

Ranks also wait for each other: every optimizer step ends in an allreduce, so a step lasts as long as the slowest
rank's compute. When one micro-batch's compute time varies with coefficient of variation `step_cv` (the same probe
measures it), the k = accum micro-batches of a step sum to a time of relative spread cv / sqrt(k), and the slowest of
p ranks takes on average 1 + cv * e_p / sqrt(k) times the mean, e_p the expected maximum of p standard normal draws
(e_2 = 0.56, e_64 = 2.34): a step of one micro-batch pays the most, an accumulated one (strong scaling) little.
The early ranks spend that wait in the allreduce (hvdtrain times it there), so the model adds it to the exposed
communication, not to the compute.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_GPUS",
    "OUT_OF_SAMPLE_TARGET_PCT",
    "PROFILES",
    "SOURCED_FIELDS",
    "Calibration",
    "MachineProfile",
    "Measurement",
    "allreduce_time",
    "assumption_lines",
    "calibrate",
    "compute_on",
    "derive",
    "expected_max_normal",
    "format_prediction",
    "get_profile",
    "hierarchical_allreduce_time",
    "load_profile",
    "missing_sources",
    "parse_ranks",
    "predict_point",
    "predict_strong_table",
    "predict_table",
    "profile_dict",
    "ring_allreduce_time",
    "small_allreduce_time",
    "source_lines",
    "straggler_factor",
    "strong_assumption_lines",
    "strong_split",
]

DEFAULT_GPUS = (1, 2, 4, 8, 16, 32, 64)
GB = 1e9  # bandwidths are in GB/s of 1e9 bytes, as NCCL's busbw is reported
MB = 1024 * 1024  # Horovod's fusion threshold is in MiB
OUT_OF_SAMPLE_TARGET_PCT = 15.0  # issue 12: fitted on 1 rank, the model predicts the other runs' epochs within 15%


@dataclass(frozen=True)
class MachineProfile:
    """A cluster, as the performance model sees it. Bandwidths are effective (achieved), not line rates.

    `sources` says where each number comes from: a citation (datasheet and figure), "measured: <command>" or
    "assumption: <why>"; `missing_sources` lists the numbers without one.
    """

    name: str
    gpu: str  # accelerator, for the printout
    relative_throughput: float  # training compute speed relative to one P100 (P100 = 1.0)
    gpus_per_node: int  # GPUs (ranks) per node
    intra_bw_gbs: float  # effective allreduce bus bandwidth inside a node, GB/s
    intra_latency_us: float  # latency of one ring step inside a node, microseconds
    nic_bw_gbs: float  # effective bandwidth of one network adapter, GB/s
    nics_per_node: int  # network adapters per node
    inter_latency_us: float  # latency of one ring step between nodes, microseconds
    hierarchical: bool = False  # HOROVOD_HIERARCHICAL_ALLREDUCE when the GPUs span nodes
    fusion_mb: float = 128.0  # HOROVOD_FUSION_THRESHOLD in MiB (0 disables tensor fusion)
    cycle_ms: float = 1.0  # HOROVOD_CYCLE_TIME in ms
    overlap: float = 0.5  # fraction of the allreduce hidden behind the backward pass (0..1)
    backward_fraction: float = 2.0 / 3.0  # share of the compute that is backward: the most comm can hide behind
    contention: float = 1.0  # compute time multiplier for each rank when more than one rank runs on a node
    step_cv: float = 0.0  # coefficient of variation of one micro-batch's compute time (ranks wait for the slowest)
    notes: str = ""  # what the machine is, in one sentence
    sources: dict[str, str] = field(default_factory=dict, compare=False)  # field name -> where its value comes from

    def __post_init__(self) -> None:
        problems = []
        for name in ("relative_throughput", "intra_bw_gbs", "nic_bw_gbs", "contention"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("gpus_per_node", "nics_per_node"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("intra_latency_us", "inter_latency_us", "fusion_mb", "cycle_ms", "step_cv"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("overlap", "backward_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        unknown = sorted(set(self.sources) - set(SOURCED_FIELDS))
        if unknown:
            problems.append(f"sources name fields that are not numbers of the profile: {unknown}")
        if problems:
            raise ValueError(f"machine profile {self.name!r}: " + "; ".join(problems))

    @property
    def node_bw_gbs(self) -> float:
        """Network bandwidth out of one node (all its NICs)."""
        return self.nic_bw_gbs * min(self.nics_per_node, self.gpus_per_node)

    def compute_factor(self, p: int) -> float:
        """How much longer each rank computes on `p` GPUs than one GPU alone: `contention` with > 1 rank a node."""
        return self.contention if min(p, self.gpus_per_node) > 1 else 1.0

    def straggler_wait(self, compute_s: float, p: int, accum: int = 1) -> float:
        """Seconds a rank waits, on average, for the slowest of `p` ranks at the end of a step of `compute_s`
        computed in `accum` micro-batches (in hvdtrain this wait is timed as part of the allreduce)."""
        return compute_s * (straggler_factor(p, accum, self.step_cv) - 1.0)


@functools.cache  # every prediction asks for the same few p: integrate each once
def expected_max_normal(p: int) -> float:
    """E[max of `p` independent standard normal draws] (0 for 1, 1/sqrt(pi) for 2), by numerical integration."""
    if p < 1:
        raise ValueError(f"the number of ranks must be >= 1, got {p}")
    x = np.linspace(-12.0, 12.0, 24001)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    # E[max] = integral of x d(cdf^p)
    return float(np.trapezoid(x * np.gradient(cdf**p, x), x))


def straggler_factor(p: int, accum: int, step_cv: float) -> float:
    """Mean time of the slowest of `p` ranks over the mean rank, for steps of `accum` micro-batches whose compute
    times vary independently with coefficient of variation `step_cv`: 1 + cv * e_p / sqrt(accum) (normal limit).

    `step_cv` belongs to one micro-batch of the size the probe timed (jobs.bench_contention: the recipe's per-GPU
    batch); a micro-batch of a different size varies differently, which the model does not follow.
    """
    if p <= 1 or step_cv <= 0:
        return 1.0
    return 1.0 + step_cv * expected_max_normal(p) / math.sqrt(max(accum, 1))


# The numbers of a profile that need a source (with `from __future__ import annotations` the types are strings).
SOURCED_FIELDS = tuple(f.name for f in fields(MachineProfile) if f.type in ("int", "float", "bool"))


def missing_sources(profile: MachineProfile) -> list[str]:
    """The numeric fields of `profile` that have no (or an empty) source."""
    return [name for name in SOURCED_FIELDS if not profile.sources.get(name, "").strip()]


def derive(profile: MachineProfile, source: str, **changes: Any) -> MachineProfile:
    """`profile` with `changes` applied and `source` recorded for each changed number."""
    sources = {**profile.sources, **{k: source for k in changes if k in SOURCED_FIELDS}}
    return replace(profile, **changes, sources=sources)


# Shared sources. Horovod's defaults are read from horovod/common/operations.cc (the reference notes, horovod.md
# section 3 item 11); a "study" is the source study of issue 12 (P100 GPUs on EDR InfiniBand).
_BACKWARD = "assumption: backward costs about twice the forward pass (activation and weight gradients), so 2/3"
_HVD_FUSION = "Horovod 0.28 operations.cc: SetTensorFusionThresholdBytes(128 * 1024 * 1024), the default"
_HVD_CYCLE = "Horovod 0.28 operations.cc: SetCycleTimeMs(1), the default"
_BENCH = "measured: `python -m jobs.bench_allreduce --repeats 2` on 2026-12-03 (dev machine, default launch, 2 ranks)"
# Two processes with a core each on this host, the jobs.bench_scaling recipe's step (one thread each).
_PROBE = (
    "measured: `python -m jobs.bench_contention --json runs/bench_contention_cv.json` on 2026-12-03 (dev machine,"
    " quiet): the jobs.bench_scaling recipe's step, one thread, 200 steps x 3 rounds; an independent probe, not the"
    " 2-rank runs it predicts"
)
CPU_CONTENTION = 1.01
_CPU_CONTENTION_SOURCE = (
    f"{_PROBE}: mean step 30.6 ms alone (median of 3 rounds), 30.8 ms each with 2 processes at once, x1.007 (an"
    " earlier probe under load had x1.16)"
)
CPU_STEP_CV = 0.158
_CPU_STEP_CV_SOURCE = (
    f"{_PROBE}: step times of a process beside another vary with sd / mean 0.158 (median of 6 processes), so two"
    " synchronous ranks wait x1.089 a step of one micro-batch"
)
_GPU_STEP_CV = (
    "assumption: 0, GPU kernels of a fixed-shape step take the same time each step; stragglers from data loading or"
    " a noisy node are not modelled (pass a measured spread with --step-cv)"
)
_GPU_CONTENTION = (
    "assumption: 1, no contention: each rank computes on its own GPU with its own memory; what the ranks of a node"
    " share (host CPU for data loading, PCIe) is outside the model"
)

# Pass a YAML/JSON profile or CLI flags to use your own numbers.
PROFILES: dict[str, MachineProfile] = {
    "study_p100_edr": MachineProfile(
        name="study_p100_edr",
        gpu="NVIDIA P100 (16 GB)",
        relative_throughput=1.0,
        gpus_per_node=4,
        intra_bw_gbs=10.0,
        intra_latency_us=5.0,
        nic_bw_gbs=10.0,
        nics_per_node=1,
        inter_latency_us=10.0,
        hierarchical=False,
        fusion_mb=64.0,
        cycle_ms=5.0,
        overlap=0.5,
        notes="the source study's cluster: P100 GPUs on PCIe, one 100 Gb/s EDR InfiniBand adapter per node, Horovod"
        " of its time",
        sources={
            "relative_throughput": "the unit of this field (P100 = 1); NVIDIA Tesla P100 PCIe datasheet: 9.3 TFLOP/s"
            " FP32, 18.7 TFLOP/s FP16",
            "gpus_per_node": "assumption: 4 P100 per node, a common P100 server of the study's time; the study names"
            " the GPU and the fabric, not this number",
            "intra_bw_gbs": "NVIDIA Tesla P100 PCIe datasheet: PCIe Gen3 32 GB/s (16 GB/s each way); assumption: an"
            " NCCL ring through the PCIe switch achieves ~10 GB/s of it",
            "intra_latency_us": "assumption: a few us per ring step over PCIe (NCCL's per-step overhead)",
            "nic_bw_gbs": "InfiniBand EDR (the study's fabric): 100 Gb/s = 12.5 GB/s per port; assumption: ~80%"
            " achieved, 10 GB/s",
            "nics_per_node": "assumption: one EDR adapter per node",
            "inter_latency_us": "assumption: ~1 us on the EDR wire plus NCCL and host staging of the time, ~10 us per"
            " ring step",
            "hierarchical": "Horovod operations.cc: HOROVOD_HIERARCHICAL_ALLREDUCE is off unless set (flat ring)",
            "fusion_mb": "Horovod operations.cc before 0.20: SetTensorFusionThresholdBytes(64 * 1024 * 1024);"
            " assumption: the study ran that default",
            "cycle_ms": "Horovod operations.cc before 0.20: SetCycleTimeMs(5); assumption: the study ran that default",
            "overlap": "assumption: half the allreduce hidden behind backward (Horovod starts each fusion buffer from"
            " the backward hooks); not measured on that cluster",
            "backward_fraction": _BACKWARD,
            "contention": _GPU_CONTENTION,
            "step_cv": _GPU_STEP_CV,
        },
    ),
    "modern_h100_ndr": MachineProfile(
        name="modern_h100_ndr",
        gpu="NVIDIA H100 SXM (80 GB)",
        relative_throughput=10.0,
        gpus_per_node=8,
        intra_bw_gbs=360.0,
        intra_latency_us=3.0,
        nic_bw_gbs=45.0,
        nics_per_node=8,
        inter_latency_us=5.0,
        hierarchical=True,
        fusion_mb=128.0,
        cycle_ms=1.0,
        overlap=0.7,
        notes="a DGX H100 node: 8 H100 SXM on NVLink 4, one 400 Gb/s NDR InfiniBand adapter per GPU",
        sources={
            "relative_throughput": "assumption: ~10x a P100 for a small 3D U-Net with bf16 autocast, well below the"
            " peak ratio (NVIDIA H100 SXM datasheet: 989 TFLOP/s dense BF16, 67 TFLOP/s FP32; P100: 18.7 TFLOP/s"
            " FP16) because small 3D convolutions are memory-bound (H100 SXM 3.35 TB/s against P100 732 GB/s: 4.6x);"
            " pass a step time measured on an H100 instead",
            "gpus_per_node": "NVIDIA DGX H100 user guide: 8 H100 SXM GPUs per node",
            "intra_bw_gbs": "NVIDIA H100 SXM datasheet: NVLink 900 GB/s per GPU (both directions, 450 GB/s each way);"
            " assumption: an NCCL allreduce reaches ~80% of one direction, 360 GB/s bus bandwidth",
            "intra_latency_us": "assumption: a few us per ring step on NVLink/NVSwitch (NCCL's per-step overhead)",
            "nic_bw_gbs": "InfiniBand NDR: 400 Gb/s = 50 GB/s per port; assumption: ~90% achieved, 45 GB/s",
            "nics_per_node": "NVIDIA DGX H100 user guide: 8 single-port ConnectX-7 400 Gb/s InfiniBand adapters for"
            " the compute fabric, one per GPU",
            "inter_latency_us": "assumption: ~1 us NDR wire and switch latency plus NCCL's per-step overhead, 5 us",
            "hierarchical": "assumption: HOROVOD_HIERARCHICAL_ALLREDUCE=1, set for nodes whose NVLink is 8x faster"
            " than one adapter",
            "fusion_mb": _HVD_FUSION,
            "cycle_ms": _HVD_CYCLE,
            "overlap": "assumption: 70% of the allreduce hidden behind backward (fast links finish most buffers"
            " before backward does); not measured",
            "backward_fraction": _BACKWARD,
            "contention": _GPU_CONTENTION,
            "step_cv": _GPU_STEP_CV,
        },
    ),
    "cpu_this_machine": MachineProfile(
        name="cpu_this_machine",
        gpu="CPU ranks on this host (2 cores, MPI shared memory: the jobs/_launch.py default)",
        relative_throughput=0.01,
        gpus_per_node=64,
        intra_bw_gbs=4.1,
        intra_latency_us=258.0,
        nic_bw_gbs=4.1,
        nics_per_node=1,
        inter_latency_us=258.0,
        hierarchical=False,
        fusion_mb=128.0,
        cycle_ms=0.2,
        overlap=0.0,
        contention=CPU_CONTENTION,
        step_cv=CPU_STEP_CV,
        notes="every rank on this one 2-core host, Horovod over OpenMPI's shared-memory transport; `calibrate`"
        " takes compute from measured 1-rank runs",
        sources={
            "relative_throughput": "assumption: 2 CPU cores at ~0.1 TFLOP/s against a P100's 9.3 TFLOP/s FP32"
            " (datasheet); used only to scale CPU step times to other profiles",
            "gpus_per_node": "assumption: every rank on this one host, so every count runs the in-node ring (past"
            " 2 ranks they share the 2 cores, which the model does not capture)",
            "intra_bw_gbs": f"{_BENCH}: bus bandwidth 3.72 GB/s at 16 MiB (4.51 ms) and 4.00 GB/s at 64 MiB"
            " (16.79 ms); the slope between them (48 MiB in 12.28 ms) is 4.1 GB/s, the rest is latency",
            "intra_latency_us": f"{_BENCH}: 1 KiB allreduce 615 us = 2 ring steps + half the 0.2 ms cycle, so"
            " (615 - 100) / 2 = 258 us per step",
            "nic_bw_gbs": "assumption: no network (one host); the in-node figure, so no count crosses a slower link",
            "nics_per_node": "assumption: no network (one host); unused",
            "inter_latency_us": "assumption: no network (one host); the in-node figure",
            "hierarchical": "assumption: one host, no node level to reduce across",
            "fusion_mb": f"{_HVD_FUSION}; jobs/_launch.py leaves HOROVOD_FUSION_THRESHOLD unset",
            "cycle_ms": "jobs/_launch.py: the default launch sets HOROVOD_CYCLE_TIME=0.2",
            "overlap": "assumption: none hidden: the loop times the exposed wait in dist.synchronize(), and the"
            " allreduce competes with backward for the same 2 cores",
            "backward_fraction": _BACKWARD,
            "contention": _CPU_CONTENTION_SOURCE,
            "step_cv": _CPU_STEP_CV_SOURCE,
        },
    ),
}


def get_profile(profile: str | MachineProfile | Path) -> MachineProfile:
    """A profile by name, from a YAML/JSON file, or the profile itself.

    Raises:
        KeyError: an unknown name that is not a file either.
    """
    if isinstance(profile, MachineProfile):
        return profile
    if str(profile) in PROFILES:
        return PROFILES[str(profile)]
    path = Path(profile)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.exists():
        return load_profile(path)
    raise KeyError(f"unknown machine profile {str(profile)!r}: use one of {sorted(PROFILES)} or a .yaml/.json file")


def load_profile(path: str | Path) -> MachineProfile:
    """Read a custom profile from YAML or JSON; `base: NAME` starts from a named profile and overrides its fields.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unreadable content, unknown keys or missing fields (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"machine profile file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml and json raise different types; the caller needs only the file and reason
        raise ValueError(f"machine profile file {path}: cannot parse ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"machine profile file {path}: expected a mapping of fields, got {type(data).__name__}")
    data = dict(data)
    base = data.pop("base", None)
    known = {f.name for f in fields(MachineProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"machine profile file {path}: unknown keys {unknown}; known keys are {sorted(known)}")
    data.setdefault("name", path.stem)
    given = data.pop("sources", None) or {}  # the file may cite its own numbers; otherwise the file is the source
    try:
        if not isinstance(given, dict):
            raise ValueError(f"sources must be a mapping of field name to source, got {type(given).__name__}")
        if base is not None:
            if base not in PROFILES:
                raise ValueError(f"base {base!r} is not one of {sorted(PROFILES)}")
            changed = sorted(set(data) - {"name", "notes"})
            # The base's notes describe its own numbers: say which ones this file changed.
            data.setdefault("notes", f"{base} with {changed} from {path}; {base}: {PROFILES[base].notes}")
            prof = derive(PROFILES[base], f"given in {path}", **data)
            return replace(prof, sources={**prof.sources, **given})
        sources = {k: f"given in {path}" for k in data if k in SOURCED_FIELDS}
        return MachineProfile(**data, sources={**sources, **given})
    except (TypeError, ValueError) as e:
        raise ValueError(f"machine profile file {path}: {e}") from e


def ring_allreduce_time(nbytes: float, p: int, bw_gbs: float, latency_us: float) -> float:
    """Seconds for one ring allreduce of `nbytes` over `p` ranks: 2(p-1)/p * n / B + 2(p-1) * latency."""
    if p < 1:
        raise ValueError(f"the number of ranks must be >= 1, got {p}")
    if p == 1:
        return 0.0
    return 2.0 * (p - 1) / p * nbytes / (bw_gbs * GB) + 2.0 * (p - 1) * latency_us * 1e-6


def hierarchical_allreduce_time(nbytes: float, p: int, profile: MachineProfile) -> float:
    """Seconds for a hierarchical allreduce: reduce-scatter in the node, allreduce across nodes, allgather.

    Each of the g shards (n/g bytes) crosses the network in its own ring and the g rings share the node's NICs,
    so the inter-node term is 2(m-1)/m * n / B_node.
    """
    g = min(p, profile.gpus_per_node)
    m = math.ceil(p / g)
    intra = (g - 1) / g * nbytes / (profile.intra_bw_gbs * GB) + (g - 1) * profile.intra_latency_us * 1e-6
    return 2.0 * intra + ring_allreduce_time(nbytes, m, profile.node_bw_gbs, profile.inter_latency_us)


def _one_allreduce(nbytes: float, p: int, profile: MachineProfile) -> tuple[float, str]:
    if p == 1:
        return 0.0, "none"
    if p <= profile.gpus_per_node:
        return ring_allreduce_time(nbytes, p, profile.intra_bw_gbs, profile.intra_latency_us), "ring in node"
    if profile.hierarchical:
        return hierarchical_allreduce_time(nbytes, p, profile), "hierarchical"
    # A flat ring crosses every node boundary: its slowest link and the network latency set the pace.
    bw = min(profile.intra_bw_gbs, profile.node_bw_gbs)
    return ring_allreduce_time(nbytes, p, bw, profile.inter_latency_us), "flat ring"


def _buffers(grad_bytes: float, fusion_mb: float, n_tensors: int | None) -> list[float]:
    if grad_bytes <= 0:
        return []
    if fusion_mb <= 0:  # fusion off: one allreduce per gradient tensor
        if not n_tensors:
            raise ValueError("tensor fusion is disabled (fusion_mb=0): pass n_tensors, the number of gradient tensors")
        return [grad_bytes / n_tensors] * n_tensors
    cap = fusion_mb * MB
    full = int(grad_bytes // cap)
    rest = grad_bytes - full * cap
    return [cap] * full + ([rest] if rest > 0 else [])


def allreduce_time(
    grad_bytes: float, p: int, profile: MachineProfile, n_tensors: int | None = None
) -> tuple[float, str, int]:
    """Seconds to allreduce all gradients of one step with tensor fusion: (seconds, algorithm, allreduce calls)."""
    profile = get_profile(profile)
    bufs = _buffers(grad_bytes, profile.fusion_mb, n_tensors)
    total, algo = 0.0, "none"
    for b in bufs:
        t, algo = _one_allreduce(b, p, profile)
        total += t
    return total, algo, len(bufs)


def small_allreduce_time(profile: MachineProfile, p: int, count: float) -> float:
    """Seconds for `count` latency-bound allreduces (a few bytes each, one after the other) on `p` GPUs.

    Each is its own Horovod operation: the ring's latency steps plus, on average, half a cycle before it starts.
    """
    if p == 1 or count <= 0:
        return 0.0
    return count * (_one_allreduce(0.0, p, profile)[0] + profile.cycle_ms * 1e-3 / 2)


def compute_on(profile: MachineProfile, step_s: float, measured_on: str | MachineProfile | None = None) -> float:
    """Compute seconds per step on `profile`'s GPU.

    With `measured_on` None the step time is taken as measured on the target; otherwise it is scaled by the
    ratio of relative throughputs (a first-order guess that ignores memory-bound layers and AMP differences).
    """
    if step_s <= 0:
        raise ValueError(f"compute time per step must be > 0, got {step_s}")
    if measured_on is None:
        return step_s
    src = get_profile(measured_on)
    return step_s * src.relative_throughput / profile.relative_throughput


def _check_point(compute_s: float, grad_bytes: float, samples: float, batch: float, p: int, accum: int) -> None:
    if p < 1 or batch <= 0 or accum < 1:
        raise ValueError(f"need gpus >= 1, batch_per_gpu > 0 and accum >= 1, got {p}, {batch}, {accum}")
    if samples <= 0 or grad_bytes < 0 or compute_s <= 0:
        raise ValueError(
            f"need samples_per_epoch > 0, grad_bytes >= 0, compute_step_s > 0; got {samples}, {grad_bytes}, {compute_s}"
        )


def predict_point(
    profile: str | MachineProfile,
    compute_step_s: float,
    grad_bytes: float,
    samples_per_epoch: float,
    batch_per_gpu: int,
    p: int,
    accum: int = 1,
    n_tensors: int | None = None,
    small_allreduces: float = 0.0,
) -> dict[str, Any]:
    """The model at `p` GPUs; `compute_step_s` is forward + backward of one optimizer step on the target GPU.

    Args:
        profile: a profile name, file or object.
        compute_step_s: compute seconds of one optimizer step (all `accum` micro-batches) on one GPU alone; with
            more than one rank on a node it is multiplied by the profile's `contention`; on more than one GPU the
            step also waits for the slowest rank (`straggler_factor` of `step_cv`).
        grad_bytes: bytes allreduced per step (parameters x element size; half with fp16 compression).
        samples_per_epoch: training samples in one epoch.
        batch_per_gpu: samples per GPU per micro-batch.
        p: GPUs.
        accum: micro-batches per optimizer step (only the last one's backward can hide the allreduce).
        n_tensors: gradient tensors, needed only when tensor fusion is off.
        small_allreduces: latency-bound collectives per step besides the gradients (hvdtrain's step flags, a
            global-batch Dice); never hidden.

    Returns:
        gpus, nodes, algorithm, allreduce_calls, global_batch, steps_per_epoch (fractional: the model ignores the
        dropped last batch), compute_s (with contention), contention (the factor applied), allreduce_s,
        small_allreduce_s, straggler_wait_s (for the slowest rank), exposed_comm_s (all communication and waiting
        on the step's critical path), step_s, epoch_s, samples_per_s.
    """
    prof = get_profile(profile)
    _check_point(compute_step_s, grad_bytes, samples_per_epoch, batch_per_gpu, p, accum)
    contention = prof.compute_factor(p)
    compute = compute_step_s * contention  # ranks that share a node slow each other down (CPU: the memory bus)
    wait = prof.straggler_wait(compute, p, accum)  # each step ends when the slowest rank has computed
    comm, algo, calls = allreduce_time(grad_bytes, p, prof, n_tensors)
    # Backward hooks start each fusion buffer's allreduce while earlier layers still compute their gradients.
    hideable = prof.backward_fraction * compute / accum
    hidden = min(prof.overlap * comm, hideable)
    tail = prof.cycle_ms * 1e-3 / 2 if p > 1 and calls else 0.0  # the last gradients wait ~half a cycle
    small = small_allreduce_time(prof, p, small_allreduces)
    exposed = comm - hidden + tail + small + wait
    step = compute + exposed
    global_batch = batch_per_gpu * accum * p
    steps = samples_per_epoch / global_batch
    return {
        "gpus": p,
        "nodes": math.ceil(p / prof.gpus_per_node),
        "algorithm": algo,
        "allreduce_calls": calls,
        "global_batch": global_batch,
        "steps_per_epoch": steps,
        "compute_s": compute,
        "contention": contention,
        "allreduce_s": comm,
        "small_allreduce_s": small,
        "straggler_wait_s": wait,
        "exposed_comm_s": exposed,
        "step_s": step,
        "epoch_s": steps * step,
        "samples_per_s": global_batch / step,
    }


def predict_table(
    profile: str | MachineProfile,
    compute_step_s: float,
    grad_bytes: float,
    samples_per_epoch: float,
    batch_per_gpu: int,
    gpus: Sequence[int] = DEFAULT_GPUS,
    accum: int = 1,
    measured_on: str | MachineProfile | None = None,
    n_tensors: int | None = None,
    small_allreduces: float = 0.0,
) -> list[dict[str, Any]]:
    """Predicted time per epoch, speedup and efficiency at each GPU count (speedup against 1 GPU, always computed).

    `compute_step_s` is on the target GPU, or on `measured_on`'s and scaled by relative throughput. Each row is
    `predict_point`'s plus profile, speedup (`epoch_1 / epoch_p`) and efficiency (`speedup / p`).
    """
    prof = get_profile(profile)
    compute = compute_on(prof, compute_step_s, measured_on)
    args = (samples_per_epoch, batch_per_gpu)
    base = predict_point(prof, compute, grad_bytes, *args, 1, accum, n_tensors, small_allreduces)
    rows = []
    for p in gpus:
        row = predict_point(prof, compute, grad_bytes, *args, int(p), accum, n_tensors, small_allreduces)
        speedup = base["epoch_s"] / row["epoch_s"]
        rows.append(
            {"profile": prof.name, "scaling": "weak", **row, "speedup": speedup, "efficiency": speedup / row["gpus"]}
        )
    return rows


def strong_split(global_batch: int, p: int, max_batch_per_gpu: int | None = None) -> tuple[int, int, int]:
    """(samples per GPU per step, largest micro-batch, accumulation steps) for a fixed global batch on `p` GPUs.

    Each GPU takes G / p samples per optimizer step, in micro-batches of at most `max_batch_per_gpu` (memory): the
    rest is gradient accumulation, the last micro-batch holding what is left.

    Raises:
        ValueError: G / p is not a whole number of samples, or a batch or count below 1.
    """
    if global_batch < 1 or p < 1 or (max_batch_per_gpu is not None and max_batch_per_gpu < 1):
        raise ValueError(
            f"need global batch, GPUs and max batch per GPU >= 1, got {global_batch}, {p}, {max_batch_per_gpu}"
        )
    if global_batch % p:
        raise ValueError(f"global batch {global_batch} does not split evenly over {p} GPUs")
    per_gpu = global_batch // p
    cap = min(per_gpu, max_batch_per_gpu or per_gpu)
    return per_gpu, cap, math.ceil(per_gpu / cap)


def predict_strong_table(
    profile: str | MachineProfile,
    compute_per_sample_s: float,
    grad_bytes: float,
    samples_per_epoch: float,
    global_batch: int,
    gpus: Sequence[int] = DEFAULT_GPUS,
    max_batch_per_gpu: int | None = None,
    measured_on: str | MachineProfile | None = None,
    small_allreduces: float = 0.0,
    compute_per_update_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Strong scaling: time per epoch, speedup and efficiency with the global batch fixed at `global_batch`.

    Each GPU computes G / N samples per step (`strong_split`), so compute per step shrinks as 1/N while the
    allreduce of the same gradients does not, and steps per epoch stay samples / G. Compute is linear in samples
    (`compute_per_sample_s`, on `measured_on`'s GPU or the target's): optimistic for small per-GPU batches, which
    keep a GPU less busy. Rows are `predict_point`'s with batch_per_gpu (G / N), micro_batch, accum, speedup
    (against the same global batch on 1 GPU) and efficiency.
    """
    prof = get_profile(profile)
    per_sample = compute_on(prof, compute_per_sample_s, measured_on)
    # The per-update work (optimizer step, the loop's per-step work) does not shrink with N.
    per_update = compute_on(prof, compute_per_update_s, measured_on) if compute_per_update_s > 0 else 0.0
    rows = []
    for p in [1, *gpus]:
        per_gpu, micro, accum = strong_split(global_batch, int(p), max_batch_per_gpu)
        # The mean micro-batch (per_gpu / accum) keeps the global batch exact when the last one is smaller.
        args = (per_sample * per_gpu + per_update, grad_bytes, samples_per_epoch, per_gpu / accum, int(p), accum)
        row = predict_point(prof, *args, None, small_allreduces)
        row.update(global_batch=global_batch, batch_per_gpu=per_gpu, micro_batch=micro, accum=accum)
        rows.append(row)
    base, rows = rows[0], rows[1:]
    for row in rows:
        speedup = base["epoch_s"] / row["epoch_s"]
        row.update(profile=prof.name, scaling="strong", speedup=speedup, efficiency=speedup / row["gpus"])
    return rows


def assumption_lines(
    profile: MachineProfile,
    compute_step_s: float | None = None,
    grad_bytes: float | None = None,
    samples_per_epoch: float | None = None,
    batch_per_gpu: int | None = None,
    accum: int = 1,
    measured_on: str | MachineProfile | None = None,
) -> list[str]:
    """Every number the prediction rests on, one per line, for printing beside the table."""
    p = profile
    lines = [
        f"profile {p.name}: {p.gpu}, {p.gpus_per_node} GPUs per node",
        f"  intra-node: {p.intra_bw_gbs:g} GB/s effective allreduce bandwidth, {p.intra_latency_us:g} us per ring step",
        f"  network: {p.nics_per_node} x {p.nic_bw_gbs:g} GB/s adapters per node ({p.node_bw_gbs:g} GB/s per node),"
        f" {p.inter_latency_us:g} us per ring step; "
        + ("hierarchical allreduce across nodes" if p.hierarchical else "flat ring across nodes"),
        f"  Horovod: fusion buffer {p.fusion_mb:g} MiB, cycle {p.cycle_ms:g} ms; {p.overlap:.0%} of the allreduce "
        f"hidden behind backward (backward = {p.backward_fraction:.0%} of compute)",
        f"  compute speed {p.relative_throughput:g} x a P100; x{p.contention:.3g} compute time per rank when more"
        f" than one rank shares a node (contention); micro-batch time spread {p.step_cv:.3g} (cv), the slowest rank"
        " sets each step",
    ]
    if p.notes:
        lines.append(f"  machine: {p.notes}")
    lines += source_lines(p)
    if compute_step_s is not None:
        if measured_on is None:
            lines.append(f"compute per step: {compute_step_s:.4g} s, taken as measured on the target GPU")
        else:
            src = get_profile(measured_on)
            lines.append(
                f"compute per step: {compute_step_s:.4g} s measured on {src.name} ({src.relative_throughput:g} x P100)"
                f" -> {compute_on(p, compute_step_s, src):.4g} s on {p.name} (scaled by relative throughput)"
            )
            if src.name != p.name:
                lines.append(
                    "  WARNING: the relative throughputs are rough guesses; for a trustworthy number pass a step time"
                    " measured on the target GPU (--step-time)"
                )
    if grad_bytes is not None:
        lines.append(f"gradient: {grad_bytes / MB:.2f} MiB allreduced per step")
    if samples_per_epoch is not None and batch_per_gpu is not None:
        lines.append(
            f"epoch: {samples_per_epoch:g} samples, {batch_per_gpu} per GPU per micro-batch x accum {accum}; "
            "weak scaling (global batch grows with the GPUs, so steps per epoch shrink)"
        )
    lines.append("not modelled: data loading, evaluation, network contention from other jobs")
    return lines


def strong_assumption_lines(
    global_batch: int, max_batch_per_gpu: int | None, compute_per_sample_s: float, compute_per_update_s: float = 0.0
) -> list[str]:
    """What the strong-scaling table assumes, for printing above it."""
    update = f" + {compute_per_update_s:.4g} s per update (not shrinking with N)" if compute_per_update_s > 0 else ""
    cap = (
        f"micro-batches of at most {max_batch_per_gpu}, the rest by gradient accumulation"
        if max_batch_per_gpu
        else ("one micro-batch (no --max-batch-per-gpu)")
    )
    return [
        f"strong scaling: global batch {global_batch} at every GPU count; per GPU {global_batch} / N samples per step"
        f" in {cap}",
        f"  compute {compute_per_sample_s:.4g} s per sample{update} on the measuring GPU, linear in samples (a small"
        " per-GPU batch keeps a GPU less busy: optimistic at large N); the allreduce per step does not shrink with N",
        "  steps per epoch = samples / global batch at every N; speedup against the same global batch on 1 GPU",
    ]


def source_lines(profile: MachineProfile) -> list[str]:
    """Each number of the profile with where it comes from (flagged when it has no source)."""
    lines = ["  sources:"]
    for name in SOURCED_FIELDS:
        value = getattr(profile, name)
        shown = str(value) if isinstance(value, bool) else f"{value:g}"
        lines.append(f"    {name} = {shown}: {profile.sources.get(name, '').strip() or 'NO SOURCE GIVEN'}")
    return lines


def format_prediction(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of `predict_table` or `predict_strong_table` rows (the latter with the per-GPU split)."""
    strong = bool(rows) and "micro_batch" in rows[0]
    extra = "per-GPU batch | micro x accum | compute s | " if strong else ""
    head = (
        f"| GPUs | nodes | allreduce | global batch | {extra}step s | exposed comm s | epoch s | speedup | efficiency |"
        "\n|---:|---:|---|---:|" + ("---:|---:|---:|" if strong else "") + "---:|---:|---:|---:|---:|"
    )
    body = []
    for r in rows:
        split = f"{r['batch_per_gpu']} | {r['micro_batch']} x {r['accum']} | {r['compute_s']:.4g} | " if strong else ""
        body.append(
            f"| {r['gpus']} | {r['nodes']} | {r['algorithm']} | {r['global_batch']} | {split}{r['step_s']:.4g} | "
            f"{r['exposed_comm_s']:.3g} | {r['epoch_s']:.4g} | {r['speedup']:.2f} | {r['efficiency']:.1%} |"
        )
    return "\n".join([head, *body])


@dataclass(frozen=True)
class Measurement:
    """One measured real run, as calibration needs it (per-epoch means)."""

    world_size: int
    steps_per_epoch: float  # optimizer steps per epoch
    epoch_time_s: float  # training wall time per epoch
    comm_s: float  # time per epoch waiting for the gradient allreduce (the exposed part)
    grad_bytes: float
    label: str = ""
    samples_per_step: float | None = None  # samples per rank per optimizer step (batch x accum); None: unknown
    small_allreduces: float = 0.0  # latency-bound collectives per step besides the gradients (flags, global Dice)
    accum: int = 1  # micro-batches per rank per optimizer step (the ranks wait for each other once per step)

    @property
    def compute_step_s(self) -> float:
        return (self.epoch_time_s - self.comm_s) / self.steps_per_epoch

    @property
    def global_batch(self) -> float | None:
        return self.samples_per_step * self.world_size if self.samples_per_step else None


def _rank_words(ranks: Sequence[int] | None) -> str:
    if ranks is None:
        return "all runs"
    return ", ".join(map(str, ranks)) + (" rank" if list(ranks) == [1] else " ranks")


@dataclass(frozen=True)
class Calibration:
    """A profile fitted to the runs at `fit_ranks`, and its epoch-time error on every run, fitted or held out.

    Each point has label, world_size, in_sample, scaling ("fit", "weak" or "strong": a held-out run with the fitted
    runs' per-rank batch, or with their global batch), measured/predicted epoch and comm per step, error_pct.
    """

    profile: MachineProfile
    method: str
    compute_step_s: float  # compute per step of the fitted runs at their smallest world size (mean)
    points: list[dict[str, Any]] = field(default_factory=list)
    fit_ranks: tuple[int, ...] | None = None  # world sizes fitted on; None: every run
    compute_per_sample_s: float | None = None  # the same per sample, when the runs' batches are known
    compute_per_update_s: float = 0.0  # per optimizer step on top of the samples' (fitted when the runs' steps differ)

    def summaries(self) -> list[dict[str, Any]]:
        """The in-sample error, then one out-of-sample error per kind of held-out run (weak, strong scaling).

        Each: in_sample, scaling, ranks, runs, error_pct (the point with the largest |error|), within_target.
        """
        groups: dict[tuple[bool, str], list[dict[str, Any]]] = {}
        for pt in self.points:
            groups.setdefault((pt["in_sample"], pt["scaling"]), []).append(pt)
        out = []
        for (inside, scaling), pts in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
            worst = max(pts, key=lambda pt: abs(pt["error_pct"]))
            err = worst["error_pct"]
            ranks = sorted({pt["world_size"] for pt in pts})
            within = abs(err) <= OUT_OF_SAMPLE_TARGET_PCT
            out.append(
                dict(in_sample=inside, scaling=scaling, ranks=ranks, runs=len(pts), error_pct=err, within_target=within)
            )
        return out

    def summary_lines(self) -> list[str]:
        """'in-sample error (...)' and 'out-of-sample error (fit on 1 rank, predicting 2 ranks): X% (...)' lines."""
        fit = _rank_words(self.fit_ranks)
        lines = []
        for s in self.summaries():
            worst = f"{s['error_pct']:+.1f}%" + (f" (largest of {s['runs']} runs)" if s["runs"] > 1 else "")
            if s["in_sample"]:
                lines.append(f"in-sample error (fit on {fit}): {worst}")
                continue
            what = _rank_words(s["ranks"]) + (", strong scaling" if s["scaling"] == "strong" else "")
            verdict = "within" if s["within_target"] else "NOT within"
            lines.append(
                f"out-of-sample error (fit on {fit}, predicting {what}): {worst}, {verdict} the "
                f"{OUT_OF_SAMPLE_TARGET_PCT:g}% target"
            )
        if not any(not pt["in_sample"] for pt in self.points):
            lines.append(f"out-of-sample error: no real run outside the fitted ones ({fit}) to predict")
        return lines

    def lines(self) -> list[str]:
        """Human-readable summary: the fitted numbers, the error per measured point, then the error summaries."""
        p = self.profile
        per_sample = f" ({self.compute_per_sample_s:.4g} s per sample" if self.compute_per_sample_s else ""
        if per_sample:
            per_sample += f" + {self.compute_per_update_s:.4g} s per update)" if self.compute_per_update_s else ")"
        out = [
            f"calibration of {p.name} on {_rank_words(self.fit_ranks)} ({self.method}): latency "
            f"{p.intra_latency_us:.4g} us per ring step, bandwidth {p.intra_bw_gbs:.4g} GB/s; compute "
            f"{self.compute_step_s:.4g} s per step{per_sample}",
            f"  contention x{p.contention:.4g} on each rank's compute with more than one rank on the node, not fitted:"
            f" {p.sources.get('contention', 'NO SOURCE GIVEN')}",
            f"  stragglers: micro-batch time spread (cv) {p.step_cv:.3g}, the slowest rank sets each step (x"
            f"{straggler_factor(2, 1, p.step_cv):.3f} at 2 ranks, 1 micro-batch a step), not fitted:"
            f" {p.sources.get('step_cv', 'NO SOURCE GIVEN')}",
        ]
        for pt in self.points:
            how = "fitted" if pt["in_sample"] else f"held out, {pt['scaling']} scaling"
            out.append(
                f"  {pt['label'] or 'run'} ({pt['world_size']} rank(s), {how}): epoch measured "
                f"{pt['measured_epoch_s']:.4g} s, predicted {pt['predicted_epoch_s']:.4g} s, error "
                f"{pt['error_pct']:+.1f}%; comm/step measured {pt['measured_comm_step_s']:.3g} s, predicted "
                f"{pt['predicted_comm_step_s']:.3g} s"
            )
        return out + self.summary_lines()


def _fit_nonneg(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, str] | None:
    """Least squares for [latency, 1/bandwidth] >= 0; None when the columns are not independent."""
    if np.linalg.matrix_rank(a / np.maximum(np.abs(a).max(axis=0), 1e-300), tol=1e-9) < 2:
        return None
    x, *_ = np.linalg.lstsq(a, y, rcond=None)
    if (x >= 0).all():
        return x, "least squares"
    # A negative term is noise: fit the other one alone and keep the better of the two.
    best = None
    for j in range(2):
        col = a[:, j]
        c = max(float(col @ y) / float(col @ col), 0.0)
        x1 = np.zeros(2)
        x1[j] = c
        r = float(np.sum((a @ x1 - y) ** 2))
        if best is None or r < best[0]:
            best = (r, x1)
    return best[1], "least squares (one term clipped to 0)"


def _fit_comm(prof: MachineProfile, multi: Sequence[Measurement]) -> tuple[MachineProfile, str]:
    """The profile with in-node latency and bandwidth fitted to the gradient wait of the multi-rank runs."""
    if not multi:
        return prof, "no multi-rank run fitted: the profile's latency and bandwidth kept"
    rows, y = [], []
    for m in multi:
        p = m.world_size
        calls = len(_buffers(m.grad_bytes, prof.fusion_mb, None)) or 1
        rows.append([calls * 2.0 * (p - 1), 2.0 * (p - 1) / p * m.grad_bytes])
        # The measured wait holds the wait for the slowest rank too: take the modelled one off (the run's own
        # compute, less its small collectives at the prior latency).
        wait = prof.straggler_wait(m.compute_step_s - small_allreduce_time(prof, p, m.small_allreduces), p, m.accum)
        y.append(m.comm_s / m.steps_per_epoch - prof.cycle_ms * 1e-3 / 2 - wait)
    a, yv = np.asarray(rows), np.asarray(y)
    fit = _fit_nonneg(a, yv)
    if fit is not None:
        (lat_s, inv_bw), method = fit
    else:
        prior = np.array([prof.intra_latency_us * 1e-6, 1.0 / (prof.intra_bw_gbs * GB)])
        # Clip at a tiny positive ratio: a zero would mean infinite bandwidth.
        ratio = max(float(yv.sum()) / float((a @ prior).sum()), 1e-9)
        lat_s, inv_bw = prior * ratio
        method = f"ratio to the prior (x{ratio:.3g}; one world size cannot separate latency from bandwidth)"
    bw = 1.0 / (inv_bw * GB) if inv_bw > 0 else math.inf  # the fit found no bandwidth term
    runs = ", ".join(m.label or f"{m.world_size} ranks" for m in multi)
    source = f"measured: fitted to the allreduce wait of real run(s) {runs} ({method})"
    lat_us = float(lat_s) * 1e6
    prof = derive(prof, source, intra_latency_us=lat_us, intra_bw_gbs=bw, nic_bw_gbs=bw, inter_latency_us=lat_us)
    return prof, method


def _compute_reference(prof: MachineProfile, fit: Sequence[Measurement]) -> tuple[float, float | None, float]:
    """(per step, per sample, per update) compute of the fitted runs at their smallest world size.

    Per sample is None when a batch is unknown. When the runs differ in samples per step (a weak run of one
    micro-batch a step and a strong one of 32), step = per_sample * samples + per_update is fitted (per_update >= 0:
    the optimizer's update, the loop's per-step work); otherwise per_update is 0 and per sample is the mean ratio.
    A multi-rank run's epoch less its gradient wait (which holds the wait for the slowest rank) still holds its small
    collectives and its ranks' contention: their modelled time is taken off and the rest divided by the contention
    factor, so that the compute is what one GPU alone would spend.
    """
    smallest = min(m.world_size for m in fit)
    ref = [m for m in fit if m.world_size == smallest]
    steps = [
        (m.compute_step_s - small_allreduce_time(prof, m.world_size, m.small_allreduces))
        / prof.compute_factor(m.world_size)
        for m in ref
    ]
    compute = sum(steps) / len(steps)
    if not all(m.samples_per_step for m in ref):
        return compute, None, 0.0
    samples = np.array([float(m.samples_per_step) for m in ref])
    if len(set(samples)) > 1:
        (per_sample, per_update), *_ = np.linalg.lstsq(np.c_[samples, np.ones_like(samples)], steps, rcond=None)
        if per_update >= 0 and per_sample > 0:
            return compute, float(per_sample), float(per_update)
    return compute, sum(s / m.samples_per_step for s, m in zip(steps, ref)) / len(ref), 0.0


def _scaling_kind(m: Measurement, fit: Sequence[Measurement], in_sample: bool) -> str:
    """'fit', or for a held-out run 'strong' (the fitted runs' global batch on more ranks) or 'weak'."""
    if in_sample:
        return "fit"
    smallest = min(f.world_size for f in fit)
    ref = next(f for f in fit if f.world_size == smallest)
    same_global = m.global_batch is not None and ref.global_batch is not None and m.global_batch == ref.global_batch
    return "strong" if same_global and m.world_size != ref.world_size else "weak"


def _point(prof: MachineProfile, m: Measurement, compute: float, in_sample: bool, scaling: str) -> dict[str, Any]:
    # Only the per-step numbers are used: the epoch has the measured run's own number of steps.
    pred = predict_point(
        prof, compute, m.grad_bytes, m.steps_per_epoch, 1, m.world_size, m.accum, None, m.small_allreduces
    )
    pred_epoch = pred["step_s"] * m.steps_per_epoch
    return {
        "label": m.label,
        "world_size": m.world_size,
        "in_sample": in_sample,
        "scaling": scaling,
        "measured_epoch_s": m.epoch_time_s,
        "predicted_epoch_s": pred_epoch,
        "error_pct": 100.0 * (pred_epoch - m.epoch_time_s) / m.epoch_time_s,
        "measured_comm_step_s": m.comm_s / m.steps_per_epoch,
        "predicted_comm_step_s": pred["allreduce_s"]
        + pred["straggler_wait_s"]
        + (prof.cycle_ms * 1e-3 / 2 if m.world_size > 1 else 0.0),
    }


def calibrate(
    profile: str | MachineProfile, measurements: Sequence[Measurement], fit_ranks: Iterable[int] | None = None
) -> Calibration:
    """Fit the profile's single-node latency and bandwidth, and the compute, to the runs at `fit_ranks`.

    The unknowns are the latency `a` and the inverse bandwidth `1/B` of the ring in one node: each fitted run at
    p > 1 ranks gives `comm per step - cycle tail = calls * 2(p-1) * a + 2(p-1)/p * bytes / B`. With two or more
    independent points (e.g. 2 and 4 ranks) they are fitted by non-negative least squares; with only one shape
    (e.g. only 2 ranks) the prior latency and bandwidth are scaled together by one ratio; with no multi-rank run
    fitted (`fit_ranks=(1,)`) the profile's own (measured) numbers stay. Overlap is set to 0: the measured comm is
    already the exposed part. Compute per step (per sample when the batches are known, so that a strong-scaling
    run's smaller per-rank batch is predicted too, plus a per-update term when the fitted runs' steps differ in
    samples) comes from the fitted runs at their smallest world size. The contention factor of ranks sharing a node
    and the straggler spread are the profile's, measured by their own probe (jobs.bench_contention) and never
    fitted here, so the held-out runs stay out of sample. Every run, fitted or not, then gets the
    predicted epoch time and its error; `summaries` keeps the in-sample and the out-of-sample errors apart.

    Args:
        profile: the profile to fit (its latency and bandwidth are the prior).
        measurements: real runs.
        fit_ranks: world sizes to fit on (e.g. (1,)); None fits on every run.

    Raises:
        ValueError: no measurements, none at `fit_ranks`, or a run with more ranks than the profile has per node.
    """
    prof = derive(get_profile(profile), "assumption: calibration fits the exposed wait the loop times", overlap=0.0)
    if not measurements:
        raise ValueError("calibration needs at least one measured real run")
    for m in measurements:
        if m.world_size > prof.gpus_per_node:
            raise ValueError(
                f"run {m.label or '?'} has {m.world_size} ranks but profile {prof.name} has {prof.gpus_per_node} per "
                "node: calibration fits the single-node terms only"
            )
        if m.steps_per_epoch <= 0:
            raise ValueError(f"run {m.label or '?'}: steps per epoch must be > 0, got {m.steps_per_epoch}")
    ranks = tuple(sorted(set(fit_ranks))) if fit_ranks is not None else None
    inside = [ranks is None or m.world_size in ranks for m in measurements]
    fit = [m for m, i in zip(measurements, inside) if i]
    if not fit:
        found = sorted({m.world_size for m in measurements})
        raise ValueError(f"no real run at the fit ranks {list(ranks or [])} (runs at {found} ranks)")
    prof, method = _fit_comm(prof, [m for m in fit if m.world_size > 1])
    compute, per_sample, per_update = _compute_reference(prof, fit)
    points = []
    for m, i in zip(measurements, inside):
        known = per_sample is not None and m.samples_per_step
        c = per_sample * m.samples_per_step + per_update if known else compute
        points.append(_point(prof, m, c, i, _scaling_kind(m, fit, i)))
    return Calibration(prof, method, compute, points, ranks, per_sample, per_update)


def parse_ranks(text: str) -> tuple[int, ...] | None:
    """'1' or '1,2' as a tuple of world sizes; 'all' as None (fit on every run).

    Raises:
        ValueError: not 'all' or a comma-separated list of positive integers.
    """
    if text.strip().lower() == "all":
        return None
    try:
        ranks = tuple(int(r) for r in text.split(",") if r.strip())
    except ValueError as e:
        raise ValueError(f"fit ranks must be 'all' or world sizes like '1' or '1,2', got {text!r}") from e
    if not ranks or min(ranks) < 1:
        raise ValueError(f"fit ranks must be 'all' or world sizes >= 1 like '1' or '1,2', got {text!r}")
    return ranks


def profile_dict(profile: MachineProfile) -> dict[str, Any]:
    """The profile as a plain dict (for JSON output)."""
    return asdict(profile)
