"""Run pictures: `cli.plot` draws several runs' curves into one PNG, and every run keeps its own plots current."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sfd_jax.training.metrics import MetricWriter
from tests.golden import subprocess_env

# matplotlib's default colour cycle: the first four lines of a picture
CYCLE = {"C0": (0x1F, 0x77, 0xB4), "C1": (0xFF, 0x7F, 0x0E), "C2": (0x2C, 0xA0, 0x2C), "C3": (0xD6, 0x27, 0x28)}


def _write_run(workdir, fid_start, steps=(100, 200, 300, 400)):
  """A metrics.jsonl as the training loop writes it: training lines, and evaluations at two guidance scales."""
  workdir.mkdir(parents=True)
  lines = []
  for step in range(10, steps[-1] + 1, 10):
    lines.append({"step": step, "loss": 2.0 / step ** 0.3, "loss_mse": 1.0 / step ** 0.3, "lr": 1e-4,
                  "images_per_s": 500.0 + step % 30, "epoch": step * 0.01})
    if step in steps:
      lines.append({"step": step, "eval/cfg1/fid": fid_start / step ** 0.5, "eval/cfg1.5/fid": fid_start / step,
                    "eval/cfg1/model_calls": 40.0, "eval/cfg1.5/model_calls": 40.0, "eval/seconds": 3.0,
                    "epoch": step * 0.01})
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def _plot(*args):
  return subprocess.run([sys.executable, "-m", "sfd_jax.cli.plot", *map(str, args)], env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)


def _pixels_near(image, rgb, tolerance=12):
  return int(np.sum(np.all(np.abs(image[..., :3].astype(int) - rgb) <= tolerance, axis=-1)))


def test_cli_plot_draws_two_runs_into_one_png(tmp_path):
  _write_run(tmp_path / "sfd", 300.0)
  _write_run(tmp_path / "sync", 200.0)
  out = tmp_path / "fid.png"
  result = _plot(tmp_path / "sfd", tmp_path / "sync", "--metric=fid", f"--out={out}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"wrote {out}" in result.stdout
  image = np.asarray(Image.open(out).convert("RGB"))
  assert image.shape == (500, 800, 3)  # 8 × 5 inches at 100 dpi
  assert image.std() > 5 and len(np.unique(image.reshape(-1, 3), axis=0)) > 50
  # Two runs × two guidance scales: four lines, each in its own colour of the cycle.
  for name, rgb in CYCLE.items():
    assert _pixels_near(image, rgb) > 200, name


def test_cli_plot_names_what_it_can_draw(tmp_path):
  _write_run(tmp_path / "sfd", 300.0)
  result = _plot(tmp_path / "sfd", "--metric=fdi", f"--out={tmp_path / 'x.png'}")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "error: no run logs 'fdi'; these do: " in result.stderr and "fid" in result.stderr
  missing = _plot(tmp_path / "nothing", "--metric=fid", f"--out={tmp_path / 'x.png'}")
  assert missing.returncode == 2 and "metrics.jsonl does not exist" in missing.stderr
  assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("with_eval", [False, True])
def test_a_run_keeps_its_plots(tmp_path, with_eval):
  writer = MetricWriter(tmp_path)
  for step in range(10, 110, 10):
    writer.write_scalars(step, {"loss": 1.0 / step, "loss_mse": 0.5 / step, "lr": 1e-3, "images_per_s": 100.0})
    if with_eval and step % 50 == 0:
      writer.write_scalars(step, {"eval/cfg1/fd": 10.0 / step, "eval/seconds": 1.0})
  writer.flush()
  assert (tmp_path / "plots" / "training.png").exists()  # drawn after the first write
  writer.close()  # and again at the end, with everything
  training = np.asarray(Image.open(tmp_path / "plots" / "training.png").convert("RGB"))
  assert training.shape == (2 * 280, 3 * 400, 3) and training.std() > 5  # 4 panels in rows of 3
  assert (tmp_path / "plots" / "eval.png").exists() == with_eval


def _events(directory):
  """Every summary value of the TensorBoard event files in `directory` (the TFRecord framing: length, its CRC,
  the Event proto, its CRC)."""
  import struct

  from tensorboardX.proto import event_pb2
  values = []
  for path in sorted(directory.iterdir()):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      values.extend(event.summary.value)
      offset += 12 + length + 4
  return values


def test_hparams_of_the_config_reach_tensorboard(tmp_path):
  from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

  from sfd_jax.training import config as config_lib
  cfg = config_lib.base_config()
  writer = MetricWriter(tmp_path)
  writer.write_hparams(cfg.to_dict(), ("loss", "eval/cfg1/fid"))
  writer.close()
  data = {v.tag: HParamsPluginData.FromString(v.metadata.plugin_data.content) for v in _events(tmp_path / "tensorboard")
          if v.tag.startswith("_hparams_/")}
  hparams = data["_hparams_/session_start_info"].session_start_info.hparams
  assert hparams["optim.lr"].number_value == 1e-4 and hparams["loss.repa_mode"].string_value == "cos"
  assert hparams["eval.cfg_scales"].string_value == "[1.0]" and hparams["data.flip"].bool_value is True
  assert [m.name.tag for m in data["_hparams_/experiment"].experiment.metric_infos] == ["loss", "eval/cfg1/fid"]


def _write_demo_like_run(workdir, delta_t, fd_start):
  """A run as the demo's SFD stage leaves it: evaluations log the Fréchet distance `fd` (not `fid`), unguided and
  guided, and config.json holds the semantic lead Δ."""
  workdir.mkdir(parents=True)
  lines = [{"step": s, "loss": 1.0 / s, "loss_cos": 0.5 / s, "loss_repa": 0.1 / s, "grad_norm": 2e5 if s == 10 else 3.0}
           for s in (10, 20)]
  lines += [{"step": s, "eval/cfg1/fd": fd_start / s, "eval/cfg2/fd": fd_start / s / 2, "eval/seconds": 1.0}
            for s in (10, 20)]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  (workdir / "config.json").write_text(json.dumps({"loss": {"delta_t": delta_t}}))


def test_cli_plot_defaults_to_a_metric_the_runs_log_and_writes_next_to_them(tmp_path):
  """The demo's runs log `fd`: without --metric the plot draws it into the first run's plots/, not the current
  directory; --metric=fid (no such key) is one sentence that lists `fd`."""
  _write_demo_like_run(tmp_path / "runs" / "sfd", 0.3, 300.0)
  _write_demo_like_run(tmp_path / "runs" / "sync", 0.0, 200.0)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  result = subprocess.run([sys.executable, "-m", "sfd_jax.cli.plot", str(tmp_path / "runs" / "sfd"),
                           str(tmp_path / "runs" / "sync")], env=subprocess_env(), cwd=elsewhere,
                          capture_output=True, text=True, timeout=300)
  out = tmp_path / "runs" / "sfd" / "plots" / "compare_fd.png"
  assert result.returncode == 0 and f"wrote {out}" in result.stdout, result.stderr[-2000:]
  assert np.asarray(Image.open(out).convert("RGB")).shape == (500, 800, 3) and not any(elsewhere.iterdir())
  for name, rgb in CYCLE.items():  # two runs × two guidance scales
    assert _pixels_near(np.asarray(Image.open(out).convert("RGB")), rgb) > 100, name
  fid = _plot(tmp_path / "runs" / "sfd", "--metric=fid")
  errors = [line for line in fid.stderr.splitlines() if line.startswith("error:")]
  assert fid.returncode == 2 and "Traceback" not in fid.stderr and len(errors) == 1, fid.stderr[-2000:]
  assert errors[0].startswith("error: no run logs 'fid'; these do: ") and " fd," in errors[0], errors[0]


def test_pictures_name_runs_their_delta_and_metrics_in_words(tmp_path):
  from sfd_jax import plots
  _write_demo_like_run(tmp_path / "sfd", 0.3, 300.0)
  _write_demo_like_run(tmp_path / "sync", 0.0, 200.0)
  logs = [plots.read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("sfd", "sync")]
  labels = plots.run_labels([tmp_path / "sfd", tmp_path / "sync"], logs)
  assert labels == ["sfd (Δ = 0.3)", "sync (Δ = 0)"]
  runs = dict(zip(labels, logs))
  # A run of another objective on the same base config (the demo's texture VAE) has no Δ to name.
  (tmp_path / "vae").mkdir()
  (tmp_path / "vae" / "config.json").write_text(json.dumps({"loss": {"delta_t": 0.3}}))
  assert plots.run_labels([tmp_path / "vae"], [[{"step": 1, "loss_kl": 1.0}]]) == ["vae"]
  ax = plots.runs_figure(runs, [(plots.readable("fd"), "fd")]).axes[0]
  assert ax.get_title() == "Fréchet distance"
  assert ax.get_legend_handles_labels()[1] == ["sfd (Δ = 0.3), unguided", "sfd (Δ = 0.3), CFG 2",
                                               "sync (Δ = 0), unguided", "sync (Δ = 0), CFG 2"]
  panels = {ax.get_title(): ax for ax in plots.eval_figure(runs["sfd (Δ = 0.3)"]).axes if ax.get_title()}
  assert set(panels) == {"Fréchet distance", "seconds per evaluation"}
  assert panels["Fréchet distance"].get_legend_handles_labels()[1] == ["unguided", "CFG 2"]
  figures = plots.run_figures(tmp_path / "sfd", runs["sfd (Δ = 0.3)"])  # the run's own plots/
  assert {name: figure.get_suptitle() for name, figure in figures.items()} == {"training.png": "sfd (Δ = 0.3)",
                                                                                "eval.png": "sfd (Δ = 0.3)"}
  # The first gradient norms of an SFD run (the cosine loss at the zero-initialised output) come with their reason.
  training = {ax.get_title(): ax for ax in figures["training.png"].axes if ax.get_title()}
  assert set(training) == {"loss", "cosine velocity loss", "REPA loss", "gradient norm"}
  assert [t.get_text() for t in training["gradient norm"].texts] == [plots.GRAD_NORM_NOTE]
  assert "zero-initialised" in plots.GRAD_NORM_NOTE and training["gradient norm"].get_yscale() == "log"
  semvae = [{"step": s, "loss": 1.0, "loss_cos": 0.5, "grad_norm": 2e5} for s in (10, 20)]  # a cosine loss, not SFD's
  assert not any(ax.texts for ax in plots.training_figure(semvae).axes)
