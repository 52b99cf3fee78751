"""Independent truth for core.models.flops: FLOPs counted from a traced jaxpr.

dot_general / conv_general_dilated as 2 x multiply-accumulates, scan bodies times their length.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np


def jaxpr_flops(fn: Callable[..., Any], *args, **kwargs) -> float:
  """Counts dot_general / conv FLOPs (2 x MACs) in the jaxpr of fn(*args), scans x length."""
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  return _count(closed.jaxpr)


def _count(jaxpr: Any) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      k = int(np.prod([lhs[d] for d in lc])) if lc else 1
      total += 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * k
    elif name == "conv_general_dilated":
      dn = eqn.params["dimension_numbers"]
      rhs = eqn.invars[1].aval.shape
      kernel_spatial = float(np.prod([rhs[d] for d in dn.rhs_spec[2:]]))
      cin = rhs[dn.rhs_spec[1]]
      out = float(np.prod(eqn.outvars[0].aval.shape))
      dil = float(np.prod(eqn.params.get("lhs_dilation") or (1,)))
      # A transposed conv (lhs dilation d, kernel d) touches one non-zero input per d^2 taps.
      total += 2.0 * out * kernel_spatial * cin / dil
    sub = 0.0
    for v in eqn.params.values():
      for j in (v if isinstance(v, (list, tuple)) else [v]):
        inner = getattr(j, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          sub = max(sub, _count(inner)) if name == "cond" else sub + _count(inner)
        elif hasattr(j, "eqns"):
          sub += _count(j)
    if name == "scan":
      sub *= eqn.params["length"]
    total += sub
  return total
