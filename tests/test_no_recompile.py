"""A sweep compiles once: Δ (the schedule's numbers) and the guidance scales are traced inputs of the sampler and of
`generate.make_generator`, so after the first call a second Δ or scale lowers no program (counted with jax's
monitoring events, which fire before the persistent compilation cache is consulted). A velocity function of one's
own must be a `jax.tree_util.Partial` of a module-level function (`sampler`'s docstring): a new Partial, even with
new weights, reuses the compiled sampler; a new lambda compiles again."""
import contextlib
import dataclasses

import jax
import numpy as np
import pytest
from jax.tree_util import Partial

from sfd_jax import generate, sharding as shd
from sfd_jax.diffusion import sampler
from sfd_jax.diffusion.schedule import Offset
from sfd_jax.models.texture_vae import AutoencoderKL
from tests.test_sampler import tiny_model

LOWERING = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@contextlib.contextmanager
def lowerings():
  """The names of the programs jax lowers (to compile them, or to look them up in the persistent cache) inside."""
  names = []

  def listen(event, duration_secs, **kwargs):
    del duration_secs
    if event == LOWERING:
      names.append(kwargs.get("fun_name"))
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


@pytest.fixture(scope="module")
def tiny():
  model, variables = tiny_model()
  z = sampler.noise(jax.random.key(0), np.arange(2), (4, 4, 48))
  return model, variables, z, np.array([1, 3], np.int32)


def test_the_sampler_compiles_once_for_a_delta_sweep_and_new_scales(tiny):
  model, variables, z, y = tiny

  def plain(delta):
    return sampler.sample(sampler.model_velocity(model, variables), z, y, schedule=Offset(delta))[0]

  def cfg(delta, scale):
    return sampler.sample(sampler.cfg_velocity(model, variables, scale, 10), z, y, delta_t=delta)[0]

  first_plain, first_cfg = plain(0.3), cfg(0.3, 1.5)
  with lowerings() as compiled:
    other_delta, other_scale, both = plain(0.5), cfg(0.3, 3.0), cfg(0.1, 2.0)
  assert compiled == []
  for before, after in ((first_plain, other_delta), (first_cfg, other_scale), (first_cfg, both)):
    assert np.abs(np.asarray(before) - np.asarray(after)).max() > 1e-3  # the new value was used


def _velocity(model, variables, x, t_tex, t_sem, y):
  return model.apply(variables, x, t_tex, t_sem, y)


def test_a_partial_velocity_reuses_the_compiled_sampler_and_a_lambda_does_not(tiny):
  model, variables, z, y = tiny
  run = lambda velocity: sampler.sample(velocity, z, y, delta_t=0.3, method="euler", num_steps=3)[0]
  first = run(Partial(_velocity, model, variables))
  scaled = jax.tree.map(lambda w: 1.1 * w, variables)
  with lowerings() as compiled:
    again = run(Partial(_velocity, model, variables))
    other_weights = run(Partial(_velocity, model, scaled))
  assert compiled == []
  np.testing.assert_array_equal(again, first)
  assert np.abs(np.asarray(other_weights) - np.asarray(first)).max() > 1e-3
  run(lambda x, t_tex, t_sem, labels: model.apply(variables, x, t_tex, t_sem, labels))
  with lowerings() as compiled:
    run(lambda x, t_tex, t_sem, labels: model.apply(variables, x, t_tex, t_sem, labels))
  assert compiled  # a new lambda is a new function: the sampler compiles again


def test_the_generator_compiles_once_for_a_delta_sweep_and_new_scales(tiny):
  """`generate.make_generator` (as `cli.sample` runs it, with the mesh): the schedule and the guidance scales are
  inputs; on the official fixed grid (computed on the host) an equal schedule reuses its program."""
  model, variables, _, _ = tiny
  vae = AutoencoderKL(ch=32, ch_mult=(1, 1), num_res_blocks=0, attn_resolutions=(), resolution=8, z_channels=32,
                      embed_dim=32)
  vae_variables = vae.init(jax.random.key(0), np.zeros((1, 8, 8, 3)))
  mesh = shd.make_mesh()
  s = generate.Settings(model="", vae="", stats="", out="", num_images=2, batch_size=2, labels="1,3",
                        cfg_scale=1.5)
  params = jax.device_put((variables, None, vae_variables, np.zeros(32, np.float32), np.ones(32, np.float32)),
                          shd.replicated(mesh))
  batch = shd.shard_batch(mesh, np.arange(2))
  scales = lambda scale: generate.guidance_scales(dataclasses.replace(s, cfg_scale=scale))
  generator = generate.make_generator(s, model, vae, None, 16, "both", 2, mesh)
  first = generator(Offset(0.3), scales(1.5), *params, batch)
  with lowerings() as compiled:
    other_delta = generator(Offset(0.5), scales(1.5), *params, batch)
    other_scale = generator(Offset(0.3), scales(3.0), *params, batch)
  assert compiled == []
  assert not np.array_equal(other_delta[0], first[0]) and not np.array_equal(other_scale[0], first[0])
  np.testing.assert_array_equal(other_scale[1], [1, 3])
  on_grid = generate.make_generator(dataclasses.replace(s, method="euler", num_steps=3), model, vae, None, 16,
                                    "both", 2, mesh)
  first = on_grid(Offset(0.3), scales(1.5), *params, batch)
  with lowerings() as compiled:
    again = on_grid(Offset(0.3), scales(3.0), *params, batch)  # another batch of a run: the same schedule
  assert compiled == [] and not np.array_equal(again[0], first[0])
