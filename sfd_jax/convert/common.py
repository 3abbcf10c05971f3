"""Strict, invertible mapping between torch state dicts and flax params.

A converter is a list of `Rule`s, one per flax leaf, each naming the torch tensor it comes from (or, for the
parameters of scanned layers stacked on a leading axis, the per-layer tensors `blocks.{i}.…`) and the layout
change between them. The same list converts in both directions, so every converter round-trips. Conversion is
strict: every rule must find its tensor with the expected shape, and every tensor of the file must be used
(or be a known constant that is checked, or match an explicit ignore pattern). Errors name the key.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

import flax
import jax
import numpy as np

from sfd_jax.convert.io import ConversionError

# torch layout -> flax layout, and back.
_TRANSFORMS = {
    "same": (lambda w: w, lambda p: p),
    "dense": (lambda w: w.T, lambda p: p.T),  # Linear (out, in) <-> Dense (in, out)
    "conv": (lambda w: w.transpose(2, 3, 1, 0), lambda p: p.transpose(3, 2, 0, 1)),  # OIHW <-> HWIO
}


@dataclasses.dataclass(frozen=True)
class Rule:
  flax_path: tuple[str, ...]
  torch_key: str      # with `{i}` where `layers` > 0
  kind: str = "same"  # one of _TRANSFORMS
  layers: int = 0     # > 0: the flax leaf stacks the tensors torch_key.format(i=0 … layers−1) on a new axis 0

  @property
  def torch_keys(self) -> list[str]:
    return [self.torch_key.format(i=i) for i in range(self.layers)] if self.layers else [self.torch_key]

  def to_flax(self, w):
    return _TRANSFORMS[self.kind][0](w)

  def to_torch(self, p):
    return _TRANSFORMS[self.kind][1](p)

  def torch_shape(self, flax_shape) -> tuple[int, ...]:
    """The shape of one torch tensor of this rule (one layer's, for a stacked rule)."""
    one = flax_shape[1:] if self.layers else flax_shape
    return tuple(self.to_torch(np.empty(one, np.int8)).shape)


def linear(flax_prefix: tuple[str, ...], torch_prefix: str, layers: int = 0) -> list[Rule]:
  """Rules for a torch nn.Linear <-> flax nn.Dense (with bias)."""
  return [Rule(flax_prefix + ("kernel",), f"{torch_prefix}.weight", "dense", layers),
          Rule(flax_prefix + ("bias",), f"{torch_prefix}.bias", "same", layers)]


def conv(flax_prefix: tuple[str, ...], torch_prefix: str) -> list[Rule]:
  """Rules for a torch nn.Conv2d <-> flax nn.Conv (with bias)."""
  return [Rule(flax_prefix + ("kernel",), f"{torch_prefix}.weight", "conv"),
          Rule(flax_prefix + ("bias",), f"{torch_prefix}.bias")]


def norm(flax_prefix: tuple[str, ...], torch_prefix: str, bias: bool = True) -> list[Rule]:
  """Rules for a torch LayerNorm/GroupNorm/RMSNorm weight (and bias) <-> flax scale (and bias)."""
  rules = [Rule(flax_prefix + ("scale",), f"{torch_prefix}.weight")]
  if bias:
    rules.append(Rule(flax_prefix + ("bias",), f"{torch_prefix}.bias"))
  return rules


def _names(keys: Iterable[str], limit: int = 5) -> str:
  keys = sorted(keys)
  shown = ", ".join(repr(k) for k in keys[:limit])
  return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def flax_from_torch(state_dict: Mapping[str, np.ndarray], rules: list[Rule], template, *,
                    constants: Mapping[str, np.ndarray] | None = None, ignore: Iterable[str] = (),
                    constant_atol: float = 1e-5, what: str = "checkpoint"):
  """Builds flax params (shaped like `template`) from a torch-named state dict, strictly.

  `constants` are tensors the flax model computes itself (fixed tables, buffers): when the file has them they
  must match. `ignore` holds regexes for keys that are not weights of this model (e.g. a training loss).
  """
  flat_template = flax.traverse_util.flatten_dict(flax.core.unfreeze(template))
  by_path = {r.flax_path: r for r in rules}
  if set(by_path) != set(flat_template):  # a bug in a converter, not in the user's file
    missing = ["/".join(p) for p in set(flat_template) - set(by_path)]
    extra = ["/".join(p) for p in set(by_path) - set(flat_template)]
    raise AssertionError(f"converter rules do not cover the model: no rule for {missing}, stale rules {extra}")

  missing = [k for r in rules for k in r.torch_keys if k not in state_dict]
  if missing:
    raise ConversionError(f"{what} is missing {len(missing)} key(s) the model needs: {_names(missing)}")
  flat = {}
  for path, leaf in flat_template.items():
    rule = by_path[path]
    want = rule.torch_shape(leaf.shape)
    layers = []
    for key in rule.torch_keys:
      w = np.asarray(state_dict[key])
      if tuple(w.shape) != want:
        raise ConversionError(f"{what} key {key!r} has shape {tuple(w.shape)} but the model "
                              f"expects {want}; the file was made for a different model configuration")
      layers.append(np.asarray(rule.to_flax(w), dtype=leaf.dtype))
    flat[path] = np.stack(layers) if rule.layers else layers[0]

  for key, expected in (constants or {}).items():
    if key in state_dict:
      got = np.asarray(state_dict[key], np.float32)
      expected = np.asarray(expected, np.float32)
      if got.shape != expected.shape or not np.allclose(got, expected, atol=constant_atol, rtol=0):
        raise ConversionError(f"{what} key {key!r} (shape {got.shape}) differs from the fixed table this model "
                              f"computes (shape {expected.shape}); the file was made for another size")
  used = {k for r in rules for k in r.torch_keys} | set(constants or {})
  patterns = [re.compile(p) for p in ignore]
  unknown = [k for k in state_dict if k not in used and not any(p.search(k) for p in patterns)]
  if unknown:
    raise ConversionError(f"{what} has {len(unknown)} key(s) the model does not use: {_names(unknown)}; "
                          "the file was made for a different model or configuration")
  return flax.traverse_util.unflatten_dict(flat)


def torch_from_flax(params, rules: list[Rule], constants: Mapping[str, np.ndarray] | None = None) -> dict:
  """The inverse of `flax_from_torch`: torch-named numpy arrays (fixed tables included) from flax params."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(jax.device_get(params)))
  out = {}
  for r in rules:
    leaf = np.asarray(flat[r.flax_path])
    for i, key in enumerate(r.torch_keys):
      out[key] = np.ascontiguousarray(r.to_torch(leaf[i] if r.layers else leaf))
  out.update({k: np.asarray(v, np.float32) for k, v in (constants or {}).items()})
  return out
