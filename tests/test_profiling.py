"""core.profiling: HLO op_name mapping, the per-kind sums, and a real jax.profiler trace on CPU."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import benchmark, profiling

HLO = """
%fused_gemm (param_0: bf16[64,64], param_1: bf16[64,64]) -> f32[64,64] {
  %param_0 = bf16[64,64]{1,0} parameter(0)
  %param_1 = bf16[64,64]{1,0} parameter(1)
  %dot.7 = bf16[64,64]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/jvp(UViT)/transformer/mlp/Dense_0/dot_general"}
  ROOT %convert.8 = f32[64,64]{1,0} convert(%dot.7), metadata={op_name="jit(train_step)/jvp(UViT)/transformer/mlp/Dense_0/convert_element_type"}
}

ENTRY %main (p0: f32[8,16,16,4], p1: f32[3,3,4,4]) -> f32[3,3,4,4] {
  %p0 = f32[8,16,16,4]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,4,4]{3,2,1,0} parameter(1)
  %conv.1 = f32[8,16,16,4]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(train_step)/jvp(UNet)/down3_block5/conv_in/conv_general_dilated" source_file="x.py" source_line=1}
  %fusion.2 = f32[8,16,16,4]{3,2,1,0} fusion(%conv.1), kind=kLoop, calls=%fused, metadata={op_name="jit(train_step)/transpose(jvp(UNet))/down3_block5/GroupNorm_0/mul"}
  %copy.3 = f32[8,16,16,4]{3,2,1,0} copy(%p0)
  %convolution.4 = f32[3,3,4,4]{3,2,1,0} convolution(%copy.3, %fusion.2), window={size=16x16 pad=1_1x1_1}, dim_labels=f01b_i01o->01bf
  ROOT %gemm_fusion.5 = f32[64,64]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%fused_gemm, metadata={op_name="jit(train_step)/jvp(UViT)/transformer/mlp/Dense_0/convert_element_type"}
}
"""


def test_op_names_reads_metadata_and_infers_missing_from_operands():
  names = profiling.op_names(HLO)
  assert names["conv.1"] == "jit(train_step)/jvp(UNet)/down3_block5/conv_in/conv_general_dilated"
  assert names["fusion.2"].endswith("GroupNorm_0/mul")
  # The weight-gradient convolution has no metadata: its path comes from its nearest named operand
  # (the fusion), it is backward because an operand within reach is, and its kind is its own
  # opcode. The copy's only operand is a parameter, so it stays unmapped, as does the parameter.
  assert names["convolution.4"] == "jit(train_step)/transpose(jvp(UNet))/down3_block5/GroupNorm_0/convolution"
  assert profiling.kind(names["convolution.4"]) == "conv/bwd"
  assert "copy.3" not in names and "p0" not in names
  # A fusion around a matrix product counts as the product, not as its root (a convert).
  assert names["gemm_fusion.5"].endswith("Dense_0/dot_general")
  assert profiling.kind(names["gemm_fusion.5"]) == "matmul"


LOOP_HLO = """
%region_body.1 (arg: (s32[], u32[4])) -> (s32[], u32[4]) {
  %arg = (s32[], u32[4]{0}) parameter(0)
  %gte.2 = u32[4]{0} get-tuple-element(%arg), index=1
  %copy.3 = u32[4]{0} copy(%gte.2)
  %gte.4 = s32[] get-tuple-element(%arg), index=0
  ROOT %tuple.5 = (s32[], u32[4]{0}) tuple(%gte.4, %copy.3)
}

%region_cond.6 (arg.7: (s32[], u32[4])) -> pred[] {
  %arg.7 = (s32[], u32[4]{0}) parameter(0)
  %gte.8 = s32[] get-tuple-element(%arg.7), index=0
  %constant.9 = s32[] constant(5)
  ROOT %compare.10 = pred[] compare(%gte.8, %constant.9), direction=LT
}

ENTRY %main (p0: (s32[], u32[4])) -> (s32[], u32[4]) {
  %p0 = (s32[], u32[4]{0}) parameter(0)
  %copy.11 = (s32[], u32[4]{0}) copy(%p0)
  ROOT %while.12 = (s32[], u32[4]{0}) while(%copy.11), condition=%region_cond.6, body=%region_body.1, metadata={op_name="jit(train_step)/jvp(UViT)/transformer/Dropout_0/jit(_uniform)/while"}
}
"""


def test_op_names_name_a_loops_unnamed_instructions_after_the_loop():
  """The copies of a while loop's carried state (jax.random's threefry counters) have no metadata
  and no named operand: they count under the loop that runs them. Outside any loop an unnamed copy
  of a parameter stays unmapped."""
  names = profiling.op_names(LOOP_HLO)
  loop = "jit(train_step)/jvp(UViT)/transformer/Dropout_0/jit(_uniform)/while"
  assert names["copy.3"] == loop + "/copy" and names["compare.10"] == loop + "/compare"
  assert profiling.kind(names["copy.3"]) == "rng" and profiling.scope(names["copy.3"]) == "transformer"
  assert "copy.11" not in names and "p0" not in names


@pytest.mark.parametrize("op_name,kind,scope", [
    ("jit(train_step)/jvp(UViT)/transformer/while/body/closed_call/blocks/block/self_attn/vmap()/reduce_max",
     "attention", "transformer"),
    ("jit(train_step)/transpose(jvp(UNet))/down3_block5/GroupNorm_0/mul", "norm/bwd", "down3"),
    ("jit(train_step)/jvp(UNet)/mid_attn/out/dot_general", "attention", "mid"),
    ("jit(train_step)/jvp(UNet)/up2_resample/conv/conv_general_dilated", "conv", "up2"),
    ("jit(train_step)/transpose(jvp(UNet))/up2_block0/Conv_0/add", "conv/bwd", "up2"),
    ("jit(train_step)/transpose(jvp(UViT))/transformer/while/body/blocks/block/mlp/Dense_0/dot_general",
     "matmul/bwd", "transformer"),
    ("jit(train_step)/jvp(UViT)/transformer/while/body/blocks/block/mlp/Dropout_0/jit(_bernoulli)/lt",
     "rng", "transformer"),
    ("jit(train_step)/jvp(UViT)/down0_block1/jit(silu)/logistic", "other", "down0"),
    ("jit(train_step)/jvp(UViT)/convert_element_type", "other", "(model)"),
    ("jit(train_step)/mul", "outside_model", None),
    (None, "unmapped", None),
])
def test_kind_and_scope(op_name, kind, scope):
  assert profiling.kind(op_name) == kind
  assert profiling.scope(op_name) == scope


def test_summarize_sums_per_step_skips_loop_containers_and_picks_device_streams():
  names = profiling.op_names(HLO)
  trace = {"traceEvents": [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
      {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
      # Host-side events, also with hlo_op: not device time when a device stream exists.
      {"ph": "X", "pid": 1, "name": "conv.1", "dur": 9000.0, "args": {"hlo_op": "conv.1"}},
      {"ph": "X", "pid": 7, "name": "conv.1", "dur": 3000.0, "args": {"hlo_op": "conv.1"}},
      {"ph": "X", "pid": 7, "name": "conv.1", "dur": 1000.0, "args": {"hlo_op": "conv.1"}},
      # A kernel without hlo_op: matched by its name, which XLA takes from the instruction.
      {"ph": "X", "pid": 7, "name": "fusion.2", "dur": 500.0, "args": {}},
      {"ph": "X", "pid": 7, "name": "convolution.4", "dur": 2000.0, "args": {}},
      {"ph": "X", "pid": 7, "name": "while.9", "dur": 99999.0, "args": {"hlo_op": "while.9"}},
      {"ph": "X", "pid": 7, "name": "mystery_kernel", "dur": 500.0, "args": {}},
  ]}
  events = profiling.device_events(trace)
  assert all(e["pid"] == 7 for e in events) and len(events) == 6
  res = profiling.summarize(events, names, steps=2, top=3)
  # microseconds / 1000 / 2 steps; the while loop's span is left out (its body is counted).
  assert res["by_kind"] == {"conv": 2.0, "conv/bwd": 1.0, "norm/bwd": 0.25, "unmapped": 0.25}
  assert res["device_ms_per_step"] == 3.5
  assert res["mapped_fraction"] == pytest.approx(3.25 / 3.5, abs=1e-4)
  assert res["by_scope"] == {"down3": 3.25, "(unmapped)": 0.25}
  assert [o["op"] for o in res["top_ops"]] == ["conv.1", "convolution.4", "fusion.2"]
  assert res["top_ops"][0]["calls"] == 1.0


def test_device_events_count_each_kernel_once_on_an_accelerator():
  """A GPU trace shows the same work on several lines: the per-op line wins, else the streams;
  the per-program spans never count."""
  meta = [
      {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "thread_name", "pid": 7, "tid": 1, "args": {"name": "XLA Modules"}},
      {"ph": "M", "name": "thread_name", "pid": 7, "tid": 2, "args": {"name": "XLA Ops"}},
      {"ph": "M", "name": "thread_name", "pid": 7, "tid": 3, "args": {"name": "Stream #7(Compute)"}},
  ]
  module = {"ph": "X", "pid": 7, "tid": 1, "name": "jit_train_step", "dur": 100.0, "args": {}}
  op = {"ph": "X", "pid": 7, "tid": 2, "name": "conv.1", "dur": 40.0, "args": {"hlo_op": "conv.1"}}
  kernel = {"ph": "X", "pid": 7, "tid": 3, "name": "sm90_xmma_fprop", "dur": 39.0,
            "args": {"hlo_op": "conv.1"}}
  assert profiling.device_events({"traceEvents": meta + [module, op, kernel]}) == [op]
  assert profiling.device_events({"traceEvents": meta + [module, kernel]}) == [kernel]


def test_device_events_on_cpu_are_the_thunks_with_hlo_op():
  trace = {"traceEvents": [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": 1, "name": "PjitFunction(f)", "dur": 50.0, "args": {}},
      {"ph": "X", "pid": 1, "name": "dot.1", "dur": 10.0, "args": {"hlo_op": "dot.1"}},
  ]}
  assert [e["name"] for e in profiling.device_events(trace)] == ["dot.1"]


def test_profile_of_a_real_trace_puts_the_time_where_the_flops_are():
  """A jitted conv, a 2-GFLOP matrix product (fused with a tanh on XLA:CPU) and a tiny add, traced
  for real: the product's fusion counts as matmul and costs far more than the add; nearly every
  event maps to an instruction of the compiled module."""

  def f(x, w, a, b, c):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y, jnp.tanh(a @ b).sum(), c + 1.0

  rng = np.random.default_rng(0)
  args = (rng.standard_normal((2, 16, 16, 8), np.float32), rng.standard_normal((3, 3, 8, 8), np.float32),
          rng.standard_normal((1024, 1024), np.float32), rng.standard_normal((1024, 1024), np.float32),
          rng.standard_normal((256,), np.float32))
  compiled = jax.jit(f).lower(*args).compile()
  args = [jnp.asarray(a) for a in args]
  jax.block_until_ready(compiled(*args))
  res = profiling.profile(compiled, lambda: compiled(*args), steps=3)
  assert res["steps"] == 3 and res["device_ms_per_step"] > 0
  assert res["mapped_fraction"] > 0.9
  kinds = res["by_kind"]
  assert kinds.get("conv", 0) > 0 and kinds.get("matmul", 0) > 10 * kinds.get("outside_model", 0)
  assert abs(sum(kinds.values()) - res["device_ms_per_step"]) < 0.01
  assert res["wall_ms_per_step_traced"] > 0


def test_a_failed_profile_is_recorded_not_raised(monkeypatch, capsys):
  """The benchmark's timings stand when the profiler fails (e.g. no CUPTI on a GPU image)."""
  def broken(*a, **k):
    raise RuntimeError("no profiler plugin")

  monkeypatch.setattr(profiling, "profile", broken)
  assert benchmark._profile(None, lambda: None, 2) == {"error": "RuntimeError: no profiler plugin"}
  assert "profile failed: RuntimeError: no profiler plugin" in capsys.readouterr().err
