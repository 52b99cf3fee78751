"""Train (or resume) one run: ``python -m core.train gin_file=... workdir=... [Gin.bindings=...]``.

The trainer itself (gin configurables, the loop) is core/trainer.py; this module is only the
command line, so that ``python -m`` does not register the configurables twice. Invalid gin
bindings and unknown names fail here, before anything is compiled, with a one-line message.
Exit status: 0 finished (or reached ``stop_at_step``), 2 a mistake to fix (one ``error:`` line),
75 preempted by SIGTERM after writing a checkpoint (rerun the same command to resume). A SIGTERM
that arrives while the command starts (importing JAX, which takes seconds, or joining
``jax.distributed``) is kept and stops the run after its first step (core/trainer.py).
"""
from __future__ import annotations

from core import errors

if __name__ == "__main__":
  errors.defer_sigterm()  # before the slow imports below (not when imported as a library)

import json  # noqa: E402  (after defer_sigterm, on purpose)
from typing import Any, Sequence  # noqa: E402

import jax  # noqa: E402

from core import cli  # noqa: E402
from core import config as config_lib  # noqa: E402
from core.errors import UserError, run_main  # noqa: E402
from core import trainer  # noqa: E402

# A run the hint can name: the paper's ImageNet 128 U-Net at demo scale (files under gin/).
EXAMPLE_GIN_FILES = ("gin_file=models/unet_imagenet128.gin gin_file=train/unet_imagenet.gin "
                     "gin_file=scales/demo.gin")

OPTIONS = [
    cli.Option("gin_file", None, "gin file(s) defining the run; repeat to layer several",
               repeated=True),
    cli.Option("workdir", None,
               "run directory (local path or gs://bucket/prefix); resumed if it has checkpoints"),
    cli.Option("coordinator", None, "multi-host: coordinator address host:port for jax.distributed "
               "(on Cloud TPU leave unset and pass distributed=true: it is read from the "
               "environment)"),
    cli.Option("num_processes", None, "multi-host: number of processes", parse=int),
    cli.Option("process_id", None, "multi-host: this process's index", parse=int),
    cli.Option("distributed", False, "call jax.distributed.initialize() (TPU pods, SLURM, ...)",
               parse=cli.parse_bool),
    cli.Option("stop_at_step", None, "stop (after checkpointing) at this step, for staged runs",
               parse=int),
]


def initialize_distributed(opts: dict[str, Any]) -> None:
  """jax.distributed from explicit options (localhost tests) or the environment (TPU, SLURM)."""
  if opts.get("coordinator"):
    jax.distributed.initialize(coordinator_address=opts["coordinator"],
                               num_processes=opts["num_processes"],
                               process_id=opts["process_id"])
  elif opts.get("distributed"):
    jax.distributed.initialize()


def main(argv: Sequence[str]) -> int:
  opts, bindings = cli.parse(argv, OPTIONS, prog="core.train", description=__doc__.split("\n\n")[0])
  if not opts["gin_file"]:
    raise UserError(f"give at least one gin_file=..., e.g. {EXAMPLE_GIN_FILES} (files under gin/; "
                    f"python -m experiments.run table=2 dry_run=true prints complete commands)")
  if not opts["workdir"]:
    raise UserError("give workdir=<run directory> (a local path or gs://bucket/prefix)")
  config_lib.parse(opts["gin_file"], bindings)  # fails here, before any compile, on a bad binding
  initialize_distributed(opts)
  # stop_at_step= given here wins over a gin binding of train.stop_at_step (a snapshot row's).
  stop = {} if opts["stop_at_step"] is None else {"stop_at_step": opts["stop_at_step"]}
  summary = trainer.train(opts["workdir"], **stop)  # may raise Preempted
  print(json.dumps(summary), flush=True)
  return 0


if __name__ == "__main__":
  run_main(main)
