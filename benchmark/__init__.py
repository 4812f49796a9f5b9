"""FLAIR benchmark suite: data preparation, ResNet-18, central and federated training.

When a command of the suite imports the package (`python -m
benchmark.<command>`, a top-level command script or a `flair-...` console
script), the package first routes file descriptor 2 through
`cli.stderr_filter`, before TensorFlow is imported: TensorFlow's C++ INFO
and known-harmless messages go to the command's log file, every other
line to the console.

Importing `tensorflow_federated` installs a default execution context whose
executor factory owns a `ServiceManager`; that object's `__del__` runs during
interpreter shutdown, after the `subprocess` module it uses has been torn
down, and prints "Exception ignored in ... ServiceManager.__del__" with a
traceback below the output of every command (TFF 0.87). The package
therefore releases that context at exit, while the interpreter is still
whole (`_release_tff_default_context`). It imports nothing heavy itself.

Also before TensorFlow is imported, on any import of the package, CUDA's
lazy loading and a JIT cache large enough for TensorFlow's kernels are set
where the user has not set them (`core.cuda_env.set_defaults`): on a GPU
whose kernels TensorFlow 2.14 only ships as PTX, the first run compiles
them, and later runs reuse them.
"""

import atexit
import sys

from benchmark.cli import stderr_filter
from benchmark.core import cuda_env

cuda_env.set_defaults()

if stderr_filter.is_command(getattr(sys, "orig_argv", sys.argv)):
  stderr_filter.start()


def _release_tff_default_context() -> None:
  """Replaces TFF's default execution context by its no-op one, if TFF was
  imported, so the old context (and any worker process it started) is
  released now rather than during interpreter teardown."""
  if "tensorflow_federated" not in sys.modules:
    return
  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.impl.context_stack import runtime_error_context
  from tensorflow_federated.python.core.impl.context_stack import set_default_context
  # pylint: enable=g-import-not-at-top
  set_default_context.set_default_context(
      runtime_error_context.RuntimeErrorContext())


atexit.register(_release_tff_default_context)
