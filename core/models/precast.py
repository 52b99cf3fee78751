"""Parameters cast once to the compute dtype, for inference (the sampler's loop).

flax's Dense, DenseGeneral, Conv and Embed keep float32 parameters and cast them to their compute
dtype (bfloat16) at every call, so a jitted sampler that closes over float32 EMA weights may
convert every kernel again at each of its 256 steps (XLA need not hoist the converts out of the
loop).
:func:`precast_params` finds, by running the model abstractly, the parameters of exactly these
modules and casts them before the loop: the model then computes bit-identical outputs, since a
cast of an already-cast array does nothing. Every other parameter (norm scales and biases, which
are used in float32; the folded up-sampling kernel, summed in float32 first) keeps its dtype.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Modules that cast their parameters to ``self.dtype`` before using them, and only then.
CASTING_MODULES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed)


def casting_modules(model: nn.Module, params: Any, image_shape: Sequence[int]
                    ) -> dict[tuple[str, ...], Any]:
  """{module path: compute dtype} of the casting modules ``model`` calls on one image of
  ``image_shape`` (H, W, C); abstract (jax.eval_shape), nothing is computed."""
  found: dict[tuple[str, ...], Any] = {}

  def record(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name == "__call__" and isinstance(mod, CASTING_MODULES) and mod.dtype:
      found[tuple(mod.path)] = jnp.dtype(mod.dtype)
    return next_fun(*args, **kwargs)

  spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  z = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  kw = {}
  if getattr(model, "text_channels", 0):   # width of the text embeddings from the projection
    width = params["text_proj"]["norm"]["scale"].shape[0]
    kw["text_emb"] = jax.ShapeDtypeStruct((1, 1, width), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda p, z, kw: model.apply({"params": p}, z, jnp.zeros((1,)), **kw),
                   jax.tree.map(spec, params), z, kw)
  return found


def precast_params(model: nn.Module, params: Any, image_shape: Sequence[int]) -> Any:
  """``params`` with the parameters of every casting module cast to its compute dtype (see the
  module docstring); works inside jit (on tracers) and outside."""
  modules = casting_modules(model, params, image_shape)

  def cast(path, leaf):
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    dtype = modules.get(keys[:-1])
    if dtype is None or not jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf
    return leaf.astype(dtype)

  return jax.tree_util.tree_map_with_path(cast, params)
