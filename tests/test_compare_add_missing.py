"""Adding rows to a stored comparison without rerunning it
(``python -m experiments.compare ... --add-missing``), and the decoupled
WSAM registry row the committed comparison runs."""

import json
import os
import shutil
import zlib

import numpy as np
import pytest

from experiments import compare
from experiments import config
from experiments import trainer

# Student's t, 97.5% quantile, 2 degrees of freedom (a printed t-table).
T2 = 4.303
# A run of the mocked trainer takes this many CPU seconds per unit of cost;
# the session adding rows runs on a machine 1.5x as loaded.
LOAD = {0: 1.0, 1: 1.5}
COST = {"sgd": 1.0, "sam": 2.0, "gsam": 3.0}


def _mock_train_row(shift_sgd=0.0):
  """A stand-in for training one row on one seed: a fixed accuracy per
  (row, seed), CPU time = the row's cost x the session's load."""
  session = {"n": 0}

  def train(trainers, base, lab, name, margs, seed, args, bar):
    del base, args, bar
    if lab not in trainers:
      trainers[lab] = True
    u = zlib.crc32(f"{lab}/{seed}".encode()) / 2**32
    acc = 0.5 + 0.3 * u + (shift_sgd if lab == "sgd" else 0.0)
    t = COST.get(name, 2.0) * LOAD[session["n"]] * (1 + 0.1 * seed)
    return {"label": lab, "method": name, "method_args": margs,
            "seed": seed, "final_test_acc": acc, "final_train_acc": acc + .1,
            "final_test_loss": 1 - acc, "train_s": t, "train_cpu_s": t,
            "compile_s": 1.0, "compile_cpu_s": 1.0,
            "second_grads_per_step": 0.0 if name == "sgd" else 1.0,
            "history": [{"train_loss": 1.0}, {"train_loss": 0.5}],
            "settings": dict(margs)}

  return train, session


# --jobs 1: the mocked trainer runs in this process (not in workers).
BASE = ["--dataset", "digits", "--epochs", "1", "--seeds", "3",
        "--batch-size", "256", "--no-progress", "--jobs", "1"]
FIRST = "sgd,sgd:lr=0.1,sam"
MORE = FIRST + ",gsam,sam:num_splits=2"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  """A comparison made once by the mocked trainer (session 0)."""
  train, _ = _mock_train_row()
  out = str(tmp_path_factory.mktemp("made") / "cmp")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(compare, "_train_row", train)
    compare.main(BASE + ["--methods", FIRST, "--out", out])
  return out


@pytest.fixture
def stored(made, tmp_path, monkeypatch):
  """A copy of it, and the mocked trainer of a later session."""
  out = str(tmp_path / "cmp")
  shutil.copytree(made, out)
  train, session = _mock_train_row()
  session["n"] = 1
  monkeypatch.setattr(compare, "_train_row", train)
  return out, session


def _read(out):
  with open(os.path.join(out, "results.json")) as f:
    return json.load(f)


def test_add_missing_adds_only_the_lacking_rows_and_resummarises(stored):
  out, _ = stored
  before = _read(out)
  compare.main(BASE + ["--methods", MORE, "--out", out, "--add-missing"])
  saved = _read(out)
  labels = ["sgd", "sgd (lr=0.1)", "sam", "gsam", "sam (num_splits=2)"]
  assert [m["label"] for m in saved["methods"]] == labels
  # The stored runs are kept as they were; the new rows ran on every seed.
  assert saved["runs"][:len(before["runs"])] == before["runs"]
  new = saved["runs"][len(before["runs"]):]
  assert sorted((r["label"], r["seed"]) for r in new) == sorted(
      (lab, s) for lab in labels[3:] for s in range(3))
  assert all(r["session"] == 1 for r in new)
  (added,) = saved["additions"]
  assert added["rows"] == labels[3:] and added["session"] == 1
  assert saved["command"] == before["command"]  # what made the file
  assert "--add-missing" in added["command"]
  # The summary recomputed from all the runs, by hand: accuracies, the
  # best SGD row as reference, paired t-intervals over the 3 seeds.
  acc = {(r["label"], r["seed"]): r["final_test_acc"] for r in saved["runs"]}
  mean = {lab: np.mean([acc[lab, s] for s in range(3)]) for lab in labels}
  ref = max(("sgd", "sgd (lr=0.1)"), key=mean.get)
  by = {r["label"]: r for r in saved["summary"]}
  assert [r["label"] for r in saved["summary"]] == labels
  for lab in labels:
    np.testing.assert_allclose(by[lab]["acc_mean"], mean[lab], rtol=1e-12)
    if lab == ref:
      assert "vs_sgd" not in by[lab]
      continue
    d = np.array([acc[lab, s] - acc[ref, s] for s in range(3)])
    half = T2 * d.std(ddof=1) / np.sqrt(3)
    got = by[lab]["vs_sgd"]
    assert got["ref"] == ref
    np.testing.assert_allclose([got["mean"], got["lo"], got["hi"]],
                               [d.mean(), d.mean() - half, d.mean() + half],
                               rtol=1e-3, atol=1e-12)
  # The best SAM row is SAM's (its default here), not the m-sharpness row.
  d = np.array([acc["gsam", s] - acc["sam", s] for s in range(3)])
  np.testing.assert_allclose(by["gsam"]["vs_best_sam"]["mean"], d.mean())
  # Cost: each row against SGD of its own session (the rerun for the added
  # rows, on a machine 1.5x as loaded), so the load cancels.
  np.testing.assert_allclose(by["sam"]["cpu_rel"], 2.0)
  np.testing.assert_allclose(by["gsam"]["cpu_rel"], 3.0)
  np.testing.assert_allclose(by["sgd"]["cpu_rel"], 1.0)
  # The stored summary is the recomputation from the stored runs.
  assert saved["summary"] == json.loads(json.dumps(compare.resummarise(
      saved)))
  md = open(os.path.join(out, "results.md")).read()
  assert "Rows added later by `python -m experiments.compare" in md
  assert "| gsam | " in md and "| sam (num_splits=2) | " in md
  # Nothing lacking: a second addition adds nothing.
  compare.main(BASE + ["--methods", MORE, "--out", out, "--add-missing"])
  assert _read(out) == saved


def test_rerun_replaces_only_the_named_rows(stored):
  # --rerun sam: SAM's stored runs are replaced by new ones on every seed
  # (here the mocked trainer of a later session: same accuracies, 1.5x the
  # CPU time), every other stored run is kept as it was, the missing rows
  # are added, and the summary is recomputed from the runs now stored.
  out, _ = stored
  before = _read(out)
  compare.main(BASE + ["--methods", MORE, "--out", out, "--add-missing",
                       "--rerun", "sam"])
  saved = _read(out)
  kept = [r for r in before["runs"] if r["label"] != "sam"]
  assert saved["runs"][:len(kept)] == kept
  new = saved["runs"][len(kept):]
  assert sorted((r["label"], r["seed"]) for r in new) == sorted(
      (lab, s) for lab in ("sam", "gsam", "sam (num_splits=2)")
      for s in range(3))
  assert all(r["session"] == 1 for r in new)
  old_sam = {r["seed"]: r for r in before["runs"] if r["label"] == "sam"}
  for r in new:
    if r["label"] == "sam":  # the later session's run, not the stored one
      assert r["train_cpu_s"] == 1.5 * old_sam[r["seed"]]["train_cpu_s"]
  (added,) = saved["additions"]
  assert added["replaced"] == ["sam"]
  assert added["rows"] == ["sam", "gsam", "sam (num_splits=2)"]
  assert len(saved["runs"]) == 3 * len(saved["methods"])
  assert saved["summary"] == json.loads(json.dumps(compare.resummarise(
      saved)))
  # SAM's cost is now against the rerun SGD of its own session: still 2x.
  by = {r["label"]: r for r in saved["summary"]}
  np.testing.assert_allclose(by["sam"]["cpu_rel"], 2.0)


@pytest.mark.parametrize("flags, says", [
    (["--rerun", "sam"], "--rerun needs --add-missing"),
    (["--add-missing", "--rerun", "sgd"], "sgd is rerun"),
    (["--add-missing", "--rerun", "vsam"], "--rerun: vsam not among"),
])
def test_rerun_usage_errors(flags, says, capsys):
  with pytest.raises(SystemExit) as e:
    compare.plans(BASE + ["--methods", FIRST, "--out", "runs/x"] + flags)
  assert e.value.code == 2
  assert says in capsys.readouterr().err


@pytest.mark.parametrize("change, flags, says", [
    (None, ["--epochs", "2"], "base_config.epochs: stored 1, now 2"),
    (None, ["--seeds", "2"], "seeds: stored 3, now 2"),
    (None, ["--methods", "sgd,sgd:lr=0.1,gsam"],
     "row 'sam': stored, not among this command's rows"),
    (lambda s: s["xla"].update(xla_flags="--xla_cpu_max_isa=AVX512"), [],
     "xla.xla_flags: stored '--xla_cpu_max_isa=AVX512', now"),
    (lambda s: s["registry_defaults"]["sam"].update(rho=0.1), [],
     "registry_defaults.sam.rho: stored 0.1, now 0.05"),
    (lambda s: s.update(complete=False), [], "an interrupted run"),
])
def test_add_missing_refuses_another_configuration(stored, change, flags,
                                                   says):
  out, _ = stored
  path = os.path.join(out, "results.json")
  if change is not None:
    saved = _read(out)
    change(saved)
    with open(path, "w") as f:
      json.dump(saved, f)
  before = open(path).read()
  argv = BASE + ["--methods", MORE, "--out", out, "--add-missing"]
  with pytest.raises(SystemExit, match="another configuration") as e:
    compare.main(argv + flags)
  assert says in str(e.value)
  assert open(path).read() == before  # refused before writing anything


def test_add_missing_refuses_a_machine_that_does_not_reproduce_sgd(
    stored, monkeypatch):
  out, _ = stored
  path = os.path.join(out, "results.json")
  before = open(path).read()
  train, session = _mock_train_row(shift_sgd=1e-4)
  session["n"] = 1
  monkeypatch.setattr(compare, "_train_row", train)
  with pytest.raises(SystemExit, match="does not reproduce") as e:
    compare.main(BASE + ["--methods", MORE, "--out", out, "--add-missing"])
  assert "SGD on seed 0: final_test_acc stored" in str(e.value)
  assert open(path).read() == before


def test_add_missing_on_a_real_run_reproduces_sgd(tmp_path):
  # The real trainer: the SGD rerun gives the stored numbers bit for bit
  # (else add_missing refuses), and the added row is a real run.
  out = str(tmp_path / "m")
  flags = ["--dataset", "mnist1d", "--epochs", "1", "--seeds", "2",
           "--batch-size", "400", "--model-arg", "hidden=(8, 8)",
           "--out", out, "--no-progress", "--jobs", "1"]
  compare.main(flags + ["--methods", "sgd"])
  stored = _read(out)
  compare.main(flags + ["--methods", "sgd,gsam", "--add-missing"])
  saved = _read(out)
  sgd = {r["seed"]: r for r in stored["runs"]}
  for r in saved["additions"][0]["sgd_reruns"]:
    assert all(r[k] == sgd[r["seed"]][k] for k in compare.REPRODUCED_KEYS)
  gsam = [r for r in saved["runs"] if r["label"] == "gsam"]
  assert [r["seed"] for r in gsam] == [0, 1]
  assert all(r["second_grads_per_step"] == 1.0 for r in gsam)


def test_committed_protocol_lists_the_added_rows_after_its_grids():
  for plan in compare.plans(["--committed"]):
    added = [compare.methods_lib.label(n, a) for n, a in compare.ADDED_ROWS]
    assert plan.labels[-len(added):] == added


def test_wsam_decoupled_row_is_the_papers_update_over_the_trainers_base():
  # The registry row through the trainer: the base optimizer (weight decay,
  # SGD momentum, cosine schedule) follows the clean gradient; the
  # sharpness term a * (h - g) is added scaled by the scheduled learning
  # rate; weight decay is applied once; planned as unplanned. NumPy on
  # least squares.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import sam_optax  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(6, 3)), rng.normal(size=6)
  loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
  rho, gamma, lr, mu, wd, steps = 0.1, 0.8, 0.1, 0.9, 0.01, 3
  cfg = config.Config(dataset="digits", method="wsam_decoupled",
                      method_args={"rho": rho, "gamma": gamma}, epochs=1,
                      lr=lr, momentum=mu, weight_decay=wd)
  tx, sam_tx = trainer.make_optimizer(cfg, loss, False, steps,
                                      with_sam=True)
  grad = lambda v: 2 * x.T @ (x @ v - y) / len(y)
  a = gamma / (1 - gamma)
  batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  for planned in (False, True):  # the trainer plans it (sam_optax.planner)
    plan_of = sam_optax.planner(sam_tx) if planned else None
    w = jnp.array([0.3, -0.2, 0.5])
    state = tx.init(w)
    v, trace = np.asarray(w, np.float64), np.zeros(3)
    for t in range(steps):
      g = grad(v)
      h = grad(v + rho * g / np.linalg.norm(g))
      lr_t = lr * 0.5 * (1 + np.cos(np.pi * t / steps))
      trace = mu * trace + g + wd * v
      v = v - lr_t * trace - lr_t * a * (h - g)
      plan = plan_of(t, state) if planned else None
      u, state = tx.update(jnp.asarray(grad(np.asarray(w, np.float64)),
                                       jnp.float32), state, w, batch=batch,
                           plan=plan)
      w = optax.apply_updates(w, u)
      np.testing.assert_allclose(np.asarray(w), v, rtol=1e-5, atol=1e-6)
