"""The prepared one-GPU check of issue 15: throughput and memory in one JSON file, in <= 8 minutes.

    python scripts/gpu_check.py [out=benchmarks/results] [budget_s=480] [smoke=true] [tables=true]
                                [only=train_uvit_benchmark256,sample_uvit_benchmark256]
    GPU_CHECK_SMOKE=1 python scripts/gpu_check.py out=/tmp/x      # tiny shapes, runs on a CPU

Stages, in order of importance, each ``python -m core.benchmark`` in its own process (so a stage
that runs out of memory or time is recorded and the next one still runs, and each stage's peak GPU
memory is its own):

- ``train_uvit_benchmark256``: gin/models/uvit_benchmark256.gin, batch 32, bf16 (target >= 250 img/s;
  the compiled PyTorch port: 173 img/s on one H100);
- ``sample_uvit_benchmark256``: the whole sampler jitted, 256 steps, guidance 1.5 (cond and uncond
  in one batch of 2 x 64) (target >= 4.4 img/s; the port: 2.9 img/s);
- ``train_uvit36_256``: the 36-block U-ViT 2B (gin/models/uvit_imagenet256.gin), batch 32, bf16
  (target >= 150 img/s; the port: 102 img/s), with remat (without it the step asked 81 GiB of the
  H100's 80; the smoke stage keeps the retry-with-remat path);
- ``train_unet256``: the ImageNet 256 U-Net of appendix B.1, batch 32, bf16;
- ``train_uvit_benchmark256_rbg``: the first stage with ``Train.prng_impl='unsafe_rbg'`` (its
  noise and dropout from a cheaper generator), if time is left;
- ``table4``/``table5`` (``tables=true``, when time is left): experiments.run mode=throughput at
  paper shapes, batch 8, the relative steps/s columns.

Writes ``<out>/<device>-<date>.json`` (and a copy under ``$OUT`` when that is set, as on the device
machine) with img/s, TFLOP/s, MFU, compiled and peak memory per stage. Smoke mode runs the same
stages with tiny widths and images, to test this plumbing and the JSON schema on a CPU.
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
SCHEMA = "simple-diffusion/gpu-check/1"
# issue 15's anchors: lucidrains/denoising-diffusion-pytorch simple_diffusion.py on one H100, bf16.
PORT = {"train_uvit_benchmark256": 173.0, "train_uvit36_256": 102.0, "sample_uvit_benchmark256": 2.9}
TARGETS = {"train_uvit_benchmark256": 250.0, "train_uvit36_256": 150.0, "sample_uvit_benchmark256": 4.4}

BENCH = "gin/models/uvit_benchmark256.gin"
UVIT36 = "gin/models/uvit_imagenet256.gin"
UNET256 = "gin/models/unet_imagenet256.gin"

# Smoke shapes: every stage's code path at a size a 2-core CPU runs in seconds.
_TINY_UVIT = ["image_size=16", "UViT.base_channels=4", "UViT.emb_channels=8", "UViT.channel_multiplier=[1,2]",
              "UViT.num_res_blocks=[1]", "UViT.num_heads=1", "UViT.patching_type='none'"]
_TINY_UNET = ["image_size=16", "UNet.base_channels=4", "UNet.emb_channels=8", "UNet.channel_multiplier=[1,2]",
              "UNet.num_res_blocks=[1,1]", "UNet.attn_resolutions=[8]", "UNet.num_heads=1"]


def stages(smoke: bool) -> list[dict]:
  """(name, core.benchmark arguments, alternatives tried when the first attempt fails)."""
  if smoke:
    return [
        {"name": "train_uvit_benchmark256", "args": [BENCH, "batch=2", "steps=2", "warmup=1", "dtype=bfloat16",
                                                     "profile=1", "UViT.num_transformer_blocks=1", *_TINY_UVIT]},
        {"name": "sample_uvit_benchmark256", "args": [BENCH, "what=sample", "batch=2", "sampler_steps=2",
                                                      "guidance=1.5", "dtype=bfloat16",
                                                      "UViT.num_transformer_blocks=1", *_TINY_UVIT]},
        {"name": "train_uvit36_256", "args": [UVIT36, "batch=2", "steps=2", "warmup=1", "dtype=bfloat16",
                                              "UViT.num_transformer_blocks=2", *_TINY_UVIT],
         "retry": ["remat=true"]},
        {"name": "train_unet256", "args": [UNET256, "batch=2", "steps=2", "warmup=1", "dtype=bfloat16", *_TINY_UNET]},
        {"name": "train_uvit_benchmark256_rbg", "args": [BENCH, "batch=2", "steps=2", "warmup=1", "dtype=bfloat16",
                                                         "Train.prng_impl='unsafe_rbg'",
                                                         "UViT.num_transformer_blocks=1", *_TINY_UVIT]},
    ]
  # cap_s: the most one stage may take, so that a slow stage leaves time for the next ones.
  # Measured on one H100 (2026-11-27): the benchmark stage took 80 s (compile 48), sampling 112 s,
  # the 36-block U-ViT ran out of memory without remat (81 GiB asked) in 63 s, then ran with it in
  # 39 s, and the U-Net 256 did not finish in 181 s. So the U-ViT 36 runs with remat at once, and
  # the U-Net gets the time saved (and fewer steps). The benchmark and U-Net stages end with a
  # profile of a few steps (core.profiling): where the device time goes, for the next session.
  return [
      {"name": "train_uvit_benchmark256", "args": [BENCH, "batch=32", "steps=20", "warmup=3", "dtype=bfloat16",
                                                   "profile=3"], "cap_s": 150},
      {"name": "sample_uvit_benchmark256", "args": [BENCH, "what=sample", "batch=64", "sampler_steps=256",
                                                    "guidance=1.5", "dtype=bfloat16"], "cap_s": 150},
      {"name": "train_uvit36_256", "args": [UVIT36, "batch=32", "steps=10", "warmup=2", "dtype=bfloat16",
                                            "remat=true"], "cap_s": 120},
      {"name": "train_unet256", "args": [UNET256, "batch=32", "steps=5", "warmup=1", "dtype=bfloat16",
                                         "profile=2"], "cap_s": 240},
      # If time is left: the benchmark stage with a cheaper generator for its noise and dropout
      # (Train.prng_impl), against the first stage's threefry.
      {"name": "train_uvit_benchmark256_rbg", "args": [BENCH, "batch=32", "steps=20", "warmup=3",
                                                       "dtype=bfloat16", "Train.prng_impl='unsafe_rbg'"],
       "cap_s": 100},
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
  """Runs one stage (and its retry) in a subprocess; returns its record for the JSON."""
  attempts = [stage["args"]] + ([stage["args"] + stage["retry"]] if stage.get("retry") else [])
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


def summarize(name: str, rec: dict) -> dict:
  r = rec.get("result") or {}
  mem = (r.get("device_memory") or {}).get("peak_bytes_in_use")
  img = r.get("img_per_sec")
  target = TARGETS.get(name)
  return {"stage": name, "status": rec["status"], "img_per_sec": img, "tflops_per_sec": r.get("tflops_per_sec"),
          "mfu": r.get("mfu"), "peak_bytes": mem, "compiled_bytes": (r.get("compiled_memory") or {}).get("total_bytes"),
          "target_img_per_sec": target, "port_img_per_sec": PORT.get(name),
          "meets_target": None if (img is None or target is None) else img >= target,
          # Where the device time of a profiled stage goes (core.profiling), in ms per step.
          "device_ms_by_kind": (r.get("profile") or {}).get("by_kind")}


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
    records[st["name"]] = run_stage(st, min(left, st.get("cap_s", left))) if left > 10 else {"status": "skipped", "seconds": 0.0, "attempts": []}
    s = summarize(st["name"], records[st["name"]])
    mfu = "n/a" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%"
    kinds = ", ".join(f"{k} {v:.0f}" for k, v in list((s["device_ms_by_kind"] or {}).items())[:5])
    print(f"[gpu-check] {st['name']}: {s['status']}, {s['img_per_sec'] or 0:.2f} img/s, MFU {mfu}, "
          f"{records[st['name']]['seconds']:.0f} s" + (f"; ms/step: {kinds}" if kinds else ""), flush=True)
  tables = None
  if opts.get("tables", "false").lower() in ("1", "true", "yes"):
    tables = run_tables(budget - (time.time() - start), smoke)
  results = [r["result"] for r in records.values() if r.get("result")]
  device = results[0]["device"] if results else "unknown"
  peaks = [s["peak_bytes"] for s in (summarize(n, r) for n, r in records.items()) if s["peak_bytes"]]
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
  doc = {
      "schema": SCHEMA, "device": device, "num_devices": results[0]["num_devices"] if results else None,
      "date": date, "smoke": smoke, "budget_s": budget, "seconds": round(time.time() - start, 1),
      "summary": [summarize(n, r) for n, r in records.items()],
      "peak_memory_bytes": max(peaks) if peaks else None,
      "stages": records, "tables": tables,
  }
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{_slug(device)}-{date}{'-smoke' if smoke else ''}.json")
  with open(path, "w") as f:
    json.dump(doc, f, indent=1)
  if os.environ.get("OUT") and os.path.isdir(os.environ["OUT"]):
    shutil.copy(path, os.environ["OUT"])
  print(f"[gpu-check] wrote {path} ({doc['seconds']:.0f} s)", flush=True)
  return 0 if all(r["status"] == "ok" for n, r in records.items() if not only or n in only) else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
