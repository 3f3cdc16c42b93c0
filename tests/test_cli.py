"""The command lines' refusals: bad values, resumes that do not fit their
directory, damaged checkpoints (exit codes and messages).

Every run here is tiny: the digits, a 4-8-8 CNN, batch 512 (2 steps per
epoch over the 8 CPU devices), 1 or 2 epochs.
"""

import dataclasses
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import chex
import jax
import pytest

from experiments import checkpoints
from experiments import compare
from experiments import config
from experiments import train
from experiments import trainer

TINY = ["--batch-size", "512", "--no-progress", "--model-arg",
        "widths=(4, 8, 8)", "--model-arg", "hidden=16"]
TINY_ARGS = {"widths": (4, 8, 8), "hidden": 16}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _exit(capsys, argv, main=train.main):
  """Runs ``main(argv)``; returns (exit code, stderr). Fails if it returns."""
  with pytest.raises(SystemExit) as e:
    main(argv)
  return e.value.code, capsys.readouterr().err


# --------------------------------------------------------------------------
# Values: refused at parse time (exit 2), naming the flag and the range.
# --------------------------------------------------------------------------

# (flag, bad value, the allowed range as the message states it)
BAD_VALUES = [
    ("--lr", "nan", "a finite number > 0"),
    ("--lr", "0", "a finite number > 0"),
    ("--lr", "inf", "a finite number > 0"),
    ("--weight-decay", "nan", "a finite number >= 0"),
    ("--weight-decay", "-1e-4", "a finite number >= 0"),
    ("--momentum", "-1", "a finite number in [0, 1)"),
    ("--momentum", "1", "a finite number in [0, 1)"),
    ("--warmup-epochs", "-3", "an integer >= 0"),
    ("--eval-every", "0", "an integer >= 1"),
    ("--checkpoint-every", "0", "an integer >= 1"),
    ("--epochs", "0", "an integer >= 1"),
    ("--epochs", "1.5", "an integer >= 1"),
    ("--batch-size", "-8", "an integer >= 1"),
    ("--label-smoothing", "1", "a finite number in [0, 1)"),
    ("--label-noise", "nan", "a finite number in [0, 1]"),
    ("--rho", "nan", "a finite number >= 0"),
    ("--rho", "-0.1", "a finite number >= 0"),
    ("--seed", "-1", "an integer in [0, 4294967295]"),
    ("--padding", "-1", "an integer >= 0"),
    ("--cutout", "-2", "an integer >= 0"),
    ("--image-size", "0", "an integer >= 1"),
    ("--workers", "-1", "an integer >= 0"),
    ("--num-processes", "0", "an integer >= 1"),
    ("--process-id", "-1", "an integer >= 0"),
    ("--coordinator-address", "localhost",
     "HOST:PORT with a port in [1, 65535]"),
    ("--coordinator-address", "10.0.0.1:0",
     "HOST:PORT with a port in [1, 65535]"),
]


def test_train_flags_refuse_bad_values_at_parse_time(capsys):
  # Each used to be accepted: NaN rates trained to NaN, 0 for --eval-every
  # or --checkpoint-every trained an epoch and died in ZeroDivisionError.
  # (The runs are tiny, so the old code fails fast here too.)
  for flag, value, allowed in BAD_VALUES:
    code, err = _exit(capsys, TINY + ["--epochs", "1", f"{flag}={value}"])
    assert code == 2, (flag, value)
    assert f"argument {flag}: must be {allowed}, got '{value}'" in err, err
    assert "Traceback" not in err


def test_compare_shares_the_checked_base_flags(capsys):
  train_only = ("--rho", "--seed", "--eval-every", "--checkpoint-every",
                "--num-processes", "--process-id", "--coordinator-address")
  for flag, value, allowed in BAD_VALUES:
    if flag in train_only:
      continue
    code, err = _exit(capsys, [f"{flag}={value}"], main=compare.plans)
    assert code == 2 and f"argument {flag}: must be {allowed}" in err, err


def test_the_other_commands_refuse_bad_numbers_at_parse_time(capsys):
  # Each was accepted (0, negative or NaN) or gave a traceback ("abc").
  from experiments import bench  # pylint: disable=g-import-not-at-top
  from experiments import layerwise_study  # pylint: disable=g-import-not-at-top
  for main, argv, says in [
      (compare.plans, ["--seeds", "0"], "argument --seeds: must be"),
      (compare.plans, ["--rho-grid", "0.05,nan"], "argument --rho-grid"),
      (compare.plans, ["--rho-grid", "abc"], "argument --rho-grid"),
      (compare.plans, ["--rho-grid", "-0.1"], "argument --rho-grid"),
      (bench.parse_args, ["--steps", "0"], "argument --steps: must be"),
      (bench.parse_args, ["--batch-size", "-1"], "argument --batch-size"),
      (bench.parse_args, ["--lr", "nan"], "argument --lr: must be"),
      (bench.parse_args, ["--devices", "-2"], "argument --devices"),
      (layerwise_study.main, ["--seeds", "0"], "argument --seeds: must be"),
      (layerwise_study.main, ["--epochs", "nan"], "argument --epochs"),
      (layerwise_study.main, ["--settings", "nope"], "--settings: unknown"),
  ]:
    code, err = _exit(capsys, argv, main=main)
    assert code == 2 and says in err, (argv, err)
    assert "Traceback" not in err


def test_train_settings_the_parser_cannot_check_are_usage_errors(capsys):
  for argv, says in [
      (["--num-processes", "2"], "go together"),
      (["--num-processes", "2", "--process-id", "2",
        "--coordinator-address", "localhost:1"],
       "--process-id 2 must be < --num-processes 2"),
      (["--method", "looksam", "--method-arg", "k=0"], "k must be"),
      (["--method", "sam", "--method-arg", "rh=0.1"], "'rh'"),
  ]:
    code, err = _exit(capsys, TINY + ["--epochs", "1"] + argv)
    assert code == 2 and says in err, (argv, err)


def test_special_float_method_args_are_numbers_refused_by_their_range(
    capsys):
  # "nan" and "inf" are not Python literals: they stayed strings and were
  # refused as "expected a real number ..., got 'nan'". Every path that
  # reads key=value (train's --method-arg and --model-arg, compare's and the
  # bench's --methods, digits_planned) goes through parse_value.
  from experiments import digits_planned  # pylint: disable=g-import-not-at-top

  for text in ("nan", "NaN", "inf", "-inf", "+Infinity"):
    value = config.parse_value(text)
    assert isinstance(value, float) and not math.isfinite(value), text
  assert config.parse_value("sharpness") == "sharpness"
  assert config.parse_method_args(["rho=nan"])["rho"] != "nan"
  (_, a), (_, b) = compare.parse_methods("sam:rho=inf,looksam:rho=-inf")
  assert a["rho"] == math.inf and b["rho"] == -math.inf
  for value in ("nan", "inf", "-inf"):
    code, err = _exit(capsys, TINY + ["--epochs", "1", "--method", "sam",
                                      "--method-arg", f"rho={value}"])
    assert code == 2, err
    assert f"rho must be in [0, inf), got {value}" in err, err
  code, err = _exit(capsys, ["sam:rho=nan"], main=digits_planned.main)
  assert code == 2 and "rho must be in [0, inf), got nan" in err, err


def test_digits_planned_refuses_bad_methods_before_training(capsys):
  from experiments import digits_planned

  for argv, says in [([], "the following arguments are required: methods"),
                     (["nosuch"], "unknown method 'nosuch'"),
                     (["sam:rh=0.1"], "'rh'"),
                     (["looksam:k=0"], "k must be")]:
    code, err = _exit(capsys, argv, main=digits_planned.main)
    assert code == 2 and says in err, (argv, err)


def test_config_refuses_non_finite_and_out_of_range_values():
  for field, value, allowed in [
      ("lr", math.nan, "a finite number > 0"),
      ("weight_decay", math.nan, "a finite number >= 0"),
      ("momentum", -1.0, r"a finite number in \[0, 1\)"),
      ("warmup_epochs", -3, "an integer >= 0"),
      ("epochs", 2.5, "an integer >= 1"),
      ("seed", -1, "an integer in"),
  ]:
    with pytest.raises(ValueError, match=f"{field} must be {allowed}"):
      config.Config(**{field: value})


def test_run_refuses_zero_eval_and_checkpoint_periods_before_training():
  tr = trainer.Trainer(config.Config(epochs=1, batch_size=512,
                                     model_args=TINY_ARGS))
  for kw in ({"eval_every": 0}, {"checkpoint_every": 0}):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
      tr.run(0, log=None, progress=False, **kw)


# --------------------------------------------------------------------------
# Resume: what --out holds must fit the command (exit 2 before training).
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 2-epoch SGD run (checkpoints of epochs 1 and 2)."""
  out = str(tmp_path_factory.mktemp("cli") / "run")
  res = train.main(TINY + ["--epochs", "2", "--out", out])
  return out, res


def _copy(src, tmp_path, drop_last=False):
  """A copy of run ``src``; ``drop_last``: as if it died in epoch 2."""
  dst = str(tmp_path / "run")
  shutil.copytree(src, dst)
  if drop_last:
    shutil.rmtree(os.path.join(dst, "checkpoints", "2"))
  return dst


def test_resume_with_nothing_to_resume_is_refused(capsys, tmp_path):
  out = str(tmp_path / "empty")
  code, err = _exit(capsys, TINY + ["--epochs", "1", "--out", out,
                                    "--resume"])
  assert code == 2
  assert f"--resume: nothing to resume in {out}" in err
  assert "run without --resume" in err
  os.makedirs(os.path.join(out, "checkpoints"))  # the directory, no steps
  code, err = _exit(capsys, TINY + ["--epochs", "1", "--out", out,
                                    "--resume"])
  assert code == 2 and "holds no checkpoint" in err, err
  a_file = str(tmp_path / "file")
  open(a_file, "w").close()
  code, err = _exit(capsys, TINY + ["--epochs", "1", "--out", a_file])
  assert code == 2 and f"--out {a_file} is a file" in err, err


def test_a_fresh_run_over_a_previous_one_is_refused(capsys, finished,
                                                    tmp_path):
  # It used to train, and orbax silently kept the old run's checkpoints of
  # the same epochs beside the new run's.
  out = _copy(finished[0], tmp_path)
  code, err = _exit(capsys, TINY + ["--epochs", "2", "--out", out])
  assert code == 2
  assert f"{out} holds a run already (checkpoints of epochs [1, 2]" in err
  assert "pass --resume" in err and "choose another --out" in err


@pytest.mark.parametrize("flags,says", [
    (["--perturbation", "global"],
     "perturbation='per-device' (this command: 'global')"),
    (["--lr", "0.1"], "lr=0.05 (this command: 0.1)"),
    (["--seed", "3"], "seed=0 (this command: 3)"),
    (["--epochs", "3"], "epochs=2 (this command: 3)"),
    (["--label-noise", "0.1"], "label_noise=0.3 (this command: 0.1)"),
    (["--method", "sam"], "method='sgd' (this command: 'sam')"),
    (["--no-planned"], "planned=True (this command: False)"),
])
def test_resume_under_other_settings_is_refused(capsys, finished, tmp_path,
                                                flags, says):
  out = _copy(finished[0], tmp_path, drop_last=True)
  before = open(os.path.join(out, "results.json")).read()
  argv = TINY + ["--epochs", "2", "--out", out, "--resume"] + flags
  code, err = _exit(capsys, argv)
  assert code == 2
  assert f"--resume: the run in {out} was trained with" in err
  assert says in err, err
  # Nothing was trained or rewritten.
  assert open(os.path.join(out, "results.json")).read() == before
  assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["1"]


def test_resume_may_change_the_settings_that_keep_the_trajectory(
    finished, tmp_path):
  # --eval-every, --checkpoint-every, --workers, --data-dir: the same run.
  out = _copy(finished[0], tmp_path, drop_last=True)
  res = train.main(TINY + ["--epochs", "2", "--out", out, "--resume",
                           "--eval-every", "5", "--checkpoint-every", "3",
                           "--workers", "1", "--data-dir", str(tmp_path)])
  chex.assert_trees_all_equal(jax.device_get(res["state"].params),
                              jax.device_get(finished[1]["state"].params))
  assert res["history"][0] == finished[1]["history"][0]


def test_resume_of_a_finished_run_returns_its_results(finished, tmp_path):
  # It used to crash on a KeyError ('final_test_acc'): nothing was trained,
  # so the summary was never written.
  out = _copy(finished[0], tmp_path)
  res = train.main(TINY + ["--epochs", "2", "--out", out, "--resume"])
  saved = json.load(open(os.path.join(finished[0], "results.json")))
  assert res["final_test_acc"] == saved["final_test_acc"]
  assert res["history"] == saved["history"]


def test_device_count_may_change_on_resume_only_under_global_perturbation(
    tmp_path):
  four, eight = jax.devices()[:4], jax.devices()
  # Per-device: 4 devices perturbed with 128 examples each, 8 would with 64.
  cfg = config.Config(epochs=1, batch_size=512, model_args=TINY_ARGS,
                      perturbation="per-device", method="sam",
                      planned=False)  # one program to compile
  out = str(tmp_path / "per-device")
  trainer.Trainer(cfg, devices=four).run(0, out=out, log=None,
                                         progress=False)
  with pytest.raises(checkpoints.ResumeError,
                     match="the device count 4 \\(now 8; under per-device"):
    trainer.Trainer(cfg, devices=eight).run(0, out=out, resume=True,
                                            log=None, progress=False)
  # Global: the same whole-batch step on 8 devices as on 4, to float
  # rounding; each epoch records where it ran.
  cfg = dataclasses.replace(cfg, epochs=2, perturbation="global")
  out = str(tmp_path / "global")
  full = trainer.Trainer(cfg, devices=four).run(0, out=out, log=None,
                                                progress=False)
  shutil.rmtree(os.path.join(out, "checkpoints", "2"))
  res = trainer.Trainer(cfg, devices=eight).run(0, out=out, resume=True,
                                                log=None, progress=False)
  assert [h["devices"] for h in res["history"]] == [4, 8]
  chex.assert_trees_all_close(jax.device_get(res["state"].params),
                              jax.device_get(full["state"].params),
                              rtol=1e-4, atol=1e-5)


def test_planner_reads_are_counted_across_a_resume(tmp_path):
  # layerwise_sam_runtime with select_every=1 perturbs step t with the
  # ranking made at step t - 2, on the device (steps 0 and 1 perturb every
  # layer): one read per step from step 2 on, 4 over the 6 steps (2 a
  # 2-step epoch), interrupted after epoch 2 or not. (A count restarted at
  # 0 on resume would say 2.)
  out = str(tmp_path / "run")
  argv = TINY + ["--epochs", "3", "--out", out, "--method",
                 "layerwise_sam_runtime", "--method-arg", "num_layers=1",
                 "--method-arg", "select_every=1"]
  full = train.main(argv)
  assert [h["planner_reads"] for h in full["history"]] == [0, 2, 4]
  shutil.rmtree(os.path.join(out, "checkpoints", "3"))
  res = train.main(argv + ["--resume"])
  assert res["planner_reads"] == 4
  saved = json.load(open(os.path.join(out, "results.json")))
  assert [h["planner_reads"] for h in saved["history"]] == [0, 2, 4]
  assert saved["planner_reads"] == 4


# --------------------------------------------------------------------------
# Damaged checkpoints: exit 1, the file and what to do, no traceback.
# --------------------------------------------------------------------------


def _truncate(paths):
  for p in paths:
    if os.path.isfile(p):
      with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)


DAMAGE = {
    # The run record emptied (a JSONDecodeError inside orbax).
    "empty record": lambda step: open(
        os.path.join(step, "run", "metadata"), "w").close(),
    # The arrays' files cut in half (orbax's JSON or tensorstore errors),
    # every item's but the run record's.
    "truncated state": lambda step: _truncate(
        p for p in glob.glob(os.path.join(step, "*", "**"), recursive=True)
        if os.path.relpath(p, step).split(os.sep)[0] != "run"),
    # An empty step directory (a KeyError inside orbax).
    "empty step": lambda step: [shutil.rmtree(step), os.makedirs(step)],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_a_clean_error(capsys, finished, tmp_path,
                                               damage):
  out = _copy(finished[0], tmp_path)
  step = os.path.join(out, "checkpoints", "2")
  DAMAGE[damage](step)
  code, err = _exit(capsys, TINY + ["--epochs", "2", "--out", out,
                                    "--resume"])
  assert code == 1
  lines = [x for x in err.splitlines() if x.strip()]
  assert len(lines) == 1, err
  assert lines[0].startswith("python -m experiments.train: error: cannot "
                             f"read the ")
  assert f"of checkpoint {step} (" in err
  assert (f"delete {step} to resume from the checkpoint of epoch 1, or "
          f"delete {out} (or point --out elsewhere) to start again") in err


def test_every_way_out_of_a_run_closes_its_checkpoint_manager(
    capsys, monkeypatch, finished, tmp_path):
  # An open orbax manager at exit printed "RuntimeError: Event loop is
  # closed" tracebacks after the damaged-checkpoint message; the managers
  # were closed on some exit paths only (not on an error in training).
  closes = []  # one list per manager opened: a 1 per close()
  real = checkpoints.checkpoint_manager

  def tracked(path, **kwargs):
    manager = real(path, **kwargs)
    calls, close = [], manager.close
    manager.close = lambda: (calls.append(1), close())[1]
    closes.append(calls)
    return manager

  monkeypatch.setattr(checkpoints, "checkpoint_manager", tracked)

  def broken_epoch(*args, **kwargs):
    raise KeyboardInterrupt

  # A damaged checkpoint (the restore fails), a resume under other settings
  # (refused after reading the record), a run interrupted in training, one
  # that finishes.
  out = _copy(finished[0], tmp_path / "damaged", drop_last=True)
  DAMAGE["truncated state"](os.path.join(out, "checkpoints", "1"))
  assert _exit(capsys, TINY + ["--epochs", "2", "--out", out,
                               "--resume"])[0] == 1
  out = _copy(finished[0], tmp_path / "other", drop_last=True)
  assert _exit(capsys, TINY + ["--epochs", "2", "--out", out, "--resume",
                               "--lr", "0.5"])[0] == 2
  with monkeypatch.context() as m:
    m.setattr(trainer.Trainer, "train_epoch", broken_epoch)
    with pytest.raises(KeyboardInterrupt):
      train.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "stop")])
  train.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "done")])
  assert closes == [[1]] * 4, closes


def test_a_damaged_results_json_does_not_stop_a_resume(finished, tmp_path):
  # The history comes from the checkpoint, and results.json is rewritten
  # (it used to be read: a JSONDecodeError).
  out = _copy(finished[0], tmp_path, drop_last=True)
  open(os.path.join(out, "results.json"), "w").close()
  res = train.main(TINY + ["--epochs", "2", "--out", out, "--resume"])
  saved = json.load(open(os.path.join(out, "results.json")))
  want = finished[1]["history"]
  assert saved["history"][0] == want[0] == res["history"][0]
  for key in ("train_loss", "test_loss", "test_acc", "epoch"):
    assert saved["history"][1][key] == want[1][key]  # bit-exact resume


def test_a_damaged_checkpoint_in_the_real_command(finished, tmp_path):
  # The command itself: exit code 1, one message, no traceback.
  out = _copy(finished[0], tmp_path, drop_last=True)
  DAMAGE["empty record"](os.path.join(out, "checkpoints", "1"))
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep
             + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--epochs", "2", "--out",
       out, "--resume"] + TINY, env=env, cwd=ROOT, capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr
  assert "Traceback" not in proc.stderr
  assert (f"error: cannot read the run record of checkpoint "
          f"{os.path.join(out, 'checkpoints', '1')}") in proc.stderr
  assert "(or point --out elsewhere) to start again" in proc.stderr


# --------------------------------------------------------------------------
# Committed results: no command writes over them unless --overwrite.
# --------------------------------------------------------------------------


def _committed_files():
  results = os.path.join(ROOT, "experiments", "results")
  return {f: (os.path.getmtime(f), os.path.getsize(f))
          for f in glob.glob(os.path.join(results, "**"), recursive=True)
          if os.path.isfile(f)}


def test_every_command_refuses_to_overwrite_committed_results(capsys):
  # Each command pointed at a committed result (a one-epoch trial once
  # replaced the complete committed digits study within a minute) exits
  # with a usage error naming --overwrite, before any training, and every
  # committed file is left as it was.
  from experiments import bench  # pylint: disable=g-import-not-at-top
  from experiments import digits_planned  # pylint: disable=g-import-not-at-top
  from experiments import layerwise_study  # pylint: disable=g-import-not-at-top

  results = os.path.join(ROOT, "experiments", "results")
  before = _committed_files()
  assert before, "no committed results to protect?"
  cases = [
      (compare.plans, ["--committed", "--dataset", "digits", "--regime",
                       "long", "--out", os.path.join(results, "digits")]),
      (compare.plans, ["--dataset", "mnist1d", "--epochs", "1", "--out",
                       os.path.join(results, "mnist1d")]),
      (compare.plans, ["--out", results]),  # datasets' subdirectories
      (compare.plans, ["--long", "--out",
                       os.path.join(results, "digits_long")]),
      (layerwise_study.main, ["--seeds", "1", "--epochs", "1", "--out",
                              os.path.join(results, "layerwise")]),
      (train.main, TINY + ["--epochs", "1", "--out",
                           os.path.join(results, "mnist1d")]),
      (digits_planned.main, ["sam", "--out", os.path.join(
          results, "digits_planned.jsonl")]),
      (bench.parse_args, ["--json", os.path.join(
          results, "bench", "cpu_small_cnn.json")]),
  ]
  for main, argv in cases:
    code, err = _exit(capsys, argv, main=main)
    assert code == 2 and "holds committed results" in err, (argv, err)
    assert "pass --overwrite to replace them on purpose" in err
    assert "Traceback" not in err
  assert _committed_files() == before
  # With --overwrite the same plans are accepted (nothing is written here).
  (plan,) = compare.plans(["--dataset", "mnist1d", "--out",
                           os.path.join(results, "mnist1d"), "--overwrite"])
  assert plan.out == os.path.join(results, "mnist1d")


def test_commands_write_under_runs_by_default():
  from experiments import digits_planned  # pylint: disable=g-import-not-at-top
  from experiments import layerwise_study  # pylint: disable=g-import-not-at-top
  from experiments import outputs  # pylint: disable=g-import-not-at-top

  for argv in ([], ["--committed"], ["--long"], ["--full"],
               ["--dataset", "cifar10"], ["--dataset", "fashion_mnist"]):
    for plan in compare.plans(argv):
      assert plan.out.startswith("runs/"), (argv, plan.out)
      assert not outputs.is_committed_area(plan.out)
  assert layerwise_study.DEFAULT_OUT == "runs/layerwise"
  p = train.parser()
  assert p.parse_args([]).out is None  # train writes nothing unless asked
  import inspect  # pylint: disable=g-import-not-at-top

  assert '"runs/digits_planned.jsonl"' in inspect.getsource(
      digits_planned.main)
  from experiments import bench  # pylint: disable=g-import-not-at-top

  assert bench.parse_args(["--methods", "sgd"]).json == "runs/bench/bench.json"


def test_check_output_rule(tmp_path, monkeypatch):
  from experiments import outputs  # pylint: disable=g-import-not-at-top

  results = tmp_path / "results"
  (results / "a").mkdir(parents=True)
  (results / "a" / "results.json").write_text("{}")
  (results / "empty").mkdir()
  monkeypatch.setattr(outputs, "RESULTS_DIR", str(results))
  link = tmp_path / "link"
  link.symlink_to(results / "a")
  for path in (results / "a", results / "a" / "results.json", results,
               link, tmp_path / "x" / ".." / "results" / "a"):
    with pytest.raises(outputs.OverwriteError, match="results.json"):
      outputs.check_output(str(path), overwrite=False)
    outputs.check_output(str(path), overwrite=True)
  # Allowed: a new or empty directory there, anything elsewhere.
  for path in (results / "new", results / "empty", tmp_path / "runs" / "a",
               tmp_path):
    outputs.check_output(str(path), overwrite=False)
  # Several paths: refused if any is.
  with pytest.raises(outputs.OverwriteError):
    outputs.check_output([str(results / "new"), str(results / "a")], False)
