"""The jitted train step: loss and gradients (optionally over micro-batches), AdamW, EMA, metrics.

The step is a pure function of (state, batch) for any objective `loss_fn(params, batch, rng, positions)`: the
SFD objective for the DiT (`sfd_loss_fn`), the SemVAE objective for the Semantic VAE. It is jitted with the
state's shardings in and out, the batch split over every device, and the state donated. A non-finite loss or
gradient never reaches the params: the update is skipped inside the step and `metrics['finite']` reports it, so
the loop can stop or go on.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sfd_jax import sharding as shd
from sfd_jax.diffusion.loss import sfd_loss
from sfd_jax.training.state import TrainState, lr_schedule


def _micro_batches(tree, n: int):
  """(B, ...) → (n, B/n, ...), micro-batch i holding rows i, i+n, ...: each one spread over every device."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), tree)


def loss_and_grads(loss_fn: Callable, params, batch, rng, accum_steps: int):
  """Mean loss, metrics and gradients over the batch, in `accum_steps` sequential micro-batches.

  loss_fn(params, batch, rng, positions) -> (loss, metrics); positions are the rows' indices in the batch, so
  the random draws (and hence the result) do not depend on the micro-batch split.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  positions = jnp.arange(jax.tree.leaves(batch)[0].shape[0])
  if accum_steps == 1:
    (_, metrics), grads = grad_fn(params, batch, rng, positions)
    return metrics, grads

  def accumulate(carry, micro):
    (_, metrics), grads = grad_fn(params, micro[0], rng, micro[1])
    return jax.tree.map(jnp.add, carry, (metrics, grads)), None

  micro = _micro_batches((batch, positions), accum_steps)
  first = jax.tree.map(lambda x: x[0], micro)
  (_, metrics_shape), grads_shape = jax.eval_shape(grad_fn, params, first[0], rng, first[1])
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (metrics_shape, grads_shape))
  (metrics, grads), _ = jax.lax.scan(accumulate, zeros, micro)
  return jax.tree.map(lambda x: x / accum_steps, (metrics, grads))


def sfd_loss_fn(model, cfg) -> Callable:
  """The SFD objective of `cfg.loss` for a LightningDiT, as a `loss_fn` for `train_step`."""
  def loss_fn(params, batch, rng, positions):
    return sfd_loss(model.apply, {"params": params}, batch, rng, cfg.loss, cfg.model.num_classes, positions,
                    use_repa=model.use_repa)
  return loss_fn


def train_step(state: TrainState, batch, *, loss_fn: Callable, tx, cfg, skip_with_cond: bool = False):
  """One optimiser update; returns (new state, metrics)."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  metrics, grads = loss_and_grads(loss_fn, state.params, batch, rng, cfg.optim.grad_accum_steps)
  return apply_gradients(state, grads, metrics, tx=tx, cfg=cfg, skip_with_cond=skip_with_cond)


def apply_gradients(state: TrainState, grads, metrics, *, tx, cfg, skip_with_cond: bool = False):
  """The optimiser and EMA update from the gradients, skipped where the loss or gradients are not finite.

  The skip is a select between the new and the old state, which XLA fuses into the optimiser's own pass over the
  state on accelerators. XLA:CPU does not: there the select reads and writes the whole state once more (a sixth
  of a CPU step), so `skip_with_cond` (the train step's choice on CPU devices) wraps the update in a `lax.cond`
  instead, which on a TPU would cost copies of the state. Either way a skipped step leaves params, EMA and
  optimiser state as they were, and its `update_norm` is 0.
  """
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

  def update(state):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = cfg.optim.ema_decay
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    return state.replace(params=params, ema_params=ema, opt_state=opt_state), optax.global_norm(updates)

  def skip(state):
    return state, jnp.zeros((), jnp.float32)

  if skip_with_cond:
    new_state, update_norm = jax.lax.cond(finite, update, skip, state)
  else:
    new_state, update_norm = jax.tree.map(lambda n, o: jnp.where(finite, n, o), update(state), skip(state))
  new_state = new_state.replace(step=state.step + 1)
  metrics.update(grad_norm=grad_norm, param_norm=optax.global_norm(new_state.params), update_norm=update_norm,
                 lr=lr_schedule(cfg.optim)(state.step), finite=finite)
  return new_state, metrics


def make_train_step(loss_fn: Callable, tx, cfg, mesh: Mesh, shardings: TrainState):
  """`train_step` jitted for `mesh`: state in/out on `shardings` (donated), batch rows over all devices.

  `cfg` needs `batch_size` and `optim` (grad_accum_steps, ema_decay and the schedule).
  """
  if cfg.batch_size % (mesh.devices.size * cfg.optim.grad_accum_steps):
    raise shd.ShardingError(
        f"batch_size {cfg.batch_size} must be divisible by the {mesh.devices.size} devices × "
        f"{cfg.optim.grad_accum_steps} micro-batches (optim.grad_accum_steps); change one of them")
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  step = shd.traced_with_mesh(mesh, lambda state, batch: train_step(state, batch, loss_fn=loss_fn, tx=tx, cfg=cfg,
                                                                    skip_with_cond=on_cpu))
  return jax.jit(step, in_shardings=(shardings, shd.batch_sharding(mesh)),
                 out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
