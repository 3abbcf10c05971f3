"""Image sources and the ADM crops: crops against PIL called directly, folder / tfds / digits records, unreadable
images, and host-count-invariant, checkpointable batches."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from sfd_jax.data import images
from sfd_jax.errors import UserError


def _photo(width, height, seed=0):
  """A smooth random RGB image (bicubic upscale of noise), so resampling errors would show."""
  small = np.random.default_rng(seed).integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
  return Image.fromarray(small).resize((width, height), resample=Image.BICUBIC)


# Each case: image size, target, the sizes PIL must go through (box halvings, then the bicubic size), crop offset.
CENTER_CASES = [
    ((1000, 700), 256, [(500, 350)], (366, 256), (0, 55)),              # one halving, landscape
    ((600, 1100), 256, [(300, 550)], (256, 469), (106, 0)),             # portrait, odd crop offset
    ((2100, 1300), 256, [(1050, 650), (525, 325)], (414, 256), (0, 79)),  # two halvings
    ((200, 120), 256, [], (427, 256), (0, 85)),                          # upscaling, no halving
    ((256, 256), 256, [], (256, 256), (0, 0)),                           # already the target
]


@pytest.mark.parametrize("size,target,halvings,bicubic,offset", CENTER_CASES)
def test_center_crop_matches_pil(size, target, halvings, bicubic, offset):
  image = _photo(*size)
  expected = image
  for half in halvings:
    expected = expected.resize(half, resample=Image.BOX)
  expected = np.asarray(expected.resize(bicubic, resample=Image.BICUBIC))
  top, left = offset
  expected = expected[top:top + target, left:left + target]
  got = images.adm_center_crop(np.asarray(image), target)
  assert got.shape == (target, target, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, expected)


def test_random_crop_matches_pil_with_the_same_draws():
  image = _photo(900, 700, seed=1)
  got = images.adm_random_crop(np.asarray(image), 256, np.random.default_rng(5))
  draws = np.random.default_rng(5)
  short = int(draws.integers(256, 321))  # ⌈256/1.0⌉ .. ⌈256/0.8⌉ inclusive
  assert 256 <= short <= 320
  reference = image.resize((450, 350), resample=Image.BOX)  # 700 ≥ 2·short > 350: exactly one halving
  scale = short / min(reference.size)
  reference = np.asarray(reference.resize((round(reference.size[0] * scale), round(reference.size[1] * scale)),
                                          resample=Image.BICUBIC))
  top, left = int(draws.integers(reference.shape[0] - 255)), int(draws.integers(reference.shape[1] - 255))
  np.testing.assert_array_equal(got, reference[top:top + 256, left:left + 256])
  crops = {images.adm_random_crop(np.asarray(image), 256, np.random.default_rng(s)).tobytes() for s in range(4)}
  assert len(crops) == 4  # the draws matter


def test_flip_and_bad_inputs():
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  np.testing.assert_array_equal(images.hflip(image)[:, 0], image[:, 2])
  with pytest.raises(ValueError, match="uint8 RGB"):
    images.adm_center_crop(np.zeros((8, 8), np.uint8), 4)
  with pytest.raises(UserError, match="crop 'middle'"):
    images.view({"image": image, "label": 0, "index": 0}, None, resolution=2, crop="middle")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Two classes; images of several sizes and modes (RGB JPEG, palette PNG, grey PNG) and one corrupt file."""
  root = tmp_path_factory.mktemp("folder")
  (root / "cats").mkdir()
  (root / "dogs").mkdir()
  (root / "empty_class").mkdir()
  _photo(300, 200, 1).save(root / "dogs" / "b.jpg", quality=95)
  _photo(120, 160, 2).convert("P").save(root / "cats" / "a.png")
  _photo(64, 64, 3).convert("L").save(root / "cats" / "c.PNG")
  (root / "dogs" / "a_broken.jpg").write_bytes(b"not a jpeg at all")
  (root / "dogs" / "notes.txt").write_text("ignored")
  return root


def test_folder_source(folder):
  source = images.FolderImages(folder)
  assert source.class_names == ["cats", "dogs", "empty_class"]
  assert source.files == ["cats/a.png", "cats/c.PNG", "dogs/a_broken.jpg", "dogs/b.jpg"]
  first = source[0]
  assert first["label"] == 0 and first["index"] == 0 and first["image"].shape == (160, 120, 3)
  with Image.open(folder / "cats" / "a.png") as palette:  # converted to RGB before any resize, as ImageFolder
    expected = images.adm_center_crop(np.asarray(palette.convert("RGB")), 64)
  np.testing.assert_array_equal(images.adm_center_crop(first["image"], 64), expected)
  grey = source[1]["image"]
  assert grey.shape == (64, 64, 3) and np.array_equal(grey[..., 0], grey[..., 2])
  assert source[3]["label"] == 1
  with pytest.raises(images.UnreadableImage, match="a_broken.jpg") as info:
    source[2]
  assert info.value.index == 2
  assert source.describe()["num_images"] == 4


def test_skip_unreadable_stands_in_the_next_image(folder):
  source = images.SkipUnreadable(images.FolderImages(folder))
  assert source[2]["index"] == 3 and source[3]["index"] == 3


def test_bad_sources_name_the_fix(tmp_path):
  with pytest.raises(UserError, match="no images"):
    images.FolderImages(tmp_path)
  (tmp_path / "loose.png").write_bytes(b"")
  with pytest.raises(UserError, match="must hold class folders"):
    images.open_source("folder", str(tmp_path))
  with pytest.raises(UserError, match="does not exist"):
    images.FolderImages(tmp_path / "missing")
  with pytest.raises(UserError, match="not one of"):
    images.open_source("imagenet")
  with pytest.raises(UserError, match="tfds build"):
    images.TfdsImages("no_such_dataset_xyz", data_dir=str(tmp_path))
  with pytest.raises(UserError, match="hold out"):
    images.heldout_split(10, 10)


def test_tfds_source_without_tensorflow(tmp_path):
  """A prepared tfds dataset (array_record) written here without TensorFlow, read back through `tfds.builder`."""
  import tensorflow_datasets as tfds
  from array_record.python.array_record_module import ArrayRecordWriter
  from tensorflow_datasets.core import example_serializer

  features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                         "label": tfds.features.ClassLabel(names=["zero", "one"])})
  pngs = []
  for seed in range(3):
    buffer = io.BytesIO()
    _photo(40 + 8 * seed, 32, seed).save(buffer, format="PNG")
    pngs.append(buffer.getvalue())
  pngs[1] = pngs[1][:60]  # truncated: must be unreadable, not fatal
  directory = tmp_path / "tiny_images" / "1.0.0"
  directory.mkdir(parents=True)
  serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
  writer = ArrayRecordWriter(str(directory / "tiny_images-train.array_record-00000-of-00001"), "group_size:1")
  for i, png in enumerate(pngs):
    writer.write(serializer.serialize_example(features.encode_example({"image": png, "label": i % 2})))
  writer.close()
  tfds.folder_dataset.write_metadata(data_dir=directory, features=features, check_data=False,
                                     filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                                     split_infos=[tfds.core.SplitInfo(name="train", shard_lengths=[3], num_bytes=0)])
  source = images.open_source("tfds", str(tmp_path), tfds_name="tiny_images")
  assert len(source) == 3 and source.class_names == ["zero", "one"]
  record = source[2]
  assert record["label"] == 0 and record["index"] == 2
  np.testing.assert_array_equal(record["image"], np.asarray(_photo(56, 32, 2)))
  with pytest.raises(images.UnreadableImage, match="tfds:tiny_images:train\\[1\\]"):
    source[1]
  json.dumps(source.describe())


def test_digits_source():
  source = images.DigitsImages(size=24)
  assert len(source) == 1797 and source.class_names == [str(d) for d in range(10)]
  record = source[5]
  assert record["image"].shape == (24, 24, 3) and record["image"].dtype == np.uint8 and 0 <= record["label"] < 10
  assert record["image"].max() > 200 and record["image"].min() < 30


# Two hosts whose devices hold interleaved row blocks of a batch of 8, as a TPU mesh's ring order gives them.
HOST_ROWS = (np.array([0, 1, 6, 7]), np.array([2, 3, 4, 5]))


def test_image_batches_do_not_depend_on_the_host_count():
  source = images.Subset(images.DigitsImages(size=40), np.arange(10, 50))
  kwargs = dict(global_batch_size=8, seed=3, resolution=32, crop="random", flip=True, prefetch=0)
  whole = images.image_pipeline(source, **kwargs)
  hosts = [images.image_pipeline(source, rows=rows, **kwargs) for rows in HOST_ROWS]
  for _ in range(6):  # past one epoch (40 images = 5 batches): a reshuffled second epoch
    batch = next(whole)
    for rows, part in zip(HOST_ROWS, [next(h) for h in hosts]):
      for key in ("image", "label", "index"):
        np.testing.assert_array_equal(part[key], batch[key][rows])
  assert batch["image"].shape == (8, 32, 32, 3) and set(batch["index"]) <= set(range(10, 50))


def test_image_batches_resume_at_a_batch_on_any_number_of_hosts():
  source = images.DigitsImages(size=40)
  it = images.image_pipeline(source, global_batch_size=4, seed=0, resolution=32, prefetch=0)
  next(it)
  expected = [next(it) for _ in range(2)]
  resumed = images.image_pipeline(source, global_batch_size=4, seed=0, resolution=32, prefetch=0, start_batch=1)
  host_rows = (np.array([0, 3]), np.array([1, 2]))
  hosts = [images.image_pipeline(source, global_batch_size=4, seed=0, resolution=32, prefetch=0, start_batch=1,
                                 rows=rows) for rows in host_rows]
  for batch in expected:
    np.testing.assert_array_equal(next(resumed)["image"], batch["image"])
    for rows, host in zip(host_rows, hosts):
      np.testing.assert_array_equal(next(host)["image"], batch["image"][rows])


def test_center_view_evaluates_each_image_once():
  source = images.DigitsImages(size=32)
  batches = list(images.image_pipeline(images.Subset(source, np.arange(10)), global_batch_size=4, seed=0,
                                       resolution=32, crop="center", shuffle=False, num_epochs=1, prefetch=0))
  assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the last partial batch dropped
  np.testing.assert_array_equal(batches[1]["image"][0], source[4]["image"])
