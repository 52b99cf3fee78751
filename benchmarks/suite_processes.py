"""Where `make test`'s CPU time goes, process by process (docs/tests.md's per-process table).

    python benchmarks/suite_processes.py [log=/tmp/suite-processes.jsonl] [-- pytest arguments]
    python benchmarks/suite_processes.py summarize log=/tmp/suite-processes.jsonl

Runs pytest as `make test` does (``-n 2 --dist loadgroup tests`` unless given arguments after
``--``) with a ``sitecustomize`` module in the environment's site-packages, so that every Python
process the suite starts (pytest's workers, trainers, eval workers, benchmarks, helper scripts)
appends one JSON line when it exits: its command, the test that started it
(``PYTEST_CURRENT_TEST``, which child processes inherit), its CPU seconds and JAX's own
``jax.monitoring`` events (tracing, lowering and backend-compile seconds, persistent-cache hits).
The module is removed again however the run ends. It costs about 0.8 s a process. Then prints the
summary: by kind of process, and the tests whose processes took the most CPU.
"""
from __future__ import annotations

import collections
import json
import os
import site
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Written into site-packages for the run. Registers jax.monitoring listeners as soon as
# jax.monitoring can take them (an __import__ wrapper, dropped once registered), and writes one
# line at exit.
HOOK = '''\
import atexit, builtins, collections, json, os, sys, time
_t0, _log = time.time(), os.environ.get("SD_SUITE_PROCESS_LOG")
_events, _secs, _done = collections.Counter(), collections.Counter(), [False]
_import = builtins.__import__

def _register(name, *args, **kwargs):
  module = _import(name, *args, **kwargs)
  monitoring = sys.modules.get("jax.monitoring")
  if not _done[0] and hasattr(monitoring, "register_event_duration_secs_listener"):
    _done[0] = True
    builtins.__import__ = _import
    monitoring.register_event_listener(lambda event, *a, **k: _events.update([event]))
    monitoring.register_event_duration_secs_listener(
        lambda event, secs, *a, **k: _secs.update({event: secs}))
  return module

def _write():
  t = os.times()
  line = {"argv": sys.argv[:3], "test": os.environ.get("PYTEST_CURRENT_TEST"),
          "wall": round(time.time() - _t0, 2), "cpu": round(t.user + t.system, 2),
          "secs": {k: round(v, 3) for k, v in _secs.items()}, "events": dict(_events)}
  with open(_log, "a") as f:
    f.write(json.dumps(line) + "\\n")

if _log:
  builtins.__import__ = _register
  atexit.register(_write)
'''

COMPILE = "/jax/core/compile/backend_compile_duration"
TRACE = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")
HITS = "/jax/compilation_cache/cache_hits"


def kind(argv: list[str]) -> str:
  """What a process was, from its command line."""
  first = os.path.basename(argv[0]) if argv else ""
  if first == "-c":
    return "python -c (pytest's workers, test scripts)"
  if argv[0].endswith(os.path.join("core", "train.py")):
    return "core.train"
  if argv[0].endswith(os.path.join("eval", "worker.py")):
    return "eval.worker"
  if argv[0].endswith(os.path.join("core", "benchmark.py")):
    return "core.benchmark"
  return "others"


def summarize(log: str, top: int = 25) -> str:
  rows = [json.loads(l) for l in open(log)]
  by_kind = collections.defaultdict(lambda: collections.Counter())
  by_test = collections.Counter()
  for r in rows:
    k = by_kind[kind(r["argv"])]
    k["count"] += 1
    k["cpu"] += r["cpu"]
    k["compile"] += r["secs"].get(COMPILE, 0.0)
    k["trace"] += sum(r["secs"].get(t, 0.0) for t in TRACE)
    k["hits"] += r["events"].get(HITS, 0)
    if r["test"]:
      by_test[r["test"].rsplit(" ", 1)[0].split("@")[0]] += r["cpu"]
  out = [f"{len(rows)} processes, {sum(r['cpu'] for r in rows):.0f} CPU-s",
         "| processes | count | CPU-s | compiling (s) | tracing + lowering (s) | cache hits |",
         "|---|---|---|---|---|---|"]
  for name, k in sorted(by_kind.items(), key=lambda kv: -kv[1]["cpu"]):
    out.append(f"| {name} | {k['count']} | {k['cpu']:.0f} | {k['compile']:.0f} | {k['trace']:.0f} "
               f"| {k['hits']} |")
  out.append("\nTests whose processes took the most CPU (not counting in-process work):")
  out += [f"{cpu:8.0f}  {test}" for test, cpu in by_test.most_common(top)]
  return "\n".join(out)


def main(argv: list[str]) -> int:
  pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  opts = dict(a.split("=", 1) for a in argv if "=" in a)
  words = [a for a in argv if "=" not in a]
  unknown = set(opts) - {"log"} or set(words) - {"summarize"}
  if unknown:
    print(f"error: unknown argument(s) {sorted(unknown)}; use [summarize] [log=PATH] [-- pytest args]",
          file=sys.stderr)
    return 2
  log = opts.get("log", "/tmp/suite-processes.jsonl")
  if words == ["summarize"]:
    print(summarize(log))
    return 0
  hook = os.path.join(site.getsitepackages()[0], "sitecustomize.py")
  if os.path.exists(hook):
    print(f"error: {hook} exists; this script would replace it (remove it first)", file=sys.stderr)
    return 2
  if os.path.exists(log):
    os.remove(log)
  with open(hook, "w") as f:
    f.write(HOOK)
  try:
    env = dict(os.environ, SD_SUITE_PROCESS_LOG=log)
    cmd = [sys.executable, "-m", "pytest", "-q", *(pytest_args or ["-n", "2", "--dist", "loadgroup",
                                                                   "tests"])]
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
  finally:
    os.remove(hook)
  print(summarize(log))
  return rc


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
