"""Sharded data loading: equal training steps on every rank, exactly-once evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import dist

__all__ = ["ShardedTrainSampler", "EvalShardSampler", "train_loader", "train_loader_for", "eval_loader", "set_epoch"]


class ShardedTrainSampler(Sampler[int]):
    """Shuffled indices for one rank, reshuffled each epoch from (seed, epoch).

    Every rank yields the same number of samples, a multiple of the batch size, so every rank takes the same
    number of optimizer steps: uneven step counts leave Horovod replicas waiting or diverged (see `hvd.join`).
    Rank r takes positions r, r + size, ... of one global permutation, so the union of the ranks' i-th batches
    is the i-th global batch that a single rank with `size` times the batch would see: runs at different world
    sizes see the same data order. With `simulate_gpus` N, the micro-batches of a step come simulated GPU by GPU
    (j x accumulation + a), and simulated GPU j gets exactly the samples that real rank r x N + j of an N times
    larger job would get (so its batch statistics and random streams match too, `hvdtrain.seeding`).
    """

    def __init__(
        self,
        length: int,
        batch_size: int,
        rank: int,
        size: int,
        seed: int = 0,
        shuffle: bool = True,
        micro_per_step: int = 1,
        simulate_gpus: int = 1,
    ):
        if simulate_gpus < 1 or micro_per_step % simulate_gpus:
            raise ValueError(f"micro_per_step {micro_per_step} is not a multiple of simulate_gpus {simulate_gpus}")
        # One optimizer step takes `micro_per_step` micro-batches on every rank (gradient accumulation).
        global_batch = batch_size * size * micro_per_step
        if length < global_batch:
            raise ValueError(
                f"the training set has {length} samples, fewer than one global batch "
                f"({batch_size} per rank x {size} ranks x {micro_per_step} accumulation = {global_batch})"
            )
        self.length, self.batch_size, self.rank, self.size = length, batch_size, rank, size
        self.seed, self.shuffle, self.epoch, self.skip = seed, shuffle, 0, 0
        self.steps = length // global_batch * micro_per_step  # micro-batches per rank; the ragged tail is dropped
        self.micro, self.simulate_gpus = micro_per_step, simulate_gpus

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's permutation; `skip_batches` resumes part-way through it (after a preemption)."""
        self.epoch, self.skip = epoch, skip_batches

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        used = order[: self.steps * self.batch_size * self.size]
        return iter(self._micro_batches(used)[self.skip * self.batch_size :])

    def _micro_batches(self, used: list[int]) -> list[int]:
        """This rank's samples in micro-batch order; without simulation simply positions rank, rank + size, ..."""
        n, b = self.simulate_gpus, self.batch_size
        accum = self.micro // n
        # The shard of each GPU this rank plays, as real rank r x N + j of a size x N job would take it.
        shards = [used[self.rank * n + j :: self.size * n] for j in range(n)]
        out: list[int] = []
        for step in range(self.steps // self.micro):
            for j in range(n):
                k = step * accum  # the GPU's micro-batch counter at the start of the step
                out += shards[j][k * b : (k + accum) * b]
        return out

    def __len__(self) -> int:
        return (self.steps - self.skip) * self.batch_size


class EvalShardSampler(Sampler[int]):
    """Indices rank, rank + size, ...: each sample exactly once across ranks, no padding duplicates.

    Ranks may get different counts (5 samples on 2 ranks: 3 and 2; 1 sample on 4 ranks: 1, 0, 0, 0), so
    evaluation must not run collectives per batch; metrics reduce once at the end.
    """

    def __init__(self, length: int, rank: int, size: int):
        self.length, self.rank, self.size = length, rank, size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.size))


def _loader(dataset: Dataset, sampler: Sampler, batch_size: int, num_workers: int, collate_fn: Any) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # forkserver: fork after MPI/InfiniBand initialisation is unsafe (Horovod's examples do the same).
        multiprocessing_context="forkserver" if num_workers > 0 else None,
        # Its own generator: otherwise every `iter(loader)` draws the workers' base seed from the global RNG,
        # and a run resumed mid-epoch would see different dropout masks than an uninterrupted one.
        generator=torch.Generator().manual_seed(getattr(sampler, "seed", 0)),
    )


def train_loader(
    dataset: Dataset,
    batch_size_per_gpu: int,
    seed: int = 0,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    shuffle: bool = True,
    micro_per_step: int = 1,
    simulate_gpus: int = 1,
) -> DataLoader:
    """This rank's training loader; call `set_epoch(loader, epoch)` before each epoch.

    `micro_per_step` is the number of micro-batches per optimizer step (accumulation x simulated GPUs), so that
    the epoch holds a whole number of optimizer steps; `simulate_gpus` orders them as the simulated GPUs would
    take them.
    """
    d = dist.info()
    sampler = ShardedTrainSampler(
        len(dataset), batch_size_per_gpu, d.rank, d.size, seed, shuffle, micro_per_step, simulate_gpus
    )
    return _loader(dataset, sampler, batch_size_per_gpu, num_workers, collate_fn)


def train_loader_for(dataset: Dataset, cfg: Any, collate_fn: Callable | None = None) -> DataLoader:
    """The training loader a `TrainConfig` asks for: its per-GPU batch, seed, workers, and whole optimizer steps of
    `cfg.micro_per_step` micro-batches in the simulated GPUs' order."""
    return train_loader(
        dataset,
        cfg.batch_size_per_gpu,
        cfg.seed,
        cfg.num_workers,
        collate_fn,
        micro_per_step=cfg.micro_per_step,
        simulate_gpus=cfg.simulate_gpus,
    )


def eval_loader(
    dataset: Dataset, batch_size: int, num_workers: int = 0, collate_fn: Callable | None = None
) -> DataLoader:
    """This rank's share of an evaluation set (each sample exactly once across ranks)."""
    d = dist.info()
    return _loader(dataset, EvalShardSampler(len(dataset), d.rank, d.size), batch_size, num_workers, collate_fn)


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Reseed the loader's shuffling (and the dataset's augmentation, when it has `set_epoch`) for `epoch`."""
    if isinstance(loader.sampler, ShardedTrainSampler):
        loader.sampler.set_epoch(epoch, skip_batches)
        if loader.generator is not None:  # worker seeds follow (seed, epoch, rank), not the loader's history
            s = loader.sampler
            loader.generator.manual_seed((s.seed * 1_000_003 + epoch) * 4099 + s.rank)
    elif hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
