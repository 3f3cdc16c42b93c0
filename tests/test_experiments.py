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
  if not any(item.name == "test_compare_tiny_run_on_digits_writes_the_three_"
             "files" for item in request.session.items):
    yield None  # not selected: nothing to start
    return
  out = str(tmp_path_factory.mktemp("compare") / "cmp")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      "--xla_backend_optimization_level=0 "
      "--xla_llvm_disable_expensive_passes=true"))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.compare", "--epochs", "1",
       "--seeds", "2", "--batch-size", "256", "--out", out, "--no-progress",
       "--methods", TINY_METHODS] + TINY_CNN, env=env, cwd=root, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  yield out, proc
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


# --------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------


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
  with pytest.raises(ValueError, match="label_smoothing must be in"):
    config.Config(label_smoothing=1.0)
  with pytest.raises(ValueError, match="label_noise must be in"):
    config.Config(label_noise=-0.1)
  with pytest.raises(ValueError, match="epochs must be >= 1"):
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


def test_compare_protocols():
  args, out, specs, labels = compare.plan([])
  assert (args.dataset, args.model, args.epochs, args.batch_size, args.lr,
          args.weight_decay, args.label_noise, args.seeds) == (
              "digits", "digits_cnn", 60, 64, 0.05, 5e-4, 0.3, 5)
  assert out == "experiments/results/digits"
  assert labels == methods.available() + RHO_GRID
  args, out, _, labels = compare.plan(["--long"])
  assert (args.epochs, args.seeds, out) == (
      240, 5, "experiments/results/digits_long")
  assert labels == methods.available() + RHO_GRID
  with pytest.raises(SystemExit):
    compare.plan(["--long", "--full"])
  args, out, _, labels = compare.plan(["--full"])
  assert (args.dataset, args.model, args.epochs, args.batch_size, args.lr,
          args.label_noise) == ("cifar10", "resnet18", 200, 128, 0.1, 0.0)
  assert out == "experiments/results/cifar10_resnet18"
  assert labels == methods.available()
  args, out, _, _ = compare.plan(["--full", "--model", "wrn28_10",
                                  "--dataset", "cifar100", "--epochs", "5"])
  assert (args.model, args.dataset, args.epochs) == ("wrn28_10", "cifar100", 5)
  assert out == "experiments/results/cifar100_wrn28_10"
  args, out, _, labels = compare.plan(["--dataset", "cifar10",
                                       "--methods", "sam"])
  assert (args.model, args.label_noise) == ("resnet18", 0.0)
  assert labels == ["sgd", "sam"]  # SGD is always the reference
  with pytest.raises(SystemExit):
    compare.plan(["--methods", "sam,sam"])


def test_layerwise_study_rows_are_registry_methods_with_their_choices():
  from experiments import layerwise_study  # pylint: disable=g-import-not-at-top

  specs = [compare.parse_methods(spec)[0] for _, spec in
           layerwise_study.VARIANTS]
  assert all(n in methods.available() for n, _ in specs)
  # Every runtime row states both choices; the crossing is complete for
  # both rankings (by gradient and by sharpness) on the selected layers.
  runtime = [a for n, a in specs if n in ("layerwise_sam_runtime",
                                          "layerwise_sam_sharpness")]
  assert all({"normalize", "second"} <= set(a) for a in runtime)
  for name in ("layerwise_sam_runtime", "layerwise_sam_sharpness"):
    norms = {a["normalize"] for n, a in specs
             if n == name and a["second"] == "selected"}
    assert norms == {"selection", "global"}, name
  assert ("layerwise_sam", {"rho": layerwise_study.RHO}) in specs  # default
  labels = [methods.label(n, a) for n, a in specs]
  assert len(set(labels)) == len(labels)


def test_compare_tiny_run_on_digits_writes_the_three_files(compare_run):
  out, proc = compare_run
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  assert "| sam |" in stdout
  files = sorted(os.listdir(out))
  assert files == ["accuracy_vs_cost.png", "results.json", "results.md"]
  saved = json.load(open(os.path.join(out, "results.json")))
  md = open(os.path.join(out, "results.md")).read()
  # Every registry method and one row of SAM's grid (the grids themselves:
  # test_compare_protocols).
  labels = methods.available() + ["sam (rho=0.1)"]
  assert [r["label"] for r in saved["summary"]] == labels
  assert saved["complete"] and len(saved["runs"]) == 2 * len(labels)
  assert "python -m experiments.compare --epochs 1" in md
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
    assert (f"{100 * accs.mean():.2f} ± {100 * se:.2f} | "
            f"{100 * accs.std(ddof=1):.2f}") in md
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
      "--warmup", "1", "--batch-size", "2", "--json", path,
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
