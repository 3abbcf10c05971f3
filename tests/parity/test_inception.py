"""The flax FID InceptionV3 against the published pytorch-fid architecture, built here from torch.nn modules.

pytorch-fid and torch-fidelity cannot be installed next to this torch (they need torchvision) and nothing may be
downloaded, so the reference is their FID InceptionV3 (torchvision module names, FIDInceptionA/C/E pooling, the
1008-class fc) with random weights from `torch.manual_seed`, preceded by torch-fidelity's TF1-exact bilinear
resize and the graph's (x − 128)/128, evaluated in float64. BatchNorm statistics are calibrated on the test images,
so every layer carries O(1) activations and the 1e-4 tolerance is meaningful.
"""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the torch extra; only the Python 3.13 tier runs without it
import torch.nn.functional as F
from torch import nn

from sfd_jax.convert.inception import FID_WEIGHTS_NAME, inception_from_state_dict, inception_to_torch, load_inception
from sfd_jax.convert.io import ConversionError
from sfd_jax.data.images import ArrayImages
from sfd_jax.eval.features import FeatureExtractor
from sfd_jax.models.inception import resize_tf1_bilinear

TOL = 1e-4
IMAGE_SHAPE = (4, 80, 96, 3)  # the CLI tests use the same batch, so the compiled network is shared via the cache


class BasicConv2d(nn.Module):
  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = nn.BatchNorm2d(cout, eps=0.001, momentum=None)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionC(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b7 = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7 = layer(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionE(nn.Module):
  """FIDInceptionE_1 (average pool) and FIDInceptionE_2 (max pool)."""

  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
    return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                      self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd), self.branch_pool(pooled)], 1)


def tf1_resize(x, size=299):
  """torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x` (align_corners=False), NCHW float32."""
  def axis(n):
    src = torch.arange(size, dtype=torch.float32) * torch.tensor(n / size, dtype=torch.float32)
    lo = src.long()
    return lo, (lo + 1).clamp_max(n - 1), src - lo.float()
  y0, y1, dy = axis(x.shape[2])
  x0, x1, dx = axis(x.shape[3])
  top, bottom = x[:, :, y0], x[:, :, y1]
  top = top[..., x0] + (top[..., x1] - top[..., x0]) * dx
  bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * dx
  return top + (bottom - top) * dy[:, None]


class FIDInceptionV3(nn.Module):
  """pytorch-fid's `fid_inception_v3()` module tree (torchvision names), returning the ADM features."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = FIDInceptionA(192, 32)
    self.Mixed_5c = FIDInceptionA(256, 64)
    self.Mixed_5d = FIDInceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = FIDInceptionC(768, 128)
    self.Mixed_6c = FIDInceptionC(768, 160)
    self.Mixed_6d = FIDInceptionC(768, 160)
    self.Mixed_6e = FIDInceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    self.fc = nn.Linear(2048, 1008)

  def forward(self, pixels_nchw):
    x = (tf1_resize(pixels_nchw) - 128) / 128
    x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, stride=2)
    x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
      x = block(x)
    spatial = self.Mixed_6d.branch1x1(x)
    for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = block(x)
    pool = x.mean(dim=(2, 3))
    return {"pool": pool, "spatial": spatial, "logits_unbiased": pool @ self.fc.weight.T, "logits": self.fc(pool)}


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  smooth = np.cumsum(np.cumsum(rng.normal(size=IMAGE_SHAPE), axis=1), axis=2)  # structure at every scale
  smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min()) * 255
  return np.clip(smooth + rng.normal(0, 8, IMAGE_SHAPE), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def torch_reference(images):
  """(float32 state dict, float64 features) of a random-weight reference whose BatchNorm fits `images`."""
  torch.manual_seed(0)
  model = FIDInceptionV3()
  batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  with torch.no_grad():
    for bn in batchnorms:
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.normal_(0.0, 0.2)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    model.train()(pixels)  # momentum=None: running statistics become these images' statistics
    for bn in batchnorms:  # no channel amplified beyond a typical one, so float32 rounding stays ~1e-5
      bn.running_var.clamp_(min=float(bn.running_var.median()))
    state_dict = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    # The exact answer: the same float32 weights evaluated in float64.
    features = {k: v.numpy() for k, v in model.double().eval()(pixels.double()).items()}
  features["spatial"] = features["spatial"].transpose(0, 2, 3, 1)  # NHWC, as the TF graph
  return state_dict, features


@pytest.fixture(scope="module")
def weight_file(torch_reference, tmp_path_factory):
  path = tmp_path_factory.mktemp("inception") / FID_WEIGHTS_NAME
  torch.save({k: torch.from_numpy(v) for k, v in torch_reference[0].items()}, path)
  return path


@pytest.fixture(scope="module")
def flax_features(weight_file, images):
  model, variables = load_inception(weight_file)
  return FeatureExtractor(model, variables, per_device_batch=len(images))(ArrayImages(images))


def _max_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_reference_is_not_degenerate(torch_reference):
  features = torch_reference[1]
  for name in ("pool", "spatial", "logits_unbiased"):
    assert 0.1 < np.std(features[name]) < 100, name
  assert np.std(features["pool"], axis=0).mean() > 0.01  # the images give different features


def test_pool3_matches(flax_features, torch_reference):
  assert flax_features.pool.shape == (IMAGE_SHAPE[0], 2048)
  assert _max_err(flax_features.pool, torch_reference[1]["pool"]) < TOL


def test_spatial_matches_first_seven_channels_flattened_hwc(flax_features, torch_reference):
  expected = torch_reference[1]["spatial"][..., :7].reshape(IMAGE_SHAPE[0], -1)
  assert flax_features.spatial.shape == (IMAGE_SHAPE[0], 17 * 17 * 7)
  assert _max_err(flax_features.spatial, expected) < TOL


def test_unbiased_logits_match(flax_features, torch_reference):
  assert _max_err(flax_features.logits, torch_reference[1]["logits_unbiased"]) < TOL


@pytest.mark.parametrize("shape", [(2, 256, 256, 3), (1, 37, 53, 3), (1, 400, 320, 3), (1, 299, 299, 3)])
def test_resize_matches_tf1_reference(shape):
  pixels = np.random.default_rng(1).integers(0, 256, shape).astype(np.float32)
  expected = tf1_resize(torch.from_numpy(pixels).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  assert _max_err(resize_tf1_bilinear(pixels), expected) < 1e-4


def test_resize_samples_at_corners_not_centres():
  # A ramp f(x) = x sampled at x_out · in/out (TF1 without half-pixel centres), clamped at the last pixel.
  ramp = np.broadcast_to(np.arange(256, dtype=np.float32)[:, None], (1, 2, 256, 1))
  out = np.asarray(resize_tf1_bilinear(np.ascontiguousarray(ramp), 299))[0, 0, :, 0]
  expected = np.minimum(np.arange(299, dtype=np.float32) * np.float32(256 / 299), 255)
  np.testing.assert_allclose(out, expected, atol=2e-5)


def test_round_trip_and_torch_fidelity_layout(torch_reference, weight_file):
  state_dict = torch_reference[0]
  model, variables = load_inception(weight_file)
  back = inception_to_torch(model, variables)
  weights = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  assert back.keys() == weights.keys() and len(back) == 94 * 5 + 2
  assert all(np.array_equal(back[k], weights[k]) for k in weights)
  # torch-fidelity's converter writes the same names without BatchNorm counters, sometimes under a DDP prefix.
  _, again = inception_from_state_dict({f"module.{k}": v for k, v in weights.items()})
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(variables)))


def test_bad_weight_files(torch_reference, tmp_path):
  state_dict = dict(torch_reference[0])
  with pytest.raises(ConversionError, match=f"{FID_WEIGHTS_NAME}.*--inception"):
    load_inception(tmp_path / "nowhere.pth")
  missing = {k: v for k, v in state_dict.items() if k != "Mixed_6d.branch1x1.bn.running_var"}
  with pytest.raises(ConversionError, match="Mixed_6d.branch1x1.bn.running_var"):
    inception_from_state_dict(missing)
  with pytest.raises(ConversionError, match="AuxLogits.fc.weight"):
    inception_from_state_dict({**state_dict, "AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
  with pytest.raises(ConversionError, match="torchvision's ImageNet InceptionV3"):
    inception_from_state_dict({**state_dict, "fc.weight": np.zeros((1000, 2048), np.float32)})
  corrupt = tmp_path / "corrupt.pth"
  corrupt.write_bytes(b"not a torch file")
  with pytest.raises(ConversionError, match="corrupt"):
    load_inception(corrupt)
