"""The prepared one-GPU check (issues 15, 29): throughput, memory and A/Bs in one JSON file, <= 8 min.

    python scripts/gpu_check.py [out=benchmarks/results] [budget_s=480] [smoke=true] [tables=true]
                                [only=train_uvit_benchmark256,sample_uvit_benchmark256]
    GPU_CHECK_SMOKE=1 python scripts/gpu_check.py out=/tmp/x      # tiny shapes, runs on a CPU

Stages, in order of importance, each ``python -m core.benchmark`` in its own process (so a stage
that runs out of memory or time is recorded and the next one still runs, and each stage's peak GPU
memory is its own), each with a time cap; the JAX compilation cache is on (with it XLA's per-fusion
autotuning results, so the A/B variants of one shape compile faster after the first):

- ``train_uvit_benchmark256``: the baseline, the configuration of the 2026-11-27 run
  (gin/models/uvit_benchmark256.gin, batch 32, bf16, nearest-then-conv up-sampling, no remat,
  XLA attention, threefry), with ``profile=2``: where the step's device time goes by kind, level
  and op;
- then one change at a time against it (docs/performance.md): ``_transposed`` (up-sampling as one
  transposed conv, the default off the CPU), ``_minimal`` (that + selective remat of the
  transformer blocks), ``train_uvit36_256`` (the 36-block 2.47B U-ViT with selective remat
  instead of full remat; full remat if that runs out of memory), ``train_unet256`` (the U-Net 256
  of B.1, its levels' blocks in one nn.scan each: compile time, MFU and a profile),
  ``sample_uvit_benchmark256`` (the jitted sampler, 32 guided steps of 2 x 64 images, weights cast
  once) and ``_noprecast`` (cast at every step, as before), ``_pallas`` (the Triton flash-attention
  kernel at head size 512), ``_rbg`` (Train.prng_impl='unsafe_rbg' against threefry), ``_all``
  (every training change together);
- ``table4``/``table5`` (``tables=true``, when time is left): experiments.run mode=throughput at
  paper shapes, batch 8, the relative steps/s columns.

Writes ``<out>/<device>-<date>.json`` (and a copy under ``$OUT`` when that is set, as on the device
machine) with img/s (sampling: image-forwards/s), TFLOP/s, MFU, compile seconds, compiled and peak
memory per stage, each stage's speed against the baseline, and the issue 29 targets met or not.
Smoke mode runs the same stages with tiny widths and images, to test this plumbing and the JSON
schema on a CPU (the Pallas kernel in interpret mode).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "simple-diffusion/gpu-check/2"
BENCH = "gin/models/uvit_benchmark256.gin"
UVIT36 = "gin/models/uvit_imagenet256.gin"
UNET256 = "gin/models/unet_imagenet256.gin"
BASELINE = "train_uvit_benchmark256"
# The compiled PyTorch port (lucidrains/denoising-diffusion-pytorch simple_diffusion.py) on one
# H100, bf16: img/s for training, image-forwards/s for sampling (issue 15's anchors).
PORT = {BASELINE: 173.0, "train_uvit36_256": 102.0, "sample_uvit_benchmark256": 745.0}
# Issue 29's targets (one H100, bf16): (what, stage(s) measuring it, metric, target).
TARGETS = (
    ("training at the benchmark shape (16 blocks, batch 32)",
     [BASELINE, "train_uvit_benchmark256_transposed", "train_uvit_benchmark256_minimal",
      "train_uvit_benchmark256_pallas", "train_uvit_benchmark256_rbg",
      "train_uvit_benchmark256_all"], "img_per_sec", 250.0),
    ("training with 36 blocks (2.47B) without full remat", ["train_uvit36_256"], "img_per_sec",
     150.0),
    ("sampling at the benchmark shape", ["sample_uvit_benchmark256"], "image_forwards_per_sec",
     1100.0),
    ("U-Net 256 (B.1) at batch 32: compiled in under 60 s, with MFU", ["train_unet256"],
     "compile_s", 60.0),
)

# Smoke shapes: every stage's code path at a size a 2-core CPU runs in seconds.
_TINY_UVIT = ["image_size=16", "UViT.base_channels=4", "UViT.emb_channels=8", "UViT.channel_multiplier=[1,2]",
              "UViT.num_res_blocks=[1]", "UViT.num_heads=1", "UViT.patching_type='none'",
              "UViT.num_transformer_blocks=1"]
_TINY_UNET = ["image_size=16", "UNet.base_channels=4", "UNet.emb_channels=8", "UNet.channel_multiplier=[1,2]",
              "UNet.num_res_blocks=[1,2]", "UNet.attn_resolutions=[8]", "UNet.num_heads=1"]
# The Pallas kernel's tiles at the smoke stage's 64 and 4 tokens.
_TINY_PALLAS = ["pallas_attention.block_q=16", "pallas_attention.block_k=16",
                "pallas_attention.block_backward=16"]
_PALLAS = ["UViT.attention_impl='pallas'"]
_RBG = ["Train.prng_impl='unsafe_rbg'"]


def stages(smoke: bool) -> list[dict]:
  """name, core.benchmark arguments, cap_s (the most the stage may take, so a slow stage leaves
  time for the next ones), fallback (full argument lists tried when an attempt fails)."""
  if smoke:
    train = ["batch=2", "steps=2", "warmup=1", "dtype=bfloat16"]
    sample = ["what=sample", "batch=2", "sampler_steps=2", "guidance=1.5", "dtype=bfloat16"]
    uvit, unet, uvit36, pallas = _TINY_UVIT, _TINY_UNET, [*_TINY_UVIT, "UViT.num_transformer_blocks=2"], _TINY_PALLAS
    # The CPU resolves upsample_impl='auto' to 'nearest': the A/B names the transposed path.
    transposed = ["UViT.upsample_impl='transposed'"]
  else:
    train = ["batch=32", "steps=10", "warmup=2", "dtype=bfloat16"]
    sample = ["what=sample", "batch=64", "sampler_steps=32", "guidance=1.5", "dtype=bfloat16"]
    uvit = unet = uvit36 = pallas = []
    transposed = []   # 'auto' is the transposed conv on the GPU
  minimal = ["remat_policy=minimal"]
  # Measured on one H100 (2026-11-27): the benchmark stage took 80 s (compile 48), the 36-block
  # U-ViT 39 s with full remat, the U-Net 256 did not compile within 180 s (unrolled then).
  return [
      {"name": BASELINE, "cap_s": 100,
       "args": [BENCH, *train, "profile=2", *uvit, "UViT.upsample_impl='nearest'"]},
      {"name": "train_uvit_benchmark256_transposed", "cap_s": 55,
       "args": [BENCH, *train, *uvit, *transposed]},
      {"name": "train_uvit_benchmark256_minimal", "cap_s": 55,
       "args": [BENCH, *train, *uvit, *transposed, *minimal]},
      {"name": "train_uvit36_256", "cap_s": 90,
       "args": [UVIT36, *train, *uvit36, *transposed, *minimal],
       "fallback": [[UVIT36, *train, *uvit36, *transposed, "remat=true"]]},
      {"name": "train_unet256", "cap_s": 130,
       "args": [UNET256, *train, "profile=2", *unet, *[t.replace("UViT", "UNet") for t in transposed]]},
      {"name": "sample_uvit_benchmark256", "cap_s": 45, "args": [BENCH, *sample, *uvit, *transposed]},
      {"name": "sample_uvit_benchmark256_noprecast", "cap_s": 45,
       "args": [BENCH, *sample, *uvit, *transposed, "precast=false"]},
      {"name": "train_uvit_benchmark256_pallas", "cap_s": 55,
       "args": [BENCH, *train, *uvit, *transposed, *_PALLAS, *pallas]},
      {"name": "train_uvit_benchmark256_rbg", "cap_s": 50,
       "args": [BENCH, *train, *uvit, *transposed, *_RBG]},
      {"name": "train_uvit_benchmark256_all", "cap_s": 55,
       "args": [BENCH, *train, *uvit, *transposed, *minimal, *_PALLAS, *pallas, *_RBG]},
  ]


def _slug(s: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "unknown"


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # the 2.47B U-ViT needs most of 80 GB
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "sd-jax-cache"))
  env["PYTHONUNBUFFERED"] = "1"
  return env


def run_stage(stage: dict, timeout: float) -> dict:
  """Runs one stage (and its fallbacks) in a subprocess; returns its record for the JSON."""
  attempts = [stage["args"], *stage.get("fallback", [])]
  record = {"status": "skipped", "seconds": 0.0, "attempts": []}
  start = time.time()
  for args in attempts:
    left = timeout - (time.time() - start)
    if left < 5:
      break
    cmd = [sys.executable, "-m", "core.benchmark", *args]
    t0 = time.time()
    try:
      p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=left)
      out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
      out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
      err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
      rc = None
    lines = [l for l in out.splitlines() if l.startswith("{")]
    attempt = {"command": "python -m core.benchmark " + " ".join(args), "seconds": round(time.time() - t0, 1),
               "returncode": rc}
    if rc == 0 and lines:
      record.update(status="ok", result=json.loads(lines[-1]), command=attempt["command"])
      record["attempts"].append(attempt)
      break
    # The stage's own lines, not XLA's log lines (W1127 05:17:52.77 ...), which can be hundreds.
    tail = [l for l in err.strip().splitlines() if l.strip() and not re.match(r"[WIEF]\d{4} ", l)][-3:]
    # A timeout keeps the stage's last line (e.g. "compiled the train step in N s"): which phase ran out.
    attempt["error"] = (f"timeout after: {tail[-1][-300:]}" if tail else "timeout") if rc is None else (
        " | ".join(tail)[-600:] or f"exit status {rc}")
    record["attempts"].append(attempt)
    record["status"] = "timeout" if rc is None else "failed"
  record["seconds"] = round(time.time() - start, 1)
  return record


def run_tables(budget: float, smoke: bool) -> dict:
  """Tables 4 and 5 steps/s at paper shapes (smoke: smoke scale), relative columns in the JSON."""
  out = {}
  scale, batch = ("smoke", "2") if smoke else ("paper", "8")
  start = time.time()
  for table in ("4", "5"):
    left = budget - (time.time() - start)
    if left < 30:
      out[table] = {"status": "skipped"}
      continue
    with tempfile.TemporaryDirectory() as tmp:
      cmd = [sys.executable, "-m", "experiments.run", f"table={table}", "mode=throughput", f"scale={scale}",
             f"workdir={tmp}", f"throughput_batch={batch}", "throughput_steps=3"]
      try:
        p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=left)
        path = os.path.join(tmp, "throughput.jsonl")
        rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
        out[table] = {"status": "ok" if p.returncode == 0 else "failed", "rows": rows,
                      "error": None if p.returncode == 0 else p.stderr.strip().splitlines()[-1:]}
      except subprocess.TimeoutExpired:
        out[table] = {"status": "timeout"}
  return out


def _metric(name: str) -> str:
  return "image_forwards_per_sec" if name.startswith("sample") else "img_per_sec"


def summarize(name: str, rec: dict, baseline: dict | None = None) -> dict:
  """One stage's line: speed (img/s; sampling: image-forwards/s), MFU, memory, compile time,
  speed relative to the baseline stage of its kind, the port's figure beside it."""
  r = rec.get("result") or {}
  mem = (r.get("device_memory") or {}).get("peak_bytes_in_use")
  speed = r.get(_metric(name))
  base = (baseline or {}).get(_metric(name))
  return {"stage": name, "status": rec["status"], "metric": _metric(name), "value": speed,
          "img_per_sec": r.get("img_per_sec"), "tflops_per_sec": r.get("tflops_per_sec"),
          "mfu": r.get("mfu"), "compile_s": r.get("compile_s"), "peak_bytes": mem,
          "compiled_bytes": (r.get("compiled_memory") or {}).get("total_bytes"),
          "remat_policy": r.get("remat_policy"), "remat": r.get("remat"),
          "vs_baseline": None if speed is None or not base else speed / base,
          "port": PORT.get(name),
          # Where the device time of a profiled stage goes (core.profiling), in ms per step.
          "device_ms_by_kind": (r.get("profile") or {}).get("by_kind")}


def targets(summary: list[dict], smoke: bool = False) -> list[dict]:
  """Issue 29's targets against the best stage that measures each (met None: not measured, or
  a smoke run, whose tiny CPU shapes say nothing of the GPU)."""
  by_name = {s["stage"]: s for s in summary}
  out = []
  for what, names, metric, target in TARGETS:
    done = [by_name[n] for n in names if n in by_name and by_name[n]["status"] == "ok"]
    if metric == "compile_s":       # the U-Net: compiled in time, ran, and has an MFU
      best = done[0] if done else None
      value = best and best["compile_s"]
      met = None if best is None else bool(value < target and best["mfu"] is not None)
    else:
      if names[0] == "train_uvit36_256":   # "without full remat": the selective-remat attempt
        done = [d for d in done if d["remat_policy"] == "minimal"]
      best = max(done, key=lambda d: d["value"] or 0.0, default=None)
      value = best and best["value"]
      met = None if value is None else value >= target
    out.append({"target": what, "metric": metric, "goal": target, "value": value,
                "stage": best and best["stage"], "mfu": best and best["mfu"],
                "port": PORT.get(names[0]), "met": None if smoke else met})
  return out


def _baseline(records: dict, name: str) -> dict | None:
  """The result each stage is compared with: the baseline training stage, or the first sampling
  stage (with its weights cast once) for the sampling A/B."""
  first = BASELINE if not name.startswith("sample") else "sample_uvit_benchmark256"
  if name == first or name.startswith("train_u") and not name.startswith("train_uvit_benchmark256"):
    return None
  return (records.get(first) or {}).get("result")


def main(argv: list[str]) -> int:
  opts = dict(a.split("=", 1) for a in argv if "=" in a)
  unknown = set(opts) - {"out", "budget_s", "smoke", "tables", "only"}
  if unknown or any("=" not in a for a in argv):
    print(f"error: unknown option(s) {sorted(unknown) or argv}; use out=, budget_s=, smoke=, tables=, only= "
          f"(see the docstring of scripts/gpu_check.py)", file=sys.stderr)
    return 2
  smoke = opts.get("smoke", os.environ.get("GPU_CHECK_SMOKE", "0")).lower() in ("1", "true", "yes")
  budget = float(opts.get("budget_s", 480))
  out_dir = opts.get("out", os.path.join(ROOT, "benchmarks", "results"))
  start = time.time()
  records = {}
  only = set(opts["only"].split(",")) if opts.get("only") else None
  known = [st["name"] for st in stages(smoke)]
  if only and not only <= set(known):
    print(f"error: only={opts['only']}: stages are {','.join(known)}", file=sys.stderr)
    return 2
  for st in stages(smoke):
    if only and st["name"] not in only:
      records[st["name"]] = {"status": "skipped", "seconds": 0.0, "attempts": []}
      continue
    left = budget - (time.time() - start)
    cap = left if smoke else min(left, st["cap_s"])   # smoke: a loaded CPU, no per-stage cap
    records[st["name"]] = run_stage(st, cap) if left > 10 else {"status": "skipped", "seconds": 0.0, "attempts": []}
    s = summarize(st["name"], records[st["name"]], _baseline(records, st["name"]))
    mfu = "n/a" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%"
    rel = "" if s["vs_baseline"] is None else f" ({s['vs_baseline']:.2f}x the baseline)"
    kinds = ", ".join(f"{k} {v:.0f}" for k, v in list((s["device_ms_by_kind"] or {}).items())[:5])
    print(f"[gpu-check] {st['name']}: {s['status']}, {s['value'] or 0:.2f} {s['metric']}{rel}, MFU {mfu}, "
          f"compile {s['compile_s'] or 0:.0f} s, {records[st['name']]['seconds']:.0f} s"
          + (f"; ms/step: {kinds}" if kinds else ""), flush=True)
  tables = None
  if opts.get("tables", "false").lower() in ("1", "true", "yes"):
    tables = run_tables(budget - (time.time() - start), smoke)
  results = [r["result"] for r in records.values() if r.get("result")]
  device = results[0]["device"] if results else "unknown"
  summary = [summarize(n, r, _baseline(records, n)) for n, r in records.items()]
  peaks = [s["peak_bytes"] for s in summary if s["peak_bytes"]]
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
  doc = {
      "schema": SCHEMA, "device": device, "num_devices": results[0]["num_devices"] if results else None,
      "date": date, "smoke": smoke, "budget_s": budget, "seconds": round(time.time() - start, 1),
      "summary": summary, "targets": targets(summary, smoke),
      "peak_memory_bytes": max(peaks) if peaks else None,
      "stages": records, "tables": tables,
  }
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{_slug(device)}-{date}{'-smoke' if smoke else ''}.json")
  with open(path, "w") as f:
    json.dump(doc, f, indent=1)
  if os.environ.get("OUT") and os.path.isdir(os.environ["OUT"]):
    shutil.copy(path, os.environ["OUT"])
  for t in doc["targets"]:
    port = "" if t["port"] is None else f", port {t['port']:g}"
    value = "-" if t["value"] is None else f"{t['value']:.1f}"
    verdict = ("smoke: not judged" if smoke else
               {True: "met", False: "NOT met", None: "not measured"}[t["met"]])
    print(f"[gpu-check] target {t['target']}: {t['metric']} {value} against {t['goal']:g}{port}: "
          f"{verdict} ({t['stage'] or 'no stage'})", flush=True)
  print(f"[gpu-check] wrote {path} ({doc['seconds']:.0f} s)", flush=True)
  return 0 if all(r["status"] == "ok" for n, r in records.items() if not only or n in only) else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
