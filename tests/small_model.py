"""A shallow ResNet for the tests of the training loops, in-process or as a
command.

Tests of resume, checkpoints, outputs and errors check the loops, not the
network, yet most of a ResNet-18 run on a CPU goes to tracing and compiling
its 18 layers (about 40 s before the first FedAvg round). These tests give
`benchmark.model.resnet18` fewer, narrower stages: the same builder, layers
(convolutions, GroupNorm or frozen BatchNorm, a downsampling block, the
classifier) and input/output contract. Measured on 2 cores: a 3-round FedAvg
run on the real sample took 14 s in-process against 46 s, and 30-38 s as a
command against 49-58 s (12 s of which is importing TF and TFF). ResNet-18
itself stays in the model tests (one FedAvg round of it through TFF's
worker), the restore and full-disk tests (its layer names and file sizes)
and the two learning tests: with this shallow network, the FedAvg learning
test's val macro averaged precision stayed at its initial 0.18 over 24
rounds (three runs), where ResNet-18 gains 0.05-0.10.

In a test process: the `small_resnet` fixture (tests/conftest.py). For a
command in a subprocess: `command("benchmark.federated_main", flags)` runs
the module as `python -m` would, with the small layout set first. For a
command that starts others (`make demo`): `SITE_DIR` on its PYTHONPATH.
"""

import importlib.abc
import os
import runpy
import sys

# Two stages of one basic block each; the second downsamples (stride 2, 1x1
# projection), as three of ResNet-18's four stages do. 32 filters is the
# smallest width GroupNorm's 32 groups allow.
SMALL_LAYOUT = {"INITIAL_FILTERS": 32, "STAGE_FILTERS": (32, 64),
                "BLOCKS_PER_STAGE": (1, 1)}


def use(setattr_fn, model=None) -> None:
  """Sets the small layout on `benchmark.model` (or on `model`, that module
  as it is being imported) through `setattr_fn(module, name, value)`
  (pytest's `monkeypatch.setattr`, or plain `setattr`)."""
  if model is None:
    from benchmark.model import resnet as model  # pylint: disable=g-import-not-at-top
  for name, value in SMALL_LAYOUT.items():
    assert hasattr(model, name), name  # The layout's names must stay real.
    setattr_fn(model, name, value)


class _SmallLayoutOnImport(importlib.abc.MetaPathFinder):
  """Finds `benchmark.model` as the other finders do, and sets the small
  layout on it right after it executes."""

  def find_spec(self, fullname, path, target=None):
    if fullname != "benchmark.model":
      return None
    for finder in sys.meta_path:
      if finder is self or not hasattr(finder, "find_spec"):
        continue
      spec = finder.find_spec(fullname, path, target)
      if spec is not None:
        break
    else:
      return None
    execute = spec.loader.exec_module

    def exec_module(module):
      execute(module)
      use(setattr, module)

    spec.loader.exec_module = exec_module
    return spec


def use_on_import() -> None:
  """Sets the small layout on `benchmark.model` when this process imports it
  (which it must not have done yet): for commands that start further
  commands, through tests/shallow_site/sitecustomize.py."""
  assert "benchmark.model" not in sys.modules
  sys.meta_path.insert(0, _SmallLayoutOnImport())


# A PYTHONPATH entry whose sitecustomize.py calls `use_on_import()`: every
# Python process started with it builds the small layout.
SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "shallow_site")


# The width of the last stage, which feeds the classifier.
WIDTH = SMALL_LAYOUT["STAGE_FILTERS"][-1]


def command(module: str, args: list[str], shallow: bool = True) -> list[str]:
  """The argv that runs `python -m module args...`, with the small layout
  unless `shallow` is False (then the module's own ResNet-18)."""
  if not shallow:
    return [sys.executable, "-m", module, *args]
  return [sys.executable, os.path.abspath(__file__), module, *args]


if __name__ == "__main__":
  _module = sys.argv[1]
  sys.argv = [_module, *sys.argv[2:]]
  use(setattr)
  runpy.run_module(_module, run_name="__main__", alter_sys=True)
