"""The run-directory contract: where a run (local or gs://) keeps what.

``<run>/config.gin`` (the operative gin config), ``metrics.jsonl`` (training log), ``train/``
(the trainer's TensorBoard events), ``checkpoints/`` (orbax), ``eval/results.jsonl`` (one row per
metric), ``eval/samples/``, ``eval/`` events (the eval worker's TensorBoard events), ``job.json``
(the table rows a run serves); ``<workdir>/throughput.jsonl``. ``tensorboard --logdir <workdir>``
thus names a run's two TensorBoard runs ``<run>/train`` and ``<run>/eval``.
"""
from __future__ import annotations

from core.errors import UserError
from core.io import storage


# TensorBoard event directories under a run directory (earlier versions: ``tb`` and ``eval/tb``).
TRAIN_EVENTS = "train"
EVAL_EVENTS = "eval"


def config_path(run_dir: str) -> str:
  return storage.join(run_dir, "config.gin")


def metrics_path(run_dir: str) -> str:
  return storage.join(run_dir, "metrics.jsonl")


def checkpoints_dir(run_dir: str) -> str:
  return storage.join(run_dir, "checkpoints")


def results_path(run_dir: str) -> str:
  return storage.join(run_dir, "eval", "results.jsonl")


def job_path(run_dir: str) -> str:
  return storage.join(run_dir, "job.json")


def throughput_path(workdir: str) -> str:
  return storage.join(workdir, "throughput.jsonl")


def is_run(run_dir: str) -> bool:
  """Whether core.train has written this run's config.gin."""
  return storage.exists(config_path(run_dir))


def read_config(run_dir: str) -> str:
  """The text of the run's config.gin; a UserError naming the fix when there is none."""
  path = config_path(run_dir)
  if not storage.exists(path):
    raise UserError(f"{path} does not exist: is {run_dir} a run directory written by core.train?")
  return storage.read_text(path)
