"""``mode=plan``: what each job is and what it costs, before anything runs."""
from __future__ import annotations

import functools
import json
from typing import Any

import jax

from core import config as config_lib
from core import storage

# Without a measurement, cost is estimated at this utilisation of one H100's dense bf16 peak.
ASSUMED_MFU = 0.4
ASSUMED_PEAK = 989e12


def _build(job, scale: str):
  """Parses the job's gin at ``scale`` and returns (model, TrainConfig)."""
  from core import trainer as train_lib  # pylint: disable=import-outside-toplevel
  from core.models import make_model  # pylint: disable=import-outside-toplevel
  from experiments import run  # pylint: disable=import-outside-toplevel
  args = run.job_args(job, scale, "unused", None)
  files = [a.split("=", 1)[1] for a in args if a.startswith("gin_file=")]
  binds = [a for a in args if not a.startswith(("gin_file=", "workdir="))]
  config_lib.parse(files, binds)
  return make_model(), train_lib.TrainConfig()


def _measured_img_per_sec(job, workdir: str) -> float | None:
  path = storage.join(workdir, "throughput.jsonl")
  if not storage.exists(path):
    return None
  keys = {(e.table, e.group, e.row) for e in job.entries}
  best = None
  for line in storage.read_text(path).splitlines():
    try:
      r = json.loads(line)
    except json.JSONDecodeError:
      continue
    if (str(r.get("table")), r.get("group"), r.get("row")) in keys:
      best = r.get("img_per_sec")
  return best


def describe(job, scale: str, workdir: str) -> dict[str, Any]:
  """Row labels, run name, resolution, parameters, FLOPs per image, batch, steps, time estimate."""
  model, cfg = _build(job, scale)
  from core import trainer as train_lib  # pylint: disable=import-outside-toplevel
  nc = int(getattr(model, "num_classes", 0) or 0)
  state = jax.eval_shape(functools.partial(train_lib.init_state, model, train_lib.make_optimizer(cfg), cfg,
                                           num_classes=nc), jax.random.key(0))
  params = sum(int(a.size) for a in jax.tree.leaves(state["params"]))
  fwd = train_lib.forward_flops(model, cfg)
  images = cfg.num_steps * cfg.batch_size
  measured = _measured_img_per_sec(job, workdir)
  img_per_sec = measured or ASSUMED_MFU * ASSUMED_PEAK / (3 * fwd)
  return {
      "rows": [f"T{e.table} {e.group} / {e.row}" for e in job.entries],
      "run_name": job.name,
      "scale": scale,
      "resolution": cfg.image_size,
      "params": params,
      "gflops_per_image": fwd / 1e9,
      "batch_size": cfg.batch_size,
      "steps": cfg.num_steps,
      "estimated_hours": images / img_per_sec / 3600.0,
      "estimate_basis": (f"measured {measured:.1f} img/s" if measured else
                         f"assumed {ASSUMED_MFU:.0%} MFU of one H100"),
  }


def format_text(planned: list[dict[str, Any]]) -> str:
  lines = []
  for p in planned:
    lines.append(f"{p['run_name']}  ({p['scale']}, {p['resolution']}x{p['resolution']})")
    for r in p["rows"]:
      lines.append(f"    {r}")
    lines.append(f"    params {p['params'] / 1e6:,.1f}M  forward {p['gflops_per_image']:,.3g} GFLOP/image  "
                 f"batch {p['batch_size']}  steps {p['steps']:,}  ~{p['estimated_hours']:,.3g} accelerator-hours "
                 f"({p['estimate_basis']})")
  total = sum(p["estimated_hours"] for p in planned)
  lines.append(f"{len(planned)} job(s), about {total:,.1f} accelerator-hours in total")
  return "\n".join(lines)
