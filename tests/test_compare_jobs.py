"""``compare --jobs N``: work units in worker processes (experiments.workers).

The runs must be bit for bit those of ``--jobs 1`` (one process, rows
interleaved), listed in the same order; a unit that fails or a worker that
dies must stop the command with the unit named, never leaving a
``results.json`` that claims to be complete.
"""

import json
import multiprocessing
import operator
import os
import shutil
import signal
import threading
import time

import pytest

from experiments import compare
from experiments import workers
from experiments import xla_env

# The digits (30% label noise), a tiny CNN, one epoch of 5 steps, two
# seeds; a row whose method argument raises inside the worker.
TINY = ["--dataset", "digits", "--epochs", "1", "--seeds", "2",
        "--batch-size", "256", "--model-arg", "widths=(4, 8, 8)",
        "--model-arg", "hidden=16", "--no-progress"]
ROWS = "sgd,sam,looksam:bogus=1"
BAD = "looksam (bogus=1)"
# What a run must reproduce exactly; the history without its timings.
EXACT = ("label", "method", "method_args", "seed", "final_test_acc",
         "final_test_loss", "final_train_acc", "steps", "grad_evals",
         "settings", "error")
TIMINGS = ("epoch_s", "epoch_cpu_s", "images_per_s")


def _exact(run):
  out = {k: run.get(k) for k in EXACT}
  out["history"] = [{k: v for k, v in h.items() if k not in TIMINGS}
                    for h in run.get("history", [])]
  return out


def _load(out):
  with open(os.path.join(out, "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
  """The same tiny comparison with ``--jobs 1`` and ``--jobs 2``."""
  root = tmp_path_factory.mktemp("jobs")
  outs = {}
  for jobs in (1, 2):
    outs[jobs] = str(root / f"j{jobs}")
    compare.main(TINY + ["--methods", ROWS, "--out", outs[jobs],
                         "--jobs", str(jobs)])
  return root, outs


def test_jobs_2_gives_the_runs_of_jobs_1_in_the_same_order(both, capfd):
  _, outs = both
  one, two = _load(outs[1]), _load(outs[2])
  assert one["complete"] and two["complete"]
  # The protocol's order, rotated per seed (3 rows, 2 seeds: seed 1 starts
  # at row 3 // 2 = 1), whatever finished first.
  order = [("sgd", 0), ("sam", 0), (BAD, 0), ("sam", 1), (BAD, 1),
           ("sgd", 1)]
  assert [(r["label"], r["seed"]) for r in one["runs"]] == order
  assert [(r["label"], r["seed"]) for r in two["runs"]] == order
  for a, b in zip(one["runs"], two["runs"]):
    assert _exact(a) == _exact(b)
    assert ("error" in a) == (a["label"] == BAD)
    if "error" not in a:
      assert len(a["history"]) == 1 and a["final_test_acc"] is not None
  # The failing row is recorded the same way in both: its error, in the
  # table as failed.
  assert "unexpected keyword argument 'bogus'" in two["runs"][2]["error"]
  # Per-process CPU time: recorded for every run in both.
  assert all(r["train_cpu_s"] > 0 for r in two["runs"] if "error" not in r)
  # Each worker took the parent's XLA settings (checked when it started)
  # and the file records them.
  assert one["jobs"] == {"jobs": 1}
  assert two["jobs"]["jobs"] == 2 and len(two["jobs"]["workers"]) == 2
  mine = {k: xla_env.describe()[k] for k in xla_env.COMPILE_KEYS}
  assert mine["xla_flags"] == os.environ.get("XLA_FLAGS", "")
  assert all(w == mine for w in two["jobs"]["workers"])
  assert two["xla"] == one["xla"]


def _without(src, dst, label):
  """A copy of the result in ``src`` as if its ``label`` row had not run."""
  shutil.copytree(src, dst)
  saved = _load(dst)
  saved["methods"] = [m for m in saved["methods"] if m["label"] != label]
  saved["runs"] = [r for r in saved["runs"] if r["label"] != label]
  with open(os.path.join(dst, "results.json"), "w") as f:
    json.dump(saved, f)
  return saved


def test_jobs_adds_missing_rows_as_one_process_ran_them(both, tmp_path):
  # --add-missing --jobs 2 on the one-process result without its SAM row:
  # the SGD rerun (its own unit) reproduces the stored SGD runs, and the
  # added SAM runs are bit for bit those of the one-process run.
  _, outs = both
  full = _load(outs[1])
  out = str(tmp_path / "a")
  _without(outs[1], out, "sam")
  compare.main(TINY + ["--methods", ROWS, "--add-missing", "--out", out,
                       "--jobs", "2"])
  added = _load(out)
  assert added["complete"] and [m["label"] for m in added["methods"]] == [
      "sgd", "sam", BAD]
  assert [(r["label"], r["seed"]) for r in added["runs"][-2:]] == [
      ("sam", 0), ("sam", 1)]
  want = {(r["label"], r["seed"]): _exact(r) for r in full["runs"]}
  for r in added["runs"]:
    assert _exact(r) == want[r["label"], r["seed"]]
  (addition,) = added["additions"]
  assert addition["rows"] == ["sam"] and addition["jobs"]["jobs"] == 2
  assert [_exact(r) for r in addition["sgd_reruns"]] == [
      want["sgd", s] for s in (0, 1)]


def test_jobs_add_missing_stops_when_sgd_is_not_reproduced(
    both, tmp_path, monkeypatch):
  # The SGD rerun's unit (the first) gives another accuracy than the
  # stored run: refused before the other units' results are used, the
  # file left as it was.
  _, outs = both
  out = str(tmp_path / "b")
  saved = _without(outs[1], out, "sam")
  before = open(os.path.join(out, "results.json")).read()
  seen = []

  def fake_run(fn, units, jobs, label, workers_xla):
    del fn, jobs, workers_xla
    seen.extend(label(k) for k in range(len(units)))
    sgd = [dict(r) for r in saved["runs"] if r["label"] == "sgd"]
    sgd.sort(key=lambda r: r["seed"])
    sgd[1]["final_test_loss"] += 1e-7
    yield 0, sgd
    raise AssertionError("the command went on after the refusal")

  monkeypatch.setattr(workers, "run", fake_run)
  with pytest.raises(SystemExit, match="does not reproduce .* SGD on seed 1"):
    compare.main(TINY + ["--methods", ROWS, "--add-missing", "--out", out,
                         "--jobs", "2"])
  assert seen == [f"digits/long {compare.SGD_RERUN}", "digits/long sam"]
  assert open(os.path.join(out, "results.json")).read() == before


@pytest.mark.parametrize("stop, code, says", [
    (lambda label: workers.UnitError(1, label(1), "its worker process died "
                                     "(exit code -9)"), 1,
     "the unit digits/long sam failed in its worker process, so the command "
     "stopped (the other workers too): its worker process died (exit code "
     "-9)"),
    (lambda label: workers.Interrupted([label(1)], 1, 2), 130,
     "interrupted after 1 of 2 units; the workers were stopped while "
     "running: digits/long sam."),
])
def test_a_failing_unit_or_ctrl_c_stops_the_command_and_names_the_unit(
    tmp_path, capsys, monkeypatch, stop, code, says):
  # The parent's side: the first unit finishes, then the second fails in
  # its worker or Ctrl-C arrives (experiments.workers.run raises; its own
  # side is tested below).
  def fake_run(fn, units, jobs, label, workers_xla):
    del fn, jobs, workers_xla
    assert [u[2] for u in units] == ["sgd", "sam"]  # (tag, base, label...
    yield 0, [{"label": "sgd", "method": "sgd", "method_args": {},
               "seed": s, "error": "not run"} for s in range(2)]
    raise stop(label)

  monkeypatch.setattr(workers, "run", fake_run)
  out = str(tmp_path / "o")
  with pytest.raises(SystemExit) as e:
    compare.main(TINY + ["--methods", "sgd,sam", "--out", out, "--jobs",
                         "2"])
  assert e.value.code == code
  err = capsys.readouterr().err
  assert says in err
  assert f"Incomplete (results.json says complete: false): {out}." in err
  saved = _load(out)
  assert saved["complete"] is False
  assert [r["label"] for r in saved["runs"]] == ["sgd", "sgd"]


def test_workers_report_a_unit_that_raises_or_dies():
  assert sorted(workers.run(operator.add, [(1, 2), (3, 4), (5, 6)], 2)) == [
      (0, 3), (1, 7), (2, 11)]
  label = lambda i: f"unit #{i}"  # pylint: disable=unnecessary-lambda-assignment
  with pytest.raises(workers.UnitError) as e:
    list(workers.run(operator.truediv, [(1, 2), (1, 0), (3, 4)], 2,
                     label=label))
  assert e.value.unit == 1 and e.value.label == "unit #1"
  assert "ZeroDivisionError" in e.value.detail
  with pytest.raises(workers.UnitError) as e:
    list(workers.run(os._exit, [(7,)], 2, label=label))
  assert e.value.unit == 0 and "died (exit code 7)" in e.value.detail
  assert not multiprocessing.active_children()


def test_ctrl_c_stops_the_workers_and_names_the_running_units():
  # Python's own Ctrl-C handler, whatever an earlier test in this pytest
  # process left installed (the full suite once saw the SIGINT ignored).
  before = signal.signal(signal.SIGINT, signal.default_int_handler)
  timer = threading.Timer(2.5, os.kill, (os.getpid(), signal.SIGINT))
  t0 = time.perf_counter()
  timer.start()
  try:
    with pytest.raises(workers.Interrupted) as e:
      list(workers.run(time.sleep, [(60,), (60,), (60,)], 2,
                       label=lambda i: f"sleep #{i}"))
  finally:
    timer.join()
    signal.signal(signal.SIGINT, before)
  assert time.perf_counter() - t0 < 30  # not the units' 60 s
  assert e.value.finished == 0 and e.value.total == 3
  assert set(e.value.running) <= {"sleep #0", "sleep #1"}
  assert not multiprocessing.active_children()


def test_jobs_argument(monkeypatch):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5},
                      raising=False)
  assert workers.usable_cpus() == 3
  assert workers.resolve_jobs("auto", 10) == 3
  assert workers.resolve_jobs("auto", 2) == 2  # capped by the units
  assert workers.resolve_jobs(1, 10) == 1 and workers.resolve_jobs(8, 3) == 3
  assert workers.resolve_jobs(4, 0) == 1
  (plan,) = compare.plans(["--dataset", "digits"])
  assert plan.args.jobs == "auto"
  (plan,) = compare.plans(["--dataset", "digits", "--jobs", "3"])
  assert plan.args.jobs == 3
  for bad in ("0", "-1", "two"):
    with pytest.raises(SystemExit):
      compare.plans(["--dataset", "digits", "--jobs", bad])


def test_xla_snapshot_is_what_a_worker_adopts():
  snap = xla_env.snapshot()
  assert snap["environ"]["XLA_FLAGS"] == os.environ.get("XLA_FLAGS")
  import jax

  jax.devices()  # this process's backends are started: too late to adopt
  with pytest.raises(RuntimeError, match="already started its backends"):
    xla_env.adopt(snap)
