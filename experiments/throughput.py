"""``mode=throughput``: steps/s of each row of Tables 4 and 5, on synthetic data, on this device.

The paper reports relative training speed (Table 4: blocks at 16x16; Table 5: downsampling). We
time the real training step of each row's configuration at the chosen scale on random images, so
the relative columns can be regenerated on any machine; results go to ``<workdir>/throughput.jsonl``
where ``tables.render`` reads them.
"""
from __future__ import annotations

import json
import time

import jax

from core import storage


def measure(entries, scale: str, workdir: str, *, steps: int = 10, warmup: int = 2) -> list[dict]:
  """Times ``steps`` training steps (after ``warmup``) for each throughput row; appends results."""
  from core import trainer as train_lib  # pylint: disable=import-outside-toplevel
  from experiments import plan  # pylint: disable=import-outside-toplevel
  from experiments import registry  # pylint: disable=import-outside-toplevel
  rows = []
  entries = [e for e in entries if e.throughput]
  if not entries:
    from core.errors import UserError  # pylint: disable=import-outside-toplevel
    raise UserError("mode=throughput measures the rows of Tables 4 and 5; choose table=4 or table=5")
  for job in registry.jobs(entries):
    model, cfg = plan._build(job, scale)  # pylint: disable=protected-access
    import gin  # pylint: disable=import-outside-toplevel
    logsnr_fn = gin.query_parameter("train.logsnr_fn").scoped_configurable_fn()
    sps = train_lib.time_train_steps(model, logsnr_fn, cfg, steps=steps, warmup=warmup)["steps_per_sec"]
    for e in job.entries:
      row = {"table": e.table, "group": e.group, "row": e.row, "steps_per_sec": sps,
             "img_per_sec": sps * cfg.batch_size, "batch_size": cfg.batch_size, "scale": scale,
             "device": jax.devices()[0].device_kind, "device_count": jax.device_count(), "time": time.time()}
      rows.append(row)
      print(f"T{e.table} {e.row}: {sps:.3f} steps/s ({row['img_per_sec']:.1f} img/s, batch {cfg.batch_size}, "
            f"{row['device']})", flush=True)
  storage.makedirs(workdir)
  storage.append_lines(storage.join(workdir, "throughput.jsonl"), [json.dumps(r) for r in rows])
  return rows
