"""LightningDiT-SFD and its training loss in PyTorch, written after the official code with its state-dict names, as
the speed reference for the benchmarks.

Nothing of the official code is vendored; `check_against_golden` verifies this module against the golden
fixtures (computed with the official code) before any timing, so the comparison is with the same network.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
  def __init__(self, dim, eps=1e-6):
    super().__init__()
    self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

  def forward(self, x):
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
    return y.type_as(x) * self.weight


def sincos_2d(dim, grid):
  def one(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], 1)
  h, w = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")
  return np.concatenate([one(dim // 2, w), one(dim // 2, h)], 1).astype(np.float32)


def rope_tables(head_dim, grid):
  dim = head_dim // 2
  freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
  f = torch.einsum("l,f->lf", torch.arange(grid).float(), freqs).repeat_interleave(2, -1)
  angles = torch.cat([f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)], -1)
  return angles.reshape(grid * grid, head_dim).cos(), angles.reshape(grid * grid, head_dim).sin()


def rotate_pairs(x):
  x = x.unflatten(-1, (-1, 2))
  return torch.stack([-x[..., 1], x[..., 0]], -1).flatten(-2)


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
    self.q_norm, self.k_norm = RMSNorm(dim // heads), RMSNorm(dim // heads)

  def forward(self, x, cos, sin):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    q, k = self.q_norm(q), self.k_norm(k)
    q, k = q * cos + rotate_pairs(q) * sin, k * cos + rotate_pairs(k) * sin
    return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

  def forward(self, x):
    a, b = self.w12(x).chunk(2, -1)
    return self.w3(F.silu(a) * b)


class Block(nn.Module):
  def __init__(self, dim, heads, hidden):
    super().__init__()
    self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
    self.attn, self.mlp = Attention(dim, heads), SwiGLU(dim, hidden)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

  def forward(self, x, c, cos, sin):
    sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, -1)
    x = x + g1[:, None] * self.attn(self.norm1(x) * (1 + sc1[:, None]) + sh1[:, None], cos, sin)
    return x + g2[:, None] * self.mlp(self.norm2(x) * (1 + sc2[:, None]) + sh2[:, None])


class TimestepEmbedder(nn.Module):
  def __init__(self, width):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))

  def forward(self, t):
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32, device=t.device) / 128)
    args = t.float()[:, None] * freqs[None]
    return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1))


class FinalLayer(nn.Module):
  def __init__(self, dim, out):
    super().__init__()
    self.norm_final, self.linear = RMSNorm(dim), nn.Linear(dim, out)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, -1)
    return self.linear(self.norm_final(x) * (1 + scale[:, None]) + shift[:, None])


class PatchEmbed(nn.Module):
  def __init__(self, channels, dim, patch):
    super().__init__()
    self.proj = nn.Conv2d(channels, dim, patch, patch)


class LabelEmbedder(nn.Module):
  def __init__(self, classes, dim):
    super().__init__()
    self.embedding_table = nn.Embedding(classes + 1, dim)


class LightningDiTSFD(nn.Module):
  """NCHW in, (velocity, REPA projection) out, with the official parameter names."""

  def __init__(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio, num_classes,
               repa_depth, repa_projector_dim, repa_z_dim):
    super().__init__()
    d, grid = hidden_size, input_size // patch_size
    self.patch, self.channels, self.grid, self.repa_depth = patch_size, in_channels, grid, repa_depth
    self.x_embedder = PatchEmbed(in_channels, d, patch_size)
    self.t_embedder_sem, self.t_embedder_tex = TimestepEmbedder(d // 2), TimestepEmbedder(d // 2)
    self.y_embedder = LabelEmbedder(num_classes, d)
    self.register_buffer("pos_embed", torch.from_numpy(sincos_2d(d, grid))[None])
    cos, sin = rope_tables(d // num_heads, grid)
    self.register_buffer("rope_cos", cos)
    self.register_buffer("rope_sin", sin)
    hidden = int(2 / 3 * int(d * mlp_ratio))
    self.blocks = nn.ModuleList(Block(d, num_heads, hidden) for _ in range(depth))
    self.final_layer = FinalLayer(d, patch_size ** 2 * in_channels)
    p = repa_projector_dim
    self.repa_projector = nn.Sequential(nn.Linear(d, p), nn.SiLU(), nn.Linear(p, p), nn.SiLU(),
                                        nn.Linear(p, repa_z_dim))

  def forward(self, x, t_tex, t_sem, y):
    b = x.shape[0]
    tok = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
    c = torch.cat([self.t_embedder_sem(t_sem), self.t_embedder_tex(t_tex)], -1)
    c = c + self.y_embedder.embedding_table(y)
    z = None
    for i, block in enumerate(self.blocks):
      tok = block(tok, c, self.rope_cos, self.rope_sin)
      if i + 1 == self.repa_depth:
        z = self.repa_projector(tok)
    out = self.final_layer(tok, c)
    g, p = self.grid, self.patch
    v = out.reshape(b, g, g, p, p, self.channels).permute(0, 5, 1, 3, 2, 4).reshape(b, self.channels, g * p, g * p)
    return v, z


def sfd_loss(model, x1, x0, t, y, dino, delta_t=0.3, semantic_weight=2.0, semantic_channels=16):
  """The official objective for fixed draws; x NCHW, dino (B, N, D)."""
  a = (1 + delta_t) * t
  t_sem, t_tex = a.clamp(max=1), (a - delta_t).clamp(min=0)
  c = x1.shape[1] - semantic_channels
  xt = torch.cat([t_tex[:, None, None, None] * x1[:, :c] + (1 - t_tex[:, None, None, None]) * x0[:, :c],
                  t_sem[:, None, None, None] * x1[:, c:] + (1 - t_sem[:, None, None, None]) * x0[:, c:]], 1)
  target = x1 - x0
  v, z = model(xt, t_tex, t_sem, y)
  w = torch.ones(x1.shape[1], device=x1.device)
  w[c:] = semantic_weight
  mse = (w[None, :, None, None] * (v - target) ** 2).mean((1, 2, 3))
  cos = (1 - F.cosine_similarity(v, target, dim=1)).mean((1, 2))
  repa = (1 - F.cosine_similarity(z, dino, dim=-1)).mean(1)
  return mse.mean() + cos.mean() + repa.mean()


@torch.no_grad()
def update_ema(ema_model, model, decay=0.9999):
  """The official train.py's EMA update after every optimiser step: one in-place update per named parameter."""
  ema_params = dict(ema_model.named_parameters())
  for name, param in model.named_parameters():
    ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def build(model_cfg) -> LightningDiTSFD:
  """The torch model for an sfd_jax `model` config."""
  return LightningDiTSFD(model_cfg.input_size, model_cfg.patch_size, model_cfg.in_channels, model_cfg.hidden_size,
                         model_cfg.depth, model_cfg.num_heads, model_cfg.mlp_ratio, model_cfg.num_classes,
                         model_cfg.repa_depth, model_cfg.repa_projector_dim, model_cfg.repa_z_dim)


def check_against_golden(golden_dir) -> float:
  """Max |velocity − official| of this module on golden/dit_tiny (raises if above 1e-4)."""
  import json
  from pathlib import Path
  kw = json.loads((Path(golden_dir) / "dit_tiny" / "config.json").read_text())["model_kwargs"]
  sd = dict(np.load(Path(golden_dir) / "dit_tiny" / "state_dict.npz"))
  io = np.load(Path(golden_dir) / "dit_tiny" / "inputs_outputs.npz")
  z_dim = sd["repa_projector.4.weight"].shape[0]
  model = LightningDiTSFD(kw["input_size"], kw["patch_size"], kw["in_channels"], kw["hidden_size"], kw["depth"],
                          kw["num_heads"], kw["mlp_ratio"], kw["num_classes"], kw["repa_depth"],
                          kw["repa_projector_dim"], z_dim)
  weights = {k: torch.from_numpy(v.astype(np.float32)) for k, v in sd.items() if not k.startswith("feat_rope")}
  model.load_state_dict(weights, strict=False)
  with torch.no_grad():
    v, _ = model(*(torch.from_numpy(io[k]) for k in ("x", "t_tex", "t_sem", "y")))
  err = float(np.abs(v.numpy() - io["velocity"]).max())
  if err > 1e-4:
    raise AssertionError(f"the torch reference differs from the official velocity by {err}")
  return err
