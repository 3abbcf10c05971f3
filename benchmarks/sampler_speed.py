"""Guided Dopri5 sampling throughput: sfd_jax's three-phase solver against the official torchdiffeq dopri5, with
the same weights, batch, guidance and tolerances on the same device.

  python benchmarks/sampler_speed.py                   # SFD-XL + AutoGuidance by B, batch 32, bfloat16 (a GPU)
  python benchmarks/sampler_speed.py --preset=S --guide_preset=S --input_size=4 --batch=4 --dtype=float32 \\
      --repeats=1                                      # a CPU smoke run

Both models get random weights, perturbed (0.02·N(0, 1) on every parameter) so that the velocity is not the zero a
fresh model outputs; the step counts of such a field are not those of trained weights, so the comparison is per
batch at equal tolerance: images/s (median and fastest of `--repeats` batches after one warm-up) and model calls.
sfd_jax: `sampler.sample` (one solve per phase, per-sample error norm) with `autoguidance_velocity`, jitted once.
Official: `torchdiffeq.odeint(drift, z, [0, 1+Δ], method='dopri5')` on the masked field of
`forward_with_autoguidance`, the torch model from benchmarks/torch_reference.py, bf16 autocast
when --dtype=bfloat16, eager and with --torch_compile also torch.compile'd.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sfd_jax import sharding as shd  # noqa: E402
from sfd_jax.convert.dit import dit_to_torch  # noqa: E402
from sfd_jax.diffusion import sampler  # noqa: E402
from sfd_jax.diffusion.schedule import Offset  # noqa: E402
from sfd_jax.models.dit import lightningdit  # noqa: E402

flags.DEFINE_string("preset", "XL", "The sampled model.")
flags.DEFINE_string("guide_preset", "B", "The AutoGuidance guide.")
flags.DEFINE_integer("input_size", 16, "Latent grid.")
flags.DEFINE_integer("batch", 32, "Images per batch (split over all devices).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype of both implementations.")
flags.DEFINE_float("scale", 1.5, "AutoGuidance scale (texture and semantic).")
flags.DEFINE_float("rtol", 1e-3, "Dopri5 relative tolerance (official).")
flags.DEFINE_float("atol", 1e-6, "Dopri5 absolute tolerance (official).")
flags.DEFINE_integer("repeats", 3, "Timed batches after the warm-up.")
flags.DEFINE_bool("torch", True, "Also time the official torchdiffeq sampler.")
flags.DEFINE_bool("torch_compile", False, "Also time it with torch.compile'd models.")
flags.DEFINE_string("out", None, "Write the results as JSON here.")
FLAGS = flags.FLAGS
DELTA, SEMANTIC = 0.3, 16


def _timed(run, repeats):
  run()  # compiles (jit, torch.compile) and warms up
  times, calls = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    calls = run()
    times.append(time.perf_counter() - start)
  return {"batch_s": statistics.median(times), "fastest_batch_s": min(times), "model_calls": int(calls),
          "images_per_s": FLAGS.batch / statistics.median(times)}


def random_model(preset, key):
  model = lightningdit(preset, input_size=FLAGS.input_size, dtype=FLAGS.dtype)
  variables = jax.jit(model.init)(key, *model.dummy_inputs())
  noise = jax.tree.map(lambda p, k: 0.02 * jax.random.normal(k, p.shape), variables,
                       jax.tree.unflatten(jax.tree.structure(variables),
                                          list(jax.random.split(key, len(jax.tree.leaves(variables))))))
  return model, jax.tree.map(jnp.add, variables, noise)


def bench_jax(models, z, y):
  (model, variables), (guide, guide_variables) = models
  mesh = shd.make_mesh()

  def generate(variables, guide_variables, z, y):
    velocity = sampler.autoguidance_velocity(model, variables, guide, guide_variables, FLAGS.scale, FLAGS.scale,
                                             semantic_channels=SEMANTIC)
    final, stats = sampler.sample(velocity, z, y, delta_t=DELTA, rtol=FLAGS.rtol, atol=FLAGS.atol,
                                  semantic_channels=SEMANTIC)
    return final, stats["model_calls"]

  step = jax.jit(shd.traced_with_mesh(mesh, generate))
  params = jax.device_put((variables, guide_variables), shd.replicated(mesh))
  z, y = shd.shard_batch(mesh, (z, y))

  def run():
    final, calls = step(*params, z, y)
    jax.block_until_ready(final)
    return calls
  return _timed(run, FLAGS.repeats)


def bench_torch(models, z, y, compile_models: bool):
  import torch
  import torch_reference
  import torchdiffeq
  device = "cuda" if torch.cuda.is_available() else "cpu"
  nets = []
  for model, variables in models:
    net = torch_reference.build(model).to(device).eval()
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in dit_to_torch(model, variables).items()
             if not k.startswith("feat_rope")}
    net.load_state_dict(state, strict=False)
    nets.append(torch.compile(net) if compile_models else net)
  net, guide = nets
  z = torch.from_numpy(np.array(z)).permute(0, 3, 1, 2).contiguous().to(device)
  y = torch.from_numpy(np.array(y)).long().to(device)
  calls = [0]
  texture = torch.arange(z.shape[1], device=device) < z.shape[1] - SEMANTIC

  def drift(tau, x):
    calls[0] += 1
    tau = tau.float()
    t_sem = torch.full((x.shape[0],), 1.0, device=device).minimum(tau)
    t_tex = (tau - DELTA).clamp(min=0.0).expand(x.shape[0])
    with torch.autocast(device, dtype=torch.bfloat16, enabled=FLAGS.dtype == "bfloat16"):
      cond, weak = net(x, t_tex, t_sem, y)[0], guide(x, t_tex, t_sem, y)[0]
    guided = (weak + FLAGS.scale * (cond - weak)).float()
    mask = torch.where(texture, (tau >= DELTA).float(), (tau <= 1.0).float())
    return guided * mask[None, :, None, None]

  t = torch.tensor([0.0, 1.0 + DELTA], dtype=torch.float64, device=device)
  with torch.no_grad():  # the same network as sfd_jax's: the guided field at τ = 0.65 (both streams moving)
    field = drift(torch.tensor(0.65, dtype=torch.float64, device=device), z).permute(0, 2, 3, 1).float().cpu()

  def run():
    calls[0] = 0
    with torch.no_grad():
      torchdiffeq.odeint(drift, z, t, method="dopri5", rtol=FLAGS.rtol, atol=FLAGS.atol)
    if device == "cuda":
      torch.cuda.synchronize()
    return calls[0]
  return {"device": device, "compiled": compile_models, "field": field.numpy(), **_timed(run, FLAGS.repeats)}


def jax_field(models, z, y):
  (model, variables), (guide, guide_variables) = models
  velocity = sampler.autoguidance_velocity(model, variables, guide, guide_variables, FLAGS.scale, FLAGS.scale,
                                           semantic_channels=SEMANTIC)
  t_tex, t_sem = Offset(DELTA).times(jnp.full((z.shape[0],), 0.65))
  return np.asarray(velocity(jnp.asarray(z), t_tex, t_sem, jnp.asarray(y)))


def main(argv):
  del argv
  key = jax.random.key(0)
  models = (random_model(FLAGS.preset, jax.random.fold_in(key, 1)),
            random_model(FLAGS.guide_preset, jax.random.fold_in(key, 2)))
  model = models[0][0]
  z = np.asarray(jax.random.normal(jax.random.fold_in(key, 3),
                                   (FLAGS.batch, model.input_size, model.input_size, model.in_channels)))
  y = np.arange(FLAGS.batch, dtype=np.int32) % model.num_classes
  device = jax.devices()[0]
  result = {"device": f"{len(jax.devices())}× {device.device_kind}", "preset": FLAGS.preset,
            "guide": FLAGS.guide_preset, "batch": FLAGS.batch, "dtype": FLAGS.dtype, "jax": bench_jax(models, z, y)}
  print(f"device: {result['device']}  {FLAGS.preset} + AutoGuidance {FLAGS.guide_preset}, batch {FLAGS.batch}, "
        f"{FLAGS.dtype}, rtol {FLAGS.rtol}, atol {FLAGS.atol}")
  j = result["jax"]
  print(f"sfd_jax Dopri5: {j['images_per_s']:.2f} img/s ({j['batch_s']:.2f} s/batch, fastest "
        f"{j['fastest_batch_s']:.2f}), {j['model_calls']} model calls")
  if FLAGS.torch:
    result["torch"] = [bench_torch(models, z, y, False)]
    if FLAGS.torch_compile:
      result["torch"].append(bench_torch(models, z, y, True))
    reference = jax_field(models, z, y)
    for t in result["torch"]:
      kind = "torch.compile" if t["compiled"] else "eager"
      field = t.pop("field")
      t["field_rel_difference"] = float(np.linalg.norm(field - reference) / np.linalg.norm(reference))
      print(f"official torchdiffeq dopri5 ({kind}, {t['device']}): {t['images_per_s']:.2f} img/s "
            f"({t['batch_s']:.2f} s/batch), {t['model_calls']} model calls, field at τ=0.65 within "
            f"{t['field_rel_difference']:.1e} (rel. L2) of sfd_jax's; sfd_jax / official: "
            f"{j['images_per_s'] / t['images_per_s']:.2f}")
  if FLAGS.out:
    Path(FLAGS.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
