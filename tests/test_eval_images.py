"""Image sources as the evaluator reads them: streamed ADM .npz batches, folders of samples, the ADM centre crop,
fixed-shape batches, bad inputs."""
import hashlib
import zipfile

import numpy as np
import pytest
from PIL import Image

from sfd_jax.data.images import (
  CenterCropped,
  FolderImages,
  NpzImages,
  Subset,
  digest,
  image_shape,
  open_images,
  read_images,
)
from sfd_jax.errors import UserError
from sfd_jax.eval.reference import read_reference


@pytest.fixture
def batch(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (11, 6, 5, 3), dtype=np.uint8)
  np.savez(tmp_path / "batch.npz", arr_0=images, arr_1=np.arange(11) % 3)
  return tmp_path / "batch.npz", images


def test_npz_is_streamed_in_any_order(batch):
  path, images = batch
  source = open_images(path)
  assert isinstance(source, NpzImages) and len(source) == 11 and image_shape(source) == (6, 5, 3)
  np.testing.assert_array_equal(read_images(source, np.arange(0, 4)), images[:4])
  np.testing.assert_array_equal(read_images(source, [5, 6, 9]), images[[5, 6, 9]])  # skips forward
  np.testing.assert_array_equal(read_images(source, [1, 10]), images[[1, 10]])  # backwards: reopens
  np.testing.assert_array_equal(read_images(Subset(source, [7, 2]), [0, 1]), images[[7, 2]])
  assert [source[i]["label"] for i in (0, 4, 8)] == [0, 1, 2]  # arr_1, the labels the sampler stores


def test_compressed_npz_and_digest(tmp_path, batch):
  path, images = batch
  np.savez_compressed(tmp_path / "small.npz", arr_0=images)
  small = open_images(tmp_path / "small.npz")
  np.testing.assert_array_equal(read_images(small, range(11)), images)
  assert small[3]["label"] == -1
  assert digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_bad_batches_say_what_is_wrong(tmp_path, batch):
  path, images = batch
  np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
  with pytest.raises(UserError, match="uint8 images"):
    open_images(tmp_path / "float.npz")
  np.savez(tmp_path / "other.npz", samples=images)
  with pytest.raises(UserError, match="no 'arr_0'"):
    open_images(tmp_path / "other.npz")
  (tmp_path / "junk.npz").write_bytes(b"junk")
  with pytest.raises(UserError, match="corrupt"):
    open_images(tmp_path / "junk.npz")
  with zipfile.ZipFile(path) as zf:  # an npz whose image array is cut short
    data = zf.read("arr_0.npy")
  with zipfile.ZipFile(tmp_path / "cut.npz", "w") as zf:
    zf.writestr("arr_0.npy", data[:-40])
  with pytest.raises(UserError, match="truncated"):
    read_images(open_images(tmp_path / "cut.npz"), range(11))
  with pytest.raises(UserError, match="folder of images"):
    open_images(tmp_path / "missing.npz")
  with pytest.raises(UserError, match="neither images"):
    read_reference(tmp_path / "other.npz")
  np.savez(tmp_path / "half.npz", mu=np.zeros(3))
  with pytest.raises(UserError, match="mu without sigma"):
    read_reference(tmp_path / "half.npz")


def test_folder_reads_sorted_images_and_checks_sizes(tmp_path):
  images = np.random.default_rng(1).integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
  for i, image in enumerate(images):
    Image.fromarray(image).save(tmp_path / f"{i:06d}.png")
  Image.fromarray(images[0]).save(tmp_path / ".000003.png.tmp", format="PNG")  # a sampler's unfinished write
  source = open_images(tmp_path)
  assert isinstance(source, FolderImages) and len(source) == 3 and image_shape(source) == (8, 10, 3)
  assert source[1]["label"] == -1  # no class folders
  np.testing.assert_array_equal(read_images(source, [0, 2]), images[[0, 2]])
  Image.new("RGB", (12, 8)).save(tmp_path / "sub.png")
  with pytest.raises(UserError, match="centre-crop"):
    read_images(open_images(tmp_path), range(4))
  cropped = open_images(tmp_path, image_size=4)
  assert isinstance(cropped, CenterCropped) and read_images(cropped, range(4)).shape == (4, 4, 4, 3)
  (tmp_path / "zz_broken.png").write_bytes(b"not a png")
  with pytest.raises(UserError, match="zz_broken.png"):
    read_images(open_images(tmp_path, image_size=4), range(5))


def test_tfds_split_is_read_through_data_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  import io
  def png(i):
    buffer = io.BytesIO()
    Image.fromarray(np.full((10 + i, 12, 3), 40 * i, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
  records = [{"image": png(i), "label": i} for i in range(5)]  # mixed sizes, encoded as tfds stores them
  with tfds.testing.mock_data(num_examples=5, as_data_source_fn=lambda *args, **kwargs: records):
    source = open_images("tfds:imagenette:train", image_size=8)
    assert len(source) == 5 and image_shape(source) == (8, 8, 3) and digest(source) is None
    np.testing.assert_array_equal(read_images(source, [1, 4])[:, 0, 0, 0], [40, 160])
