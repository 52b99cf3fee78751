"""The front door: train, evaluate and record every row of a paper table.

    python -m experiments.run table=5 [row=...] [scale=paper|demo|smoke] [launcher=local|tpu]
                              [workdir=...] [mode=run|plan|throughput]

For each job of the table (rows with identical configurations are one job), ``mode=run`` trains or
resumes it, evaluates its last checkpoint (FID train, FID eval, IS; the Table 9 guidance sweep), and
records ``job.json`` and ``eval/results.jsonl`` in ``<workdir>/<run name>``, where
``python -m tables.render`` finds them. Jobs already complete are skipped; partial ones resume.
``mode=plan`` lists the jobs with their cost; ``mode=throughput`` measures steps/s for the rows of
Tables 4 and 5 on synthetic data on this machine.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

from core import cli
from core import storage
from core.errors import UserError, run_main
from eval.inception import RESIZE_MODES
from experiments import launchers, registry, scales

# Evaluation size per scale (the paper: 50K samples, 256 sampler steps is our default). Demo rows
# keep their 500 samples as an npz and compare them with whole splits (FID with a bootstrap spread,
# and KID); smoke compares 16 samples with a prefix of each split. All scales resize the paper's
# way (legacy_tensorflow) unless resize= says otherwise.
EVAL = {
    "paper": {"num_samples": None, "sampler_steps": 256, "batch_size": 256, "max_reference_images": None,
              "save_samples": "grid"},
    "demo": {"num_samples": 500, "sampler_steps": 64, "batch_size": 100, "max_reference_images": None,
             "save_samples": "npz"},
    "smoke": {"num_samples": 16, "sampler_steps": 4, "batch_size": 8, "max_reference_images": 32,
              "save_samples": "npz"},
}

OPTIONS = [
    cli.Option("table", None, f"which table: {', '.join(registry.TABLES)}"),
    cli.Option("row", None, "only these rows (comma-separated labels as printed in the paper, or group/label)",
               parse=lambda s: [r.strip() for r in s.split(",") if r.strip()]),
    cli.Option("scale", "demo", "paper (appendix B settings, needs accelerators and ImageNet), demo (built-in "
               "emoji data, CPU minutes) or smoke (tiny, for tests)", choices=scales.SCALES),
    cli.Option("mode", "run", "run: train+evaluate+record; plan: list jobs and costs; throughput: measure "
               "steps/s of Tables 4 and 5 rows", choices=("run", "plan", "throughput")),
    cli.Option("launcher", "local", "local: this machine, one job after another; tpu: Cloud TPU VM slices",
               choices=launchers.LAUNCHERS),
    cli.Option("workdir", None, "where run directories go (local or gs://); default runs/<scale>"),
    cli.Option("data_dir", None, "prepared data set (paper scale: ImageNet at the row's resolution)"),
    cli.Option("format", "text", "output of mode=plan", choices=("text", "json")),
    cli.Option("dry_run", False, "print the commands instead of running them", parse=cli.parse_bool),
    cli.Option("eval", True, "evaluate after training", parse=cli.parse_bool),
    cli.Option("num_samples", None, "override the number of evaluation samples", parse=int),
    cli.Option("extractor", "auto", "Inception source for FID/IS: auto, clean-fid, fid-helper or a .pt path"),
    cli.Option("resize", "legacy_tensorflow", "FID/KID resize to 299: legacy_tensorflow (the paper's, ADM's "
               "evaluator) or clean (clean-fid)", choices=RESIZE_MODES),
    cli.Option("tpu_zone", "us-central2-b", "tpu launcher: zone"),
    cli.Option("tpu_type", None, "tpu launcher: accelerator type (default: the paper's, e.g. v4-256)"),
    cli.Option("tpu_project", None, "tpu launcher: GCP project"),
    cli.Option("repo_url", None, "tpu launcher: git URL of this repository to check out on the workers"),
]


def job_args(job: registry.Job, scale: str, run_dir: str, data_dir: str | None) -> list[str]:
  """The exact ``python -m core.train`` arguments for a job at a scale."""
  args = [f"gin_file={f}" for f in job.gin_files]
  binds = list(job.bindings) + scales.scale_bindings(job.gin_files, job.bindings, job.arch, job.resolution, scale)
  if data_dir:
    binds.append(f"Train.data_dir = '{data_dir}'")
  args += [b.replace(" ", "") for b in binds]
  args.append(f"workdir={run_dir}")
  return args


def eval_args(job: registry.Job, scale: str, run_dir: str, opts: dict[str, Any]) -> list[str]:
  ev = EVAL[scale]
  n = opts["num_samples"] or ev["num_samples"] or job.num_samples
  return [f"workdir={run_dir}", f"num_samples={n}", "guidance=" + ",".join(f"{w:g}" for w in job.guidances),
          f"batch_size={ev['batch_size']}", f"sampler_steps={ev['sampler_steps']}",
          f"noise_param={job.noise_param}", f"extractor={opts['extractor']}",
          f"resize={opts.get('resize') or 'legacy_tensorflow'}", f"save_samples={ev['save_samples']}",
          "once=true"] + (
              [f"max_reference_images={ev['max_reference_images']}"] if ev["max_reference_images"] else [])


def write_job_json(job: registry.Job, scale: str, run_dir: str, args: list[str]) -> None:
  """Records which table rows the run serves (merged with rows recorded by earlier invocations)."""
  path = storage.join(run_dir, "job.json")
  rows = job.rows_json()
  if storage.exists(path):
    old = json.loads(storage.read_text(path))
    rows = old.get("rows", []) + [r for r in rows if r not in old.get("rows", [])]
  storage.makedirs(run_dir)
  storage.write_text(path, json.dumps({
      "run_name": job.name, "scale": scale, "arch": job.arch, "resolution": job.resolution,
      "gin_files": list(job.gin_files), "bindings": list(job.bindings), "train_args": args, "rows": rows,
  }, indent=1))


def is_trained(run_dir: str) -> bool:
  from core import trainer as train_lib  # pylint: disable=import-outside-toplevel
  if not storage.exists(storage.join(run_dir, "config.gin")):
    return False
  last = _latest_step(run_dir)
  return last is not None and last >= _configured_steps(run_dir, train_lib)


def _latest_step(run_dir: str) -> int | None:
  from core import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  if not storage.exists(storage.join(run_dir, "checkpoints")):
    return None
  c = ckpt_lib.Checkpointer(run_dir, with_data=False, async_save=False)
  try:
    return c.latest_step()
  finally:
    c.close()


def _configured_steps(run_dir: str, train_lib) -> int:
  import gin  # pylint: disable=import-outside-toplevel
  from core import config as config_lib  # pylint: disable=import-outside-toplevel
  config_lib.register_configurables()
  gin.clear_config()
  gin.parse_config(storage.read_text(storage.join(run_dir, "config.gin")))
  steps = train_lib.TrainConfig().num_steps
  gin.clear_config()
  return steps


def run_local(job: registry.Job, scale: str, workdir: str, opts: dict[str, Any]) -> None:
  from core import train as train_cli  # pylint: disable=import-outside-toplevel
  from eval import worker  # pylint: disable=import-outside-toplevel
  run_dir = storage.join(workdir, job.name)
  args = job_args(job, scale, run_dir, opts["data_dir"])
  e_args = eval_args(job, scale, run_dir, opts)
  if opts["dry_run"]:
    print("python -m core.train " + " ".join(_quote(a) for a in args))
    if opts["eval"]:
      print("python -m eval.worker " + " ".join(e_args))
    return
  write_job_json(job, scale, run_dir, args)
  rows = ", ".join(f"T{e.table} {e.group} {e.row}" for e in job.entries)
  if is_trained(run_dir):
    print(f"[{job.name}] trained already ({rows})", flush=True)
  else:
    print(f"[{job.name}] training ({rows})", flush=True)
    train_cli.main(args)
  if opts["eval"]:  # the worker evaluates only what these settings have not evaluated yet
    print(f"[{job.name}] evaluating", flush=True)
    before = len(worker.read_results(run_dir))
    worker.main(e_args)
    if len(worker.read_results(run_dir)) == before:
      print(f"[{job.name}] evaluated already (every result for these settings exists)", flush=True)


def _quote(a: str) -> str:
  return f'"{a}"' if any(c in a for c in " '[]()") else a


def check_device(scale: str, launcher: str, planned: list[dict[str, Any]]) -> None:
  """Refuses paper scale on a machine without accelerators, saying what it would cost."""
  import jax  # pylint: disable=import-outside-toplevel
  if scale == "paper" and launcher == "local" and jax.default_backend() == "cpu":
    total = sum(p["estimated_hours"] or 0 for p in planned)
    raise UserError(
        f"scale=paper needs accelerators: these {len(planned)} job(s) cost about {total:,.0f} accelerator-hours "
        f"at paper settings; this machine has only a CPU. Run scale=demo here, or launcher=tpu (see mode=plan)")


def main(argv: Sequence[str]) -> int:
  opts, bindings = cli.parse(argv, OPTIONS, prog="experiments.run", description=__doc__.split("\n\n")[0])
  if bindings:
    raise UserError(f"experiments.run takes no gin bindings (got {bindings[0]!r}); rows define their "
                    f"configuration: see experiments/registry.py")
  table = opts["table"]
  if opts["mode"] == "throughput" and table is None:
    table = "4"
  if table is None:
    raise UserError(f"give table=N; valid tables: {', '.join(registry.TABLES)}")
  entries = registry.select(str(table), opts["row"])
  job_list = registry.jobs(entries)
  scale = opts["scale"]
  workdir = opts["workdir"] or os.path.join("runs", scale)
  from experiments import plan as plan_lib  # pylint: disable=import-outside-toplevel
  if opts["mode"] == "plan":
    planned = [plan_lib.describe(j, scale, workdir) for j in job_list]
    print(json.dumps(planned, indent=1) if opts["format"] == "json" else plan_lib.format_text(planned))
    return 0
  if opts["mode"] == "throughput":
    from experiments import throughput  # pylint: disable=import-outside-toplevel
    throughput.measure(entries, scale, workdir)
    return 0
  if opts["launcher"] == "tpu":
    for job in job_list:
      run_dir = storage.join(workdir, job.name)
      cmds = launchers.tpu_commands(job, job_args(job, scale, run_dir, opts["data_dir"]),
                                    eval_args(job, scale, run_dir, opts), opts)
      launchers.execute(cmds, dry_run=opts["dry_run"])
    return 0
  check_device(scale, opts["launcher"], [plan_lib.describe(j, scale, workdir) for j in job_list]
               if scale == "paper" else [])
  for job in job_list:
    run_local(job, scale, workdir, opts)
  print(f"done: {len(job_list)} job(s) in {workdir}; render with: python -m tables.render table={table} "
        f"workdir={workdir}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  run_main(main)
