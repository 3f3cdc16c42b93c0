"""Tests of the experiments: data, models, training (+ resume), comparison."""

import functools
import json
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import compare
from experiments import data
from experiments import methods
from experiments import models
from experiments import checkpoints
from experiments import config
from experiments import steps
from experiments import train
from experiments import trainer
from experiments import xla_env

TINY_CNN = ["--model-arg", "widths=(4, 8, 8)", "--model-arg", "hidden=16"]
# The digits protocols' rho grids: SAM's, and those of the methods whose
# papers tuned rho, beside each registry default.
RHO_GRID = ["sam (rho=0.02)", "sam (rho=0.1)", "sam (rho=0.2)",
            "asam (rho=0.2)", "asam (rho=1.0)", "asam (rho=2.0)",
            "gnp (rho=0.05)", "gnp (rho=0.2)",
            "looksam (rho=0.05)", "looksam (rho=0.2)",
            "ssam_fisher (rho=0.05)"]


TINY_METHODS = ",".join(methods.available()) + ",sam:rho=0.1"


@pytest.fixture(scope="module", autouse=True)
def compare_run(request, tmp_path_factory):
  """The tiny comparison, started before this module's first test.

  The real command line, in a process of its own that compiles (every
  method once: most of its time) while the other tests run on the other
  core; its XLA optimises less, since its timings are not what is tested.
  """
  if not any(item.name == "test_compare_tiny_run_on_digits_writes_its_"
             "files" for item in request.session.items):
    yield None  # not selected: nothing to start
    return
  out = str(tmp_path_factory.mktemp("compare") / "cmp")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      "--xla_cpu_use_fusion_emitters=false "
      "--xla_backend_optimization_level=0 "
      "--xla_llvm_disable_expensive_passes=true"))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.compare", "--dataset", "digits",
       "--epochs", "1",
       "--seeds", "2", "--batch-size", "256", "--out", out, "--no-progress",
       "--jobs", "1", "--methods", TINY_METHODS] + TINY_CNN, env=env, cwd=root, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  yield out, proc
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


# --------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------


def _write_idx(path, array, magic=None):
  """An IDX file of unsigned bytes as LeCun's MNIST page describes it
  (gzipped when ``path`` ends in .gz), written independently of the
  loader."""
  import gzip  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top

  array = np.asarray(array, np.uint8)
  head = struct.pack(">I", magic if magic is not None else 0x800 + array.ndim)
  head += struct.pack(f">{array.ndim}I", *array.shape)
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(head + array.tobytes())


def _mock_fashion(folder, n_train=60, n_test=20, seed=0):
  """Fashion-MNIST's four files with random 28x28 images, ``n_train /
  10`` of each class (the test files uncompressed, as a user might have
  them)."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  raw = {
      "train_images": rng.integers(0, 256, (n_train, 28, 28)),
      "train_labels": rng.permutation(np.arange(n_train) % 10),
      "test_images": rng.integers(0, 256, (n_test, 28, 28)),
      "test_labels": np.arange(n_test) % 10,
  }
  for key, stem in data.FASHION_MNIST_FILES.items():
    name = stem + (".gz" if key.startswith("train") else "")
    _write_idx(folder / name, raw[key])
  return {k: np.asarray(v, np.uint8) for k, v in raw.items()}


def test_fashion_mnist_is_read_from_its_idx_files(tmp_path):
  raw = _mock_fashion(tmp_path / "fm")
  ds = data.load_fashion_mnist(data_dir=str(tmp_path / "fm"))
  assert ds.name == "fashion_mnist" and ds.num_classes == 10
  assert ds.train_images.shape == (60, 28, 28, 1)
  assert ds.test_images.shape == (20, 28, 28, 1)
  # Pixels scaled to [0, 1], standardised with the training set's mean and
  # std, the same affine map on the test set.
  x = raw["train_images"].astype(np.float64) / 255.0
  mean, std = x.mean(), x.std()
  np.testing.assert_allclose(ds.train_images[..., 0], (x - mean) / std,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      ds.test_images[..., 0],
      (raw["test_images"] / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(ds.train_labels, raw["train_labels"])
  np.testing.assert_array_equal(ds.test_labels, raw["test_labels"])
  # A fixed class-balanced subset, the same for every seed; the seed only
  # picks the noisy labels (exactly round(noise * n), none in the test set).
  a = data.load_fashion_mnist(0.25, seed=1, data_dir=str(tmp_path / "fm"),
                              train_size=20)
  b = data.load_fashion_mnist(0.25, seed=2, data_dir=str(tmp_path / "fm"),
                              train_size=20)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  np.testing.assert_array_equal(a.train_clean_labels, b.train_clean_labels)
  assert np.bincount(a.train_clean_labels, minlength=10).tolist() == [2] * 10
  assert (a.train_labels != a.train_clean_labels).sum() == 5
  assert not np.array_equal(a.train_labels, b.train_labels)
  # Every subset image is one of the training images, with its label.
  rows = {raw["train_images"][i].tobytes(): raw["train_labels"][i]
          for i in range(60)}
  x20 = raw["train_images"][data.balanced_subset(raw["train_labels"], 20,
                                                 10)]
  assert sorted(rows[im.tobytes()] for im in x20) == sorted(
      a.train_clean_labels.tolist())
  # Through the common entry point and the config (Fashion-MNIST only).
  got = data.load("fashion_mnist", data_dir=str(tmp_path / "fm"),
                  train_size=30)
  assert got.num_train == 30
  with pytest.raises(ValueError, match="train_size is for fashion_mnist"):
    data.load("digits", train_size=30)
  with pytest.raises(ValueError, match="train_size is for fashion_mnist"):
    config.Config(dataset="digits", train_size=30)
  with pytest.raises(ValueError, match=r"train_size must be in \[1, 60\]"):
    data.load_fashion_mnist(data_dir=str(tmp_path / "fm"), train_size=61)


def test_fashion_mnist_missing_or_damaged_files_are_clear_errors(tmp_path):
  empty = tmp_path / "none"
  empty.mkdir()
  with pytest.raises(data.DataFilesError) as e:
    data.load_fashion_mnist(data_dir=str(empty))
  msg = str(e.value)
  assert "apt-get install -y dataset-fashion-mnist" in msg
  assert "tfds build fashion_mnist" in msg and "--data-dir" in msg
  assert "train-images-idx3-ubyte[.gz]" in msg and str(empty) in msg
  # A wrong magic number, a short file, images of another size.
  _mock_fashion(tmp_path / "magic")
  _write_idx(tmp_path / "magic" / "t10k-labels-idx1-ubyte",
             np.zeros(20), magic=0x803)
  with pytest.raises(ValueError, match="magic number 0x00000803, expected "
                     "0x00000801"):
    data.load_fashion_mnist(data_dir=str(tmp_path / "magic"))
  _mock_fashion(tmp_path / "short")
  path = tmp_path / "short" / "t10k-labels-idx1-ubyte"
  path.write_bytes(path.read_bytes()[:-3])
  with pytest.raises(ValueError, match=r"the header says \(20,\)"):
    data.load_fashion_mnist(data_dir=str(tmp_path / "short"))
  (tmp_path / "size").mkdir()
  for key, stem in data.FASHION_MNIST_FILES.items():
    shape = (10, 8, 8) if key.endswith("images") else (10,)
    _write_idx(tmp_path / "size" / stem, np.zeros(shape))
  with pytest.raises(ValueError, match=r"images of shape \(8, 8\), "
                     r"Fashion-MNIST's are \(28, 28\)"):
    data.load_fashion_mnist(data_dir=str(tmp_path / "size"))


def _no_download(monkeypatch):
  """Records every call of TFDS's download_and_prepare (and refuses it)."""
  import tensorflow_datasets as tfds

  calls = []

  def refuse(self, *args, **kwargs):
    calls.append(self.name)
    raise AssertionError("download_and_prepare called")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      refuse)
  return calls


def test_fashion_mnist_from_a_prepared_tfds_copy(tmp_path, monkeypatch):
  # No IDX files in the directory, TFDS's fashion_mnist prepared there
  # (mocked: random records, the builder saying it is prepared): the TFDS
  # route, with the IDX route's shapes, dtypes and normalisation.
  import tensorflow_datasets as tfds

  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared",
                      lambda self: True)
  empty = tmp_path / "tfds"
  empty.mkdir()
  with tfds.testing.mock_data(num_examples=30):
    ds = data.load_fashion_mnist(data_dir=str(empty))
    source = tfds.data_source("fashion_mnist", split="train",
                              data_dir=str(empty))
    raw = np.stack([np.asarray(source[i]["image"]) for i in range(30)])
    labels = np.array([int(source[i]["label"]) for i in range(30)])
  assert ds.name == "fashion_mnist" and ds.num_classes == 10
  assert ds.train_images.shape == ds.test_images.shape == (30, 28, 28, 1)
  assert ds.train_images.dtype == ds.test_images.dtype == np.float32
  assert ds.train_labels.dtype == np.int32
  assert 0 <= ds.train_labels.min() and ds.train_labels.max() <= 9
  np.testing.assert_array_equal(ds.train_labels, labels)
  x = raw.astype(np.float64) / 255.0
  np.testing.assert_allclose(ds.train_images, (x - x.mean()) / x.std(),
                             rtol=1e-5, atol=1e-5)


def test_fashion_mnist_tfds_route_never_downloads(tmp_path, monkeypatch):
  # Nothing prepared (no IDX files, no TFDS copy): the missing-files error,
  # without asking TFDS to download and prepare the dataset (which
  # tfds.data_source does by default).
  calls = _no_download(monkeypatch)
  empty = tmp_path / "nothing"
  empty.mkdir()
  with pytest.raises(data.DataFilesError, match="dataset-fashion-mnist"):
    data.load_fashion_mnist(data_dir=str(empty))
  assert calls == []
  assert os.listdir(empty) == []  # TFDS wrote nothing there either


def test_fashion_mnist_broken_tfds_copy_is_not_missing_files(tmp_path,
                                                             monkeypatch):
  # A prepared copy that cannot be read (e.g. prepared as TFRecord, no
  # random access): an error naming the copy, not "files missing".
  import tensorflow_datasets as tfds

  _no_download(monkeypatch)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared",
                      lambda self: True)

  def tfrecord(self, *args, **kwargs):
    raise NotImplementedError("Random access data source for file format "
                              "FileFormat.TFRECORD is not supported.")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "as_data_source", tfrecord)
  broken = tmp_path / "broken"
  broken.mkdir()
  with pytest.raises(ValueError, match="prepared in .* but cannot be read "
                     r"\(NotImplementedError: Random access") as e:
    data.load_fashion_mnist(data_dir=str(broken))
  assert not isinstance(e.value, data.DataFilesError)
  assert "--file_format=array_record" in str(e.value)


def test_fashion_resnet_layout():
  # Residual stages with BatchNorm; the stem halves the side, each later
  # stage halves it again; the head is a small share of the weights.
  model = models.create("fashion_resnet", 10)
  # Jitted, with an rbg key (XLA:CPU compiles threefry's initialisers
  # several times slower), as the trainer does.
  params, stats = jax.jit(lambda k: models.init(model, k, (28, 28, 1)))(
      jax.random.key(0, impl="rbg"))
  assert set(params) == {"stem", "stem_bn", "stage1", "stage2", "stage3",
                         "head"}
  assert {"conv1", "bn1", "conv2", "bn2"} <= set(params["stage1"])
  assert {"proj", "proj_bn"} <= set(params["stage2"])
  assert jax.tree.leaves(stats)
  assert models.num_params(params) == 19810
  assert models.num_params(params["head"]) == 330
  x = jnp.ones((3, 28, 28, 1))
  assert jax.eval_shape(
      lambda p, s: model.apply({"params": p, "batch_stats": s}, x,
                               train=False), params, stats).shape == (3, 10)
  # A strided PatchConv is the stride-1 convolution at rows/cols 0, 2, ...
  conv = models.PatchConv(5, strides=2)
  x = jax.random.normal(jax.random.key(1), (2, 7, 7, 3))
  v = jax.jit(conv.init)(jax.random.key(2, impl="rbg"), x)

  @jax.jit
  def both(v, x):
    ref = jax.lax.conv_general_dilated(
        x, v["params"]["kernel"], (2, 2), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + v["params"]["bias"]
    return conv.apply(v, x), models.PatchConv(5).apply(v, x), ref

  strided, full, ref = both(v, x)
  np.testing.assert_allclose(strided, full[:, ::2, ::2], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(strided, ref, rtol=1e-4, atol=1e-4)


def test_compare_on_mock_fashion_mnist_tuned_sgd_is_the_reference(tmp_path):
  # The whole command on mock Fashion-MNIST files: an SGD learning-rate
  # grid, the best SGD row the reference of every paired difference,
  # training accuracy in the table, LookSAM's loss curves drawn.
  _mock_fashion(tmp_path / "fm", n_train=60, n_test=20)
  out = str(tmp_path / "out")
  (result,) = compare.main([
      "--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "fm"),
      "--train-size", "48", "--epochs", "2", "--seeds", "2",
      "--batch-size", "16",
      "--methods", "sgd,sgd:lr=0.5,looksam:k=2",
      "--model-arg", "widths=(4,)", "--model-arg", "stem=4",
      "--out", out, "--no-progress", "--jobs", "1"])
  saved = json.load(open(os.path.join(out, "results.json")))
  assert saved["base_config"]["dataset"] == "fashion_mnist"
  assert saved["base_config"]["model"] == "fashion_resnet"
  assert saved["xla"]["xla_flags"] is not None and saved["cpu"]
  runs = saved["runs"]
  assert len(runs) == 6 and all(r["steps"] == 2 * 3 for r in runs)
  acc = {(r["label"], r["seed"]): r["final_test_acc"] for r in runs}
  mean = {lab: np.mean([acc[lab, s] for s in (0, 1)])
          for lab in ("sgd", "sgd (lr=0.5)", "looksam (k=2)")}
  ref = max(("sgd", "sgd (lr=0.5)"), key=lambda lab: mean[lab])
  by = {r["label"]: r for r in saved["summary"]}
  assert "vs_sgd" not in by[ref]
  d = np.array([acc["looksam (k=2)", s] - acc[ref, s] for s in (0, 1)])
  got = by["looksam (k=2)"]["vs_sgd"]
  assert got["ref"] == ref
  np.testing.assert_allclose(got["mean"], d.mean(), atol=1e-12)
  half = 12.706 * d.std(ddof=1) / np.sqrt(2)
  np.testing.assert_allclose([got["lo"], got["hi"]],
                             [d.mean() - half, d.mean() + half], atol=1e-4)
  md = open(os.path.join(out, "results.md")).read()
  for lab in mean:
    train = np.mean([r["final_train_acc"] for r in runs
                     if r["label"] == lab])
    assert f"| {lab} | {100 * mean[lab]:.2f} ± " in md
    assert f" | {100 * train:.1f} | " in md
  assert "The reference is the best SGD row, " + ref in md
  assert os.path.exists(os.path.join(out, "train_loss.png"))
  assert result["meta"]["regime"] == "long"


def test_digits_split_is_fixed_and_noise_deterministic_per_seed():
  from sklearn.datasets import load_digits as sk_load

  a = data.load_digits(label_noise=0.3, seed=0)
  b = data.load_digits(label_noise=0.3, seed=0)
  c = data.load_digits(label_noise=0.3, seed=1)
  clean = data.load_digits(label_noise=0.0, seed=5)
  assert a.train_images.shape == (1437, 8, 8, 1)
  assert a.test_images.shape == (360, 8, 8, 1)
  # Same seed: identical; other seed: same split and images, other noise.
  np.testing.assert_array_equal(a.train_labels, b.train_labels)
  for other in (c, clean):
    np.testing.assert_array_equal(a.train_images, other.train_images)
    np.testing.assert_array_equal(a.test_images, other.test_images)
    np.testing.assert_array_equal(a.test_labels, other.test_labels)
    np.testing.assert_array_equal(a.train_clean_labels,
                                  other.train_clean_labels)
  assert not np.array_equal(a.train_labels, c.train_labels)
  np.testing.assert_array_equal(clean.train_labels, clean.train_clean_labels)
  # Exactly round(0.3 n) labels changed, each to a different class.
  flipped = a.train_labels != a.train_clean_labels
  assert flipped.sum() == round(0.3 * 1437)
  # Stratified 20% test split: 360 images, class counts as in the full set.
  raw = sk_load()
  full_counts = np.bincount(raw.target, minlength=10)
  test_counts = np.bincount(a.test_labels, minlength=10)
  assert np.all(np.abs(test_counts - full_counts * 360 / 1797) <= 1)
  # Images are the real digits, standardised with the train statistics.
  flat_raw = raw.images.reshape(1797, 64) / 16.0
  x_tr = a.train_images.reshape(1437, 64)
  np.testing.assert_allclose([x_tr.mean(), x_tr.std()], [0.0, 1.0],
                             atol=1e-5)
  # Each test image is one of sklearn's, standardised with the statistics
  # of the documented split's training pixels.
  mean, std = _raw_train_stats()
  recon = a.test_images.reshape(360, 64) * std + mean
  for i in range(0, 360, 40):
    diffs = np.abs(flat_raw - recon[i]).max(1)
    assert diffs.min() < 1e-5
    assert raw.target[np.argmin(diffs)] == a.test_labels[i]


def _raw_train_stats():
  from sklearn import model_selection
  from sklearn.datasets import load_digits as sk_load

  raw = sk_load()
  idx_train, _ = model_selection.train_test_split(
      np.arange(1797), test_size=360, stratify=raw.target, random_state=0)
  x = raw.images[idx_train] / 16.0
  return float(x.mean()), float(x.std())


def test_symmetric_label_noise_is_uniform_over_wrong_classes():
  labels = np.arange(30000) % 10
  noisy = data.symmetric_label_noise(labels, 1.0, 10, seed=3)
  assert np.all(noisy != labels)
  # Offsets to the wrong class: each of the 9 about 1/9 of the time.
  offsets = (noisy - labels) % 10
  counts = np.bincount(offsets, minlength=10)
  assert counts[0] == 0
  np.testing.assert_allclose(counts[1:] / 30000, 1 / 9, atol=0.01)
  half = data.symmetric_label_noise(labels, 0.5, 10, seed=3)
  assert (half != labels).sum() == 15000
  np.testing.assert_array_equal(
      half, data.symmetric_label_noise(labels, 0.5, 10, seed=3))
  with pytest.raises(ValueError, match="label_noise"):
    data.symmetric_label_noise(labels, 1.5, 10, seed=0)


def test_mnist1d_is_generated_offline_with_its_published_shape(monkeypatch):
  import random
  import socket

  import requests

  def no_network(*a, **k):
    raise AssertionError("MNIST-1D must not touch the network")

  monkeypatch.setattr(requests, "get", no_network)
  monkeypatch.setattr(socket, "socket", no_network)
  data._mnist1d_split.cache_clear()
  np.random.seed(123)
  random.seed(123)
  np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
  ds = data.load_mnist1d(label_noise=0.3, seed=4)
  # The global NumPy and random states the generator seeds are restored.
  np.testing.assert_array_equal(np.random.get_state()[1], np_before)
  assert random.getstate() == py_before
  assert ds.train_images.shape == (4000, 40)
  assert ds.test_images.shape == (1000, 40)
  assert ds.train_images.dtype == np.float32 and ds.num_classes == 10
  assert ds.image_shape == (40,)
  for y in (ds.train_clean_labels, ds.test_labels):
    assert y.dtype == np.int32 and y.min() == 0 and y.max() == 9
  # The generator makes 5,000 // 10 signals of each class, then splits.
  counts = (np.bincount(ds.train_clean_labels, minlength=10)
            + np.bincount(ds.test_labels, minlength=10))
  np.testing.assert_array_equal(counts, np.full(10, 500))
  # The package standardises the whole set.
  x = np.concatenate([ds.train_images, ds.test_images])
  np.testing.assert_allclose([x.mean(), x.std()], [0.0, 1.0], atol=1e-4)
  # Exactly 30% of the training labels flipped; the same for the seed,
  # the data the same for every seed.
  assert (ds.train_labels != ds.train_clean_labels).sum() == 1200
  again = data.load("mnist1d", label_noise=0.3, seed=4)
  np.testing.assert_array_equal(again.train_labels, ds.train_labels)
  other = data.load("mnist1d", seed=5)
  np.testing.assert_array_equal(other.train_images, ds.train_images)
  np.testing.assert_array_equal(other.train_labels, other.train_clean_labels)
  # The labels are the signals' classes: a linear classifier reaches about
  # the paper's 32% (logistic regression, Greydanus & Kobak), far above
  # chance; on shuffled labels it is at chance.
  from sklearn.linear_model import LogisticRegression

  def linear_acc(labels):
    clf = LogisticRegression(max_iter=300).fit(ds.train_images, labels)
    return clf.score(ds.test_images, ds.test_labels)

  assert 0.25 < linear_acc(ds.train_clean_labels) < 0.45
  shuffled = np.random.default_rng(0).permutation(ds.train_clean_labels)
  assert linear_acc(shuffled) < 0.16


def test_augmentations():
  rng = np.random.default_rng(0)
  image = rng.random((8, 8, 3)).astype(np.float32)
  padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
  for s in range(20):
    crop = data.random_crop(image, np.random.default_rng(s), padding=2)
    assert crop.shape == image.shape
    windows = [padded[i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
    assert any(np.array_equal(crop, w) for w in windows)
  np.testing.assert_array_equal(
      data.random_crop(image, np.random.default_rng(0), padding=0), image)
  flips = [data.random_flip(image, np.random.default_rng(s)) for s in range(20)]
  assert all(np.array_equal(f, image) or np.array_equal(f, image[:, ::-1])
             for f in flips)
  assert any(np.array_equal(f, image[:, ::-1]) for f in flips)
  assert any(np.array_equal(f, image) for f in flips)
  ones = np.ones((10, 10, 1), np.float32)
  for s in range(20):
    out = data.cutout(ones, np.random.default_rng(s), size=4)
    zero = out[..., 0] == 0
    rows, cols = np.nonzero(zero)
    assert 0 < zero.sum() <= 16
    # The zeros form one axis-aligned rectangle (the clipped square).
    assert zero.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    assert np.ptp(rows) < 4 and np.ptp(cols) < 4
  np.testing.assert_array_equal(
      data.cutout(ones, np.random.default_rng(0), 0), ones)


def test_tfds_pipeline_on_mock_cifar10():
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=24):
    ds = data.load_tfds("cifar10", label_noise=0.5, seed=1)
    assert (ds.num_train, ds.num_test, ds.num_classes) == (24, 24, 10)
    aug = data.Augment(cutout=8)
    e0 = list(ds.batches("train", 8, epoch=0, seed=0, augment=aug))
    e0b = list(ds.batches("train", 8, epoch=0, seed=0, augment=aug))
    e1 = list(ds.batches("train", 8, epoch=1, seed=0, augment=aug))
    assert len(e0) == 3
    assert e0[0]["image"].shape == (8, 32, 32, 3)
    assert e0[0]["image"].dtype == np.float32
    for x, y in zip(e0, e0b):  # deterministic for (seed, epoch)
      np.testing.assert_array_equal(x["image"], y["image"])
      np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(e0[0]["image"], e1[0]["image"])
    # Noisy labels: exactly half of the records' labels changed.
    clean = np.array([int(ds.train_source[i]["label"]) for i in range(24)])
    noisy = ds._noisy_labels()
    assert (noisy != clean).sum() == 12
    # Test split: in order, not augmented, normalised, remainder kept.
    test = list(ds.batches("test", 10))
    assert [b["image"].shape[0] for b in test] == [10, 10, 4]
    raw = np.asarray(ds.test_source[0]["image"], np.float32) / 255.0
    mean, std = data._NORMALISATION["cifar10"]
    np.testing.assert_allclose(
        test[0]["image"][0], (raw - np.array(mean)) / np.array(std),
        rtol=1e-5, atol=1e-5)
    assert test[0]["label"][0] == int(ds.test_source[0]["label"])


# --------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------


def _count(model, shape=(32, 32, 3)):
  variables = jax.eval_shape(
      lambda k: model.init(k, jnp.zeros((1,) + shape), train=False),
      jax.random.key(0))
  return models.num_params(variables["params"]), variables


def test_paper_models_have_the_published_sizes():
  # ResNet-18 (CIFAR) 11.17M and WRN-28-10 36.5M, as usually reported.
  assert _count(models.create("resnet18", 10))[0] == 11_173_962
  assert _count(models.create("wrn28_10", 10))[0] == 36_479_194
  n, variables = _count(models.create("pyramidnet110", 100))
  assert 28.0e6 < n < 28.7e6  # the paper quotes 28.3M
  # Widths grow linearly by alpha from 16 to 16 + 270.
  assert variables["params"]["head"]["kernel"].shape == (286, 100)
  assert "batch_stats" in variables
  n_vit, _ = _count(models.create("vit_small", 10))
  assert 2e6 < n_vit < 3.5e6


def test_digits_cnn_is_small_cnn_with_patch_convolutions():
  x = jax.random.normal(jax.random.key(1), (5, 8, 8, 1))
  ref = models.SmallCNN(widths=(4, 8, 8), hidden=16)
  ours = models.DigitsCNN(widths=(4, 8, 8), hidden=16)
  params = jax.jit(ref.init)(jax.random.key(0, impl="rbg"), x)["params"]
  ours_params = jax.eval_shape(ours.init, jax.random.key(0), x)["params"]
  chex.assert_trees_all_equal_shapes(params, ours_params)
  conv = models.PatchConv(3, (5, 5))
  ref_conv = nn.Conv(3, (5, 5))
  p = jax.jit(ref_conv.init)(jax.random.key(2, impl="rbg"), x)

  @jax.jit
  def both(params, p):
    return (ours.apply({"params": params}, x), ref.apply({"params": params}, x),
            conv.apply(p, x), ref_conv.apply(p, x))

  a, b, c, d = both(params, p)
  chex.assert_trees_all_close(a, b, atol=1e-5)
  chex.assert_trees_all_close(c, d, atol=1e-5)


def test_mnist1d_mlp_is_the_published_mlp_with_output_heavy_layers():
  model = models.create("mnist1d_mlp", 10)
  params = jax.jit(lambda k: models.init(model, k, (40,)))(
      jax.random.key(0, impl="rbg"))[0]
  # 40 -> 100 -> 100 -> 10 with biases: 4,100 + 10,100 + 1,010.
  assert models.num_params(params) == 15_210
  assert sorted(params) == ["fc1", "fc2", "head"]
  out_side = models.num_params(params["fc2"]) + models.num_params(
      params["head"])
  assert out_side == 11_110  # 73% of the parameters (the CNN's: 29%)
  x = np.asarray(jax.random.normal(jax.random.key(1), (3, 40)))
  p = jax.device_get(params)
  h = np.maximum(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
  h = np.maximum(h @ p["fc2"]["kernel"] + p["fc2"]["bias"], 0)
  ref = h @ p["head"]["kernel"] + p["head"]["bias"]
  np.testing.assert_allclose(model.apply({"params": params}, x), ref,
                             rtol=1e-5, atol=1e-5)
  assert config.Config(dataset="mnist1d").model == "mnist1d_mlp"
  assert config.Config(dataset="mnist1d").noise == 0.0


def test_tiny_variants_run_and_update_batch_stats():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  for model in (
      models.ResNet(num_classes=7, stage_sizes=(1, 1), width=4),
      models.WideResNet(num_classes=7, depth=10, widen=1),
      models.PyramidNet(num_classes=7, depth=8, alpha=6),
      models.ViT(num_classes=7, patch_size=4, dim=8, depth=1, heads=2),
  ):

    @jax.jit
    def run(key, model=model):
      params, stats = models.init(model, key, (8, 8, 3))
      variables = {"params": params}
      if stats:
        variables["batch_stats"] = stats
        logits, new = model.apply(variables, x, train=True,
                                  mutable=["batch_stats"])
        return logits, stats, new["batch_stats"]
      return model.apply(variables, x, train=True), {}, {}

    logits, old, new = run(jax.random.key(1, impl="rbg"))
    assert logits.shape == (2, 7)
    chex.assert_tree_all_finite(logits)
    if not isinstance(model, models.ViT):  # BatchNorm: statistics move
      assert jax.tree.leaves(old)
      assert not all(np.allclose(a, b) for a, b in
                     zip(jax.tree.leaves(old), jax.tree.leaves(new)))
  with pytest.raises(ValueError, match="model must be one of"):
    models.create("resnet19", 10)


# --------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="dataset must be one of"):
    config.Config(dataset="mnist")
  with pytest.raises(ValueError, match="method must be one of"):
    config.Config(method="adamw")
  with pytest.raises(ValueError, match="label_smoothing must be a finite number in"):
    config.Config(label_smoothing=1.0)
  with pytest.raises(ValueError, match="label_noise must be a finite number in"):
    config.Config(label_noise=-0.1)
  with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
    config.Config(epochs=0)
  assert config.Config().model == "digits_cnn"
  assert config.Config(dataset="cifar10").model == "resnet18"
  assert config.Config().noise == 0.3
  assert config.Config(dataset="cifar10").noise == 0.0


def test_label_smoothing_cross_entropy():
  logits = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], np.float32)
  labels = np.array([1, 2])
  s, k = 0.1, 3
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  target = np.full((2, 3), s / k)
  target[np.arange(2), labels] += 1 - s
  expected = -(target * logp).sum(1).mean()
  np.testing.assert_allclose(
      steps.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), k, s),
      expected, rtol=1e-6)


def _sgd_momentum_reference(w, g, lr, wd):
  """First step of SGD-momentum (trace starts at 0) on g + wd * w."""
  return jax.tree.map(lambda p, d: p - lr * (d + wd * p), w, g)


def test_train_step_is_sam_then_weight_decay_then_sgd():
  ds = data.load_digits(0.3, seed=0)
  cfg = config.Config(method="sam", method_args={"rho": 0.2}, epochs=2,
                     lr=0.1, weight_decay=1e-2, perturbation="global",
                     model_args={"widths": (4, 8, 8), "hidden": 16})
  tr = trainer.Trainer(cfg, ds)
  state = tr.init_state(0)
  batch = {"image": jnp.asarray(ds.train_images[:32]),
           "label": jnp.asarray(ds.train_labels[:32])}
  new_state, (loss, correct) = jax.jit(tr.step_fn)(state, batch)

  def loss_fn(p):
    logits = tr.model.apply({"params": p}, batch["image"])
    onehot = jax.nn.one_hot(batch["label"], 10)
    return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1))

  @jax.jit
  def reference(w):
    g = jax.grad(loss_fn)(w)
    gnorm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
    e = jax.tree.map(lambda x: 0.2 * x / gnorm, g)
    gs = jax.grad(loss_fn)(jax.tree.map(jnp.add, w, e))
    lr0 = 0.1  # cosine schedule at step 0
    logits = tr.model.apply({"params": w}, batch["image"])
    return (_sgd_momentum_reference(w, gs, lr0, 1e-2), loss_fn(w),
            jnp.sum(jnp.argmax(logits, -1) == batch["label"]))

  expected, expected_loss, expected_correct = reference(state.params)
  chex.assert_trees_all_close(new_state.params, expected, atol=1e-6)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  assert int(correct) == int(expected_correct)
  assert steps.grad_evals(new_state.opt_state) == 1


def test_batch_norm_models_run_the_methods_that_slice_the_batch():
  # m-sharpness (num_splits) and Sparse SAM's Fisher slice the batch per
  # example; a BatchNorm model's batch also carries its running statistics,
  # which the registry marks as not per example (the Fashion-MNIST ResNet
  # failed on them). m-sharpness against a reference: each half-batch
  # perturbed with its own gradient, the gradients at the two perturbed
  # points averaged, the running statistics those of the clean pass.
  ds = data.load_digits(0.0, seed=0)
  batch = {"image": jnp.asarray(ds.train_images[:16]),
           "label": jnp.asarray(ds.train_labels[:16])}
  for method, args in (("sam", {"rho": 0.5, "num_splits": 2}),
                       ("ssam_fisher", {"num_samples": 4})):
    cfg = config.Config(method=method, method_args=args, epochs=1, lr=0.1,
                        weight_decay=0.0, momentum=0.0,
                        perturbation="global", model="resnet18",
                        model_args={"stage_sizes": (1,), "width": 4})
    tr = trainer.Trainer(cfg, ds)
    assert tr.has_bn
    state = tr.init_state(0)
    new_state, _ = jax.jit(tr.step_fn)(state, batch)
    chex.assert_tree_all_finite(new_state.params)
    if method != "sam":
      continue

    def loss(p, b):
      logits = tr.model.apply(
          {"params": p, "batch_stats": state.batch_stats}, b["image"],
          train=True, mutable=["batch_stats"])[0]
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, b["label"]).mean()

    @jax.jit
    def reference(w):
      grads = []
      for half in (slice(0, 8), slice(8, 16)):
        b = jax.tree.map(lambda x, half=half: x[half], batch)
        g = jax.grad(loss)(w, b)
        gnorm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
        wp = jax.tree.map(lambda a, d: a + 0.5 * d / gnorm, w, g)
        grads.append(jax.grad(loss)(wp, b))
      return jax.tree.map(lambda a, b: (a + b) / 2, *grads)

    w = state.params
    chex.assert_trees_all_close(
        new_state.params,
        jax.tree.map(lambda a, d: a - 0.1 * d, w, reference(w)), atol=1e-5)


def test_batch_norm_goes_through_has_aux_with_clean_statistics():
  ds = data.load_digits(0.0, seed=0)
  cfg = config.Config(method="sam", method_args={"rho": 0.5}, epochs=1,
                     lr=0.1, weight_decay=0.0, momentum=0.0,
                     perturbation="global",
                     model="resnet18",
                     model_args={"stage_sizes": (1,), "width": 4})
  tr = trainer.Trainer(cfg, ds)
  assert tr.has_bn
  state = tr.init_state(0)
  batch = {"image": jnp.asarray(ds.train_images[:16]),
           "label": jnp.asarray(ds.train_labels[:16])}
  new_state, _ = jax.jit(tr.step_fn)(state, batch)

  def loss_and_stats(p):
    logits, mut = tr.model.apply(
        {"params": p, "batch_stats": state.batch_stats}, batch["image"],
        train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"]).mean(), mut["batch_stats"]

  @jax.jit
  def reference(w):
    (_, clean_stats), g = jax.value_and_grad(loss_and_stats, has_aux=True)(w)
    gnorm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
    wp = jax.tree.map(lambda a, b: a + 0.5 * b / gnorm, w, g)
    (_, perturbed_stats), gs = jax.value_and_grad(
        loss_and_stats, has_aux=True)(wp)
    return clean_stats, perturbed_stats, gs

  w = state.params
  clean_stats, perturbed_stats, gs = reference(w)
  chex.assert_trees_all_close(new_state.batch_stats, clean_stats, atol=1e-6)
  # The perturbed pass's statistics differ, and were not kept.
  assert not all(np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(clean_stats), jax.tree.leaves(perturbed_stats)))
  chex.assert_trees_all_close(
      new_state.params, jax.tree.map(lambda a, b: a - 0.1 * b, w, gs),
      atol=1e-5)


def _params_of(result):
  return jax.device_get(result["state"].params)


def test_train_cli_on_mock_cifar10_with_resume(tmp_path):
  import tensorflow_datasets as tfds

  common = ["--dataset", "cifar10", "--batch-size", "8", "--lr", "0.05",
            "--no-progress", "--cutout", "8"]
  with tfds.testing.mock_data(num_examples=24):
    # SGD on the small CNN, one short epoch.
    out = str(tmp_path / "sgd")
    res = train.main(common + ["--model", "small_cnn", "--epochs", "1",
                               "--method", "sgd", "--out", out] + TINY_CNN)
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["config"]["method"] == "sgd"
    assert len(saved["history"]) == 1
    h = saved["history"][0]
    assert h["steps"] == 3 and h["grad_evals"] == 0
    assert 0.0 <= h["test_acc"] <= 1.0 and h["images_per_s"] > 0
    assert res["grads_per_step"] == 1.0

    # SAM on a BatchNorm ResNet: two epochs straight, then the same run
    # interrupted after epoch 1 and resumed: bit-identical.
    sam = ["--model", "resnet18", "--model-arg", "stage_sizes=(1,)",
           "--model-arg", "width=4", "--method", "sam", "--rho", "0.1",
           "--epochs", "2"]
    full = train.main(common + sam + ["--out", str(tmp_path / "a")])
    hist = json.load(open(tmp_path / "a" / "results.json"))["history"]
    assert [x["grad_evals"] for x in hist] == [3, 6]
    assert full["grads_per_step"] == 2.0
    assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == ["1", "2"]
    # Interrupt: drop the last checkpoint, as if the run died in epoch 2.
    import shutil

    shutil.rmtree(tmp_path / "a" / "checkpoints" / "2")
    resumed = train.main(common + sam + ["--out", str(tmp_path / "a"),
                                         "--resume"])
    chex.assert_trees_all_equal(_params_of(resumed), _params_of(full))
    chex.assert_trees_all_equal(
        jax.device_get(resumed["state"].batch_stats),
        jax.device_get(full["state"].batch_stats))
    hist2 = json.load(open(tmp_path / "a" / "results.json"))["history"]
    assert len(hist2) == 2 and hist2[1]["grad_evals"] == 6
    assert hist2[0] == hist[0]
    assert resumed["final_test_acc"] == full["final_test_acc"]


def test_epoch_cpu_time_on_streamed_data_is_the_epochs_own(monkeypatch):
  # The CPU time of a streamed epoch is measured from the epoch's start (it
  # was once measured from the last batch's correct count, a number that the
  # loop reused as its start time: the process's whole CPU time came out).
  import tensorflow_datasets as tfds

  cfg = config.Config(dataset="cifar10", model="small_cnn", method="sgd",
                      epochs=2, batch_size=8, augment=False,
                      model_args={"widths": (4, 8, 8), "hidden": 16})
  with tfds.testing.mock_data(num_examples=24):
    tr = trainer.Trainer(cfg)
    state = tr.init_state(0)
    state, _ = tr.train_epoch(state, 0, 0)  # compiles
    # A large process CPU clock makes a wrong start time obvious.
    real = trainer.time.process_time
    monkeypatch.setattr(trainer.time, "process_time", lambda: real() + 1e4)
    before = trainer.time.process_time()
    state, m = tr.train_epoch(state, 1, 0)
    spent = trainer.time.process_time() - before
  assert 0.0 <= m["epoch_cpu_s"] <= spent, (m["epoch_cpu_s"], spent)
  assert 0.0 < m["epoch_s"]


def test_datasets_redraw_label_noise_through_with_seed():
  import tensorflow_datasets as tfds

  ds = data.load_digits(0.3, seed=0)
  again = ds.with_seed(1)
  assert ds.seed == 0 and again.seed == 1 and ds.with_seed(0) is ds
  np.testing.assert_array_equal(again.train_labels,
                                data.load_digits(0.3, seed=1).train_labels)
  assert not np.array_equal(again.train_labels, ds.train_labels)
  with tfds.testing.mock_data(num_examples=40):
    t0 = data.load("cifar10", label_noise=0.5, seed=0)
    t1 = t0.with_seed(1)
    first = lambda d: next(d.batches("train", 40, seed=0))["label"]  # noqa: E731
    assert t0.seed == 0 and t1.seed == 1
    assert not np.array_equal(first(t0), first(t1))
    np.testing.assert_array_equal(
        first(t1), first(data.load("cifar10", label_noise=0.5, seed=1)))


@functools.lru_cache(maxsize=None)
def _few_steps(perturbation, devices, method="sam", n=3):
  """The state after ``n`` steps on ``devices`` (a tuple; None: all)."""
  ds = data.load_digits(0.3, seed=0)
  cfg = config.Config(method=method, epochs=1, batch_size=32,
                      perturbation=perturbation,
                      model_args={"widths": (4, 8, 8), "hidden": 16})
  tr = trainer.Trainer(cfg, ds, devices=devices)
  state = tr.init_state(0)
  step = jax.jit(tr.step_fn)
  for i in range(n):
    batch = tr.shard({"image": ds.train_images[32 * i:32 * (i + 1)],
                      "label": ds.train_labels[32 * i:32 * (i + 1)]})
    state, _ = step(state, batch)
  return jax.device_get(state)


def test_per_device_perturbation_on_one_device_is_the_global_step():
  one = tuple(jax.devices()[:1])
  per = _few_steps("per-device", one)
  glob = _few_steps("global", one)
  chex.assert_trees_all_close(per.params, glob.params, atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(per.opt_state, glob.opt_state, atol=1e-6,
                              rtol=1e-6)


def test_per_device_perturbation_on_eight_devices_is_m_sharpness():
  # Eight devices: the global step equals the one-device step (the same
  # whole-batch computation), the per-device one differs (each device
  # perturbed with its own 4 examples' gradient), and every device holds
  # the same replicated result.
  assert jax.device_count() == 8
  glob8 = _few_steps("global", None)
  glob1 = _few_steps("global", tuple(jax.devices()[:1]))
  per8 = _few_steps("per-device", None)
  chex.assert_trees_all_close(glob8.params, glob1.params, atol=2e-5, rtol=1e-4)
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(per8.params), jax.tree.leaves(glob8.params)))
  assert diff > 1e-5
  assert steps.grad_evals(per8.opt_state) == 3


def test_batch_size_must_divide_over_the_devices():
  cfg = config.Config(method="sam", batch_size=12)
  with pytest.raises(ValueError, match="--batch-size 12 is not divisible by "
                     "the 8 devices"):
    trainer.Trainer(cfg)
  with pytest.raises(SystemExit):
    train.main(["--batch-size", "12", "--epochs", "1", "--no-progress"])


def test_distributed_flags_go_together_and_default_to_one_process(
    monkeypatch):
  from experiments import parallel

  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  assert parallel.maybe_initialize() is False  # nothing asks for it
  with pytest.raises(ValueError, match="--coordinator-address, "
                     "--num-processes and --process-id go together"):
    parallel.maybe_initialize(coordinator_address="127.0.0.1:1234")


def test_checkpoint_roundtrip_keeps_prng_keys(tmp_path):
  state = {"key": jax.random.key(3), "w": jnp.arange(3.0),
           "count": jnp.int32(4)}
  manager = checkpoints.checkpoint_manager(str(tmp_path))
  checkpoints.save(manager, 1, state)
  template = {"key": jax.random.key(0), "w": jnp.zeros(3),
              "count": jnp.int32(0)}
  back = checkpoints.restore(manager, 1, template)
  np.testing.assert_array_equal(jax.random.key_data(back["key"]),
                                jax.random.key_data(state["key"]))
  np.testing.assert_array_equal(back["w"], state["w"])
  assert back["count"] == 4


# --------------------------------------------------------------------------
# Comparison.
# --------------------------------------------------------------------------


def test_parse_methods():
  assert compare.parse_methods("sgd,sam:rho=0.1,alpha=2,asam") == [
      ("sgd", {}), ("sam", {"rho": 0.1, "alpha": 2}), ("asam", {})]
  assert [n for n, _ in compare.parse_methods(None)] == methods.available()
  with pytest.raises(ValueError, match="unknown method"):
    compare.parse_methods("sgd,foo")
  grid = compare.expand_rho_grid([("sgd", {}), ("sam", {})], [0.05, 0.1])
  assert grid == [("sgd", {}), ("sam", {"rho": 0.05}), ("sam", {"rho": 0.1})]


CORE = ["sgd", "sam", "asam", "gnp", "layerwise_sam", "ssam_fisher",
        "ssam_dynamic", "looksam", "vsam", "lightsam"]


def test_compare_protocols():
  # The quick default: the core rows on both offline datasets, 3 seeds,
  # outside the committed results.
  quick = compare.plans([])
  assert [p.args.dataset for p in quick] == ["digits", "mnist1d"]
  for p, model, noise in zip(quick, ("digits_cnn", "mnist1d_mlp"),
                             (0.3, 0.0)):
    assert (p.args.model, p.args.epochs, p.args.batch_size, p.args.lr,
            p.args.weight_decay, p.args.label_noise, p.args.seeds) == (
                model, 60, 64, 0.05, 5e-4, noise, 3)
    assert p.labels == CORE
    assert p.out == f"runs/compare/{p.args.dataset}"
  (one,) = compare.plans(["--dataset", "mnist1d", "--seeds", "2"])
  assert (one.args.model, one.args.seeds, one.labels) == (
      "mnist1d_mlp", 2, CORE)
  (long,) = compare.plans(["--long"])
  assert (long.args.epochs, long.args.seeds, long.out) == (
      240, 5, "runs/long/digits")
  assert long.labels == methods.available() + RHO_GRID
  for bad in (["--long", "--full"], ["--committed", "--long"],
              ["--committed", "--dataset", "cifar10"],
              ["--long", "--dataset", "mnist1d"], ["--methods", "sam,sam"]):
    with pytest.raises(SystemExit):
      compare.plans(bad)
  (full,) = compare.plans(["--full"])
  args = full.args
  assert (args.dataset, args.model, args.epochs, args.batch_size, args.lr,
          args.label_noise, args.seeds) == (
              "cifar10", "resnet18", 200, 128, 0.1, 0.0, 3)
  assert full.out == "runs/full/cifar10_resnet18"
  assert full.labels == methods.available()
  (full,) = compare.plans(["--full", "--model", "wrn28_10", "--dataset",
                           "cifar100", "--epochs", "5"])
  assert (full.args.model, full.args.dataset, full.args.epochs) == (
      "wrn28_10", "cifar100", 5)
  assert full.out == "runs/full/cifar100_wrn28_10"
  (tfds,) = compare.plans(["--dataset", "cifar10", "--methods", "sam"])
  assert (tfds.args.model, tfds.args.label_noise) == ("resnet18", 0.0)
  assert tfds.labels == ["sgd", "sam"]  # SGD is always the reference
  two = compare.plans(["--out", "/tmp/x", "--methods", "sam"])
  assert [p.out for p in two] == ["/tmp/x/digits", "/tmp/x/mnist1d"]
  # A row may set the base learning rate (SGD's grid); refused out of range.
  (grid,) = compare.plans(["--dataset", "digits", "--methods",
                           "sgd,sgd:lr=0.1,sam:rho=0.1"])
  assert grid.specs == [("sgd", {}), ("sgd", {"lr": 0.1}),
                        ("sam", {"rho": 0.1})]
  cfg = compare.row_config(config.config_from_args(grid.args), "sgd",
                           {"lr": 0.1})
  assert (cfg.lr, cfg.method_args) == (0.1, {})
  with pytest.raises(SystemExit):
    compare.plans(["--methods", "sgd:lr=-1"])


def test_committed_protocol_two_regimes_tuned_sgd_and_grids():
  # Every dataset in a short (clean, under-fitting) and a long regime, SGD's
  # learning-rate grid, each method's default row beside its grid; into
  # runs/ unless --out says otherwise.
  plans = compare.plans(["--committed"])
  assert [(p.args.dataset, p.regime) for p in plans] == [
      (d, r) for d in ("fashion_mnist", "digits", "mnist1d")
      for r in ("short", "long")]
  for p in plans:
    assert p.out == f"runs/committed/{p.args.dataset}/{p.regime}"
    assert p.args.seeds == (3 if p.args.dataset == "fashion_mnist" else 5)
    sgd = [m for n, m in p.specs if n == "sgd"]
    assert sgd == [{}, {"lr": 0.02}, {"lr": 0.1}]
    assert {"sam", "looksam", "lightsam", "vsam", "layerwise_sam"} <= {
        n for n, m in p.specs if not m}
    assert ("looksam", {"alpha": 0.0}) in p.specs
    assert ("lightsam", {"learning_rate": 0.3}) in p.specs
  by = {(p.args.dataset, p.regime): p.args for p in plans}
  assert (by["fashion_mnist", "short"].train_size,
          by["fashion_mnist", "short"].epochs,
          by["fashion_mnist", "short"].label_noise) == (5000, 3, 0.0)
  assert (by["fashion_mnist", "long"].train_size,
          by["fashion_mnist", "long"].epochs,
          by["fashion_mnist", "long"].label_noise) == (600, 40, 0.25)
  assert (by["digits", "long"].epochs, by["digits", "long"].label_noise) == (
      60, 0.3)
  assert by["digits", "short"].label_noise == 0.0
  assert by["digits", "short"].epochs < by["digits", "long"].epochs
  # One dataset, both regimes, into the committed directory on purpose.
  two = compare.plans(["--committed", "--dataset", "digits", "--out",
                       "/tmp/committed_digits"])
  assert [p.out for p in two] == ["/tmp/committed_digits/short",
                                  "/tmp/committed_digits/long"]
  (one,) = compare.plans(["--committed", "--dataset", "mnist1d",
                          "--regime", "short"])
  assert one.args.epochs == 10


@pytest.mark.parametrize("dataset", ["fashion_mnist", "digits", "mnist1d"])
def test_committed_flag_selects_the_committed_configuration(dataset):
  # Each committed results.json says what made it; the README's command
  # (--committed --dataset D --out experiments/results/D --overwrite) plans
  # exactly that: the regimes, rows, seeds, epochs and every base setting,
  # under the pinned XLA flags.
  from experiments import xla_env  # pylint: disable=g-import-not-at-top

  out = f"experiments/results/{dataset}"
  plans = compare.plans(["--committed", "--dataset", dataset, "--out", out,
                         "--overwrite"])
  assert [p.regime for p in plans] == ["short", "long"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for plan in plans:
    assert plan.out == f"{out}/{plan.regime}"
    saved = json.load(open(os.path.join(root, plan.out, "results.json")))
    assert saved["complete"] and saved["protocol"] == "committed"
    assert saved["regime"] == plan.regime
    # The dataset's command, or the same for one regime into its directory.
    assert saved["command"] in (
        f"python -m experiments.compare --committed --dataset {dataset} "
        f"--out {out} --overwrite --no-progress",
        f"python -m experiments.compare --committed --dataset {dataset} "
        f"--regime {plan.regime} --out {plan.out} --overwrite --no-progress")
    # Every stored row is the command's, in its order; a row the file
    # lacks can only be one added to the protocol later (ADDED_ROWS), which
    # --add-missing runs into it without rerunning the others.
    stored = [m["label"] for m in saved["methods"]]
    assert stored == [lab for lab in plan.labels if lab in stored]
    assert set(plan.labels) - set(stored) <= {
        methods.label(n, a) for n, a in compare.ADDED_ROWS}
    assert [(n, a) for lab, (n, a) in zip(plan.labels, plan.specs)
            if lab in stored] == [
                (m["method"], m["method_args"]) for m in saved["methods"]]
    for added in saved.get("additions", []):
      assert not compare.mismatches(
          dict(saved, methods=[m for m in saved["methods"]
                               if m["label"] not in added["rows"]]),
          dict(saved, xla=added["xla"], cpu=added["cpu"]))
    assert plan.args.seeds == saved["seeds"]
    assert sorted({r["seed"] for r in saved["runs"]}) == list(
        range(saved["seeds"]))
    assert len(saved["runs"]) == saved["seeds"] * len(stored)
    assert not any("error" in r for r in saved["runs"])
    base = config.config_from_args(plan.args).to_dict()
    assert base == saved["base_config"]
    # SGD's learning-rate grid, each method's default row.
    assert plan.labels[0] == "sgd"
    assert {"sgd (lr=0.02)", "sgd (lr=0.1)"} <= set(plan.labels)
    assert set(compare.DECIDED_METHODS) <= set(plan.labels)
    # Made under the pinned XLA flags, on a recorded CPU.
    assert saved["xla"]["pinned"] and saved["cpu"]
    flags = saved["xla"]["xla_flags"].split()
    assert all(f in flags for f in xla_env.PINNED)


def test_paired_interval_against_a_t_table():
  # Five paired differences; the 97.5% quantile of Student's t with 4
  # degrees of freedom is 2.776 (a printed t-table).
  d = np.array([0.01, 0.03, -0.005, 0.02, 0.015])
  mean = d.sum() / 5
  sd = np.sqrt(((d - mean) ** 2).sum() / 4)
  half = 2.776 * sd / np.sqrt(5)
  got = compare.paired_interval(d)
  assert got["n"] == 5
  np.testing.assert_allclose(got["mean"], 0.014)
  np.testing.assert_allclose(got["t"], 2.776, atol=5e-4)
  # (the table's 3 decimals of t: 2e-6 on the bounds here)
  np.testing.assert_allclose([got["lo"], got["hi"]],
                             [mean - half, mean + half], atol=1e-5)
  # Two seeds: t = 12.706 (1 degree of freedom); one seed: no interval.
  got = compare.paired_interval([0.02, 0.04])
  np.testing.assert_allclose(got["t"], 12.706, atol=5e-4)
  half = 12.706 * np.std([0.02, 0.04], ddof=1) / np.sqrt(2)
  np.testing.assert_allclose([got["lo"], got["hi"]],
                             [0.03 - half, 0.03 + half], atol=1e-5)
  assert compare.paired_interval([0.1])["lo"] is None
  # Pairs are formed on the seed: rows that list their seeds in another
  # order still subtract seed from seed.
  row = {"seeds": [2, 0, 1], "accs": [0.5, 0.7, 0.9]}
  ref = {"seeds": [0, 1, 2, 3], "accs": [0.6, 0.6, 0.6, 0.1]}
  got = compare._paired(row, ref)
  assert got["seeds"] == [0, 1, 2]
  np.testing.assert_allclose(got["mean"], np.mean([0.1, 0.3, -0.1]))


def test_reach_verdict_and_the_figures_ignore_a_diverged_row(tmp_path):
  def row(label, method, accs, time_rel, second):
    return {"label": label, "method": method, "seeds": [0, 1, 2],
            "accs": accs, "acc_mean": float(np.mean(accs)),
            "acc_se": float(np.std(accs, ddof=1) / np.sqrt(3)),
            "time_rel": time_rel, "second_rel": second,
            "grads_rel": 1 + second, "settings": {}}

  rows = compare.add_paired([
      row("sgd", "sgd", [0.70, 0.72, 0.71], 1.0, 0.0),
      row("sam", "sam", [0.75, 0.76, 0.77], 1.9, 1.0),
      row("sam (rho=0.2)", "sam", [0.10, 0.12, 0.11], 1.9, 1.0),
      # 0.3 points below the best SAM row on every seed, cheaper.
      row("looksam", "looksam", [0.747, 0.757, 0.767], 1.3, 0.2),
      # 1 point below: not reached.
      row("vsam", "vsam", [0.74, 0.75, 0.76], 1.1, 0.1),
      # as accurate as SAM, dearer.
      row("ssam_fisher", "ssam_fisher", [0.75, 0.76, 0.77], 2.0, 1.7),
  ])
  by = {r["label"]: r for r in rows}
  assert by["looksam"]["reach"]["answer"]
  assert by["looksam"]["reach"]["accuracy_in_interval"]
  np.testing.assert_allclose(by["looksam"]["vs_best_sam"]["mean"], -0.003)
  assert not by["vsam"]["reach"]["answer"]
  assert not by["vsam"]["reach"]["accuracy"]
  fisher = by["ssam_fisher"]["reach"]
  assert fisher["accuracy"] and not fisher["cheaper_time"]
  assert not fisher["answer"]
  np.testing.assert_allclose(by["sam"]["vs_sgd"]["mean"], 0.05)
  # With CPU times the cost is read from them, not from the wall-clock.
  again = compare.add_paired([
      dict(by["sgd"], cpu_rel=1.0),
      dict(by["sam"], cpu_rel=1.9),
      dict(by["looksam"], cpu_rel=2.0)])
  assert again[2]["reach"]["cost_measure"] == "cpu_rel"
  assert not again[2]["reach"]["answer"]
  text = "\n".join(compare.findings(rows))
  assert "looksam: reaches the best SAM row minus 0.5 points at lower " \
         "cost? yes" in text
  assert "vsam: reaches the best SAM row minus 0.5 points at lower cost? " \
         "no" in text
  # The diverged grid row (11%) does not stretch the accuracy axis.
  from experiments import plots

  sams = [dict(r, settings={"rho": rho}) for r, rho in
          ((by["sam"], 0.05), (by["sam (rho=0.2)"], 0.2))]
  rows = rows + [dict(by["vsam"], label="lightsam", method="lightsam",
                      acc_mean=0.12, accs=[0.1, 0.12, 0.14])]
  lo, hi = plots.accuracy_vs_cost(rows, str(tmp_path / "a.png"))
  assert 65 < lo < 70 and 77 < hi < 80
  assert plots.rho_grids(rows[:2] + sams, str(tmp_path / "g.png"))
  plots.paired_forest({"x": rows, "y": rows}, str(tmp_path / "f.png"))
  import matplotlib.image

  for name in ("a.png", "g.png", "f.png"):
    assert matplotlib.image.imread(str(tmp_path / name)).shape[1] > 500


def test_compare_on_mnist1d_tiny(tmp_path):
  out = str(tmp_path / "m")
  (result,) = compare.main([
      "--dataset", "mnist1d", "--epochs", "1", "--seeds", "2",
      "--batch-size", "400", "--methods", "sam,layerwise_sam",
      "--model-arg", "hidden=(8, 8)", "--out", out, "--no-progress",
      "--jobs", "1"])
  assert sorted(os.listdir(out)) == [
      "accuracy_vs_cost.png", "paired_vs_sgd.png", "results.json",
      "results.md"]
  saved = json.load(open(os.path.join(out, "results.json")))
  assert saved["base_config"]["dataset"] == "mnist1d"
  assert saved["base_config"]["model"] == "mnist1d_mlp"
  assert saved["label_noise"] == 0.0
  with open("/proc/cpuinfo") as f:
    names = [l.split(":", 1)[1].strip() for l in f
             if l.startswith("model name")]
  if names:
    assert saved["cpu"] == names[0]
  runs = saved["runs"]
  assert len(runs) == 6 and all(r["steps"] == 4000 // 400 for r in runs)
  acc = {(r["label"], r["seed"]): r["final_test_acc"] for r in runs}
  md = open(os.path.join(out, "results.md")).read()
  for row in saved["summary"][1:]:
    d = np.array([acc[(row["label"], s)] - acc[("sgd", s)] for s in (0, 1)])
    half = 12.706 * d.std(ddof=1) / np.sqrt(2)
    np.testing.assert_allclose(
        [row["vs_sgd"]["mean"], row["vs_sgd"]["lo"], row["vs_sgd"]["hi"]],
        [d.mean(), d.mean() - half, d.mean() + half], rtol=1e-3, atol=1e-9)
    assert (f"| {row['label']} | " in md
            and f"{100 * d.mean():+.2f} [" in md)
  assert result["rows"][0]["label"] == "sgd"


def test_layerwise_study_rows_are_registry_methods_with_their_choices():
  from experiments import layerwise_study  # pylint: disable=g-import-not-at-top

  specs = [compare.parse_methods(spec)[0] for _, spec in
           layerwise_study.VARIANTS]
  assert all(n in methods.available() for n, _ in specs)
  default = ("layerwise_sam", {"rho": layerwise_study.RHO})
  assert specs[:4] == [("sgd", {}), ("sam", {"rho": 0.1}),
                       ("gnp", {"rho": 0.1}), default]
  # Each output-side row changes at most two of the default's choices.
  lw = [a for n, a in specs if n == "layerwise_sam"]
  assert all(len(set(a) - {"rho"}) <= 2 for a in lw)
  studied = {k for a in lw for k in a}
  assert {"num_layers", "second", "alpha", "normalize"} <= studied
  labels = [methods.label(n, a) for n, a in specs]
  assert len(set(labels)) == len(labels)
  assert set(layerwise_study.DEFAULT_SETTINGS) <= set(
      layerwise_study.SETTINGS)
  settings = layerwise_study.SETTINGS
  assert {st["flags"][st["flags"].index("--dataset") + 1] for st in
          settings.values()} == {"digits", "mnist1d"}
  # On the digits, the rows the committed comparison ran with the same
  # settings are read from it (SAM at rho 0.1 is its grid row, GNP and the
  # layer-wise default are its default rows); SGD runs in the study.
  run, read = layerwise_study._split(settings["digits"], True)
  committed = "experiments/results/digits/long"
  assert read == {
      "sam (rho=0.1)": (committed, "sam (rho=0.1)"),
      "gnp (rho=0.1)": (committed, "gnp"),
      "layerwise_sam (rho=0.1)": (committed, "layerwise_sam")}
  assert 0 in run and not set(run) & set(settings["digits"]["skip"])
  assert len(run) + len(read) + len(settings["digits"]["skip"]) == len(
      specs)
  run, read = layerwise_study._split(settings["digits"], False)
  assert not read


def test_compare_tiny_run_on_digits_writes_its_files(compare_run):
  out, proc = compare_run
  stdout, stderr = proc.communicate(timeout=1800)
  assert proc.returncode == 0, stderr[-3000:]
  assert "| sam |" in stdout
  files = sorted(os.listdir(out))
  assert files == ["accuracy_vs_cost.png", "paired_vs_sgd.png",
                   "results.json", "results.md", "rho_grids.png"]
  saved = json.load(open(os.path.join(out, "results.json")))
  md = open(os.path.join(out, "results.md")).read()
  # Every registry method and one row of SAM's grid (the grids themselves:
  # test_compare_protocols).
  labels = methods.available() + ["sam (rho=0.1)"]
  assert [r["label"] for r in saved["summary"]] == labels
  assert saved["complete"] and len(saved["runs"]) == 2 * len(labels)
  assert "python -m experiments.compare --dataset digits --epochs 1" in md
  # The command pinned XLA:CPU's flags before jax started (xla_env), on top
  # of the ones this test set, and says so.
  assert saved["xla"]["pinned"], saved["xla"]
  assert saved["xla"]["xla_flags"].split() == [
      "--xla_cpu_use_fusion_emitters=false",
      "--xla_backend_optimization_level=0",
      "--xla_llvm_disable_expensive_passes=true", *xla_env.PINNED]
  for row in saved["summary"]:
    assert f"| {row['label']} |" in md
    assert "error" not in row, row
    runs = [r for r in saved["runs"] if r["label"] == row["label"]]
    accs = np.array([r["final_test_acc"] for r in runs])
    # Mean ± standard error and the std, recomputed from the runs, as
    # printed in the table.
    np.testing.assert_allclose(row["acc_mean"], accs.mean())
    np.testing.assert_allclose(row["acc_std"], accs.std(ddof=1))
    se = accs.std(ddof=1) / np.sqrt(accs.size)
    np.testing.assert_allclose(row["acc_se"], se)
    train = np.mean([r["final_train_acc"] for r in runs])
    np.testing.assert_allclose(row["train_acc_mean"], train)
    assert (f"{100 * accs.mean():.2f} ± {100 * se:.2f} | "
            f"{100 * train:.1f} |") in md
    sgd_t = np.mean([r["train_s"] for r in saved["runs"]
                     if r["label"] == "sgd"])
    np.testing.assert_allclose(
        row["time_rel"], np.mean([r["train_s"] for r in runs]) / sgd_t)
    steps = 1437 // 256
    for r in runs:
      assert r["steps"] == steps
      assert r["second_grads_per_step"] == r["grad_evals"] / steps
  by = {r["label"]: r for r in saved["summary"]}
  assert by["sgd"]["second_rel"] == 0.0 and by["sgd"]["time_rel"] == 1.0
  assert by["sgd"]["cpu_rel"] == 1.0 and by["sam"]["cpu_rel"] > 0
  assert by["sam"]["second_rel"] == 1.0
  assert by["sam"]["settings"] == {"rho": 0.05}
  assert by["sam (rho=0.1)"]["settings"] == {"rho": 0.1}
  assert "- sam (rho=0.1): rho=0.1" in md
  best = max(by["sam"], by["sam (rho=0.1)"], key=lambda r: r["acc_mean"])
  assert (f"- sam: the best of rho 0.05, 0.1 is {best['settings']['rho']} "
          f"({100 * best['acc_mean']:.2f} ± {100 * best['acc_se']:.2f}%)."
          in md)
  import matplotlib.image

  img = matplotlib.image.imread(os.path.join(out, "accuracy_vs_cost.png"))
  assert img.shape[0] > 300 and img.shape[1] > 600


# --------------------------------------------------------------------------
# Planned steps (sam_optax.planner) in training and in the benchmark.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method,method_args,perturbation", [
    ("looksam", {"k": 3}, "per-device"),  # count-only plans: segments
    ("vsam", {"warmup_steps": 2, "window": 3, "blocks": 1}, "global"),
    ("layerwise_sam_runtime", {"num_layers": 1, "select_every": 2},
     "per-device"),
])
def test_planned_training_matches_unplanned(method, method_args,
                                            perturbation):
  # Same seed, 1 epoch (5 steps) on the digits over the 8-device mesh: the planned
  # run (segments of same-plan steps; a device read where vSAM's window or
  # the layer selection needs one) ends with the parameters, statistics and
  # accuracies of the unplanned scanned epochs, to float rounding.
  base = dict(method=method, method_args=method_args, epochs=1,
              batch_size=256, perturbation=perturbation,
              model_args={"widths": (4, 8, 8), "hidden": 16})
  ref_tr = trainer.Trainer(config.Config(**base, planned=False))
  ref = ref_tr.run(0, log=None, progress=False)
  tr = trainer.Trainer(config.Config(**base))  # planned: the default
  got = tr.run(0, log=None, progress=False)
  assert got["planned"] and not ref["planned"]
  assert got["config"]["planned"] and not ref["config"]["planned"]
  chex.assert_trees_all_close(jax.device_get(got["state"].params),
                              jax.device_get(ref["state"].params),
                              rtol=1e-5, atol=1e-6)
  for h, r in zip(got["history"], ref["history"]):
    assert h["grad_evals"] == r["grad_evals"]
    assert h["train_acc"] == r["train_acc"]
    assert h["test_acc"] == r["test_acc"]
    np.testing.assert_allclose(h["train_loss"], r["train_loss"], rtol=1e-5)
  # A handful of programs, and reads only where the state decides.
  assert 1 <= len(tr._programs) <= 4  # pylint: disable=protected-access
  if method == "looksam":
    assert len(tr._programs) == 2 and got["planner_reads"] == 0  # pylint: disable=protected-access
  else:
    assert got["planner_reads"] > 0
  # None of them waited for the segment just dispatched: a step whose plan
  # reads is preceded by a one-step segment that started the read.
  assert tr.planner.blocking_reads == 0


def test_train_cli_records_planned_flag(tmp_path):
  out = str(tmp_path / "run")
  train.main(["--method", "looksam", "--epochs", "1", "--batch-size", "512",
              "--no-planned", "--no-progress", "--out", out] + TINY_CNN)
  saved = json.load(open(os.path.join(out, "results.json")))
  assert saved["config"]["planned"] is False and saved["planned"] is False


def test_bench_has_planned_rows(tmp_path):
  from experiments import bench

  path = str(tmp_path / "bench.json")
  args = bench.parse_args([
      "--methods", "looksam:k=2", "--rounds", "1", "--steps", "3",
      "--warmup", "1", "--batch-size", "2", "--json", path, "--queued", "4",
      "--memory-flags", ""])  # no second compilation in a subprocess
  result = bench.run(args)
  rows = result["rows"]
  assert list(rows) == ["sgd", "looksam (k=2)", "looksam (k=2)+plan"]
  # memory: at least the donated state (float32 params and momentum) once
  n = sum(np.size(x) for x in jax.tree.leaves(
      bench.make_problem("small", 2).params))
  assert rows["sgd"]["peak_bytes"] >= 2 * 4 * n
  assert rows["sgd"]["memory_ratio"] == 1.0
  assert rows["looksam (k=2)"]["peak_bytes_flags"] is None
  plan_row = rows["looksam (k=2)+plan"]
  assert plan_row["planned"] and not rows["looksam (k=2)"]["planned"]
  assert plan_row["programs"] == 2  # the SAM step and the reuse step
  assert plan_row["reads_per_1000"] == 0  # k is a function of the count
  assert plan_row["n_second"] + plan_row["n_skip"] == 3
  assert "looksam (k=2)+plan" in bench.to_markdown(result)
  # a queued loop of the planned row: host time in the planner, no waits
  assert plan_row["queued_steps"] == 4 and plan_row["blocking_reads"] == 0
  assert plan_row["queued_loop_ms"] > plan_row["queued_planner_ms"] > 0
  assert "queued_steps" not in rows["looksam (k=2)"]
  assert "planner ms / step" in bench.to_markdown(result)
  # compile: CPU seconds of lower + compile of every program of the row
  assert rows["sgd"]["compile_ratio"] == 1.0
  assert all(r["compile_cpu_s"] > r["lower_cpu_s"] > 0 for r in rows.values())
  assert rows["sgd"]["compile_ratio_anchor"] is None  # no optax row
  # --planned auto: a planned row only where plans change the program
  auto = bench.build_steps(["sam", "looksam"], bench.make_problem("small", 2),
                           0.01, 25, 100, planned="auto")
  assert list(auto) == ["sam", "looksam", "looksam+plan"]


def test_bench_rows_of_a_batchnorm_model_do_not_share_donated_buffers():
  """Every row's step donates its state: with BatchNorm, the second row's
  state must not hold the running statistics the first row's step donated
  (the resnet50 bench died with "Array has been deleted")."""
  import flax.linen as nn
  from experiments import bench

  class TinyBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
      x = nn.Conv(4, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      return nn.Dense(10)(jnp.mean(nn.relu(x), axis=(1, 2)))

  model = TinyBN()
  x, y = jnp.ones((4, 8, 8, 3)), jnp.arange(4) % 10
  variables = model.init(jax.random.PRNGKey(0), x[:2], train=False)
  forward = steps.make_forward(model, 10, 0.0, True)
  problem = bench.Problem(
      variables["params"], variables["batch_stats"], {"image": x, "label": y},
      forward, steps.method_loss_fn(forward, True), True)
  rows = bench.build_steps(["sgd", "sam"], problem, 0.1, 2, 4)
  for row in rows.values():
    state = row.init()
    state, _ = row.step(state, problem.batch)
    jax.block_until_ready(state)
  # the problem's own parameters and statistics are still alive, and
  # nothing moved them
  for leaf in jax.tree.leaves((problem.params, problem.batch_stats)):
    assert not leaf.is_deleted()
  np.testing.assert_array_equal(
      problem.batch_stats["BatchNorm_0"]["var"], np.ones(4))


def test_bench_compile_repeats_take_the_minimum_of_fresh_compiles(
    tmp_path, monkeypatch):
  """--compile-repeats 3: every row's programs compiled three times (the
  later two from freshly built rows, nothing from jax's caches), and
  compile_cpu_s and the ratios are the minima."""
  from experiments import bench

  compiles = []
  real = jax.stages.Lowered.compile

  def counted(self, *a, **k):
    compiles.append(1)
    return real(self, *a, **k)

  monkeypatch.setattr(jax.stages.Lowered, "compile", counted)
  args = bench.parse_args([
      "--methods", "sam", "--rounds", "1", "--steps", "1", "--warmup", "1",
      "--batch-size", "2", "--json", str(tmp_path / "b.json"), "--queued",
      "0", "--memory-flags", "", "--planned", "no", "--compile-repeats", "3"])
  rows = bench.run(args)["rows"]
  assert list(rows) == ["sgd", "sam"]
  assert len(compiles) == 2 * 3  # one program a row, three times
  for r in rows.values():
    assert len(r["compile_cpu_s_repeats"]) == 3
    assert all(t > 0 for t in r["compile_cpu_s_repeats"])
    assert r["compile_cpu_s"] == min(r["compile_cpu_s_repeats"])
  assert rows["sam"]["compile_ratio"] == (
      rows["sam"]["compile_cpu_s"] / rows["sgd"]["compile_cpu_s"])
  with pytest.raises(SystemExit):
    bench.parse_args(["--compile-repeats", "0"])


def test_bench_zoo_has_the_leaf_counts_of_real_models():
  """The zoo's models: ResNet-50's layout (161 leaves, BatchNorm), and
  transformer encoders of 200 and 408 leaves (shapes only, no compile)."""
  from experiments import bench

  want = {"resnet50": 161, "transformer": 200, "transformer_deep": 408}
  for name, leaves in want.items():
    make, side, _ = bench.MODELS[name]
    variables = jax.eval_shape(
        lambda make=make, side=side: make().init(
            jax.random.PRNGKey(0), jnp.zeros((1, side, side, 3)),
            train=False))
    assert len(jax.tree.leaves(variables["params"])) == leaves, name
    assert bool(jax.tree.leaves(variables.get("batch_stats", {}))) == (
        name == "resnet50")
  full = jax.eval_shape(lambda: models.create("resnet50", 1000).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False))
  # torchvision's ResNet-50 (25,557,032) with a 3x3 stem for its 7x7 one
  assert models.num_params(full["params"]) == 25_557_032 - 7 * 7 * 3 * 64 + (
      3 * 3 * 3 * 64)


def test_summary_tables_and_the_rule_for_a_default(tmp_path):
  # Two cells, hand-made rows: the best SGD row is the reference of each
  # cell (lr 0.1 in one, the base lr in the other); a default below it in
  # one cell fails the rule; SAM helps only where its interval is above 0.
  from experiments import summary  # pylint: disable=g-import-not-at-top

  def row(label, method, accs):
    return {"label": label, "method": method, "seeds": [0, 1, 2],
            "accs": accs, "acc_mean": float(np.mean(accs)),
            "acc_se": 0.0, "time_rel": 1.0, "second_rel": 0.0,
            "grads_rel": 1.0, "settings": {}}

  cells = {
      ("digits", "short"): [
          row("sgd", "sgd", [0.70, 0.71, 0.72]),
          row("sgd (lr=0.1)", "sgd", [0.72, 0.73, 0.74]),
          row("sam", "sam", [0.75, 0.77, 0.76]),
          row("looksam", "looksam", [0.76, 0.765, 0.77]),
      ],
      ("digits", "long"): [
          row("sgd", "sgd", [0.80, 0.81, 0.82]),
          row("sgd (lr=0.1)", "sgd", [0.60, 0.61, 0.62]),
          row("sam", "sam", [0.80, 0.815, 0.82]),
          row("looksam", "looksam", [0.70, 0.71, 0.72]),
      ],
  }
  for (d, r), rows in cells.items():
    folder = tmp_path / d / r
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(
        {"complete": True, "summary": compare.add_paired(rows)}))
  loaded = summary.load(str(tmp_path))
  assert set(loaded) == set(cells)
  short = summary.regime_table(loaded, "short")
  # looksam - best SGD (lr 0.1) per seed: +4, +3.5, +3 points.
  d = np.array([0.04, 0.035, 0.03])
  half = 4.303 * d.std(ddof=1) / np.sqrt(3)
  assert (f"| looksam | +{100 * d.mean():.2f} [+{100 * (d.mean() - half):.2f},"
          f" +{100 * (d.mean() + half):.2f}] ↑ |") in short
  assert "| sgd (lr=0.1) | best SGD (73.0%) |" in short
  long = summary.regime_table(loaded, "long")
  assert "| sgd | best SGD (81.0%) |" in long
  assert "| looksam | -10.00 [-10.00, -10.00] ↓ |" in long.replace(
      "−", "-")
  c = summary.default_checks(loaded, "looksam")
  assert c["cells"]["digits", "short"] == {
      "verdict": "above", "sam_helps": True, "reaches_sam": True}
  assert c["cells"]["digits", "long"]["verdict"] == "below"
  assert not c["cells"]["digits", "long"]["sam_helps"]  # SAM level there
  assert not c["holds"] and c["reaches"]
  assert summary.default_checks(loaded, "sam")["holds"]


def test_topk_compile_baseline_gives_the_same_masks():
  """The benchmark's usual top-k (concatenate, lax.top_k, scatter, slice)
  selects what the exact top-k and a NumPy lexsort select, ties included,
  so the two compile times compare the same result."""
  from experiments import topk_compile
  from sam_optax import parts

  rng = np.random.default_rng(3)
  scores = {"a": rng.integers(0, 4, (3, 5)).astype(np.float32),
            "b": rng.integers(0, 4, (7,)).astype(np.float32),
            "c": rng.standard_normal((2, 2, 2)).astype(np.float32)}
  flat = np.concatenate([scores[n].ravel() for n in "abc"])
  for k in (1, 9, 16, flat.size):
    want = np.zeros(flat.size, bool)
    want[np.lexsort((np.arange(flat.size), -flat))[:k]] = True
    for fn in (topk_compile.lax_top_k_mask, parts.top_k_mask):
      got = jax.jit(fn, static_argnums=1)(scores, k)
      np.testing.assert_array_equal(
          np.concatenate([np.asarray(got[n]).ravel() for n in "abc"]), want)


def test_topk_compile_measures_and_tabulates():
  from experiments import topk_compile

  shapes = topk_compile.leaf_shapes(203)
  assert len(shapes) == 203 and shapes[200:] == shapes[:3]
  row = topk_compile.measure_one(3, "exact")
  assert row["entries"] == sum(int(np.prod(s)) for s in shapes[:3])
  assert row["compile_cpu_s"] >= row["lower_cpu_s"] > 0
  rows = [dict(leaves=n, variant=v, compile_cpu_s=c)
          for n, v, c in [(50, "exact", 1.0), (50, "lax_top_k", 0.5),
                          (800, "exact", 12.0), (800, "lax_top_k", 8.0)]]
  assert topk_compile.table({"rows": rows}).splitlines()[2:] == [
      "| 50 | 1.00 s | 0.50 s | 2.00x |", "| 800 | 12.00 s | 8.00 s | 1.50x |"]
  with pytest.raises(SystemExit):
    topk_compile.main(["--leaves", "0"])
