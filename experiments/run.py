"""The front door: train, evaluate and record every row of a paper table.

    python -m experiments.run table=5 [row=...] [scale=paper|demo|smoke] [launcher=local|tpu|slurm]
                              [workdir=...] [mode=run|plan|throughput]

For each job of the table (rows with identical configurations are one job), ``mode=run`` trains or
resumes it, evaluates its last checkpoint (FID train, FID eval, IS; the Table 9 guidance sweep), and
records ``job.json`` and ``eval/results.jsonl`` in ``<workdir>/<run name>``, where
``python -m tables.render`` finds them. Jobs already complete are skipped; partial ones resume.
``mode=plan`` lists the jobs with their bytes per device and cost on the accelerator they would
use; ``launcher=tpu|slurm`` refuses, before launching anything, a job that cannot fit.
``mode=throughput`` measures steps/s for the rows of Tables 4 and 5 on synthetic data here.

Only a finished run is evaluated: a row's result is always its run's final step. SIGTERM (a
scheduler's preemption notice) stops the whole command, after the trainer's checkpoint, with exit
status 75 (EX_TEMPFAIL; 2 is a mistake to fix): rerunning the same command resumes where it stopped.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any, Sequence

import jax

from core import cli
from core import storage
from core.errors import Preempted, UserError, run_main
from eval.inception import RESIZE_MODES

from experiments import launchers, registry, scales, throughput
from experiments import plan as plan_lib

# Evaluation size per scale (the paper: 50K samples, 256 sampler steps is our default). Demo rows
# keep their 500 samples as an npz and compare them with whole splits (FID with a bootstrap spread,
# and KID); smoke compares 16 samples with a prefix of each split. All scales resize the paper's
# way (legacy_tensorflow) unless resize= says otherwise.
EVAL = {
    "paper": {"num_samples": None, "sampler_steps": None, "batch_size": 256, "max_reference_images": None,
              "save_samples": "grid"},
    # Demo: 32 sampler steps (on the 1,000-step row "original at 128": FID train 150.4 +- 1.7 vs
    # 146.7 +- 1.6 at 64 steps, KID train 0.127 vs 0.128 +- 0.002) at half the sampling time.
    "demo": {"num_samples": 500, "sampler_steps": 32, "batch_size": 100, "max_reference_images": None,
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
    cli.Option("launcher", "local", "local: this machine, one job after another; tpu: Cloud TPU VM slices; "
               "slurm: one sbatch script per job (GPU clusters)", choices=launchers.LAUNCHERS),
    cli.Option("workdir", None, "where run directories go (local or gs://); default runs/<scale>"),
    cli.Option("data_dir", None, "prepared data set (paper scale, launcher=tpu: ImageNet at the "
               "rows' resolution; {res} in it becomes each job's, e.g. gs://bucket/imagenet{res})"),
    cli.Option("format", "text", "output of mode=plan", choices=("text", "json")),
    cli.Option("dry_run", False, "print the commands instead of running them", parse=cli.parse_bool),
    cli.Option("eval", True, "evaluate after training", parse=cli.parse_bool),
    cli.Option("num_samples", None, "override the number of evaluation samples", parse=int),
    cli.Option("extractor", "auto", "Inception source for FID/IS: auto, clean-fid, fid-helper or a .pt path"),
    cli.Option("resize", "legacy_tensorflow", "FID/KID resize to 299: legacy_tensorflow (the paper's, ADM's "
               "evaluator) or clean (clean-fid)", choices=RESIZE_MODES),
    cli.Option("clip_model", None, "text-to-image rows: CLIP for the CLIP score (default: "
               "openai/clip-vit-large-patch14 at paper scale; none at demo/smoke, where no CLIP "
               "weights are at hand offline: give a local directory to score)"),
    cli.Option("tpu_zone", "us-central2-b", "tpu launcher: zone"),
    cli.Option("tpu_type", None, "tpu launcher: accelerator type (default: the paper's, e.g. v4-256)"),
    cli.Option("tpu_project", None, "tpu launcher: GCP project"),
    cli.Option("repo_url", None, "tpu launcher: git URL of this repository to check out on the workers"),
    cli.Option("accelerator", "H100", "plan (local/slurm): GPU kind planned for, e.g. H100, H200, A100"),
    cli.Option("devices", 1, "plan (launcher=local): devices planned for", parse=int),
    cli.Option("aot", False, "plan: also compile each job's sharded training step on faked CPU devices "
               "and report XLA's per-device memory", parse=cli.parse_bool),
    cli.Option("aot_devices", 8, "plan aot=true: CPU devices to fake (FSDP over all)", parse=int),
    cli.Option("nodes", 1, "slurm launcher: nodes per job", parse=int),
    cli.Option("gpus_per_node", 8, "slurm launcher: GPUs (= tasks) per node", parse=int),
    cli.Option("partition", None, "slurm launcher: partition"),
    cli.Option("account", None, "slurm launcher: account"),
    cli.Option("slurm_time", "2-00:00:00", "slurm launcher: time limit per submission (resubmit to resume)"),
    cli.Option("repo_dir", None, "slurm launcher: this repository on the cluster (default: the submit dir)"),
    cli.Option("python", None, "slurm launcher: python on the nodes (default <repo_dir>/.venv/bin/python)"),
    cli.Option("throughput_batch", None, "mode=throughput: global batch (default: the scale's)", parse=int),
    cli.Option("throughput_steps", 10, "mode=throughput: timed steps per row", parse=int),
]


def job_args(job: registry.Job, scale: str, run_dir: str, data_dir: str | None) -> list[str]:
  """The exact ``python -m core.train`` arguments for a job at a scale."""
  args = [f"gin_file={f}" for f in job.gin_files]
  binds = list(job.bindings) + scales.scale_bindings(job.gin_files, job.bindings, job.arch, job.resolution, scale)
  if data_dir:
    binds.append(f"Train.data_dir = '{data_dir.replace('{res}', str(job.resolution))}'")
  args += [b.replace(" ", "") for b in binds]
  args.append(f"workdir={run_dir}")
  return args


def sampler_steps(job: registry.Job, scale: str) -> int:
  """The row's sampler steps at paper scale (a registry choice), the scale's own below it."""
  return EVAL[scale]["sampler_steps"] or job.sampler_steps


def eval_args(job: registry.Job, scale: str, run_dir: str, opts: dict[str, Any]) -> list[str]:
  ev = EVAL[scale]
  n = opts["num_samples"] or ev["num_samples"] or job.num_samples
  return [f"workdir={run_dir}", f"num_samples={n}", "guidance=" + ",".join(f"{w:g}" for w in job.guidances),
          f"batch_size={ev['batch_size']}", f"sampler_steps={sampler_steps(job, scale)}",
          f"noise_param={job.noise_param}", f"extractor={opts['extractor']}",
          f"resize={opts.get('resize') or 'legacy_tensorflow'}", f"save_samples={ev['save_samples']}",
          "once=true"] + (
              [f"max_reference_images={ev['max_reference_images']}"] if ev["max_reference_images"] else []) + (
              [f"clip_model={clip_model(job, scale, opts)}"] if "clip_score" in job.metrics else [])


def clip_model(job: registry.Job, scale: str, opts: dict[str, Any]) -> str:
  """The CLIP of a text-to-image row's CLIP score: the literature's ViT-L/14 at paper scale."""
  from eval.clip_score import DEFAULT_MODEL  # pylint: disable=import-outside-toplevel
  del job
  return opts.get("clip_model") or (DEFAULT_MODEL if scale == "paper" else "none")


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
  try:
    write_job_json(job, scale, run_dir, args)
  except OSError as e:
    raise UserError(f"cannot write to {run_dir} ({e.strerror or e}); choose a writable "
                    f"workdir=") from None
  rows = ", ".join(f"T{e.table} {e.group} {e.row}" for e in job.entries)
  if is_trained(run_dir):
    print(f"[{job.name}] trained already ({rows})", flush=True)
  else:
    print(f"[{job.name}] training ({rows})", flush=True)
    train_cli.main(args)  # raises Preempted on SIGTERM: nothing below runs
    if not is_trained(run_dir):  # only a finished run's final step is a row's result
      raise UserError(f"[{job.name}] stopped at step {_latest_step(run_dir)} before its last step; "
                      f"rerun the same command to resume it")
  if opts["eval"]:  # the worker evaluates only what these settings have not evaluated yet
    print(f"[{job.name}] evaluating", flush=True)
    before = len(worker.read_results(run_dir))
    worker.main(e_args)
    if len(worker.read_results(run_dir)) == before:
      print(f"[{job.name}] evaluated already (every result for these settings exists)", flush=True)


def _quote(a: str) -> str:
  return f'"{a}"' if any(c in a for c in " '[]()") else a


def check_device(scale: str, launcher: str, job_list: list[registry.Job], workdir: str,
                 opts: dict[str, Any]) -> None:
  """Refuses paper scale on a machine without accelerators, saying what it would cost."""
  if scale == "paper" and launcher == "local" and jax.default_backend() == "cpu":
    planned = plan_jobs(job_list, scale, workdir, opts)
    total = sum(p["estimated_hours"] or 0 for p in planned)
    raise UserError(
        f"scale=paper needs accelerators: these {len(planned)} job(s) cost about {total:,.0f} accelerator-hours "
        f"at paper settings; this machine has only a CPU. Run scale=demo here, or launcher=tpu|slurm (see mode=plan)")


def check_data(scale: str, launcher: str, data_dir: str | None,
               job_list: list[registry.Job]) -> None:
  """Paper scale and TPU pods train on ImageNet: the built-in emoji set is for demo and smoke."""
  if scale != "paper" and launcher != "tpu":
    return
  why = "scale=paper" if scale == "paper" else "launcher=tpu"
  if not data_dir:
    raise UserError(f"{why} needs data_dir=<prepared ImageNet at the rows' resolution> "
                    f"(python -m core.data prepare src=<imagenet dir> res=... out=gs://...); "
                    f"without it the runs would train on the built-in emoji set")
  res = sorted({j.resolution for j in job_list})
  if len(res) > 1 and "{res}" not in data_dir:
    raise UserError(f"these jobs train at {', '.join(map(str, res))} pixels: put {{res}} in "
                    f"data_dir (e.g. data_dir=gs://bucket/imagenet{{res}}), one prepared set per "
                    f"resolution")


def _stop_on_sigterm(signum, frame):  # pylint: disable=unused-argument
  raise Preempted("SIGTERM: stopped; rerun the same command to resume")


def plan_jobs(job_list: list[registry.Job], scale: str, workdir: str, opts: dict[str, Any]) -> list[dict[str, Any]]:
  """experiments.plan.describe of each job on the accelerator its launcher would use."""
  out = []
  for job in job_list:
    run_dir = storage.join(workdir, job.name)
    args = job_args(job, scale, run_dir, opts["data_dir"])
    if opts["launcher"] in ("tpu", "slurm"):
      args = [*args, launchers.SHARD_ALL]
    n = int(dict(a.split("=", 1) for a in eval_args(job, scale, run_dir, opts))["num_samples"])
    tgt = plan_lib.target(opts, job.arch, launchers.DEFAULT_TPU)
    p = plan_lib.describe(job, scale, workdir, args, tgt, sampler_steps=sampler_steps(job, scale), num_samples=n)
    if opts["aot"]:
      p["aot"] = plan_lib.aot(args)
    out.append(p)
  return out


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
  if opts["mode"] == "plan":
    if opts["aot"]:  # before JAX starts its CPU backend
      jax.config.update("jax_num_cpu_devices", opts["aot_devices"])
    planned = plan_jobs(job_list, scale, workdir, opts)
    print(json.dumps(planned, indent=1) if opts["format"] == "json" else plan_lib.format_text(planned))
    return 0
  if opts["mode"] == "throughput":
    throughput.measure(entries, scale, workdir, [job_args(j, scale, "unused", None) for j in job_list],
                       batch_size=opts["throughput_batch"], steps=opts["throughput_steps"])
    return 0
  check_device(scale, opts["launcher"], job_list, workdir, opts)  # first: it says what jobs cost
  check_data(scale, opts["launcher"], opts["data_dir"], job_list)
  # SIGTERM outside the trainer's loop (which checkpoints first) stops the command too.
  previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
  try:
    return _run_jobs(job_list, table, scale, workdir, opts)
  finally:
    signal.signal(signal.SIGTERM, previous)


def _run_jobs(job_list: list[registry.Job], table: str, scale: str, workdir: str,
              opts: dict[str, Any]) -> int:
  if opts["launcher"] in ("tpu", "slurm"):
    plan_lib.check_fits(plan_jobs(job_list, scale, workdir, opts))  # refuse before launching any
    scripts = {}
    for job in job_list:
      run_dir = storage.join(workdir, job.name)
      t_args, e_args = job_args(job, scale, run_dir, opts["data_dir"]), eval_args(job, scale, run_dir, opts)
      if opts["launcher"] == "tpu":
        launchers.execute(launchers.tpu_commands(job, t_args, e_args, opts), dry_run=opts["dry_run"])
      else:
        scripts[job.name] = launchers.slurm_script(job, t_args, e_args, opts)
    if scripts:
      launchers.submit_slurm(scripts, dry_run=opts["dry_run"], script_dir=os.path.join("runs", "slurm"))
    return 0
  for job in job_list:
    run_local(job, scale, workdir, opts)
  if opts["dry_run"]:
    print(f"dry run: printed the commands of {len(job_list)} job(s); nothing was run",
          file=sys.stderr)
  else:
    print(f"done: {len(job_list)} job(s) in {workdir}; render with: python -m tables.render "
          f"table={table} workdir={workdir}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  run_main(main)
