"""``mode=throughput``: steps/s of each row of Tables 4 and 5, on synthetic data, on this device.

The paper reports relative training speed (Table 4: blocks at the 16x16 level, 1.14 / 1.00 / 0.76 /
0.62; Table 5: input downsampling at 512, 1.00 / 1.39 / 1.46 / 1.37 / 1.46). We time the real
training step (core.benchmark.train_benchmark) of each row's configuration at the chosen scale on
random images, so the relative columns can be regenerated on any machine; ``batch_size`` overrides
the scale's batch (the paper's 512 does not fit one GPU; relative speed is what is compared).
Results are appended to ``<workdir>/throughput.jsonl``, where ``tables.render`` reads them.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax

from core import benchmark
from core.errors import UserError
from core.io import jsonl, rundir, storage
from experiments import jobs, registry


def measure(entries, scale: str, workdir: str, job_train_args: Sequence[Sequence[str]], *,
            batch_size: int | None = None, steps: int = 10, warmup: int = 2) -> list[dict]:
  """Times ``steps`` training steps (after ``warmup``) for each job; appends one row per table row.

  ``job_train_args[i]``: the ``core.train`` arguments of the i-th job of ``registry.jobs(entries)``.
  """
  if not any(e.throughput for e in entries):
    raise UserError("mode=throughput measures the rows of Tables 4 and 5; choose table=4 or "
                    "table=5")
  rows = []
  for job, args in zip(registry.jobs(entries), job_train_args):
    if not any(e.throughput for e in job.entries):
      continue
    model, cfg, logsnr_fn = jobs.build(args)
    if batch_size:
      cfg = dataclasses.replace(cfg, batch_size=batch_size)
    res = benchmark.train_benchmark(model, logsnr_fn, cfg, steps=steps, warmup=warmup)
    sps = res["steps_per_sec"]
    for e in job.entries:
      if not e.throughput:
        continue
      row = {"table": e.table, "group": e.group, "row": e.row, "steps_per_sec": sps,
             "img_per_sec": sps * cfg.batch_size, "batch_size": cfg.batch_size, "scale": scale,
             "mfu": res["mfu"], "device": jax.devices()[0].device_kind,
             "device_count": jax.device_count(),
             "time": time.time()}
      rows.append(row)
      print(f"T{e.table} {e.row}: {sps:.3f} steps/s ({row['img_per_sec']:.1f} img/s, batch "
            f"{cfg.batch_size}, {row['device']})", flush=True)
  storage.makedirs(workdir)
  jsonl.append(rundir.throughput_path(workdir), rows)
  return rows
