"""Independent work units in worker processes (``compare --jobs N``).

The pinned XLA flags (:mod:`experiments.xla_env`) make each process
single-threaded, so one process uses one core. :func:`run` spreads units
(each a call ``fn(*args)``) over ``jobs`` worker processes, started with
the ``spawn`` context (a fresh interpreter: no jax state copied from the
parent). Each worker adopts the parent's XLA settings before jax starts
(:func:`experiments.xla_env.adopt`) and reports them
(:func:`experiments.xla_env.describe`); :func:`run` refuses a worker whose
settings (:data:`experiments.xla_env.COMPILE_KEYS`) differ from the
parent's, so a unit computes in a worker exactly what it computes in the
parent.

The parent hands each idle worker the next unit, so it always knows which
unit each worker runs. An exception escaping ``fn`` in a worker, or a
worker that dies, stops everything: the other workers are terminated and
:class:`UnitError` names the unit (with the worker's traceback or exit
code). Ctrl-C reaches the parent only (the workers ignore SIGINT); it
terminates the workers and raises :class:`Interrupted`, naming the units
that were running. Workers never outlive :func:`run`.

>>> import operator
>>> sorted(run(operator.add, [(1, 2), (3, 4)], jobs=2))
[(0, 3), (1, 7)]
"""

from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.connection
from multiprocessing import reduction
import os
import signal
import traceback
from typing import Any, Callable, Iterator, Optional, Sequence

from experiments import xla_env


class UnitError(RuntimeError):
  """A unit failed in its worker (an exception escaped it, or the worker
  died); ``unit`` is its index, ``label`` its description."""

  def __init__(self, unit: Optional[int], label: str, detail: str):
    self.unit, self.label, self.detail = unit, label, detail
    super().__init__(f"{label}: {detail}")


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during :func:`run`: ``running`` (labels of the units the
  workers were running), ``finished`` and ``total`` (unit counts)."""

  def __init__(self, running: list[str], finished: int, total: int):
    self.running, self.finished, self.total = running, finished, total
    super().__init__(
        f"interrupted with {finished} of {total} units finished; running: "
        + (", ".join(running) or "none"))


def usable_cpus() -> int:
  """The CPUs this process may run on (its affinity mask; else the count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def resolve_jobs(jobs, units: int) -> int:
  """``jobs`` (``"auto"``: :func:`usable_cpus`; or a count >= 1) capped by
  the number of ``units`` (at least 1)."""
  n = usable_cpus() if jobs in (None, "auto") else int(jobs)
  if n < 1:
    raise ValueError(f"jobs must be 'auto' or >= 1; got {jobs!r}")
  return max(1, min(n, units))


def parse_jobs(text: str):
  """argparse type of ``--jobs``: ``auto`` or an integer >= 1."""
  import argparse  # pylint: disable=g-import-not-at-top

  if text.strip().lower() == "auto":
    return "auto"
  try:
    n = int(text)
  except ValueError:
    n = 0
  if n < 1:
    raise argparse.ArgumentTypeError(
        f"must be 'auto' (the usable CPUs) or an integer >= 1; got {text!r}")
  return n


def _worker(conn, fn: Callable, snap: dict) -> None:
  """A worker's loop: adopt the parent's XLA settings, report them, then
  run each unit the parent sends until it sends None."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
  try:
    xla_env.adopt(snap)
    conn.send(("ready", os.getpid(), xla_env.describe()))
  except Exception:  # pylint: disable=broad-except
    conn.send(("broken", os.getpid(), traceback.format_exc()))
    return
  while True:
    try:
      task = conn.recv()
    except EOFError:  # the parent is gone
      return
    if task is None:
      return
    index, args = task
    try:
      # Pickled here, so a result that cannot be sent is this unit's error.
      done = reduction.ForkingPickler.dumps(("done", index, fn(*args)))
    except BaseException:  # pylint: disable=broad-except
      conn.send(("error", index, traceback.format_exc()))
      return
    conn.send_bytes(done)


class _Worker:

  def __init__(self, ctx, fn, snap):
    self.conn, child = ctx.Pipe()
    self.process = ctx.Process(target=_worker, args=(child, fn, snap),
                               daemon=True)
    self.process.start()
    child.close()
    self.unit: Optional[int] = None  # the unit it runs
    self.ready = False
    self.xla: Optional[dict] = None

  def stop(self) -> None:
    if self.process.is_alive():
      self.process.terminate()
    self.process.join(10)
    if self.process.is_alive():
      self.process.kill()
      self.process.join()
    self.conn.close()


def run(fn: Callable, units: Sequence[tuple], jobs: int,
        label: Callable[[int], str] = lambda i: f"unit {i}",
        workers_xla: Optional[list] = None) -> Iterator[tuple[int, Any]]:
  """Yields ``(index, fn(*units[index]))`` as the units finish, computed in
  ``min(jobs, len(units))`` spawned worker processes (in order of
  submission, each idle worker taking the next unit).

  ``fn`` must be importable by name (a module-level function). ``label(i)``
  names unit ``i`` in errors. ``workers_xla``, a list, receives each
  worker's :func:`experiments.xla_env.describe` (checked against the
  parent's: :class:`UnitError` when a :data:`~experiments.xla_env.COMPILE_KEYS`
  value differs). Raises :class:`UnitError` when a unit raises in its
  worker or its worker dies, :class:`Interrupted` on Ctrl-C; either way
  every worker is terminated first (and when the caller stops iterating).
  """
  if jobs < 1:
    raise ValueError(f"jobs must be >= 1; got {jobs}")
  ctx = multiprocessing.get_context("spawn")
  snap = xla_env.snapshot()
  mine = {k: xla_env.describe()[k] for k in xla_env.COMPILE_KEYS}
  todo = collections.deque(range(len(units)))
  finished = 0
  pool: list[_Worker] = []
  try:
    pool = [_Worker(ctx, fn, snap)
            for _ in range(min(jobs, len(units)))]
    while finished < len(units):
      # The workers starting up or running a unit (a stopped one is done).
      busy = [w for w in pool if not w.ready or w.unit is not None]
      if not busy:
        raise UnitError(None, "workers", "every worker has stopped with "
                        f"{len(units) - finished} units left")
      handles = {w.conn: w for w in busy}
      handles.update({w.process.sentinel: w for w in busy})
      for w in dict.fromkeys(handles[h] for h in
                             multiprocessing.connection.wait(list(handles))):
        msg = None
        if w.conn.poll():
          try:
            msg = w.conn.recv()
          except EOFError:
            pass
        if msg is None:  # its process ended with nothing more to read
          w.process.join(10)
          what = (label(w.unit) if w.unit is not None
                  else f"worker {w.process.pid}")
          raise UnitError(w.unit, what, "its worker process died (exit "
                          f"code {w.process.exitcode})")
        kind = msg[0]
        if kind == "broken":
          raise UnitError(None, f"worker {msg[1]}",
                          "could not take the parent's XLA settings:\n"
                          + msg[2])
        if kind == "ready":
          theirs = {k: msg[2].get(k) for k in xla_env.COMPILE_KEYS}
          if theirs != mine:
            raise UnitError(None, f"worker {msg[1]}",
                            f"its XLA settings {theirs} differ from the "
                            f"parent's {mine}")
          if workers_xla is not None:
            workers_xla.append(msg[2])
          w.ready = True
        elif kind == "error":
          raise UnitError(msg[1], label(msg[1]),
                          "raised in its worker:\n" + msg[2])
        else:  # done
          w.unit = None
          finished += 1
          yield msg[1], msg[2]
        if todo:
          w.unit = todo.popleft()
          w.conn.send((w.unit, tuple(units[w.unit])))
        else:
          w.conn.send(None)  # it exits; no longer waited on
  except KeyboardInterrupt as e:
    running = [label(w.unit) for w in pool if w.unit is not None]
    raise Interrupted(running, finished, len(units)) from e
  finally:
    for w in pool:
      w.stop()
