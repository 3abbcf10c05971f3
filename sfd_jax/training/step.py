"""The jitted train step: loss and gradients (optionally over micro-batches), AdamW, EMA, metrics.

The step is a pure function of (state, batch) for any objective `loss_fn(params, batch, rng, positions)`: the
SFD objective for the DiT (`sfd_loss_fn`), the SemVAE objective for the Semantic VAE. It is jitted with the
state's shardings in and out, the batch split over every device, and the state donated. A non-finite loss or
gradient never reaches the params: the update is skipped inside the step and `metrics['finite']` reports it, so
the loop can stop or go on.

A run whose schedule is learned (`loss.schedule.kind='learned'`) holds the schedule's parameters in the state
(`TrainState.schedule_raw`). The probe that learns them is the training run itself: for the first
`loss.schedule.probe_steps` updates the main model and the schedule are trained jointly on the schedule-corrected
objective plus the kinetic term (`loss.schedule.kinetic_weight`), the schedule by Adam at `loss.schedule.lr`; then
the schedule is frozen (its parameters and Adam state are carried bit-exactly) and the model goes on with the
schedule-corrected objective alone. "Learning When to Denoise" is reported to probe with a separate temporary
model and then train the main one; sharing the model adds no compute (the probe is the run's first steps) and
keeps a run one model, at the price of the main model's first steps seeing a moving schedule.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sfd_jax import sharding as shd
from sfd_jax.diffusion import schedule as schedule_lib
from sfd_jax.diffusion.loss import sfd_loss
from sfd_jax.plots import LEARNED_SCHEDULE_PREFIX
from sfd_jax.training.state import TrainState, lr_schedule, schedule_optimizer


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
  """The SFD objective of `cfg.loss` for a LightningDiT, as a `loss_fn` for `train_step` (which passes a learned
  schedule and the probe's kinetic weight)."""
  def loss_fn(params, batch, rng, positions, schedule=None, kinetic_weight=0.0):
    return sfd_loss(model.apply, {"params": params}, batch, rng, cfg.loss, cfg.model.num_classes, positions,
                    use_repa=model.use_repa, schedule=schedule, kinetic_weight=kinetic_weight)
  return loss_fn


def train_step(state: TrainState, batch, *, loss_fn: Callable, tx, cfg, skip_with_cond: bool = False):
  """One optimiser update; returns (new state, metrics). With a learned schedule in the state, `loss_fn` gets it
  (`schedule=`, `kinetic_weight=`) and the gradients reach its parameters during the probe (module docstring)."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  if state.schedule_raw is None:
    metrics, grads = loss_and_grads(loss_fn, state.params, batch, rng, cfg.optim.grad_accum_steps)
    return apply_gradients(state, grads, metrics, tx=tx, cfg=cfg, skip_with_cond=skip_with_cond)
  probing = state.step < cfg.loss.schedule.probe_steps
  kinetic_weight = jnp.where(probing, jnp.float32(cfg.loss.schedule.kinetic_weight), 0.0)

  def joint_loss(trained, batch, rng, positions):
    params, raw = trained
    return loss_fn(params, batch, rng, positions, schedule=schedule_lib.Learned(raw), kinetic_weight=kinetic_weight)
  metrics, (grads, schedule_grads) = loss_and_grads(joint_loss, (state.params, state.schedule_raw), batch, rng,
                                                    cfg.optim.grad_accum_steps)
  return apply_gradients(state, grads, metrics, tx=tx, cfg=cfg, skip_with_cond=skip_with_cond,
                         schedule_grads=schedule_grads)


def _probe_update(state: TrainState, grads, schedule_cfg) -> TrainState:
  """The schedule's Adam update while the probe runs (step < probe_steps); after it, the schedule's parameters
  and Adam state as they were, bit for bit."""
  probing = state.step < schedule_cfg.probe_steps
  old = (state.schedule_raw, state.schedule_opt_state)
  updates, opt_state = schedule_optimizer(schedule_cfg).update(grads, state.schedule_opt_state, state.schedule_raw)
  new = (optax.apply_updates(state.schedule_raw, updates), opt_state)
  raw, opt_state = jax.tree.map(lambda n, o: jnp.where(probing, n, o), new, old)
  return state.replace(schedule_raw=raw, schedule_opt_state=opt_state)


def schedule_metrics(raw) -> dict:
  """t_tex of a learned schedule at its interior knots τ = i/cells (`schedule_t_tex_<i>_of_<cells>`): with the
  mirror t_sem(τ) = 1 − t_tex(1 − τ) the whole map, which `sfd_jax.plots.learned_schedule` draws from
  metrics.jsonl."""
  _, tex, _ = schedule_lib.learned_knots(raw)
  cells = raw.shape[0]
  return {f"{LEARNED_SCHEDULE_PREFIX}{i}_of_{cells}": tex[i] for i in range(1, cells)}


def apply_gradients(state: TrainState, grads, metrics, *, tx, cfg, skip_with_cond: bool = False,
                    schedule_grads=None):
  """The optimiser and EMA update from the gradients, skipped where the loss or gradients are not finite.

  The skip is a select between the new and the old state, which XLA fuses into the optimiser's own pass over the
  state on accelerators. XLA:CPU does not: there the select reads and writes the whole state once more (a sixth
  of a CPU step), so `skip_with_cond` (the train step's choice on CPU devices) wraps the update in a `lax.cond`
  instead, which on a TPU would cost copies of the state. Either way a skipped step leaves params, EMA and
  optimiser state as they were, and its `update_norm` is 0. `schedule_grads` (a learned schedule's) update the
  schedule during the probe; they count in the finiteness check, not in `grad_norm`.
  """
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  if schedule_grads is not None:
    schedule_grad_norm = optax.tree.norm(schedule_grads)
    finite &= jnp.isfinite(schedule_grad_norm)

  def update(state):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = cfg.optim.ema_decay
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    new = state.replace(params=params, ema_params=ema, opt_state=opt_state)
    if schedule_grads is not None:
      new = _probe_update(new, schedule_grads, cfg.loss.schedule)
    return new, optax.tree.norm(updates)

  def skip(state):
    return state, jnp.zeros((), jnp.float32)

  if skip_with_cond:
    new_state, update_norm = jax.lax.cond(finite, update, skip, state)
  else:
    new_state, update_norm = jax.tree.map(lambda n, o: jnp.where(finite, n, o), update(state), skip(state))
  new_state = new_state.replace(step=state.step + 1)
  metrics.update(grad_norm=grad_norm, param_norm=optax.tree.norm(new_state.params), update_norm=update_norm,
                 lr=lr_schedule(cfg.optim)(state.step), finite=finite)
  if schedule_grads is not None:
    metrics.update(schedule_metrics(new_state.schedule_raw), schedule_grad_norm=schedule_grad_norm)
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
