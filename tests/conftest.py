"""Shared test fixtures: the real FLAIR sample, generated FLAIR-like data, and
a guard that no TFF worker process outlives the test session."""

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAIR_SAMPLE_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared",
                                "flair_sample")
SAMPLE_NUM_IMAGES = 35
SAMPLE_NUM_USERS = 15


@pytest.fixture(scope="session")
def flair_sample_dir():
  """The real 35-image FLAIR sample in ../shared (read-only); skips if absent."""
  if not os.path.isdir(FLAIR_SAMPLE_DIR):
    pytest.skip(f"real FLAIR sample not found at {FLAIR_SAMPLE_DIR} "
                "(it lives in ../shared beside the repository)")
  return FLAIR_SAMPLE_DIR


@pytest.fixture(scope="session")
def prepared_sample_dir(flair_sample_dir, tmp_path_factory):
  """The real sample prepared into per-user TFRecords (session-wide, read-only
  by convention: tests must not modify it)."""
  from benchmark.prepare import tfrecords
  out = str(tmp_path_factory.mktemp("sample_tfrecords"))
  tfrecords.prepare(flair_sample_dir, out, num_workers=1, show_progress=False)
  return out


@pytest.fixture(scope="session")
def synthetic_dataset_dir(tmp_path_factory):
  """A small generated FLAIR-like dataset directory (60 users, seed 0)."""
  from benchmark.prepare import synthetic
  out = str(tmp_path_factory.mktemp("synthetic_dataset"))
  synthetic.generate(out, num_users=60, seed=0)
  return out


@pytest.fixture(scope="session")
def prepared_synthetic_dir(synthetic_dataset_dir, tmp_path_factory):
  """`synthetic_dataset_dir` prepared into per-user TFRecords."""
  from benchmark.prepare import tfrecords
  out = str(tmp_path_factory.mktemp("synthetic_tfrecords"))
  tfrecords.prepare(synthetic_dataset_dir, out, num_workers=1,
                    show_progress=False)
  return out


@pytest.fixture(autouse=True)
def no_tff_worker_left_behind():
  """Fails the test that leaves a TFF worker_binary child running (and stops
  it), so a leak is reported where it happens."""
  yield
  if "tensorflow_federated" not in sys.modules:
    return
  from benchmark.backends import tff_runtime
  leftover = tff_runtime.stop_worker_children()
  if leftover:
    pytest.fail(f"TFF worker_binary process(es) {leftover} outlived this "
                "test; run TFF computations inside tff_runtime.local_runtime()")


def pytest_sessionfinish(session, exitstatus):
  """Fails the run if a TFF worker_binary child is still alive at the end."""
  del exitstatus
  if "tensorflow_federated" not in sys.modules:
    return  # TFF never loaded in this process: it started no worker.
  from benchmark.backends import tff_runtime
  leftover = tff_runtime.stop_worker_children()
  if leftover:
    print(f"\nerror: TFF worker_binary processes outlived their tests: "
          f"{leftover} (stopped now)")
    session.exitstatus = 1


def _mount_tmpfs(path: str, size_kib: int) -> None:
  import subprocess  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0:
    pytest.skip("a small file system is mounted for this test, which needs "
                "root (mount -t tmpfs)")
  result = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", path],
      capture_output=True, text=True, check=False)
  if result.returncode != 0:
    pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip()})")


@pytest.fixture
def small_filesystem(tmp_path):
  """`make(size_kib, fill_to_kib=None) -> path`: mounts a tmpfs of
  `size_kib` KiB in the test's directory (unmounted afterwards); with
  `fill_to_kib`, a file `filler` leaves about that much free. Skips with a
  reason where no file system can be mounted (not root, no permission)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  mounted = []

  def make(size_kib, fill_to_kib=None):
    path = str(tmp_path / f"small_fs{len(mounted)}")
    _mount_tmpfs(path, size_kib)
    mounted.append(path)
    if fill_to_kib is not None:
      with open(os.path.join(path, "filler"), "wb") as f:
        f.write(b"\0" * ((size_kib - fill_to_kib) * 1024))
    return path

  yield make
  for path in mounted:
    subprocess.run(["umount", "-l", path], check=False)


# The reason each kind of unwritable directory gives (os.strerror).
UNWRITABLE_REASONS = {"read_only": "Read-only file system",
                      "permission": "Permission denied"}


# As root, a subprocess run under this prefix is refused by file permissions
# like any user (the capabilities that bypass them are dropped).
_WITHOUT_PERMISSION_BYPASS = ["setpriv",
                              "--bounding-set=-dac_override,-dac_read_search"]


@pytest.fixture
def make_unwritable(tmp_path, small_filesystem):
  """`make(kind) -> (path, command_prefix)`: an existing, empty directory
  that a command cannot write to, and what to put before the command's
  argv: `"read_only"`, a small tmpfs remounted read-only (skips where none
  can be mounted); `"permission"`, a directory of mode 0555 (as root, the
  command runs under `setpriv` without the capabilities that bypass file
  permissions; skips when setpriv is missing)."""
  import shutil  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  made = []

  def make(kind):
    if kind == "read_only":
      root = small_filesystem(256)
      path = os.path.join(root, "out")
      os.mkdir(path)
      subprocess.run(["mount", "-o", "remount,ro", root], check=True)
      return path, []
    assert kind == "permission", kind
    prefix = []
    if os.geteuid() == 0:
      if shutil.which("setpriv") is None:
        pytest.skip("file permissions do not stop root, and setpriv (to "
                    "drop that) is missing")
      prefix = list(_WITHOUT_PERMISSION_BYPASS)
    path = str(tmp_path / f"no_permission{len(made)}")
    os.mkdir(path)
    os.chmod(path, 0o555)
    made.append(path)
    return path, prefix

  yield make
  for path in made:
    os.chmod(path, 0o755)


def _records_of(path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return list(tf.data.TFRecordDataset(path).as_numpy_iterator())


def _write_records(path, records):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)


@pytest.fixture
def damaged_sample(prepared_sample_dir, tmp_path):
  """A copy of the prepared real sample with three damaged train files: one
  cut short (a truncated copy), one with a label index outside the label
  index, one with a corrupt JPEG (right first bytes, garbage after)."""
  import shutil  # pylint: disable=g-import-not-at-top

  from benchmark.core import constants  # pylint: disable=g-import-not-at-top
  from benchmark.data import formats  # pylint: disable=g-import-not-at-top
  copy = str(tmp_path / "tfrecords")
  shutil.copytree(prepared_sample_dir, copy)
  train = os.path.join(copy, constants.TRAIN)
  by_size = sorted(
      (n for n in os.listdir(train) if n.endswith(constants.TFRECORD_SUFFIX)),
      key=lambda n: -len(_records_of(os.path.join(train, n))))
  cut, bad_label, bad_jpeg = (os.path.join(train, n) for n in by_size[:3])
  assert len(_records_of(cut)) >= 2
  with open(cut, "rb") as f:
    content = f.read()
  # A record is its length (8 bytes), a CRC (4), the data and a CRC (4).
  first, second = (16 + len(r) for r in _records_of(cut)[:2])
  with open(cut, "wb") as f:  # One record and a half.
    f.write(content[:first + second // 2])
  records = _records_of(bad_label)
  jpeg, labels, fine = formats.decode_example(records[-1])
  _write_records(bad_label, records[:-1] + [
      formats.encode_example(jpeg, labels + [99], fine)])
  records = _records_of(bad_jpeg)
  jpeg, labels, fine = formats.decode_example(records[0])
  _write_records(bad_jpeg, [formats.encode_example(
      jpeg[:3] + b"not a JPEG body" * 20, labels, fine)] + records[1:])
  return copy, cut, bad_label, bad_jpeg


def pytest_collection_modifyitems(session, config, items):
  """Orders the tests: tests/backends/test_tff_runtime.py first, then the
  slow ones, then the rest (each group in file order).

  test_tff_runtime.py first: in a full run of the suite (2026-11-22),
  its three tests of the TFF worker watchdog (a SIGINT to the main thread
  when the worker dies) failed when they ran last, after the Ray and
  in-process backend tests had run in the same pytest process: the main
  thread was not interrupted. Each passes alone and the suite's other
  watchdog test (a subprocess) passed. A later run started with `&` from a
  script failed them even when they ran first: such a shell starts the
  command with SIGINT ignored, and the watchdog's SIGINT was lost. The
  watchdog now interrupts with its own signal (checked with SIGINT ignored
  by test_a_worker_killed_while_idle_becomes_a_clear_error[ignored]);
  whether that was also the cause of the first failures is not known, so
  they still run first.

  Slow tests next: `make test` runs the suite in parallel processes
  (pytest-xdist), which take tests in this order; long tests started early
  and short ones filling in at the end finish sooner than the reverse.
  """
  del session, config
  items.sort(key=lambda item: (item.path.name != "test_tff_runtime.py",
                               item.get_closest_marker("slow") is None))
