"""Random streams of a data-parallel run: the same initial weights on every rank, independent draws per GPU.

Three kinds of randomness, three keys:

* Initial weights: `seed_init(seed)` before building the model, the same on every rank (rank 0's weights are
  broadcast anyway; the same seed keeps runs and trials comparable).
* Draws inside a training step (dropout masks, mixup/cutmix): before each micro-batch the loop reseeds torch's global
  generator from (seed, GPU, optimizer step, accumulation index), GPU = rank x simulate_gpus + j. Dropout takes no
  generator argument, so the global one (CPU or CUDA) is what must differ per GPU. Keying by position instead of
  carrying generator states keeps it simple: simulated GPU j of rank r draws exactly what real rank r x N + j would,
  and a resumed run draws what an uninterrupted one did, with no state to save.
* Augmentation: each training sample's draws come from (seed, epoch, sample index), whichever rank or loader worker
  loads it (`sample_rng`). Ranks load disjoint samples, so their draws are independent, and the augmented data of a
  global step is the same at every GPU count (the sampler hands out one global order, `hvdtrain.data`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["DROPOUT", "AUGMENT", "stream_seed", "seed_init", "gpu_index", "seed_micro_batch", "sample_rng"]

# Stream domains, so one key never seeds two kinds of draws.
DROPOUT, AUGMENT = 1, 2


def stream_seed(*key: int) -> int:
    """A 63-bit seed mixed from `key` (numpy's SeedSequence: neighbouring keys give unrelated streams)."""
    words = [int(k) % 2**64 for k in key]  # negative seeds are allowed in the config
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_init(seed: int) -> None:
    """Seed torch for building the model: the same initial weights on every rank for the same seed."""
    torch.manual_seed(seed)


def gpu_index(rank: int, simulate_gpus: int, j: int) -> int:
    """The GPU that simulated GPU `j` of `rank` stands for: the rank it would be in a run without simulation."""
    if not 0 <= j < simulate_gpus:
        raise ValueError(f"simulated GPU {j} is outside 0..{simulate_gpus - 1}")
    return rank * simulate_gpus + j


def seed_micro_batch(seed: int, rank: int, simulate_gpus: int, accum: int, step: int, micro: int) -> int:
    """Reseed torch's global generators for micro-batch `micro` of optimizer step `step`; returns its GPU.

    The loop's micro-batches of one step run simulated GPU by GPU: micro = j x accum + a (the order in which
    `ShardedTrainSampler` hands out their data). manual_seed also seeds every CUDA device: no sync, microseconds.
    """
    j, a = divmod(micro, accum)
    gpu = gpu_index(rank, simulate_gpus, j)
    torch.manual_seed(stream_seed(DROPOUT, seed, gpu, step, a))
    return gpu


@contextlib.contextmanager
def sample_rng(seed: int | None, epoch: int, index: int) -> Iterator[None]:
    """Torch's CPU generator keyed by (seed, epoch, sample index) inside; the caller's state is restored after.

    `seed` None (an unseeded, e.g. evaluation, dataset) leaves torch's generator as it is.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):  # CPU only: augmentation runs in the loader, on the CPU
        torch.manual_seed(stream_seed(AUGMENT, seed, epoch, index))
        yield
