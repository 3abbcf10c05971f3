"""LightningDiT-SFD: the velocity network of Semantic-First Diffusion.

A LightningDiT (adaLN blocks with RMSNorm, QK-norm, SwiGLU, 2-D RoPE on top of a fixed 2-D sin-cos table) with two
timestep embedders of width D/2, one per stream, whose outputs are concatenated `[sem | tex]`, and a REPA
projector on the hidden states after block `repa_depth`. Inputs are NHWC latents with channels
`[texture | semantic]`. The model is deterministic: label dropout belongs to the loss, which replaces labels.

The transformer blocks are one `LightningDiTBlock` applied with `jax.lax.scan` over parameters stacked on a
leading depth axis (`params['blocks']`), so XLA compiles one block instead of `depth` of them; the scan carries
the hidden state after block `repa_depth` out for the REPA projector. `convert.dit` maps the stack
to the official per-block names (`blocks.{i}.*`) both ways.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from sfd_jax.errors import UserError
from sfd_jax.models.layers import (
  ATTENTION,
  MATMUL_PRECISIONS,
  NormWeight,
  RMSNorm,
  SwiGLU,
  attention,
  compare_attention,
  dense,
  matmul_precision,
  modulate,
  rope_2d,
  sincos_2d,
  swiglu_hidden,
  timestep_embedding,
)
from sfd_jax.sharding import batch_devices, constrain_batch, fsdp_size, gather, traced_with_mesh

Dtype = Any

# depth, hidden width, heads of the official factories; patch size is a separate field.
PRESETS = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "XXL": dict(depth=24, hidden_size=1536, num_heads=24),  # the official "1p0B"
    "1p6B": dict(depth=28, hidden_size=1792, num_heads=28),
}

# The name of a layer's weights as its matmuls use them (cast, all-gathered: `_gathered_weights`).
GATHERED_WEIGHTS = "gathered_weights"
_KEEP_WEIGHTS = jax.checkpoint_policies.save_only_these_names(GATHERED_WEIGHTS)

# What each block's rematerialisation saves for the backward pass: names usable in configs. The dots policies keep
# the gathered weights too, so that the backward pass does not gather them again; `full` keeps nothing.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.dots_saveable,
                                                                       _KEEP_WEIGHTS),
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _KEEP_WEIGHTS),
}

# The official init: xavier-uniform Linear weights, zero biases.
_XAVIER = nn.initializers.xavier_uniform()


def _gathered_weights(params, dtype):
  """One layer's parameters as its matmuls use them: the kernels of the token-wise matmuls (attention and MLP) cast
  to the compute `dtype` and then replicated over the mesh in context (all-gathered over 'fsdp', in `dtype`), named
  `GATHERED_WEIGHTS`.

  Done explicitly, once per layer, so that the gathered weights are a value of the program the remat policies can
  keep for the backward pass; left to XLA, the backward pass of a rematerialised layer gathers them again. The adaLN
  modulation's kernel stays sharded: it multiplies one condition vector per sample, and moving those products is
  cheaper than moving the kernel. Without FSDP (no mesh, or fsdp 1) there is nothing to gather and the params are
  returned as they are (each matmul casts its kernel, and the backward pass casts it again rather than keeping it).
  """
  if fsdp_size() == 1:
    return params

  def gathered(path, x):
    keys = [getattr(k, "key", None) for k in path]
    if keys[-1] != "kernel" or keys[0] not in ("attn", "mlp"):
      return x
    return checkpoint_name(gather(x.astype(dtype)), GATHERED_WEIGHTS)
  return jax.tree_util.tree_map_with_path(gathered, params)


def _dense(features, dtype, name=None, zero=False):
  return dense(features, dtype, name, nn.initializers.zeros if zero else _XAVIER)


class TimestepEmbedder(nn.Module):
  """Sinusoidal features of t (256, float32) → Linear → SiLU → Linear."""
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    init = nn.initializers.normal(0.02)
    h = dense(self.width, self.dtype, "mlp_0", init)(timestep_embedding(t, 256))
    return dense(self.width, self.dtype, "mlp_2", init)(nn.silu(h))


class Attention(nn.Module):
  """Multi-head self-attention with per-head RMSNorm on q and k (one weight shared by all heads) and 2-D RoPE.

  The norms and RoPE run in float32 and are cast to `dtype` once, as the attention's input (inside the attention
  kernel where there is one: `layers.attention`, with the model's `attention` and `matmul_precision`). The inputs
  of `layers.attention` are sown as intermediates (`attention_inputs`), for `LightningDiT.attention_inputs`.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  attention: str = "auto"
  matmul_precision: str = "default"

  @nn.compact
  def __call__(self, x, rope_cos, rope_sin):
    d = x.shape[-1]
    head_dim = d // self.num_heads
    qkv = _dense(3 * d, self.dtype, "qkv")(x)
    norm_rope = (NormWeight(head_dim, name="q_norm")(), NormWeight(head_dim, name="k_norm")(), rope_cos, rope_sin)
    self.sow("intermediates", "attention_inputs", (qkv, *norm_rope))
    out = attention(qkv, self.num_heads, norm_rope, implementation=self.attention, precision=self.matmul_precision)
    return _dense(d, self.dtype, "proj")(out)


class LightningDiTBlock(nn.Module):
  """x += g1·Attn(mod(norm1 x)); x += g2·SwiGLU(mod(norm2 x)); modulation from Linear(SiLU(c)) → 6D.

  Norm and modulation run in float32 and give the matmul its `dtype` input; the residual stream is in `dtype`.
  """
  num_heads: int
  mlp_hidden: int
  dtype: Dtype = jnp.float32
  attention: str = "auto"
  matmul_precision: str = "default"

  @nn.compact
  def __call__(self, x, c, rope_cos, rope_sin):
    d = x.shape[-1]
    mod = _dense(6 * d, self.dtype, "adaLN_modulation", zero=True)(nn.silu(c))
    sh1, sc1, g1, sh2, sc2, g2 = jnp.split(mod, 6, axis=-1)
    h = modulate(RMSNorm(name="norm1")(x), sh1, sc1).astype(self.dtype)
    attn = Attention(self.num_heads, self.dtype, self.attention, self.matmul_precision, name="attn")
    x = x + g1[:, None] * attn(h, rope_cos, rope_sin)
    h = modulate(RMSNorm(name="norm2")(x), sh2, sc2).astype(self.dtype)
    return x + g2[:, None] * SwiGLU(self.mlp_hidden, self.dtype, _XAVIER, name="mlp")(h)


class FinalLayer(nn.Module):
  """Linear(mod(RMSNorm x)) with (shift, scale) from Linear(SiLU(c)); projects to p²·C per token."""
  out_features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    shift, scale = jnp.split(_dense(2 * x.shape[-1], self.dtype, "adaLN_modulation", zero=True)(nn.silu(c)), 2, -1)
    x = modulate(RMSNorm(name="norm_final")(x), shift, scale).astype(self.dtype)
    return _dense(self.out_features, self.dtype, "linear", zero=True)(x)


class REPAProjector(nn.Module):
  """Per-token MLP D → P → P → z (SiLU between) mapping hidden states onto the DINOv2 feature space."""
  projector_dim: int
  z_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.silu(_dense(self.projector_dim, self.dtype, "fc_0")(x))
    x = nn.silu(_dense(self.projector_dim, self.dtype, "fc_2")(x))
    return _dense(self.z_dim, self.dtype, "fc_4")(x)


class LightningDiT(nn.Module):
  """The SFD velocity network. `__call__(x, t_tex, t_sem, y)` → velocity (B, H, W, C), float32.

  `dual_timestep=False` is the plain LightningDiT time conditioning (one embedder of width D fed with t_sem,
  which equals t_tex when Δ = 0), for checkpoints trained without the semantic-first offset.

  `attention` (one of `layers.ATTENTION`) chooses the attention implementation (`layers.attention`);
  `matmul_precision` (one of `layers.MATMUL_PRECISIONS`) is the precision of every matmul and convolution of the
  network and of their gradients: 'highest' reproduces float32 arithmetic on TPUs and GPUs too, 'default' takes
  the platform's faster passes (bfloat16 on TPU, TF32 on GPU) for float32 operands.
  """
  input_size: int = 16
  patch_size: int = 1
  in_channels: int = 48
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  dual_timestep: bool = True
  use_repa: bool = True
  repa_depth: int = 2
  repa_projector_dim: int = 2048
  repa_z_dim: int = 768
  remat_policy: str = "none"
  scan_unroll: int = 1  # layers per iteration of the block scan; `depth` unrolls it (XLA then costs every layer)
  dtype: Dtype = jnp.float32
  attention: str = "auto"
  matmul_precision: str = "default"

  @property
  def grid_size(self) -> int:
    return self.input_size // self.patch_size

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def check_fields(self):
    """Raises ValueError naming the first field that cannot build a network (also run by `setup`)."""
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
    if self.attention not in ATTENTION:
      raise ValueError(f"attention {self.attention!r} is not one of {ATTENTION}")
    if self.matmul_precision not in MATMUL_PRECISIONS:
      raise ValueError(f"matmul_precision {self.matmul_precision!r} is not one of {MATMUL_PRECISIONS}")
    if self.hidden_size % self.num_heads or self.head_dim % 4:
      raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_heads} heads of a width "
                       "divisible by 4 (2-D RoPE)")
    if self.input_size % self.patch_size:
      raise ValueError(f"input_size {self.input_size} must be a multiple of patch_size {self.patch_size}")
    if not 1 <= self.scan_unroll <= self.depth:
      raise ValueError(f"scan_unroll {self.scan_unroll} must lie in [1, depth={self.depth}]")
    if self.use_repa and not 1 <= self.repa_depth <= self.depth:
      raise ValueError(f"repa_depth {self.repa_depth} must lie in [1, depth={self.depth}]")

  def setup(self):
    self.check_fields()
    p, d = self.patch_size, self.hidden_size
    # xavier over the kernel viewed as (p·p·C → D), as the official init of the patch-embed conv.
    patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
    self.x_embedder = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                              param_dtype=jnp.float32, kernel_init=patch_init, name="x_embedder")
    if self.dual_timestep:
      self.t_embedder_sem = TimestepEmbedder(d // 2, self.dtype)
      self.t_embedder_tex = TimestepEmbedder(d // 2, self.dtype)
    else:
      self.t_embedder = TimestepEmbedder(d, self.dtype)
    self.y_embedder = nn.Embed(self.num_classes + 1, d, param_dtype=jnp.float32,
                               embedding_init=nn.initializers.normal(0.02), name="y_embedder")
    self.blocks = self.param("blocks", self._init_blocks)
    self.final_layer = FinalLayer(p * p * self.in_channels, self.dtype)
    if self.use_repa:
      self.repa_projector = REPAProjector(self.repa_projector_dim, self.repa_z_dim, self.dtype)

  def block(self) -> LightningDiTBlock:
    """The block every layer applies (unbound); layer i's parameters are `params['blocks']` at index i."""
    return LightningDiTBlock(self.num_heads, swiglu_hidden(self.hidden_size, self.mlp_ratio), self.dtype,
                             self.attention, self.matmul_precision, parent=None)

  def _init_blocks(self, key):
    """Every layer's parameters, initialised independently and stacked on a leading depth axis."""
    x = jnp.zeros((1, self.grid_size ** 2, self.hidden_size), self.dtype)
    c = jnp.zeros((1, self.hidden_size), self.dtype)
    rope = rope_2d(self.head_dim, self.grid_size)
    return jax.vmap(lambda k: self.block().init(k, x, c, *rope)["params"])(jax.random.split(key, self.depth))

  def _apply_blocks(self, tokens, c):
    """Every layer in one `lax.scan`, each rematerialised by `remat_policy`; returns the output and the hidden
    state after layer `repa_depth` (which the scan carries: slicing the stack into two scans would copy it)."""
    block, rope = self.block(), rope_2d(self.head_dim, self.grid_size)

    def layer(carry, params_and_index):
      x, after_repa = carry
      params, i = params_and_index
      x = block.apply({"params": _gathered_weights(params, self.dtype)}, constrain_batch(x), c, *rope)
      return (x, jnp.where(i + 1 == self.repa_depth, x, after_repa)), None

    if self.remat_policy != "none":
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
    (tokens, after_repa), _ = jax.lax.scan(layer, (tokens, tokens), (self.blocks, jnp.arange(self.depth)),
                                           unroll=self.scan_unroll)
    return tokens, after_repa

  def condition(self, t_tex, t_sem, y):
    """The adaLN condition c = [emb_sem | emb_tex] + label embedding, (B, D)."""
    if self.dual_timestep:
      emb = jnp.concatenate([self.t_embedder_sem(t_sem), self.t_embedder_tex(t_tex)], axis=-1)
    else:
      emb = self.t_embedder(t_sem)
    return emb + self.y_embedder(y).astype(emb.dtype)

  def _embed(self, x, t_tex, t_sem, y):
    """(tokens (B, N, D) with the position table added, condition c (B, D)): the input of the first block."""
    b, h, w, c_in = x.shape
    if (h, w, c_in) != (self.input_size, self.input_size, self.in_channels):
      raise ValueError(f"LightningDiT expects latents (B, {self.input_size}, {self.input_size}, "
                       f"{self.in_channels}) NHWC, got {x.shape}")
    g = self.grid_size
    tokens = self.x_embedder(x.astype(self.dtype)).reshape(b, g * g, self.hidden_size)
    tokens = tokens + jnp.asarray(sincos_2d(self.hidden_size, g), self.dtype)[None]
    return tokens, self.condition(t_tex, t_sem, y)

  def __call__(self, x, t_tex, t_sem, y, return_repa: bool = False):
    if return_repa and not self.use_repa:
      raise ValueError("return_repa=True needs a model built with use_repa=True")
    with matmul_precision(self.matmul_precision):
      b, h, w, _ = x.shape
      p, g = self.patch_size, self.grid_size
      tokens, c = self._embed(x, t_tex, t_sem, y)
      tokens, after_repa = self._apply_blocks(tokens, c)
      z = self.repa_projector(after_repa).astype(jnp.float32) if self.use_repa else None
      out = self.final_layer(tokens, c).astype(jnp.float32)
    # Per-token outputs are laid out (i, j, c) with c fastest: the official unpatchify.
    v = out.reshape(b, g, g, p, p, self.in_channels).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, self.in_channels)
    return (v, z) if return_repa else v

  def attention_inputs(self, x, t_tex, t_sem, y):
    """The arguments of the first block's `layers.attention` for these inputs, (qkv, q_weight, k_weight, cos,
    sin): what `check_attention` runs each implementation on (everything before it is the same for all)."""
    with matmul_precision(self.matmul_precision):
      tokens, c = self._embed(x, t_tex, t_sem, y)
      first = jax.tree.map(lambda p: p[0], self.blocks)
      _, state = self.block().apply({"params": _gathered_weights(first, self.dtype)}, constrain_batch(tokens), c,
                                    *rope_2d(self.head_dim, self.grid_size), mutable=["intermediates"])
    return state["intermediates"]["attn"]["attention_inputs"][0]

  def forward_flops(self, with_repa: bool = True) -> int:
    """Model FLOPs of one forward pass for one sample (a multiply-add counts 2), for throughput and MFU.

    Training costs 3× this (forward + backward); rematerialisation adds compute but not model FLOPs.
    """
    n, d, c = self.grid_size ** 2, self.hidden_size, self.in_channels
    f, p = swiglu_hidden(d, self.mlp_ratio), self.patch_size
    block = 2 * d * 6 * d + 2 * n * d * (3 * d + d + 3 * f) + 2 * 2 * n * n * d
    flops = 2 * n * c * p * p * d + self.depth * block + 2 * d * 2 * d + 2 * n * d * p * p * c
    flops += 2 * 2 * (256 * d // 2 + (d // 2) ** 2) if self.dual_timestep else 2 * (256 * d + d * d)
    if self.use_repa and with_repa:
      q = self.repa_projector_dim
      flops += 2 * n * (d * q + q * q + q * self.repa_z_dim)
    return flops

  def dummy_inputs(self, batch: int = 1):
    """Arguments for `init` / `jax.eval_shape`."""
    x = jnp.zeros((batch, self.input_size, self.input_size, self.in_channels), jnp.float32)
    t = jnp.zeros((batch,), jnp.float32)
    return x, t, t, jnp.zeros((batch,), jnp.int32)


def check_attention(model: LightningDiT, variables, x, t_tex, t_sem, y, mesh, gradients: bool, where: str):
  """Runs the first attention of `model` on the first sample per device of these inputs (a real batch) with the
  model's attention and with XLA's, under `mesh` as the steps run, and stops (`layers.compare_attention`) if the
  outputs, and with `gradients` the gradients of qkv and of the QK-norm weights, differ beyond bfloat16 rounding.

  One block's forward (and backward) pass: a fraction of a second, once per run, for the way back from a kernel
  that is wrong on the chip it runs on (the kernels are tested elsewhere only as interpreted jaxpr)."""
  heads, implementation, precision = model.num_heads, model.attention, model.matmul_precision
  inputs_model, cotangent_key = model.clone(attention="xla"), jax.random.key(0)  # the same inputs for both

  def outputs(impl, variables, *inputs):
    x, t_tex, t_sem, y = (a[:batch_devices(mesh)] for a in inputs)
    qkv, *weights = inputs_model.apply(variables, x, t_tex, t_sem, y, method=LightningDiT.attention_inputs)
    wq, wk, cos, sin = weights

    def attend(qkv, wq, wk):
      with matmul_precision(precision):
        return attention(qkv, heads, (wq, wk, cos, sin), implementation=impl, precision=precision)
    if not gradients:
      return {"output": attend(qkv, wq, wk)}
    out, vjp = jax.vjp(attend, qkv, wq, wk)
    grads = vjp(jax.random.normal(cotangent_key, out.shape, out.dtype))
    return {"output": out, "qkv gradient": grads[0], "QK-norm weight gradients": jnp.concatenate(grads[1:])}

  def run(impl):
    fn = jax.jit(traced_with_mesh(mesh, lambda *args: outputs(impl, *args)))
    return jax.device_get(fn(variables, x, t_tex, t_sem, y))

  compare_attention(run(implementation), run("xla"), implementation, where)


def preset_fields(preset: str) -> dict:
  """depth, hidden_size and num_heads of an official size (`S`, `B`, `L`, `XL`, `XXL`/`1p0B`, `1p6B`)."""
  name = {"1p0B": "XXL"}.get(preset, preset)
  if name not in PRESETS:
    raise UserError(f"unknown LightningDiT preset {preset!r}; choose one of {sorted(PRESETS)} (or 1p0B)")
  return dict(PRESETS[name])


def lightningdit(preset: str | None = None, **fields) -> LightningDiT:
  """The one way to build a LightningDiT: an official size (`preset`, optional) with any field set or changed.

  `dtype` may be a name ('bfloat16'), as configs hold it. A training config builds with `lightningdit(**cfg.model)`,
  an official checkpoint with `lightningdit(**convert.dit.dit_kwargs(official_kwargs))`.
  """
  fields = {**(preset_fields(preset) if preset else {}), **fields}
  if "dtype" in fields:
    fields["dtype"] = jnp.dtype(fields["dtype"])
  return LightningDiT(**fields)
