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
