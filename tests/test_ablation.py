"""benchmarks/ablation.py at its smallest: every schedule's config is valid, one unconditional run trains and
evaluates through the script's own path (synthetic latents, an untrained texture VAE and classifier), and the tables,
JSON and plots hold the mean and standard deviation over seeds."""
import json

import jax
import numpy as np
import pytest
from absl import flags

from benchmarks import ablation
from sfd_jax import demo as demo_lib
from sfd_jax.convert import export
from sfd_jax.diffusion import schedule as schedule_lib
from sfd_jax.models.texture_vae import AutoencoderKL
from sfd_jax.training import config as config_lib

flags.FLAGS.mark_as_parsed()

SIZE = ablation.Size(steps=2, eval_every=2, per_class=1, cfg_scales=(1.0, 2.0), probe_fraction=0.5)


def test_every_schedule_config_is_valid(tmp_path):
  demo = demo_lib.Demo(demo_lib.demo_config(quick=True), tmp_path)
  for setting, schedules in ablation.SETTINGS.items():
    for name in schedules:
      cfg = ablation.run_config(demo, ablation.Run(setting, name, 2), SIZE)
      config_lib.check_values(cfg)
      schedule = schedule_lib.from_config(cfg.loss)
      kind, delta, _ = ablation.SCHEDULES[name]
      assert (cfg.seed, cfg.total_steps, cfg.loss.schedule.kind) == (2, 2, kind)
      assert cfg.loss.schedule.probe_steps == 1 and cfg.eval.num_samples == 10
      if kind in ("offset", "random_offset"):
        assert float(schedule.delta) == delta and float(schedule.end()) == 1 + delta
      if kind == "random_offset":
        assert (float(schedule.low), float(schedule.high)) == (0.0, 0.6)
      unconditional = setting == "unconditional"
      assert cfg.model.num_classes == (1 if unconditional else 10)
      assert tuple(cfg.eval.cfg_scales) == ((1.0,) if unconditional else (1.0, 2.0))
      assert cfg.loss.class_dropout == (0.0 if unconditional else 0.1)
  runs = ablation.plan(["conditional", "unconditional"], None, 2)
  assert len(runs) == 2 * (7 + 3) and [r.seed for r in runs] == [0] * 10 + [1] * 10  # seeds outermost
  assert [r.schedule == "learned" for r in runs[:10]] == [False] * 8 + [True] * 2  # learned last within a seed


def test_class_statistics():
  logits = np.full((4, 10), -20.0)
  logits[[0, 1, 2, 3], [3, 3, 7, 1]] = [20.0, 20.0, 20.0, 0.0]
  logits[3, 2] = 0.0  # p ≈ 0.5 for classes 1 and 2 (argmax: 1): not recognisable
  stats = ablation.class_statistics(logits)
  # predicted shares: class 3 one half, 7 and 1 a quarter each: ½(|½ − .1| + 2|¼ − .1| + 7·.1) = 0.7
  assert abs(stats["class_tv"] - 0.7) < 1e-12
  assert stats["recognisable"] == 0.75


@pytest.mark.slow  # compiles a train step and a sampler: 188 s on the shared 2-core host at load 13
def test_one_run_trains_evaluates_and_writes(tmp_path):
  demo = demo_lib.Demo(demo_lib.demo_config(quick=True), tmp_path / "demo")
  vae = AutoencoderKL(**demo.cfg.texture_vae.model)
  export.save_model(tmp_path / "vae", vae, vae.init(jax.random.key(0), *vae.dummy_inputs()))
  classifier = demo_lib.DigitClassifier(tuple(sorted(demo.cfg.classifier.model.items())))
  params = classifier.init(jax.random.key(1), *classifier.dummy_inputs())["params"]
  reference = np.random.default_rng(0).normal(size=(40, 128))
  cfg = ablation.run_config(demo, ablation.Run("unconditional", "delta_0.3", 0), SIZE)
  cfg.data.update(source="synthetic", synthetic_records=64)
  cfg.sample.texture_vae = str(tmp_path / "vae")
  cfg.eval.update(method="euler", num_steps=2)  # the evaluation's path; Dopri5 would triple the compile time
  metrics = ablation.unconditional_metrics(classifier, params, reference)
  seconds = ablation.train(cfg, "unconditional", tmp_path / "run", metrics)
  assert seconds > 0 and ablation.train(cfg, "unconditional", tmp_path / "run", metrics) == seconds  # reused
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "ablation_claim").touch()  # another process trains it
  with pytest.raises(ablation.Claimed):
    ablation.train(cfg, "unconditional", tmp_path / "other", metrics)
  rows = ablation.evaluations(tmp_path / "run")
  assert [r["step"] for r in rows] == [2]
  assert {"eval/cfg1/fd", "eval/cfg1/class_tv", "eval/cfg1/recognisable"} <= set(rows[0])
  assert 0 <= rows[0]["eval/cfg1/class_tv"] <= 0.9 and np.isfinite(rows[0]["eval/cfg1/fd"])

  # The summary over seeds, against numpy.
  values = {0: [4.0, 2.0], 1: [5.0, 1.0], 2: [9.0, 3.0]}
  runs = [{"setting": "conditional", "schedule": name, "seed": seed, "seconds": 1.0,
           "evaluations": [{"step": step, "eval/cfg1/fd": v + (name == "sync"), "eval/cfg1/class_accuracy": v / 10}
                           for step, v in zip((100, 200), values[seed])]}
          for name in ("sync", "delta_0.3") for seed in range(3)]
  runs += [{"setting": "conditional", "schedule": "delta_0.5", "seed": seed, "seconds": 1.0,  # one cut short
            "evaluations": [{"step": step, "eval/cfg1/fd": 1.0, "eval/cfg1/class_accuracy": 0.5} for step in steps]}
           for seed, steps in ((0, (100, 200)), (1, (100,)))]
  runs.append({"setting": "unconditional", "schedule": "learned", "seed": 0, "error": "RuntimeError: boom"})
  runs[0]["learned_map"] = {"step": 200, "tau": [0.0, 0.5, 1.0], "t_tex": [0.0, 0.2, 1.0]}
  runs.append({"setting": "unconditional", "schedule": "sync", "seed": 0, "seconds": 1.0, "evaluations": rows})
  size = {"steps": 200, "eval_every": 100, "per_class": 1, "cfg_scales": [1.0], "probe_fraction": 0.25}
  results = {"date": "today", "size": size, "seeds": [0, 1, 2], "classifier_heldout_accuracy": 0.9, "rtol": 1e-3,
             "batch_size": 32, "train_digits": 1500,
             "real_floor": {"samples": 10, "fd": 1.5}, "runs": runs}
  summary = ablation.write(results, tmp_path / "out" / "ablation")
  mean, std, n = summary["conditional"]["sync"][100]["eval/cfg1/fd"]
  assert n == 3 and abs(mean - 7.0) < 1e-12 and abs(std - np.std([5.0, 6.0, 10.0], ddof=1)) < 1e-12
  markdown = (tmp_path / "out" / "ablation_results.md").read_text()
  assert "| Δ = 0 (synchronous) | 3 | 7.00 ± 2.65 | 3.00 ± 1.00 |" in markdown
  assert "| Δ = 0.3 | 3 | 0.600 ± 0.265 | 0.200 ± 0.100 |" in markdown
  assert "| Δ = 0.5 | 2 | 1.00 ± 0.00 | 1.00 ± 0.00 (n=1) |" in markdown
  assert "failed: RuntimeError: boom" in markdown and "Δ = 0.5 − Δ = 0" not in markdown  # one seed at the end
  # Welch: difference −1, standard error √(1/3 + 1/3), t = −1.22 on 4 degrees of freedom
  assert "- Δ = 0.3 − Δ = 0 at step 200: -1.00 ± 0.82 (Welch p = 0.29, n = 3 vs 3)" in markdown
  assert "| conditional | Δ = 0.3 | 3 | 1 (1 – 1) |" in markdown
  stored = json.loads((tmp_path / "out" / "ablation_results.json").read_text())
  assert np.allclose(stored["summary"]["conditional"]["delta_0.3"]["200"]["eval/cfg1/class_accuracy"], [0.2, 0.1, 3])
  for name in ("ablation.png", "ablation_unconditional.png"):
    assert (tmp_path / "out" / name).stat().st_size > 10_000
