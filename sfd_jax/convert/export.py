"""Exported models: a directory with `model.json` (the module class and its fields) and an orbax `params` tree.

This is what `python -m sfd_jax.cli.convert` writes from an official file and what the sampler reads; a
training checkpoint's EMA weights can be exported the same way. Restoring can place the params on any sharding.
A DiT's export may hold the schedule it was trained with (`schedule`, `Schedule.to_metadata`) beside the official
kwargs (whose `semfirst_delta_t` stays, for the official code); `generate.sampling_schedule` samples with it.
"""
from __future__ import annotations

import json

import flax
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sfd_jax import storage
from sfd_jax.errors import UserError
from sfd_jax.models.dinov2 import DINOv2
from sfd_jax.models.dit import LightningDiT
from sfd_jax.models.semvae import SemVAE
from sfd_jax.models.texture_vae import AutoencoderKL

MODEL_CLASSES = {cls.__name__: cls for cls in (LightningDiT, AutoencoderKL, DINOv2, SemVAE)}


def model_fields(model) -> dict:
  """The JSON-able constructor fields of a flax module (dtype stored by name)."""
  fields = {}
  for name in model.__dataclass_fields__:
    if name in ("parent", "name"):
      continue
    value = getattr(model, name)
    if name == "dtype":
      value = jnp.dtype(value).name
    fields[name] = list(value) if isinstance(value, tuple) else value
  return fields


def save_model(path, model, variables, extra: dict | None = None, schedule=None):
  """Writes `model.json` and the params (orbax) under `path` (local or gs://); refuses to overwrite an export.
  `schedule` (a `diffusion.schedule.Schedule`) is stored as `model.json`'s `schedule`."""
  path = storage.path(path)
  if (path / "model.json").exists():
    raise UserError(f"{path} already holds an exported model; choose another output directory")
  meta = {"class": type(model).__name__, "fields": model_fields(model), **(extra or {})}
  if schedule is not None:
    meta["schedule"] = schedule.to_metadata()  # before anything is written: a schedule that cannot be stored says so
  path.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / "params", variables["params"])
  checkpointer.wait_until_finished()
  storage.write_json(path / "model.json", meta)
  return path


def _param_names(tree) -> set:
  return set(flax.traverse_util.flatten_dict(dict(tree), sep="/"))


def _check_official_semvae(path, abstract) -> None:
  """An export of the SemVAE sfd_jax had before the official module (its params named `proj_in`, `blocks_0`, ...)
  is a user error that says how to make a current one, not orbax's tree mismatch."""
  metadata = ocp.StandardCheckpointer().metadata(path / "params")
  stored = _param_names(getattr(metadata, "item_metadata", metadata))
  if stored != _param_names(abstract):
    raise UserError(f"{path} holds a SemVAE of an earlier sfd_jax (not the official module: params such as "
                    f"{sorted(stored)[0]}), which this version cannot load; convert the official "
                    "semantic_ae_final.pt again (`python -m sfd_jax.cli.convert --kind=semvae`) or retrain it "
                    "(`python -m sfd_jax.cli.train_semvae`)")


def load_model(path, sharding=None, **overrides):
  """(model, variables, meta) of an exported model (meta: `model.json`, with the `schedule` of a DiT exported with
  one); `sharding` (a Sharding or a tree of them) places the params.
  Without it they come back as numpy arrays, which every host of a pod can put on any mesh (the sharding stored
  with them names a device of the process that exported them)."""
  path = storage.path(path)
  if not (path / "model.json").exists():
    raise UserError(f"{path} is not an exported model (no model.json); "
                            "make one with `python -m sfd_jax.cli.convert`")
  meta = json.loads((path / "model.json").read_text())
  if meta["class"] not in MODEL_CLASSES:
    raise UserError(f"{path}: unknown model class {meta['class']!r} in model.json")
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["fields"].items()}
  if "dtype" in fields:
    fields["dtype"] = jnp.dtype(fields["dtype"])
  model = MODEL_CLASSES[meta["class"]](**{**fields, **overrides})
  abstract = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
  if isinstance(model, SemVAE):
    _check_official_semvae(path, abstract)
  on_host = sharding is None
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0]) if on_host else sharding
  shardings = sharding if not isinstance(sharding, jax.sharding.Sharding) else jax.tree.map(lambda _: sharding,
                                                                                             abstract)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  params = ocp.StandardCheckpointer().restore(path / "params", abstract)
  return model, {"params": jax.device_get(params) if on_host else params}, meta
