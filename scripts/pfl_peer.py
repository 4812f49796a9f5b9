"""pfl-research's side of the speed scripts: its flags, the conversion of
the data to pfl's FLAIR HDF5 layout, and a run of its FedAvg driver.

pfl-research 0.6 needs its own environment (`--pfl_python`); the driver
(`--pfl_driver`, e.g. `bench_pfl.py`) prints `RESULT {json}` as its last
figures. The scripts that import this module measure pfl-research only when
both flags are given.
"""

import json
import os
import re
import subprocess

from absl import flags

from benchmark.core import errors

PYTHON = flags.DEFINE_string(
    "pfl_python", None,
    "Python of an environment with pfl 0.6, torch, torchvision and h5py; "
    "pfl-research is measured only when given.")
DRIVER = flags.DEFINE_string(
    "pfl_driver", None, "pfl-research benchmark driver (bench_pfl.py).")
CONVERTER = flags.DEFINE_string(
    "pfl_converter", None,
    "Dataset directory -> pfl FLAIR HDF5 converter; default: to_hdf5.py "
    "beside --pfl_driver.")
TV_SHIM = flags.DEFINE_boolean(
    "pfl_tv_shim", False,
    "Let the driver import its tv_shim module (needed only for a CPU-only "
    "torch with a torchvision wheel built for CUDA torch; with matching "
    "wheels the shim's op schemas clash with torchvision's and abort).")
THREADS = flags.DEFINE_integer(
    "pfl_threads", 0,
    "torch threads of the pfl-research driver (0: the number of CPUs). On a "
    "loaded machine 1 thread was 8x faster than 2 (OpenMP under "
    "oversubscription).")
HDF5 = flags.DEFINE_string(
    "pfl_hdf5", None,
    "An existing pfl FLAIR HDF5 of the same data (skips the conversion).")


def enabled() -> bool:
  """Whether pfl-research is to be measured (`--pfl_python` given)."""
  return bool(PYTHON.value)


def check_flags() -> None:
  """Raises FlairInputError naming the flag: only one of --pfl_python and
  --pfl_driver given, or a given file missing."""
  if bool(PYTHON.value) != bool(DRIVER.value):
    raise errors.FlairInputError(
        "--pfl_python and --pfl_driver must be given together")
  for flag in (PYTHON, DRIVER, CONVERTER, HDF5):
    if flag.value and not os.path.isfile(flag.value):
      raise errors.FlairInputError(
          f"--{flag.name} {flag.value!r} is not a file")


def hdf5_path(dataset_dir: str, tfrecords_dir: str, root: str) -> str:
  """`--pfl_hdf5`, or the data converted to pfl's FLAIR HDF5 under `root`.

  Raises:
    FlairInputError: no `dataset_dir` to convert from.
    subprocess.CalledProcessError: the converter failed.
  """
  if HDF5.value:
    return HDF5.value
  if not dataset_dir:
    raise errors.FlairInputError(
        "--dataset_dir is required with --tfrecords_dir to convert the "
        "data for pfl-research (or give --pfl_hdf5)")
  converter = CONVERTER.value or os.path.join(
      os.path.dirname(os.path.abspath(DRIVER.value)), "to_hdf5.py")
  hdf5 = os.path.join(root, "flair_pfl.hdf5")
  subprocess.run([PYTHON.value, converter, dataset_dir, tfrecords_dir, hdf5],
                 check=True, stdout=subprocess.DEVNULL)
  return hdf5


def run(hdf5: str, driver_args: list[str]) -> dict:
  """Runs the driver on `hdf5` with `driver_args` (its own flags, e.g.
  `["--crop", "64"]`); prints its lines and returns its RESULT dict.

  Raises:
    RuntimeError: the driver failed (its error output's end in the
      message) or printed no RESULT line.
  """
  # Runs the driver as __main__; without --pfl_tv_shim its `import tv_shim`
  # gets an empty module.
  prelude = ("import runpy, sys, types\n"
             "if sys.argv[1] == '0':\n"
             "  sys.modules['tv_shim'] = types.ModuleType('tv_shim')\n"
             "sys.argv = sys.argv[2:]\n"
             "runpy.run_path(sys.argv[0], run_name='__main__')\n")
  threads = THREADS.value or os.cpu_count()
  command = [PYTHON.value, "-c", prelude, str(int(TV_SHIM.value)),
             DRIVER.value, "--hdf5", hdf5, *driver_args,
             "--threads", str(threads)]
  environment = dict(os.environ)
  if THREADS.value:
    environment["OMP_NUM_THREADS"] = str(THREADS.value)
  completed = subprocess.run(command, check=False, capture_output=True,
                             text=True, env=environment)
  if completed.returncode:
    raise RuntimeError(f"the pfl-research driver failed (exit "
                       f"{completed.returncode}):\n{completed.stderr[-2000:]}")
  for line in completed.stdout.splitlines():
    if not line.startswith("RESULT "):
      print(f"  pfl: {line}")
  match = re.search(r"^RESULT (\{.*\})$", completed.stdout, re.MULTILINE)
  if not match:
    raise RuntimeError(f"no RESULT line from {command}:\n"
                       f"{completed.stdout}\n{completed.stderr[-2000:]}")
  return json.loads(match.group(1))
