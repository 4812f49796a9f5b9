"""The federated round loop: it owns the rounds; its outputs are parameters.

`run_rounds` is shaped like TFF's `tff.simulation.run_training_process`
(tensorflow_federated/python/simulation/training_loop.py): it takes what
runs a round (a `backends.base.RoundBackend` holding a `tff.learning`
process), the client sampling function, an evaluation function, a
`tff.program.ProgramStateManager` and a list of `tff.program.ReleaseManager`s,
and does only this: resume from the latest program state (or evaluate the
initial model as round 0), then for each round sample a cohort, train it,
evaluate when due, release the round's metrics to every manager, and save
the program state when due. CSV and TensorBoard files, log lines, a
progress bar and the best weights are release managers
(`training.outputs`): a new output is one more manager, a new algorithm a
different learning process in the backend (docs/extending.md).

Parameters that keep state a resumed run needs (the sampling seed, the best
val loss, the next round's DP clip) implement `Resumable`: their values are
saved in the program state beside the learning-process state and the round
number, and given back before the first round of a resumed run.
"""

import asyncio
import collections
import time
import typing
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow_federated as tff

from benchmark.backends import base

ROUND_KEY = "round"
ROUND_TIME_KEY = "round_time_s"
EVAL_TIME_KEY = "eval_time_s"
STATE_KEY = "state"

Metrics = Mapping[str, Any]


@typing.runtime_checkable
class Resumable(typing.Protocol):
  """A parameter of `run_rounds` whose state must survive a resume."""

  def resume_state(self) -> dict[str, Any]:
    """Its state: `{name: Python or numpy scalar}`; names are unique among
    the loop's parameters."""

  def restore(self, values: Mapping[str, Any]) -> None:
    """Takes back the values `resume_state` gave (from a checkpoint)."""


def flatten_metrics(structure: Any, prefix: str = "") -> dict[str, float]:
  """The default `round_metrics_fn`: nested mappings, named tuples and
  sequences of a round's TFF metrics as `{"a/b/c": float}`."""
  if isinstance(structure, Mapping):
    items = structure.items()
  elif hasattr(structure, "_asdict"):
    items = structure._asdict().items()
  elif isinstance(structure, (list, tuple)):
    items = ((str(i), v) for i, v in enumerate(structure))
  else:
    return {prefix: float(np.asarray(structure))}
  flat = collections.OrderedDict()
  for key, value in items:
    flat.update(flatten_metrics(value, f"{prefix}/{key}" if prefix else
                                str(key)))
  return flat


def _resumables(components) -> list[Resumable]:
  return [c for c in components if isinstance(c, Resumable)]


def _program_state(state, round_num: int, resumables) -> dict[str, Any]:
  program_state = collections.OrderedDict([(STATE_KEY, state),
                                           (ROUND_KEY, round_num)])
  for component in resumables:
    program_state.update(component.resume_state())
  return program_state


def _release(managers, metrics: Metrics, round_num: int) -> None:
  async def release_all():
    await asyncio.gather(*[m.release(metrics, key=round_num)
                           for m in managers])
  asyncio.run(release_all())


def _evaluate(evaluation_fn, backend) -> dict[str, Any]:
  start = time.monotonic()
  metrics = dict(evaluation_fn(backend.get_model_weights()))
  metrics[EVAL_TIME_KEY] = time.monotonic() - start
  return metrics


def _resume(backend, initial_state, program_state_manager, resumables):
  """Loads the latest program state into the backend and the resumables;
  returns the last completed round (0 for a fresh start)."""
  structure = _program_state(initial_state, 0, resumables)
  loaded, version = asyncio.run(program_state_manager.load_latest(structure))
  if loaded is None:
    backend.set_state(initial_state)
    return 0
  logging.info("Resuming after round %d.", version)
  backend.set_state(loaded.pop(STATE_KEY))
  for component in resumables:
    component.restore({k: loaded[k] for k in component.resume_state()})
  return int(loaded[ROUND_KEY])


def run_rounds(
    backend: base.RoundBackend,
    initial_state: Any,
    training_selection_fn: Callable[[int], Sequence[str]],
    total_rounds: int,
    program_state_manager: tff.program.ProgramStateManager,
    metrics_managers: Sequence[tff.program.ReleaseManager] = (),
    evaluation_fn: Optional[Callable[[Any], Metrics]] = None,
    rounds_per_evaluation: int = 1,
    rounds_per_saving_program_state: int = 1,
    round_metrics_fn: Callable[[Any], Metrics] = flatten_metrics,
) -> int:
  """Runs (or resumes) rounds `1..total_rounds` of `backend`'s process.

  Args:
    backend: runs one round of the learning process (`run_round(cohort)`)
      and holds its state between rounds.
    initial_state: the process's initial state (`backend.initialize(...)`);
      a resumed run starts from the latest saved state instead.
    training_selection_fn: round number (1-based) -> the cohort's client ids.
    total_rounds: the last round to run.
    program_state_manager: saves and loads `{"state", "round", ...}` (the
      values of every `Resumable` parameter included).
    metrics_managers: each round's metrics (`round_metrics_fn`'s, then
      `ROUND_TIME_KEY` and, on evaluation rounds, the evaluation's and
      `EVAL_TIME_KEY`) are released to each with the round number as key;
      round 0 releases the initial model's evaluation.
    evaluation_fn: model weights (`tff.learning.models.ModelWeights`) ->
      metrics; run on round 0, every `rounds_per_evaluation` rounds and
      after the last round. None: no evaluation.
    rounds_per_evaluation: see `evaluation_fn`.
    rounds_per_saving_program_state: the state is saved every this many
      rounds and after the last round.
    round_metrics_fn: the process's metrics structure -> `{name: value}`.

  Returns:
    The last round run, `total_rounds`.

  Raises:
    What the backend, the managers or the functions raise (e.g. a client's
    unreadable data, `graph_runner.ClientDataError`).
  """
  managers = list(metrics_managers)
  resumables = _resumables([training_selection_fn, round_metrics_fn,
                            evaluation_fn, *managers])
  completed = _resume(backend, initial_state, program_state_manager,
                      resumables)
  if completed == 0 and evaluation_fn is not None:
    _release(managers, _evaluate(evaluation_fn, backend), 0)
  for round_num in range(completed + 1, total_rounds + 1):
    cohort = training_selection_fn(round_num)
    start = time.monotonic()
    round_metrics = backend.run_round(cohort)
    metrics = {ROUND_TIME_KEY: time.monotonic() - start}
    metrics.update(round_metrics_fn(round_metrics))
    last = round_num == total_rounds
    if evaluation_fn is not None and (
        last or round_num % rounds_per_evaluation == 0):
      metrics.update(_evaluate(evaluation_fn, backend))
    _release(managers, metrics, round_num)
    if last or round_num % rounds_per_saving_program_state == 0:
      asyncio.run(program_state_manager.save(
          _program_state(backend.get_state(), round_num, resumables),
          round_num))
  return total_rounds
