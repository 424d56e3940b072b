"""Optuna hyper-parameter search for the trainers, and carrying the best parameters to N GPUs.

`space` (search spaces from YAML), `study` (storage, sampler, pruner, worker identity), `tasks` (one trial through
each trainer's library path), `objective` (the multi-rank trial loop), `scale` (LR / warmup / batch rules for N
GPUs), `report` (best config and plots). Entry points: `jobs.tune`, `jobs.tune_report`, `jobs.scale`.
"""
