"""Model calls vs error of the three-phase samplers, against the converged solution of the same ODE.

  python benchmarks/sampler.py                                   # the golden fixture model, z, y and runs
  python benchmarks/sampler.py --model=exports/demo --num_samples=8  # any exported model (or official file)
  python benchmarks/sampler.py --field=gmm                       # an analytic Gaussian-mixture velocity

Rows: our diffrax Dopri5 (one solve per phase) at several tolerances and both error norms, the official
torchdiffeq dopri5 (the fixture's golden run, and `official_dopri5`, that algorithm re-run here on any
field: no phase split, Hairer's first step, no end clamping, dense output at 1+Δ), and the official Euler grid at
several step counts. The converged solution is the fixture's `exact/final` (float64 state, rtol 1e-9), or else our
Dopri5 at rtol 1e-8 / atol 1e-10 (float32 state: good to ~1e-6). Prints a Markdown table and writes it, with the raw
numbers as JSON, to --out.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sfd_jax.diffusion import sampler  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("field", "model", ["model", "gmm"], "A network (fixture or --model) or the analytic GMM field.")
flags.DEFINE_string("model", None, "Exported model dir, training workdir or official file (default: the golden model).")
flags.DEFINE_string("model_kwargs", None, "Official kwargs (JSON) of an official --model file.")
flags.DEFINE_string("golden", str(Path(__file__).resolve().parents[1] / "tests" / "golden"), "Golden fixtures.")
flags.DEFINE_integer("num_samples", 8, "Samples (non-fixture fields).")
flags.DEFINE_integer("seed", 0, "Noise and labels (non-fixture fields).")
flags.DEFINE_float("delta_t", None, "Δ (default: the model's, or 0.3).")
flags.DEFINE_string("out", "outputs/benchmarks", "Directory for sampler_<name>.md / .json.")

TOLERANCES = ((1e-2, 1e-5), (1e-3, 1e-6), (1e-4, 1e-7), (1e-5, 1e-8))
EULER_STEPS = (10, 20, 50, 100, 250)

# Dormand–Prince 5(4) (torchdiffeq's tableau) and its dense-output midpoint weights.
_ALPHA = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_BETA = ((1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
         (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_C_SOL = (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0)
_C_ERR = (35 / 384 - 1951 / 21600, 0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
          -2187 / 6784 - -12231 / 42400, 11 / 84 - 649 / 6300, -1 / 60)
_C_MID = (6025192743 / 30085553152 / 2, 0, 51252292925 / 65400821598 / 2, -2691868925 / 45128329728 / 2,
          187940372067 / 1594534317056 / 2, -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2)


def official_dopri5(drift, z, t_end: float, rtol: float, atol: float):
  """torchdiffeq 0.2.5 dopri5 as the official sampler calls it; returns (x(t_end), model calls).

  `drift(tau_f32, x)` is the masked field. Times are float64, the state and stage arithmetic float32, the α = 1
  stages are evaluated one float32 ulp before the step end, the error is an RMS over the whole batch, and the
  last step overshoots t_end and is interpolated back.
  """
  f32 = np.float32
  calls = 0

  def f(t, x):
    nonlocal calls
    calls += 1
    return np.asarray(drift(f32(t), x))

  rms = lambda v: float(np.sqrt(np.mean(np.square(v, dtype=np.float64))))
  y0 = np.asarray(z, f32)
  f0 = f(0.0, y0)
  scale = atol + np.abs(y0) * rtol
  d0, d1 = rms(y0 / scale), rms(f0 / scale)
  h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
  d2 = rms((f(h0, (y0 + f32(h0) * f0).astype(f32)) - f0) / scale) / h0
  h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
  t0, dt, coeffs = 0.0, min(100 * h0, h1), None
  t_prev = 0.0
  while t_end > t0:
    t1 = t0 + dt
    t0_32, dt_32, t1_32 = f32(t0), f32(dt), f32(t1)
    k = [f0]
    for alpha, beta in zip(_ALPHA, _BETA):
      ti = np.nextafter(t1_32, f32(-np.inf)) if alpha == 1.0 else f32(t0_32 + f32(alpha) * dt_32)
      yi = (y0 + sum(f32(b) * dt_32 * kj for b, kj in zip(beta, k))).astype(f32)
      k.append(f(ti, yi))
    y1 = yi
    error = sum(f32(c) * dt_32 * kj for c, kj in zip(_C_ERR, k))
    ratio = rms(error / (atol + rtol * np.maximum(np.abs(y0), np.abs(y1))))
    if ratio <= 1:
      y_mid = (y0 + sum(f32(c) * dt_32 * kj for c, kj in zip(_C_MID, k))).astype(f32)
      fa, fb = k[0], k[-1]
      coeffs = (y0, dt_32 * fa, dt_32 * (fb - 4 * fa) - 11 * y0 - 5 * y1 + 16 * y_mid,
                dt_32 * (5 * fa - 3 * fb) + 18 * y0 + 14 * y1 - 32 * y_mid,
                2 * dt_32 * (fb - fa) - 8 * (y1 + y0) + 16 * y_mid)
      t_prev, t0, y0, f0 = t0, t1, y1, k[-1]
    factor = 10.0 if ratio == 0 else min(10.0, max(0.9 * ratio ** (-1 / 5), 1.0 if ratio < 1 else 0.2))
    dt = dt * factor
  u = f32((t_end - t_prev) / (t0 - t_prev))
  out = coeffs[0] + u * coeffs[1]
  power = u
  for c in coeffs[2:]:
    power = power * u
    out = out + power * c
  return out.astype(f32), calls


def masked_drift(velocity_fn, y, delta_t: float, semantic_channels: int = 16):
  """The official drift: velocity at (t_tex, t_sem) of τ, masked by the inclusive phase rule."""
  @jax.jit
  def drift(tau, x):
    taus = jnp.full((x.shape[0],), tau, jnp.float32)
    t_tex, t_sem = jnp.maximum(taus - np.float32(delta_t), 0.0), jnp.minimum(taus, 1.0)
    is_sem = np.arange(x.shape[-1]) >= x.shape[-1] - semantic_channels
    mask = jnp.where(is_sem, tau <= 1.0, tau >= np.float32(delta_t)).astype(jnp.float32)
    return velocity_fn(x, t_tex, t_sem, y) * mask
  return drift


def gmm_velocity(key, shape, components: int = 8, sigma: float = 0.1, semantic_channels: int = 16):
  """The exact flow-matching velocity E[x1 − x0 | x_t] of a Gaussian mixture (means N(0, I), std σ), with the
  texture and semantic channels at their own times: smooth, but curved where the posterior sharpens."""
  means = jax.random.normal(key, (components, *shape))
  is_sem = jnp.arange(shape[-1]) >= shape[-1] - semantic_channels

  def velocity(x, t_tex, t_sem, y):
    t = jnp.where(is_sem, t_sem[:, None, None, None], t_tex[:, None, None, None])[:, None]  # (B, 1, 1, 1, C)
    var = t ** 2 * sigma ** 2 + (1 - t) ** 2
    r = x[:, None] - t * means[None]
    logp = -0.5 * jnp.sum(r ** 2 / var + jnp.log(var), axis=(2, 3, 4))
    w = jax.nn.softmax(logp, axis=1)[:, :, None, None, None]
    u = means[None] + (t * sigma ** 2 - (1 - t)) / var * r
    return jnp.sum(w * u, axis=1)
  return velocity


def problem():
  """(name, velocity_fn, z, y, Δ, semantic channels, converged final or None, official dopri5 (final, calls) or
  None)."""
  if FLAGS.field == "gmm":
    shape = (4, 4, 48)
    z = sampler.noise(jax.random.key(FLAGS.seed), np.arange(FLAGS.num_samples), shape)
    delta = 0.3 if FLAGS.delta_t is None else FLAGS.delta_t
    return "gmm", gmm_velocity(jax.random.key(FLAGS.seed + 1), shape), z, np.zeros(FLAGS.num_samples, np.int32), \
        delta, 16, None, None
  if FLAGS.model is None:
    golden = Path(FLAGS.golden)
    from sfd_jax.convert import load_dit
    kwargs = json.loads((golden / "dit_tiny" / "config.json").read_text())["model_kwargs"]
    with np.load(golden / "dit_tiny" / "state_dict.npz") as sd:
      model, variables = load_dit(kwargs, {k: sd[k].astype(np.float32) for k in sd.files})
    runs = json.loads((golden / "sampler" / "config.json").read_text())["runs"]
    with np.load(golden / "sampler" / "sampler.npz") as s, np.load(golden / "sampler" / "reference_ode.npz") as r:
      z, y = np.moveaxis(s["z"], 1, -1), s["y"]
      exact, official = np.moveaxis(r["exact/final"], 1, -1), np.moveaxis(s["dopri5/final"], 1, -1)
    return "fixture", sampler.model_velocity(model, variables), z, y, runs["dopri5"]["delta_t"], \
        kwargs["semantic_chans"], exact, (official, runs["dopri5"]["nfe"])
  from sfd_jax.generate import load_diffusion_model
  model, variables, official = load_diffusion_model(
      FLAGS.model, model_kwargs=json.loads(FLAGS.model_kwargs) if FLAGS.model_kwargs else None)
  delta = FLAGS.delta_t if FLAGS.delta_t is not None else float(official.get("semfirst_delta_t", 0.3))
  indices = np.arange(FLAGS.num_samples)
  z = sampler.noise(jax.random.key(FLAGS.seed), indices, (model.input_size, model.input_size, model.in_channels))
  y = sampler.random_labels(jax.random.key(FLAGS.seed + 1), indices, model.num_classes)
  semantic = int(official.get("semantic_chans", 16))
  return Path(FLAGS.model).stem, sampler.model_velocity(model, variables), z, y, delta, semantic, None, None


def main(argv):
  del argv
  jax.config.update("jax_default_matmul_precision", "highest")
  name, velocity, z, y, delta, semantic, exact, official = problem()
  z, y = jnp.asarray(z, jnp.float32), jnp.asarray(y)
  reference = "exact/final of the fixture (float64 state, rtol 1e-9)"
  if exact is None:
    exact = np.asarray(sampler.sample(velocity, z, y, delta_t=delta, rtol=1e-8, atol=1e-10,
                                      semantic_channels=semantic)[0])
    reference = "our Dopri5 at rtol 1e-8, atol 1e-10 (float32 state)"
  rows = []

  def add(method, settings, final, calls):
    final = np.asarray(final)
    rows.append(dict(method=method, settings=settings, model_calls=int(calls),
                     max_abs=float(np.abs(final - exact).max()),
                     rel_l2=float(np.linalg.norm(final - exact) / np.linalg.norm(exact))))

  if official is not None:
    add("official dopri5 (torchdiffeq, golden run)", "rtol 1e-3, atol 1e-6", *official)
  rerun = official_dopri5(masked_drift(velocity, y, delta, semantic), np.asarray(z), np.float32(1 + delta), 1e-3,
                          1e-6)
  add("official dopri5 (torchdiffeq algorithm, re-run here)", "rtol 1e-3, atol 1e-6", *rerun)
  for rtol, atol in TOLERANCES:
    for norm in sampler.ERROR_NORMS:
      final, stats = sampler.sample(velocity, z, y, delta_t=delta, rtol=rtol, atol=atol, error_norm=norm,
                                    semantic_channels=semantic)
      add(f"ours: diffrax Dopri5, {norm.replace('_', '-')} norm", f"rtol {rtol:g}, atol {atol:g}", final,
          stats["model_calls"])
  for steps in EULER_STEPS:
    final, stats = sampler.sample(velocity, z, y, delta_t=delta, method="euler", num_steps=steps,
                                  semantic_channels=semantic)
    add("official Euler grid", f"{steps} grid points", final, stats["model_calls"])

  lines = [f"Sampler benchmark `{name}`: {z.shape[0]} samples of {tuple(z.shape[1:])}, Δ = {delta:g}; error "
           f"against {reference}.", "", "| method | settings | model calls | max abs error | rel. L2 error |",
           "|---|---|---:|---:|---:|"]
  lines += [f"| {r['method']} | {r['settings']} | {r['model_calls']} | {r['max_abs']:.2e} | {r['rel_l2']:.2e} |"
            for r in rows]
  table = "\n".join(lines)
  print(table)
  out = Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"sampler_{name}.md").write_text(table + "\n")
  (out / f"sampler_{name}.json").write_text(json.dumps({"name": name, "delta_t": delta, "reference": reference,
                                                        "rows": rows}, indent=1))


if __name__ == "__main__":
  app.run(main)
