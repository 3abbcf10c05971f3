"""The FID Inception's matmul precision: every convolution and matmul of the features (FID, sFID, IS, precision and
recall) carries 'highest' (float32, as the ADM evaluator's graph) unless `cli.evaluate --matmul_precision` asks
otherwise, in the jaxpr and in the program a TPU compiler receives; evaluation during training takes the same.

CPU computes float32 convolutions exactly whatever the precision, so values cannot tell the precisions apart here
(tests/parity/test_inception.py checks them): what a TPU or GPU does is what the program it receives says.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax.convert.inception import inception_from_state_dict, inception_to_torch
from sfd_jax.eval import features
from sfd_jax.models.inception import FID_MATMUL_PRECISION, InceptionV3
from tests.programs import matmuls

EXPECTED = {"default": None, "high": (jax.lax.Precision.HIGH,) * 2, "highest": (jax.lax.Precision.HIGHEST,) * 2}
PIXELS = jax.ShapeDtypeStruct((2, 48, 40, 3), jnp.uint8)


@pytest.fixture(autouse=True)
def platform_default_precision():
  """The tests' global 'highest' (conftest) off, so that 'default' shows as what it is."""
  with jax.default_matmul_precision(None):
    yield


def _feature_jaxpr(model):
  """The jaxpr of the function `FeatureExtractor` jits, with the model's abstract variables."""
  variables = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())
  return jax.make_jaxpr(lambda v, x: features._features(model, v, x))(variables, PIXELS).jaxpr


@pytest.mark.parametrize("precision", sorted(EXPECTED))
def test_every_feature_convolution_and_matmul_carries_the_precision(precision):
  found = list(matmuls(_feature_jaxpr(InceptionV3(matmul_precision=precision))))
  assert sorted({name for name, *_ in found}) == ["conv_general_dilated", "dot_general"]
  assert len(found) == 95  # the graph's 94 convolutions and its softmax layer
  assert all(p == EXPECTED[precision] for _, _, p, _ in found), sorted({str(p) for *_, p, _ in found})


def test_highest_unless_asked_otherwise():
  """The one default of the model, of `cli.evaluate --matmul_precision` (its report says which ran:
  test_eval_cli.py) and of evaluation during training (`load_inception` without overrides, as
  `training.evaluation` calls it): float32 products."""
  assert FID_MATMUL_PRECISION == "highest"
  model = InceptionV3()
  template = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())
  state_dict = inception_to_torch(model, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), template))
  loaded, _ = inception_from_state_dict(state_dict)
  assert {p for *_, p, _ in matmuls(_feature_jaxpr(loaded))} == {EXPECTED["highest"]}
  asked, _ = inception_from_state_dict(state_dict, matmul_precision="default")
  assert {p for *_, p, _ in matmuls(_feature_jaxpr(asked))} == {None}


def test_the_tpu_compiler_receives_highest_on_every_convolution_and_matmul():
  model = InceptionV3()
  variables = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())
  text = jax.jit(lambda v, x: features._features(model, v, x)).trace(variables, PIXELS).lower(
      lowering_platforms=("tpu",)).as_text()
  ops = [line for line in text.splitlines() if re.search(r"stablehlo\.(dot_general|convolution)", line)]
  assert len(ops) == 95
  for line in ops:
    assert re.search(r"precision = \[HIGHEST, HIGHEST\]|precision_config = \[#stablehlo<precision HIGHEST>, "
                     r"#stablehlo<precision HIGHEST>\]", line), line


def test_an_unknown_precision_is_refused():
  with pytest.raises(ValueError, match="matmul_precision 'float32' is not one of"):
    InceptionV3(matmul_precision="float32")
