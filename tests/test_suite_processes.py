"""benchmarks/suite_processes.py: its hook records a real JAX process's compile and its CPU time,
and the summary adds the processes up by kind."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks import suite_processes as sp
from tests.test_train import ROOT

JIT_TWICE = """
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sin(x) * 2)
f(jnp.ones(3)); f(jnp.ones(3))  # one compile: the second call is cached
"""


def test_hook_records_a_jax_process_and_summary_counts_it(tmp_path):
  (tmp_path / "sitecustomize.py").write_text(sp.HOOK)
  log = tmp_path / "log.jsonl"
  env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", SD_SUITE_PROCESS_LOG=str(log),
             PYTEST_CURRENT_TEST="tests/test_x.py::test_y (call)", JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", JIT_TWICE], env=env, check=True, timeout=120)
  subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, timeout=60)  # no JAX
  jax_run, plain = [json.loads(l) for l in open(log)]
  assert jax_run["test"] == "tests/test_x.py::test_y (call)" and jax_run["cpu"] > 0
  assert jax_run["secs"][sp.COMPILE] > 0 and all(t in jax_run["secs"] for t in sp.TRACE)
  assert plain["secs"] == {} and plain["events"] == {}
  table = sp.summarize(str(log))
  assert "2 processes" in table
  row = next(l for l in table.splitlines() if l.startswith("| python -c"))
  assert row.split(" | ")[1] == "2"  # both are `python -c`
  assert "tests/test_x.py::test_y" in table.splitlines()[-1]
  # Without the variable the hook writes nothing.
  env.pop("SD_SUITE_PROCESS_LOG")
  subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, timeout=60)
  assert len(open(log).readlines()) == 2


def test_kind_reads_the_command_line():
  assert sp.kind([os.path.join(ROOT, "core", "train.py"), "workdir=x"]) == "core.train"
  assert sp.kind([os.path.join(ROOT, "eval", "worker.py")]) == "eval.worker"
  assert sp.kind([os.path.join(ROOT, "core", "benchmark.py")]) == "core.benchmark"
  assert sp.kind(["-c"]).startswith("python -c")
  assert sp.kind(["/usr/bin/sky"]) == "others"
