"""Where a compiled step's device time goes: a jax.profiler trace, summed by HLO op and by kind.

``profile(compiled, run, steps)`` runs ``run()`` (one call of the compiled program) ``steps`` times
under ``jax.profiler.trace``, reads the Perfetto trace it writes, maps each device event to its
HLO instruction and that instruction's ``op_name`` metadata (the JAX primitive and the flax module
path that produced it), and sums the time per step:

- ``by_kind``: attention, norm, conv, matmul, rng (from the op_name, in that order), other ops of
  the model, and ops outside it (loss, optimizer, EMA), each split into forward and backward
  (``transpose(`` in the op_name marks backward);
- ``by_scope``: the model level (``patch_in``, ``down0``, ``transformer``, ``mid``, ``up2``, ...);
- ``top_ops``: the costliest instructions with their op_name.

Used by ``python -m core.benchmark profile=N`` and the GPU check (scripts/gpu_check.py), so that a
device session records what to optimise next, not only how fast it was. On GPU the events are the
device's per-op line, else its stream kernels (:func:`device_events`), found by their ``hlo_op``
argument, else by name (XLA names a kernel after its fusion); on CPU the thunk events, which carry
``hlo_op`` too.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Any, Callable

import jax

_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s")
_REF = re.compile(r"%([\w.\-]+)")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
# The computations an instruction runs: a while loop's body and condition, a conditional's branches.
_RUNS = re.compile(r"(?:body|condition|true_computation|false_computation)=%([\w.\-]+)"
                   r"|branch_computations=\{([^}]*)\}")
_OPCODE = re.compile(r"(?:^|\s)([a-z][\w\-]*)\(%")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Kind of an op, from its op_name (lower case), first match wins.
KINDS = (
    ("attention", re.compile(r"attn|attention|dot_product|softmax")),
    ("norm", re.compile(r"norm")),
    ("conv", re.compile(r"conv_general|convolution|(?:^|/)conv(?:_\w*)?(?:/|$)")),  # not convert_*
    ("matmul", re.compile(r"dot_general|dense|einsum")),
    ("rng", re.compile(r"random|threefry|_uniform|_normal|bernoulli")),
)
_OPCODE_KINDS = {"convolution": "conv", "dot": "matmul"}  # HLO opcodes, not JAX primitives
# Control flow whose trace event spans its body's events (CPU thunks): counted through the body.
_CONTAINERS = re.compile(r"^(?:while|conditional|call)(?:[.\-]|$)")
_WRAPPER = re.compile(r"^(?:[\w\-]+\()+|\)+$")


def op_names(hlo_text: str) -> dict[str, str]:
  """{HLO instruction name: its op_name metadata} from a compiled module's text.

  A fusion that contains a convolution or a matrix product (XLA:GPU's Triton GEMMs, XLA:CPU's
  fused dots) takes that op's op_name rather than its root's (often a convert or a reduction),
  so that its time counts as the conv or matmul it mostly is. XLA creates some instructions
  without metadata (weight-gradient convolutions, layout copies). Such an instruction is named
  after its own opcode under the module path of its nearest operand that has an op_name
  (backward if any operand within reach is), e.g.
  ``jit(train_step)/transpose(jvp(UViT))/down0_block0/convolution``. One with no named operand
  within reach inside a loop body or a branch (the copies of a while loop's carried state, e.g.
  the threefry counters of ``jax.random``) is named under the loop or conditional that runs it:
  ``.../jit(_uniform)/while/copy``.
  """
  names, operands, opcodes, calls = {}, {}, {}, {}
  home: dict[str, str] = {}  # instruction -> its computation
  runner: dict[str, str] = {}  # computation -> the while or conditional instruction that runs it
  heavy: dict[str, str] = {}  # computation -> op_name of its first convolution or dot
  computation = None
  for line in hlo_text.splitlines():
    c = _COMPUTATION.match(line)
    if c:
      computation = c.group(1)
      continue
    m = _DEF.match(line)
    if not m:
      continue
    home[m.group(1)] = computation
    rhs = line[m.end():]
    for body, branches in _RUNS.findall(rhs):
      for comp in [body] if body else _REF.findall(branches):
        runner[comp] = m.group(1)
    on = _OP_NAME.search(rhs)
    op = _OPCODE.search(rhs)
    if on:
      names[m.group(1)] = on.group(1)
    if op:
      opcodes[m.group(1)] = op.group(1)
      operands[m.group(1)] = _REF.findall(rhs[op.end() - 2:])
      if on and op.group(1) in ("convolution", "dot") and computation not in heavy:
        heavy[computation] = on.group(1)
    called = _CALLS.search(rhs)
    if called:
      calls[m.group(1)] = called.group(1)
  for name, comp in calls.items():
    if comp in heavy:
      names[name] = heavy[comp]
  inferred = {}
  for name, ops in operands.items():
    if name in names:
      continue
    frontier, seen, found = list(ops), {name}, []
    for _ in range(4):  # a few operand hops: the first named operand gives the path
      found += [names[o] for o in frontier if o in names]
      seen.update(frontier)
      frontier = [p for o in frontier for p in operands.get(o, []) if p not in seen]
    if found:
      prefix = found[0].rsplit("/", 1)[0]
      if any("transpose(" in f for f in found) and "transpose(" not in prefix:
        prefix = re.sub(r"jvp\((\w+)\)", r"transpose(jvp(\1))", prefix, count=1)
      inferred[name] = f"{prefix}/{opcodes[name]}"
  names.update(inferred)
  for name in operands:
    if name in names:
      continue
    loop, hops = runner.get(home.get(name)), 0
    while loop is not None and loop not in names and hops < 8:  # a loop in an unnamed loop
      loop, hops = runner.get(home.get(loop)), hops + 1
    if loop in names:
      names[name] = f"{names[loop]}/{opcodes[name]}"
  return names


def scope(op_name: str | None) -> str | None:
  """The model level an op belongs to: the module under the model's class in its op_name.

  ``jit(train_step)/transpose(jvp(UNet))/down3_block5/conv_in/...`` -> ``down3``;
  ``.../jvp(UViT)/transformer/while/...`` -> ``transformer``; None outside the model (loss,
  optimizer, EMA, noise) or without op_name.
  """
  parts = [_WRAPPER.sub("", p) for p in (op_name or "").split("/") if p]
  for i, p in enumerate(parts[:-1]):
    if p in ("UNet", "UViT"):
      if i + 2 == len(parts):  # an op of the model's own body (e.g. the input cast)
        return "(model)"
      return re.sub(r"_(?:block|attn|resample)\w*$", "", parts[i + 1])
  return None


def kind(op_name: str | None) -> str:
  """attention | norm | conv | matmul | rng | other | outside_model, ``/bwd`` for backward ops."""
  if not op_name:
    return "unmapped"
  low = op_name.lower()
  # An inferred name (op_names) ends in the instruction's own opcode, which decides its kind.
  k = _OPCODE_KINDS.get(low.rsplit("/", 1)[-1])
  k = k or next((k for k, pattern in KINDS if pattern.search(low)), None)
  if k is None:
    k = "other" if scope(op_name) else "outside_model"
  return k + ("/bwd" if "transpose(" in low else "")


def device_events(trace: dict) -> list[dict]:
  """The 'X' events of device work, each counted once.

  On an accelerator the trace holds the same work on several lines of its device process: the
  kernels on each stream ("Stream #7(...)"), per-HLO-op spans ("XLA Ops") and per-program spans
  ("XLA Modules", "Steps"). The per-op line is used where there is one, else the stream lines;
  never the program spans. Without an accelerator: the CPU thunk events (they carry ``hlo_op``).
  """
  events = trace.get("traceEvents", [])
  procs = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e.get("pid"), e.get("tid")): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  accel = {pid for pid, name in procs.items() if re.search(r"/device:(GPU|TPU)", name)}
  work = [e for e in events if e.get("ph") == "X" and "dur" in e]
  if not accel:
    return [e for e in work if "hlo_op" in e.get("args", {})]
  work = [e for e in work if e.get("pid") in accel]
  line = lambda e: threads.get((e.get("pid"), e.get("tid")), "")
  for wanted in (r"^XLA Ops$", r"^Stream"):
    chosen = [e for e in work if re.search(wanted, line(e))]
    if chosen:
      return chosen
  return [e for e in work if not re.search(r"^(XLA Modules|Steps|XLA TraceMe)", line(e))]


def summarize(events: list[dict], names: dict[str, str], steps: int, top: int = 25) -> dict[str, Any]:
  """Per-step device milliseconds by kind, by scope and for the ``top`` costliest instructions."""
  by_kind, by_scope = collections.Counter(), collections.Counter()
  by_op, count = collections.Counter(), collections.Counter()
  mapped = 0.0
  for e in events:
    args = e.get("args", {})
    op = args.get("hlo_op") or e.get("name", "")
    if _CONTAINERS.match(op):
      continue
    on = names.get(op)
    dur = float(e["dur"]) / 1e3 / steps  # microseconds in the trace -> ms per step
    if on is not None:
      mapped += dur
    by_kind[kind(on)] += dur
    by_scope[scope(on) or ("(outside the model)" if on else "(unmapped)")] += dur
    by_op[op] += dur
    count[op] += 1
  total = sum(by_kind.values())
  rnd = lambda c: {k: round(v, 3) for k, v in c.most_common()}
  return {
      "steps": steps, "device_ms_per_step": round(total, 3),
      "mapped_fraction": round(mapped / total, 4) if total else 0.0,
      "by_kind": rnd(by_kind), "by_scope": rnd(by_scope),
      "top_ops": [{"op": op, "ms": round(ms, 3), "calls": count[op] / steps, "op_name": names.get(op)}
                  for op, ms in by_op.most_common(top)],
  }


def read_trace(logdir: str) -> dict:
  files = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True))
  if not files:
    raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {logdir}")
  with gzip.open(files[-1]) as f:
    return json.load(f)


def profile(compiled, run: Callable[[], Any], steps: int = 3, logdir: str | None = None,
            top: int = 25) -> dict[str, Any]:
  """Traces ``steps`` calls of ``run`` (which calls ``compiled``) and summarises the device time."""
  names = op_names(compiled.as_text())
  with tempfile.TemporaryDirectory() as tmp:
    d = logdir or tmp
    start = time.perf_counter()
    with jax.profiler.trace(d, create_perfetto_trace=True):
      out = None
      for _ in range(steps):
        out = run()
      jax.block_until_ready(out)
    wall = time.perf_counter() - start
    res = summarize(device_events(read_trace(d)), names, steps, top)
  res["wall_ms_per_step_traced"] = round(1e3 * wall / steps, 3)
  return res
