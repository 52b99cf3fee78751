"""Transformer blocks of the U-ViT (appendix B.2.1): MLP block, self- and cross-attention, scan.

Written in flax linen (parameters are plain pytrees; nn.scan stacks the 36 blocks of the paper's
U-ViT into one compiled loop body, nn.remat trades their activations for recomputation).

Following the pseudo-code of B.2.1:
* mlp_block: h = Dense(4C)(Normalize(x)); h = swish(h) * (1 + scale) + shift, (scale, shift) from
  a Dense of the conditioning embedding; dropout (transformer_dropout); Dense(C) zero-initialised.
* self_attention: q, k, v = DenseGeneral(Normalize(x), (heads, head_dim)); q and k go through
  NormalizeWithBias (LayerNorm with bias over head_dim); softmax(q k^T * head_dim^-0.5) v; output
  DenseGeneral over (heads, head_dim) -> C, zero-initialised.
* transformer_block: x += mlp_block(x); x += self_attention(x) — MLP first (NOTES.md item 4).
  Every MLP block has its own (scale, shift) projection of the embedding, as the listing reads
  (604M of the 2.47B parameters of the paper's "U-ViT 2B"). TransformerStack(shared_modulation=
  True) instead computes one projection for the whole stack, shared by its blocks (a variant
  for the "2B" label; README choices table).
"Normalize" (no "WithBias") is read as LayerNorm with a learned scale and no bias.

Text conditioning (Sec. 3.6 / 5.2: "cross-attention in the transformer that operates on T5 XXL
text embeddings"): when the model has text_channels > 0, every transformer block ends with
x += cross_attention(x, text), a block like self_attention whose keys and values come from the
text sequence (projected once per model to text_channels, see uvit.py). With a text mask
([B, T] bool, True on real tokens) padding tokens get no attention weight, and an example whose
mask is all False (the null text of classifier-free guidance) gets no cross-attention update at
all; without one (text_mask=None) every token is attended, padding included.

Attention is computed by jax.nn.dot_product_attention: on GPU with 16-bit inputs and head_dim
<= 128 the fused cuDNN (flash) kernel, otherwise XLA's implementation (attention_impl='auto').
attention_impl='pallas' runs the Pallas (Triton) flash-attention kernel of jax.experimental, which
takes the paper's head size of 512 (cuDNN's fused kernel stops at 256 on Hopper).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from core.errors import UserError
from core.models.layers import CONV_OUTPUT, DROPOUT_MASK, Dropout

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
MLP_EXPANSION = 4   # B.2.1 mlp_block(expansion_factor=4)
REMAT_POLICIES = ("none", "minimal", "full")


def checkpoint_policy(name: str) -> Any:
  """The jax.checkpoint policy of a remat_policy name (None: save nothing, recompute all).

  'minimal' (maxtext's name): keep the outputs of matrix products without batch dimensions (the
  q, k, v, output and MLP projections: a bf16 [B, T, C] or [B, T, 4C] each), of the ResBlocks'
  convolutions and the dropout masks; the backward pass recomputes the norms, activations,
  modulation and the attention softmax from them. 'full' keeps only the block's input.
  """
  if name not in REMAT_POLICIES:
    raise UserError(f"remat_policy={name!r} is unknown; use one of {', '.join(REMAT_POLICIES)}")
  if name == "minimal":
    cp = jax.checkpoint_policies
    return cp.save_from_both_policies(cp.checkpoint_dots_with_no_batch_dims,
                                      cp.save_only_these_names(DROPOUT_MASK, CONV_OUTPUT))
  return None


def rematerialised(cls: type, policy: str, prevent_cse: bool = True) -> type:
  """``cls`` wrapped in nn.remat with :func:`checkpoint_policy` (``cls`` itself for 'none')."""
  if policy == "none":
    return cls
  return nn.remat(cls, policy=checkpoint_policy(policy), prevent_cse=prevent_cse)


def _dense(features, dtype, name=None, zero=False, axis=-1):
  kw = {"kernel_init": nn.initializers.zeros} if zero else {}
  return nn.DenseGeneral(features, axis=axis, dtype=dtype, param_dtype=jnp.float32, name=name,
                         **kw)


def normalize(dtype, name=None) -> nn.LayerNorm:
  """The pseudo-code's Normalize: LayerNorm with learned scale, no bias."""
  return nn.LayerNorm(use_bias=False, dtype=dtype, param_dtype=jnp.float32, name=name)


def normalize_with_bias(dtype, name=None) -> nn.LayerNorm:
  """The pseudo-code's NormalizeWithBias for q and k: LayerNorm with scale and bias."""
  return nn.LayerNorm(dtype=dtype, param_dtype=jnp.float32, name=name)


@gin.configurable("pallas_attention")
def pallas_block_sizes(block_q: int = 64, block_k: int = 64, block_backward: int = 32,
                       num_warps: int | None = None, num_stages: int = 2) -> dict[str, Any]:
  """Tiles of the Pallas flash-attention kernel (gin: ``pallas_attention.block_q = 64`` ...).

  At the paper's head size of 512 a 128 x 512 bf16 query tile alone is 128 KiB of the H100's
  228 KiB of shared memory, hence 64 (forward) and 32 (backward) rows by default.
  """
  return dict(block_q=block_q, block_k=block_k, block_backward=block_backward,
              num_warps=num_warps, num_stages=num_stages)


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array | None:
  """softmax(q k^T * scale) v by jax.experimental.pallas.ops.gpu.attention.mha (Triton flash
  attention; it pads the head size to a power of 2), in Pallas interpret mode off the GPU.

  Returns None where the kernel's tiles do not divide the sequence lengths (caller: XLA's path).
  """
  # Lazy: the GPU kernel module is only needed by attention_impl='pallas'.
  from jax.experimental.pallas.ops.gpu import attention as pallas_mha  # pylint: disable=g-import-not-at-top
  cfg = pallas_block_sizes()
  t, s = q.shape[1], k.shape[1]
  bq, bk = min(cfg["block_q"], t), min(cfg["block_k"], s)
  bb_q, bb_k = min(cfg["block_backward"], t), min(cfg["block_backward"], s)
  if t % bq or s % bk or t % bb_q or s % bb_k:
    return None
  sizes = pallas_mha.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bb_q, block_kv_dkv=bb_k,
                                block_q_dq=bb_q, block_kv_dq=bb_k)
  return pallas_mha.mha(q, k, v, None, sm_scale=scale, block_sizes=sizes,
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                        interpret=jax.default_backend() != "gpu")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                          implementation: str = "auto", mask: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T * scale) v on [B, T, heads, head_dim] via jax.nn.dot_product_attention.

  ``mask``: [B, S] bool over the keys (True = attend); an example with no True key gets zeros.
  'pallas': the Pallas kernel (:func:`pallas_attention`) for unmasked attention whose lengths
  its tiles divide; masked (text cross-) attention and other lengths take XLA's path.
  """
  if implementation not in ATTENTION_IMPLS:
    raise UserError(f"attention_impl={implementation!r} is unknown; use one of "
                    f"{', '.join(ATTENTION_IMPLS)}")
  impl = implementation
  if impl == "pallas":
    out = pallas_attention(q, k, v, scale) if mask is None else None
    if out is not None:
      return out
    impl = "xla"
  if impl == "auto":
    fused_ok = (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
                and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0)
    impl = "cudnn" if fused_ok else "xla"
  if mask is None:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)
  mask = jnp.asarray(mask, bool)
  out = jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask[:, None, None, :],
                                     implementation=impl)
  return jnp.where(mask.any(axis=-1)[:, None, None, None], out, jnp.zeros_like(out))


class Attention(nn.Module):
  """Multi-head attention with normalised q, k (B.2.1); self-attention when ``context`` is None.

  ``input_norm=False`` takes ``x`` as already normalised and ``qk_norm=False`` drops the q / k
  LayerNorms: the U-Net's attention layer (unet.py, the lineage's AttnBlock) uses both.
  """
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str = "auto"
  input_norm: bool = True
  qk_norm: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    """``mask``: [B, S] bool over the context's tokens (cross-attention), None = all."""
    c = x.shape[-1]
    if c % self.num_heads:
      raise UserError(f"num_heads={self.num_heads} does not divide the {c} channels of an "
                      "attention layer; choose num_heads dividing every attention width")
    head_dim = c // self.num_heads
    x_norm = normalize(self.dtype, name="norm")(x) if self.input_norm else x
    kv_in = x_norm if context is None else context
    shape = (self.num_heads, head_dim)
    q = _dense(shape, self.dtype, name="query")(x_norm)
    k = _dense(shape, self.dtype, name="key")(kv_in)
    v = _dense(shape, self.dtype, name="value")(kv_in)
    if self.qk_norm:
      q = normalize_with_bias(self.dtype, name="norm_q")(q)
      k = normalize_with_bias(self.dtype, name="norm_k")(k)
    out = dot_product_attention(q, k, v, head_dim ** -0.5, self.attention_impl, mask)
    out = _dense(c, self.dtype, name="out", zero=True, axis=(-2, -1))(out)
    if mask is not None:  # no token to attend to (the null text): no update, bias included
      out = jnp.where(jnp.asarray(mask, bool).any(axis=-1)[:, None, None], out, jnp.zeros_like(out))
    return out


class MLPBlock(nn.Module):
  """The pseudo-code's mlp_block, with an optional U-Net skip input (normalised, averaged)."""
  expansion: int = MLP_EXPANSION
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, skip: jax.Array | None = None,
               mod: jax.Array | None = None) -> jax.Array:
    """``mod``: a precomputed [B, 2 * expansion * C] (scale, shift) projection (shared)."""
    c = x.shape[-1]
    h = normalize(self.dtype, name="norm")(x)
    if skip is not None:
      h = (h + normalize(self.dtype, name="norm_skip")(skip)) / math.sqrt(2.0)
    h = _dense(self.expansion * c, self.dtype, name="dense_in")(h)
    if mod is None:
      mod = _dense(2 * self.expansion * c, self.dtype, name="emb_proj")(emb)
    scale, shift = jnp.split(mod[:, None, :], 2, axis=-1)
    h = nn.swish(h) * (1.0 + scale) + shift
    if self.dropout > 0.0:
      h = Dropout(self.dropout, deterministic=self.deterministic)(h)
    return _dense(c, self.dtype, name="dense_out", zero=True)(h)


class TransformerBlock(nn.Module):
  """x += mlp_block(x, emb); x += self_attention(x); [x += cross_attention(x, text)] (B.2.1)."""
  num_heads: int
  dropout: float = 0.0
  cross_attention: bool = False
  deterministic: bool = True
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, text: jax.Array | None = None,
               skip: jax.Array | None = None, mod: jax.Array | None = None,
               text_mask: jax.Array | None = None) -> jax.Array:
    x = x + MLPBlock(dropout=self.dropout, deterministic=self.deterministic, dtype=self.dtype,
                     name="mlp")(x, emb, skip, mod)
    x = x + Attention(self.num_heads, self.dtype, self.attention_impl, name="self_attn")(x)
    if self.cross_attention:
      if text is None:
        raise UserError("this model has text cross-attention (text_channels > 0) but was called "
                        "without text_emb; pass text_emb=[B, T, D] or set text_channels=0")
      x = x + Attention(self.num_heads, self.dtype, self.attention_impl, name="cross_attn")(
          x, text, text_mask)
    return x


class _ScanBody(nn.Module):
  """(carry, broadcast inputs) -> (carry, None) wrapper so nn.scan can stack TransformerBlocks."""
  num_heads: int
  dropout: float = 0.0
  cross_attention: bool = False
  deterministic: bool = True
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x, emb, text, mod, text_mask):
    block = TransformerBlock(self.num_heads, self.dropout, self.cross_attention,
                             self.deterministic, self.dtype, self.attention_impl, name="block")
    return block(x, emb, text, None, mod, text_mask), None


class TransformerStack(nn.Module):
  """num_blocks TransformerBlocks, residual connections only (B.2: no skips in the middle).

  scan=True: one nn.scan over blocks, parameters stacked on a leading axis of size num_blocks
  (params['blocks']['block'][...] with shape [num_blocks, ...]); compile time does not grow with
  depth. scan=False: an unrolled loop, params['block_<i>']. remat_policy (REMAT_POLICIES) wraps
  each block in nn.remat with :func:`checkpoint_policy`: 'none' keeps every intermediate for the
  backward pass, 'minimal' only the projections' outputs and dropout masks, 'full' only the
  block's input. shared_modulation=True: one (scale, shift) projection of emb,
  params['shared_emb_proj'], used by every block's MLP.
  """
  num_blocks: int
  num_heads: int
  dropout: float = 0.0
  cross_attention: bool = False
  deterministic: bool = True
  dtype: Any = jnp.float32
  attention_impl: str = "auto"
  scan: bool = True
  remat_policy: str = "none"
  shared_modulation: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, text: jax.Array | None = None,
               text_mask: jax.Array | None = None) -> jax.Array:
    kw = dict(num_heads=self.num_heads, dropout=self.dropout,
              cross_attention=self.cross_attention, deterministic=self.deterministic,
              dtype=self.dtype, attention_impl=self.attention_impl)
    if self.num_blocks == 0:
      return x
    mod = None
    if self.shared_modulation:
      mod = _dense(2 * MLP_EXPANSION * x.shape[-1], self.dtype, name="shared_emb_proj")(emb)
    if self.scan:
      body = rematerialised(_ScanBody, self.remat_policy, prevent_cse=False)
      stack = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                      "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=self.num_blocks)
      x, _ = stack(name="blocks", **kw)(x, emb, text, mod, text_mask)
      return x
    block_cls = rematerialised(TransformerBlock, self.remat_policy)
    for i in range(self.num_blocks):
      x = block_cls(name=f"block_{i}", **kw)(x, emb, text, None, mod, text_mask)
    return x
