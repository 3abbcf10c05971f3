"""The extraction against the official `extract_features.py` (2025-12-21 release), step by step in torch: the
semantic latents (mean mode) and REPA features that `data.extract` writes for a few images at 256 and 512 px equal
the official recipe applied by torch to the same centre crops, with the public-fixture SemVAE
(golden/semvae_official, converted) and a tiny random DINOv2 with registers.

The reference, as `extract_features.py` computes it: x = crop / 255 → Normalize(0.5, 0.5) (the texture
VAE's input, in [-1, 1]); xs = Normalize(ImageNet mean/std)((x + 1) / 2); `F.interpolate(xs, (224, 224),
mode='bicubic')` (no antialias); DINOv2's final-norm patch tokens (transformers' `Dinov2WithRegistersModel`, whose
forward resizes its 37×37 position table as the hub model does); the SemVAE encoder built from the official state
dict with torch's own `nn.MultiheadAttention` / `LayerNorm` / `Linear` / `GELU`, its first `bottleneck_dim`
channels the mean. At 512 px the crop is cut into 2×2 tiles of 256 (`b c (p1 h) (p2 w) -> (b p1 p2) c h w`), each
read so, and put back (`(b p1 p2) d h w -> b d (p1 h) (p2 w)`). Latents are stored in float32 here, so they match to
float32 rounding; the REPA features are stored in float16 as the official stores them, so they match to float16
rounding.
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the torch extra; only the Python 3.13 tier runs without it
import torch.nn.functional as F
import yaml
from torch import nn
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from sfd_jax.convert.dinov2 import load_dinov2
from sfd_jax.convert.semvae import load_semvae
from sfd_jax.data import extract, images, latents
from sfd_jax.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD
from tests.golden import GOLDEN
from tests.test_extract import _tiny_encoders

FIXTURE = GOLDEN / "semvae_official"
ATOL, RTOL = 2e-5, 1e-4
REGISTERS = 4


def _dino_reference(width: int):
  """A random 2-block DINOv2/14 with registers whose position table is trained on 518 px (37×37), as the real one."""
  config = Dinov2WithRegistersConfig(hidden_size=width, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
                                     image_size=518, num_register_tokens=REGISTERS)
  torch.manual_seed(0)
  model = Dinov2WithRegistersModel(config).eval()
  with torch.no_grad():
    for key, p in model.named_parameters():
      if key.endswith("lambda1") or ("norm" in key and key.endswith("weight")):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif key.startswith("embeddings.") and not key.startswith("embeddings.patch"):
        p.copy_(0.5 * torch.randn_like(p))
      else:
        p.copy_(0.05 * torch.randn_like(p))
  return config, model


class Block(nn.Module):
  """The official TransformerBlock: x + MHA(LN1 x), then x + MLP(LN2 x)."""

  def __init__(self, d: int, heads: int):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
    self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
    self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

  def forward(self, x):
    h = self.norm1(x)
    x = x + self.attn(h, h, h, need_weights=False)[0]
    return x + self.mlp(self.norm2(x))


def _semvae_encoder_reference(state_dict: dict, arch: dict):
  d, blocks = arch["hidden_dim"], arch["transformer_blocks"]
  blocks = [Block(d, arch["transformer_heads"]) for _ in range(blocks)]
  encoder = nn.Sequential(nn.Linear(arch["input_dim"], d), *blocks, nn.LayerNorm(d),
                          nn.Linear(d, 2 * arch["bottleneck_dim"])).eval()
  encoder.load_state_dict({k[len("encoder."):]: torch.from_numpy(v) for k, v in state_dict.items()
                           if k.startswith("encoder.")})
  return encoder


@pytest.fixture(scope="module")
def setup():
  arch = json.loads((FIXTURE / "config.json").read_text())["arch"]
  state_dict = dict(np.load(FIXTURE / "state_dict.npz"))
  dino_config, dino_torch = _dino_reference(arch["input_dim"])
  dino_model, dino_variables = load_dinov2(dino_torch.state_dict(), dino_config)
  heads = yaml.safe_dump({"model": {"params": {"transformer_heads": arch["transformer_heads"]}}})
  semvae_model, semvae_variables = load_semvae(state_dict, {"config": heads})
  encoders = {"texture": _tiny_encoders()["texture"],
              "dino": extract.make_encoder(dino_model, dino_variables),
              "semvae": extract.make_encoder(semvae_model, semvae_variables)}
  return encoders, dino_torch, _semvae_encoder_reference(state_dict, arch), arch["bottleneck_dim"]


def _official_256(crops_nchw, dino_torch, semvae_encoder, channels: int):
  """extract_features.py's semantic path on (n, 3, 256, 256) uint8 crops → (mean (n, C, 16, 16), feats (n, D, 16,
  16))."""
  x = (crops_nchw.float() / 255.0 - 0.5) / 0.5  # the texture VAE's image transform
  xs = ((x + 1) / 2 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
  xs = F.interpolate(xs, size=(224, 224), mode="bicubic", align_corners=False)
  tokens = dino_torch(xs).last_hidden_state[:, 1 + REGISTERS:]  # x_norm_patchtokens (n, 256, D)
  mean = semvae_encoder(tokens)[..., :channels]
  to_maps = lambda t: t.transpose(1, 2).reshape(t.shape[0], t.shape[2], 16, 16)  # (n, L, C) → (n, C, 16, 16)
  return to_maps(mean), to_maps(tokens)


def _official(crops, *references):
  """The official path for 256 or 512 px uint8 NHWC crops → (mean, feats) NCHW, 2×2 tiles of 256 at 512 px."""
  x = torch.from_numpy(np.ascontiguousarray(crops.transpose(0, 3, 1, 2)))
  n, c, h, w = x.shape
  p = h // 256
  tiles = x.reshape(n, c, p, 256, p, 256).permute(0, 2, 4, 1, 3, 5).reshape(n * p * p, c, 256, 256)
  with torch.no_grad():
    outputs = _official_256(tiles, *references)
  return [o.reshape(n, p, p, o.shape[1], 16, 16).permute(0, 3, 1, 4, 2, 5).reshape(n, o.shape[1], 16 * p, 16 * p)
          .numpy() for o in outputs]


@pytest.mark.parametrize("resolution, count", [(256, 3), (512, 2)])
def test_semantic_latents_and_repa_features_are_the_official(setup, tmp_path, resolution, count):
  encoders, dino_torch, semvae_encoder, channels = setup
  pictures = np.random.default_rng(resolution).integers(0, 256, (count, resolution, resolution, 3), np.uint8)
  source = images.ArrayImages(pictures)
  settings = extract.Settings(resolution=resolution, shard_size=count, semantic_latent="mean",
                              latent_dtype="float32", batch_size=count)
  result = extract.extract(source, encoders, tmp_path, settings, progress=False)
  assert result["records"] == count
  stored = latents.LatentSource(tmp_path)
  records = [stored[i] for i in range(count)]
  crops = np.stack([images.adm_center_crop(source[i]["image"], resolution) for i in range(count)])
  grid = resolution // 16
  for flipped, suffix in ((False, ""), (True, "_flip")):
    mean, feats = _official(crops[:, :, ::-1] if flipped else crops, dino_torch, semvae_encoder, channels)
    semantic = np.stack([r["semantic" + suffix] for r in records])
    assert semantic.dtype == np.float32 and semantic.shape == (count, grid, grid, channels)
    assert records[0]["texture" + suffix].shape[:2] == (grid, grid)
    np.testing.assert_allclose(semantic, mean.transpose(0, 2, 3, 1), atol=ATOL, rtol=RTOL, err_msg=suffix)
    dino = np.stack([r["dino" + suffix] for r in records])  # (n, grid², D), token h·grid + w
    official_tokens = feats.transpose(0, 2, 3, 1).reshape(count, grid * grid, -1)
    assert dino.dtype == np.float16
    np.testing.assert_allclose(dino.astype(np.float32), official_tokens, atol=ATOL, rtol=2.0 ** -11,
                               err_msg=suffix)  # float16 rounding: half a unit in the last place
    assert np.abs(official_tokens).max() > 0.5 and np.abs(mean).max() > 0.1  # not vanishing activations
