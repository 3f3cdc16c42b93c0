"""experiments.xla_env: the XLA:CPU flags that make results CPU-independent.

The commands must add :data:`xla_env.PINNED` to ``XLA_FLAGS`` before jax
starts (XLA reads its flags once), keep a flag the caller set, and leave
everything alone under the opt-out variable; a fresh process must then run
with those flags (XLA's own record of its debug options, and no YNNPACK
fusion in a compiled dot).
"""

import ast
import glob
import json
import os
import subprocess
import sys

import pytest

from experiments import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("compare", "train", "layerwise_study", "digits_planned", "bench")


def test_pin_adds_the_flags_keeps_the_callers_and_opts_out():
  env = {}
  assert xla_env.pin(env) == list(xla_env.PINNED)
  assert env["XLA_FLAGS"].split() == list(xla_env.PINNED)
  assert xla_env.pin(env) == []  # idempotent
  assert env["XLA_FLAGS"].split() == list(xla_env.PINNED)

  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_max_isa=AVX"}
  added = xla_env.pin(env)
  assert "--xla_cpu_max_isa=AVX2" not in added
  assert env["XLA_FLAGS"].split() == [
      "--xla_force_host_platform_device_count=8", "--xla_cpu_max_isa=AVX",
      *[f for f in xla_env.PINNED if "max_isa" not in f]]

  for off in ("0", "false", "No", "off"):
    env = {"XLA_FLAGS": "--foo=1", xla_env.OPT_OUT_VAR: off}
    assert xla_env.pin(env) == [] and env["XLA_FLAGS"] == "--foo=1"
  env = {xla_env.OPT_OUT_VAR: "1"}
  assert xla_env.pin(env) == list(xla_env.PINNED)


def test_an_imported_command_leaves_the_flags_alone(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--foo=1")
  assert xla_env.pin_if_command("experiments.compare") == []
  assert os.environ["XLA_FLAGS"] == "--foo=1"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_pins_before_it_imports_jax(name):
  """The module's first statements (after the docstring and ``__future__``)
  import xla_env and call ``pin_if_command(__name__)``; nothing imported
  before them can start jax."""
  with open(os.path.join(ROOT, "experiments", f"{name}.py")) as f:
    body = ast.parse(f.read()).body
  body = [s for s in body
          if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
          and not (isinstance(s, ast.ImportFrom) and s.module == "__future__")]
  first, second = body[:2]
  assert isinstance(first, ast.ImportFrom) and first.module == "experiments"
  assert [a.name for a in first.names] == ["xla_env"]
  call = second.value
  assert isinstance(call, ast.Call)
  assert ast.unparse(call) == "xla_env.pin_if_command(__name__)"


def _fresh(tmp_path, **env_extra):
  """``python -m experiments.xla_env`` in a fresh process, XLA dumping its
  debug options into ``tmp_path``: (its JSON, the debug options text)."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **env_extra)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + f" --xla_dump_to={tmp_path}").strip()
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.xla_env"], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=300, check=True)
  files = glob.glob(os.path.join(tmp_path, "*.debug_options"))
  assert files, proc.stderr
  with open(files[0]) as f:
    return json.loads(proc.stdout), f.read()


def test_a_fresh_command_runs_with_the_pinned_flags(tmp_path):
  out, options = _fresh(tmp_path / "pinned")
  assert 'xla_cpu_max_isa: "AVX2"' in options
  assert "xla_cpu_multi_thread_eigen: false" in options
  assert out["ynn_fusions"] == 0  # the YNNPACK route is off
  assert out["pinned"] and not out["pin_opt_out"]
  for flag in xla_env.PINNED:
    assert flag in out["xla_flags"].split()
  assert out["cpu"] and out["jax"]

  # The same process opted out: XLA's defaults, which the checks above
  # would have caught.
  out, options = _fresh(tmp_path / "default", **{xla_env.OPT_OUT_VAR: "0"})
  assert "xla_cpu_max_isa" not in options
  assert "xla_cpu_multi_thread_eigen" not in options
  assert out["ynn_fusions"] > 0
  assert not out["pinned"] and out["pin_opt_out"]
