"""The train state (params, EMA params, optimiser state, step, rng, and a learned schedule's parameters), its
optimisers, and its born-sharded creation."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sfd_jax import sharding as shd
from sfd_jax.diffusion import schedule as schedule_lib
from sfd_jax.errors import UserError


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: updates applied so far
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array         # raw uint32 key data (checkpointable); wrap with jax.random.wrap_key_data
  # No learned schedule (not fields: a checkpoint restores only into a state of its own tree, so the state of every
  # run whose schedule is not learned keeps the tree its checkpoints always had).
  schedule_raw = None
  schedule_opt_state = None


@flax.struct.dataclass
class LearnedTrainState(TrainState):
  """The train state of a run whose schedule is learned: also the schedule's `raw` (cells,) and its Adam state."""
  schedule_raw: jax.Array
  schedule_opt_state: Any


def lr_schedule(optim) -> optax.Schedule:
  """Linear warmup from `warmup_start_factor`·lr, then constant, or constant for `constant_steps` and a cosine to
  `end_lr` after; the value at step k is the LR of the (k+1)-th update, as torch's schedulers stepped k times."""
  warmup = (optax.linear_schedule(optim.warmup_start_factor * optim.lr, optim.lr, optim.warmup_steps)
            if optim.warmup_steps else None)
  if optim.schedule == "constant":
    main = optax.constant_schedule(optim.lr)
    if warmup is None:
      return main
    return optax.join_schedules([warmup, main], [optim.warmup_steps])
  if optim.schedule == "cosine":
    if optim.decay_steps <= 0:
      raise UserError("optim.schedule='cosine' needs optim.decay_steps > 0 (the length of the cosine)")
    pieces = [optax.constant_schedule(optim.lr), optax.cosine_decay_schedule(
        optim.lr, optim.decay_steps, alpha=optim.end_lr / optim.lr)]
    boundaries = [optim.warmup_steps + optim.constant_steps]
    if warmup is not None:
      pieces, boundaries = [warmup] + pieces, [optim.warmup_steps] + boundaries
    return optax.join_schedules(pieces, boundaries)
  raise UserError(f"optim.schedule {optim.schedule!r} is not one of ('constant', 'cosine')")


def make_optimizer(optim) -> optax.GradientTransformation:
  """AdamW on the schedule, after optional global-norm clipping (official: none)."""
  adamw = optax.adamw(lr_schedule(optim), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay)
  if optim.max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim.max_grad_norm), adamw)
  return adamw


def schedule_optimizer(schedule_cfg) -> optax.GradientTransformation:
  """Adam at `loss.schedule.lr` for a learned schedule's parameters during the probe."""
  return optax.adam(schedule_cfg.lr)


def learned_schedule(cfg) -> tuple[jax.Array, optax.GradientTransformation] | None:
  """(initial `raw`, optimiser) of a run whose `loss.schedule.kind` is 'learned' (the map starts at SFD's Δ =
  `loss.delta_t`); None for every other run (and for objectives without a schedule, e.g. the SemVAE's)."""
  loss = cfg.get("loss")
  if loss is None or "schedule" not in loss or loss.schedule.kind != "learned":
    return None
  return schedule_lib.from_config(loss).raw, schedule_optimizer(loss.schedule)


def state_shardings(mesh: Mesh, abstract_state: TrainState, tx, sharding_cfg) -> TrainState:
  """Where each part of the state lives: params and EMA by the regex rules, optimiser moments like their
  params, everything else (counts, step, rng, a learned schedule and its moments) replicated."""
  params = shd.param_shardings(mesh, abstract_state.params, sharding_cfg.rules, sharding_cfg.min_size)
  replicated = NamedSharding(mesh, P())
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, params,
                              transform_non_params=lambda _: replicated)
  shardings = dict(step=replicated, params=params, ema_params=params, opt_state=opt, rng=replicated)
  if isinstance(abstract_state, LearnedTrainState):
    schedule_opt = jax.tree.map(lambda _: replicated, abstract_state.schedule_opt_state)
    return LearnedTrainState(**shardings, schedule_raw=replicated, schedule_opt_state=schedule_opt)
  return TrainState(**shardings)


def _initializer(model, tx, schedule=None):
  def init(key):
    params = model.init(key, *model.dummy_inputs())["params"]
    fields = dict(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                  opt_state=tx.init(params), rng=jax.random.key_data(jax.random.fold_in(key, 1)))
    if schedule is None:
      return TrainState(**fields)
    raw = jnp.asarray(schedule[0], jnp.float32)
    return LearnedTrainState(**fields, schedule_raw=raw, schedule_opt_state=schedule[1].init(raw))
  return init


def abstract_train_state(model, tx, mesh: Mesh, sharding_cfg, schedule=None) -> tuple[TrainState, TrainState]:
  """(shapes with shardings, shardings) of a train state: the target of a restore, without computing one.
  `schedule` is `learned_schedule(cfg)`."""
  abstract = jax.eval_shape(_initializer(model, tx, schedule), jax.random.key(0))
  shardings = state_shardings(mesh, abstract, tx, sharding_cfg)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings), shardings


def create_train_state(model, tx, mesh: Mesh, sharding_cfg, rng, schedule=None) -> tuple[TrainState, TrainState]:
  """(state, shardings): a fresh state created directly on its shardings (no full copy on one device), with a
  learned schedule's parameters where `schedule` (`learned_schedule(cfg)`) is given."""
  _, shardings = abstract_train_state(model, tx, mesh, sharding_cfg, schedule)
  init = jax.jit(_initializer(model, tx, schedule), out_shardings=shardings).lower(rng)
  # It runs once: on CPU a quick compile (a third of the time) beats faster code.
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return init.compile(compiler_options=options)(rng), shardings
