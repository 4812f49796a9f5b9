"""Tests of the federated round loop (benchmark/training/loop.py): its
schedule of evaluations, releases and checkpoints and its resume, on a fake
backend (no TensorFlow computation); and the docs/extending.md example, a
`tff.learning` process of one's own run through the loop."""

import asyncio
import collections
import os
import re
import subprocess
import sys

import pytest
import tensorflow_federated as tff

from benchmark.training import loop

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


class _FakeBackend:
  """A process whose state is a number: each round adds the cohort's size;
  its model weights are the state."""

  def __init__(self):
    self.state = None
    self.cohorts = []

  def initialize(self, model_weights=None):
    del model_weights
    return 0.0

  def set_state(self, state):
    self.state = float(state)

  def get_state(self):
    return self.state

  def get_model_weights(self):
    return self.state

  def run_round(self, cohort):
    self.cohorts.append(list(cohort))
    self.state += len(cohort)
    return {"train": {"loss": 1.0 / (1 + self.state)}}


class _MemoryStates(tff.program.ProgramStateManager):
  """Program states kept in a dict (version -> state)."""

  def __init__(self):
    self.saved = {}

  async def get_versions(self):
    return sorted(self.saved) or None

  async def load(self, version, structure):
    del structure
    return collections.OrderedDict(self.saved[version])

  async def save(self, program_state, version):
    self.saved[version] = collections.OrderedDict(program_state)


class _Recorder(tff.program.ReleaseManager):

  def __init__(self):
    self.released = []

  async def release(self, value, key):
    self.released.append((key, dict(value)))


class _CountingSampler(loop.Resumable):
  """Cohorts of two clients named after the round, with resumable state."""

  def __init__(self):
    self.calls = 0

  def resume_state(self):
    return {"calls": self.calls}

  def restore(self, values):
    self.calls = int(values["calls"])

  def __call__(self, round_num):
    self.calls += 1
    return [f"r{round_num}a", f"r{round_num}b"]


def _run(backend, states, recorder, sampler, total_rounds):
  return loop.run_rounds(
      backend, backend.initialize(), sampler, total_rounds, states,
      metrics_managers=[recorder],
      evaluation_fn=lambda weights: {"val_weights": weights},
      rounds_per_evaluation=2, rounds_per_saving_program_state=3)


def test_rounds_evaluations_releases_and_checkpoints_follow_the_schedule():
  backend, states, recorder = _FakeBackend(), _MemoryStates(), _Recorder()
  assert _run(backend, states, recorder, _CountingSampler(), 5) == 5
  assert [key for key, _ in recorder.released] == [0, 1, 2, 3, 4, 5]
  evaluated = [key for key, value in recorder.released
               if "val_weights" in value]
  assert evaluated == [0, 2, 4, 5]  # Round 0, every 2nd, and the last.
  assert all(loop.EVAL_TIME_KEY in v for k, v in recorder.released
             if k in evaluated)
  assert recorder.released[1][1]["train/loss"] == pytest.approx(1 / 3)
  assert all(loop.ROUND_TIME_KEY in v for k, v in recorder.released if k)
  assert backend.cohorts[0] == ["r1a", "r1b"]
  assert sorted(states.saved) == [3, 5]  # Every 3rd round and the last.
  assert states.saved[5][loop.STATE_KEY] == 10.0
  assert states.saved[5]["calls"] == 5


def test_a_resumed_run_continues_after_the_latest_checkpoint():
  states = _MemoryStates()
  _run(_FakeBackend(), states, _Recorder(), _CountingSampler(), 4)
  assert sorted(states.saved) == [3, 4]
  del states.saved[4]  # As if killed after round 4 and before its save.
  backend, recorder, sampler = _FakeBackend(), _Recorder(), _CountingSampler()
  _run(backend, states, recorder, sampler, 6)
  assert [key for key, _ in recorder.released] == [4, 5, 6]  # No round 0.
  assert backend.cohorts[0] == ["r4a", "r4b"]
  assert sampler.calls == 6  # Restored from round 3's checkpoint (3 calls).
  assert states.saved[6][loop.STATE_KEY] == 12.0


def test_flatten_metrics_names_nested_values_by_path():
  flat = loop.flatten_metrics(collections.OrderedDict(
      a=collections.OrderedDict(b=1, c=(2, 3)), d=4.5))
  assert flat == {"a/b": 1.0, "a/c/0": 2.0, "a/c/1": 3.0, "d": 4.5}


def _docs_example() -> str:
  with open(os.path.join(REPO_ROOT, "docs", "extending.md"),
            encoding="utf-8") as f:
    return re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)


@pytest.mark.slow
def test_the_docs_example_runs_its_own_process_through_the_loop(
    prepared_sample_dir, tmp_path):
  example = tmp_path / "example.py"
  example.write_text(_docs_example())
  os.symlink(prepared_sample_dir, tmp_path / "flair_tfrecords")
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")

  def run():
    return subprocess.run([sys.executable, str(example)], cwd=tmp_path,
                          env=env, capture_output=True, text=True,
                          timeout=600, check=False)

  first = run()
  assert first.returncode == 0, first.stderr[-3000:]
  losses = re.findall(r"^round (\d): train loss ([\d.]+)$", first.stdout,
                      re.M)
  assert [r for r, _ in losses] == ["1", "2"], first.stdout
  with open(tmp_path / "runs" / "mine" / "metrics.csv") as f:
    rows = f.read().splitlines()
  assert rows[0].startswith("round,") and "client_work/train/loss" in rows[0]
  assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
  second = run()  # Resumes after round 2: nothing left to run.
  assert second.returncode == 0, second.stderr[-3000:]
  assert "train loss" not in second.stdout
