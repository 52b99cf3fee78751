"""The front door: train, evaluate and record every row of a paper table.

    python -m experiments.run table=5 [row=...] [scale=paper|demo|smoke] [launcher=local|tpu|slurm]
                              [workdir=...] [mode=run|plan|throughput|status]
                              [batch_size=N] [grad_accum=K] [steps=N] [Train.log_every=...]

Rows with identical configurations are one job (experiments/jobs.py); ``mode=run`` trains or
resumes each, evaluates its final step and records it for ``python -m tables.render``;
``mode=plan`` prints cost and memory, ``mode=throughput`` steps/s (Tables 4, 5), ``mode=status``
each job's progress (and, launcher=slurm, its SLURM job and state). batch_size=, grad_accum= and
steps= change a row's training (e.g. the paper's batch in 8 micro-batches on one GPU,
docs/one_gpu.md): the run gets its own name and the tables mark the row. SIGTERM stops the
command with exit status 75 (after the trainer's checkpoint, or mid-evaluation, which resumes
too): rerunning it resumes.
"""
from __future__ import annotations

from core import errors

if __name__ == "__main__":
  errors.defer_sigterm()  # before the slow imports below: StopOnSigterm takes it in main()

import json  # noqa: E402  (after defer_sigterm, on purpose)
import os  # noqa: E402
import sys  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import jax  # noqa: E402

from core import cli  # noqa: E402
from core.data import coco  # noqa: E402
from core.errors import UserError, run_main  # noqa: E402
from core.io import storage  # noqa: E402
from eval.inception import RESIZE_MODES  # noqa: E402
from experiments import jobs, launchers, registry, scales, slurm, throughput, tpu  # noqa: E402
from experiments import plan as plan_lib  # noqa: E402


def _positive_int(s: str) -> int:
  v = int(s)
  if v < 1:
    raise ValueError(f"expected an integer >= 1, got {s!r}")
  return v


OPTIONS = [
    cli.Option("table", None, f"which table: {', '.join(registry.TABLES)}"),
    cli.Option("row", None,
               "only these rows (comma-separated labels as printed in the paper, or group/label)",
               parse=lambda s: [r.strip() for r in s.split(",") if r.strip()]),
    cli.Option("scale", "demo",
               "paper (appendix B settings, needs accelerators and ImageNet), demo (built-in "
               "emoji data, CPU minutes) or smoke (tiny, for tests)", choices=scales.SCALES),
    cli.Option("mode", "run",
               "run: train+evaluate+record; plan: list jobs and costs; throughput: measure "
               "steps/s of Tables 4 and 5 rows; status: each job's progress (launcher=slurm: "
               "and its SLURM job)", choices=("run", "plan", "throughput", "status")),
    cli.Option("launcher", "local",
               "local: this machine, one job after another; tpu: a SkyPilot managed job per "
               "job on a Cloud TPU slice (docs/tpu.md); slurm: one sbatch script per job "
               "(clusters; docs/cluster.md)",
               choices=launchers.LAUNCHERS),
    cli.Option("workdir", None, "where run directories go (local or gs://); default runs/<scale>"),
    cli.Option("data_dir", None, "prepared data set (paper scale, launcher=tpu: ImageNet at the "
               "rows' resolution; {res} in it becomes each job's, e.g. gs://bucket/imagenet{res})"),
    cli.Option("format", "text", "output of mode=plan", choices=("text", "json")),
    cli.Option("dry_run", False, "print the commands instead of running them",
               parse=cli.parse_bool),
    cli.Option("eval", True, "evaluate after training", parse=cli.parse_bool),
    cli.Option("eval_in_background", False,
               "launcher=local: evaluate each trained job in an eval.worker subprocess while "
               "the next job trains (one evaluation at a time)", parse=cli.parse_bool),
    cli.Option("parallel", 1,
               "launcher=local: train up to N jobs at once, each in its own process, then "
               "evaluate them in turn (on a small CPU one process leaves cores idle)",
               parse=_positive_int),
    cli.Option("batch_size", None,
               "images per optimizer step instead of the row's (paper scale: the paper's 512 or "
               "2048); the learning rate stays the row's. The run gets its own name and the "
               "tables mark the row", parse=_positive_int),
    cli.Option("grad_accum", None,
               "each step's batch in N micro-batches, one after another: the same update in the "
               "activation memory of batch_size/N images (e.g. the paper's 512 on one GPU: "
               "grad_accum=8); named and marked like batch_size", parse=_positive_int),
    cli.Option("steps", None,
               "training steps instead of the row's (a row that trains a fraction of its "
               "model's steps keeps the fraction); named and marked like batch_size",
               parse=_positive_int),
    cli.Option("num_samples", None, "override the number of evaluation samples", parse=int),
    cli.Option("extractor", "auto",
               "Inception source for FID/IS: auto, clean-fid, fid-helper or a .pt path"),
    cli.Option("resize", "legacy_tensorflow",
               "FID/KID resize to 299: legacy_tensorflow (the paper's, ADM's "
               "evaluator) or clean (clean-fid)", choices=RESIZE_MODES),
    cli.Option("clip_model", None, "text-to-image rows: CLIP for the CLIP score (default: "
               "openai/clip-vit-large-patch14 at paper scale; none at demo/smoke, where no CLIP "
               "weights are at hand offline: give a local directory to score)"),
    cli.Option("tpu_type", None,
               "tpu launcher: Cloud TPU slice (default: v4-64 for U-Nets, the paper's 32 v2 "
               "chips; v4-256 for U-ViTs, its 128 v4 chips; docs/tpu.md)"),
    cli.Option("tpu_zone", None,
               "tpu launcher: zone (default: one offering the slice's generation, e.g. "
               "us-central2-b for v4)"),
    cli.Option("tpu_spot", False,
               "tpu launcher: spot slices (cheaper, preemptible: SkyPilot relaunches and the "
               "run resumes)", parse=cli.parse_bool),
    cli.Option("repo_url", None,
               "tpu launcher: the hosts clone this git URL at the launched commit (default: "
               "the commit is uploaded)"),
    cli.Option("sky", "sky", "tpu launcher: SkyPilot's sky command (its own environment: "
               "docs/tpu.md)"),
    cli.Option("accelerator", "H100",
               "plan (local/slurm): GPU kind planned for, e.g. H100, H200, A100"),
    cli.Option("devices", 1, "plan (launcher=local): devices planned for", parse=int),
    cli.Option("aot", False,
               "plan: also compile each job's sharded training step on faked CPU devices "
               "and report XLA's per-device memory", parse=cli.parse_bool),
    cli.Option("aot_devices", 8, "plan aot=true: CPU devices to fake (FSDP over all)", parse=int),
    cli.Option("nodes", 1, "slurm launcher: nodes per job", parse=int),
    cli.Option("gpus_per_node", 8,
               "slurm launcher: GPUs per node, one task (JAX process) each; 0: CPU-only nodes",
               parse=int),
    cli.Option("tasks_per_node", None,
               "slurm launcher: tasks (JAX processes) per node (default: one per GPU, 1 without "
               "GPUs)", parse=_positive_int),
    cli.Option("cpus_per_task", 8,
               "slurm launcher: CPU cores per task (grain's readers, XLA's threads)",
               parse=_positive_int),
    cli.Option("mem_per_cpu", "8G", "slurm launcher: memory per core (sbatch --mem-per-cpu)"),
    cli.Option("partition", None, "slurm launcher: partition"),
    cli.Option("account", None, "slurm launcher: account"),
    cli.Option("slurm_time", "2-00:00:00",
               "slurm launcher: time limit of each run of a job (it requeues itself at the "
               "limit and resumes)"),
    cli.Option("slurm_logs", None,
               "slurm launcher: folder for the jobs' scripts and output (default: slurm/ beside "
               "the run directories)"),
    cli.Option("repo_dir", None,
               "slurm launcher: this repository on the cluster (default: the submit dir)"),
    cli.Option("python", None,
               "slurm launcher: python on the nodes (default <repo_dir>/.venv/bin/python)"),
    cli.Option("wait", False,
               "slurm launcher: after submitting (or with mode=status), wait until the jobs "
               "leave the queue, print their status and fail if one did not finish",
               parse=cli.parse_bool),
    cli.Option("poll_seconds", 30.0, "slurm launcher, wait=true: how often to ask squeue",
               parse=float),
    cli.Option("throughput_batch", None, "mode=throughput: global batch (default: the scale's)",
               parse=int),
    cli.Option("throughput_steps", 10, "mode=throughput: timed steps per row", parse=int),
]


def check_device(scale: str, launcher: str, job_list: list[registry.Job], workdir: str,
                 opts: dict[str, Any]) -> None:
  """Refuses paper scale on a machine without accelerators, saying what it would cost."""
  if scale == "paper" and launcher == "local" and jax.default_backend() == "cpu":
    planned = plan_lib.plan_jobs(job_list, scale, workdir, opts)
    total = sum(p["estimated_hours"] or 0 for p in planned)
    raise UserError(
        f"scale=paper needs accelerators: these {len(planned)} job(s) cost about {total:,.0f} "
        f"accelerator-hours "
        f"at paper settings; this machine has only a CPU. Run scale=demo here, or "
        f"launcher=tpu|slurm (see mode=plan)")


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
  for job in job_list:
    if scale == "paper" and "clip_score" in job.metrics:  # Table 8's FID@30K on COCO val2014
      coco.check_paper_eval_set(data_dir.replace("{res}", str(job.resolution)))


def main(argv: Sequence[str]) -> int:
  # SIGTERM outside the trainer's loop (which checkpoints first) stops the command too, with exit
  # status 75 even where a library wrapped the stop in an error of its own (orbax, restoring the
  # checkpoint an in-process evaluation samples from).
  with errors.StopOnSigterm():
    return _main(argv)


def _main(argv: Sequence[str]) -> int:
  opts, bindings = cli.parse(argv, OPTIONS, prog="experiments.run",
                             description=__doc__.split("\n\n")[0] + "\n\nGin bindings: only "
                             + ", ".join(jobs.RUN_BINDINGS) + " (how a run logs and checkpoints)")
  table = opts["table"]
  if opts["mode"] == "throughput" and table is None:
    table = "4"
  if table is None:
    raise UserError(f"give table=N; valid tables: {', '.join(registry.TABLES)}")
  entries = registry.select(str(table), opts["row"])
  scale = opts["scale"]
  job_list = [jobs.with_overrides(j, scale, batch_size=opts["batch_size"],
                                  grad_accum=opts["grad_accum"], steps=opts["steps"],
                                  bindings=bindings) for j in registry.jobs(entries)]
  workdir = opts["workdir"] or os.path.join("runs", scale)
  if opts["mode"] == "plan":
    if opts["aot"]:  # before JAX starts its CPU backend
      jax.config.update("jax_num_cpu_devices", opts["aot_devices"])
    planned = plan_lib.plan_jobs(job_list, scale, workdir, opts)
    print(json.dumps(planned,
                     indent=1) if opts["format"] == "json" else plan_lib.format_text(planned))
    return 0
  if opts["mode"] == "status":
    return _status(job_list, workdir, opts)
  if opts["mode"] == "throughput":
    throughput.measure(entries, scale, workdir,
                       [jobs.job_args(j, scale, "unused", None) for j in job_list],
                       batch_size=opts["throughput_batch"], steps=opts["throughput_steps"])
    return 0
  if not opts["dry_run"]:  # a dry run prints the commands anywhere
    check_device(scale, opts["launcher"], job_list, workdir, opts)  # first: it says what jobs cost
  check_data(scale, opts["launcher"], opts["data_dir"], job_list)
  return _run_jobs(job_list, table, scale, workdir, opts)


def _run_jobs(job_list: list[registry.Job], table: str, scale: str, workdir: str,
              opts: dict[str, Any]) -> int:
  if opts["launcher"] == "slurm":
    return _run_slurm(job_list, scale, workdir, opts)
  if opts["launcher"] == "tpu":
    # Refuse before launching any.
    plan_lib.check_fits(plan_lib.plan_jobs(job_list, scale, workdir, opts))
    tpu.launch(job_list, scale, workdir, opts)
    return 0
  background = opts["eval_in_background"] and opts["eval"] and not opts["dry_run"]
  evals = launchers.EvalQueue() if background else None
  try:
    if opts["parallel"] > 1 and not opts["dry_run"]:
      launchers.run_local_parallel(job_list, scale, workdir, opts, opts["parallel"], evals)
    else:
      for job in job_list:
        launchers.run_local(job, scale, workdir, opts, evals)
    if evals is not None:
      evals.finish()
  finally:
    if evals is not None:
      evals.stop()
  if opts["dry_run"]:
    print(f"dry run: printed the commands of {len(job_list)} job(s); nothing was run",
          file=sys.stderr)
  else:
    print(f"done: {len(job_list)} job(s) in {workdir}; render with: python -m tables.render "
          f"table={table} workdir={workdir}", file=sys.stderr)
  return 0


def _run_slurm(job_list: list[registry.Job], scale: str, workdir: str,
               opts: dict[str, Any]) -> int:
  """One sbatch script per job (experiments/slurm.py), each job's job.json written first; with
  wait=true, waits for them and fails naming any that did not finish."""
  if opts["gpus_per_node"]:  # refuse before launching any (CPU nodes: nothing to check)
    plan_lib.check_fits(plan_lib.plan_jobs(job_list, scale, workdir, opts))
  prepared = []
  for job in job_list:
    run_dir = storage.join(workdir, job.name)
    t_args = jobs.job_args(job, scale, run_dir, opts["data_dir"])
    e_args = jobs.eval_args(job, scale, run_dir, opts) if opts["eval"] else None
    prepared.append((job, run_dir, slurm.script(job, t_args, e_args, opts)))
    if not opts["dry_run"]:  # the rows the run serves, for tables.render
      try:
        jobs.write_job_json(job, scale, run_dir, t_args)
      except OSError as e:
        raise UserError(f"cannot write to {run_dir} ({e.strerror or e}); choose a writable "
                        f"workdir= on storage every node mounts") from None
  slurm.submit(prepared, dry_run=opts["dry_run"])
  if opts["wait"] and not opts["dry_run"]:
    slurm.wait(job_list, workdir, poll_seconds=opts["poll_seconds"], eval_too=opts["eval"])
  return 0


def _status(job_list: list[registry.Job], workdir: str, opts: dict[str, Any]) -> int:
  """mode=status: each job's latest checkpoint and results (launcher=slurm: and SLURM's view);
  with wait=true, after the jobs have left the queue."""
  if opts["launcher"] == "slurm" and opts["wait"]:
    slurm.wait(job_list, workdir, poll_seconds=opts["poll_seconds"], eval_too=opts["eval"])
    return 0
  if opts["launcher"] == "slurm":
    rows = slurm.status(job_list, workdir)
  else:
    rows = [{"job": j.name, "slurm_job": "", "state": "",
             **slurm.progress(storage.join(workdir, j.name))} for j in job_list]
  print(slurm.format_status(rows), flush=True)
  return 0


if __name__ == "__main__":
  run_main(main)
