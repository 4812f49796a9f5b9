"""Where prepare's tasks run: this process or a pool of worker processes.

Each process that runs a task (this one with one worker, or each spawned
worker) holds the input source that images are read from (`set_source`,
`source`) and loads TensorFlow at most once (`tensorflow`). Pool tasks are
module-level functions of their modules (picklable); they read the source
from here.
"""

import multiprocessing
import os
from typing import Any, Iterable, Optional

_tf = None
# The input (a `sources` source) that tasks read images from, in this
# process.
_source = None


def set_source(source: Any) -> None:
  """Makes `source` (a `sources` source, or None) this process's input."""
  global _source
  _source = source


def source() -> Any:
  """This process's input source (`set_source`)."""
  return _source


def _init_worker(source_: Any) -> None:
  """Pool initializer: sets the source in the worker process (its fd 2 is
  the parent's, filtered by `cli.stderr_filter`)."""
  set_source(source_)


def tensorflow():
  """The `tensorflow` module, imported on first use in this process."""
  global _tf
  if _tf is None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    _tf = tf
  return _tf


def default_num_workers() -> int:
  """The number of CPU cores this process may use."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux.
    return os.cpu_count() or 1


def start(num_workers: int, source_: Any) -> Optional[Any]:
  """Sets `source_` as this process's input and, for `num_workers` > 1,
  starts a `multiprocessing.Pool` of that many processes, each holding
  `source_` (pickled to it).

  Returns:
    The pool, or None when `num_workers` is 1 (tasks then run here).
  """
  set_source(source_)
  if num_workers <= 1:
    return None
  # "spawn": the parent may have imported TensorFlow (tests, notebooks), and
  # forking a process with TF's threads is unsafe.
  return multiprocessing.get_context("spawn").Pool(
      num_workers, initializer=_init_worker, initargs=(source_,))


def stop(pool: Optional[Any]) -> None:
  """Forgets this process's source and terminates `pool` (if any) at once,
  waiting for its processes to end."""
  set_source(None)
  if pool is not None:
    pool.terminate()
    pool.join()


def progress(iterable: Optional[Iterable[Any]], show: bool, **kwargs):
  """A tqdm bar over `iterable` (`tqdm.tqdm(iterable, **kwargs)`) if `show`,
  else `iterable` itself."""
  if not show:
    return iterable
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(iterable, **kwargs)
