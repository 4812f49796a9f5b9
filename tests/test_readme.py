"""Every shell command the README shows is run here at small scale: the
download and prepare commands first, in README order, in a new working
directory (the `readme_workdir` fixture), then each other command as a test
of its own in that directory (so parallel test processes can share them out).
Paths stay as written (relative to the working directory), `.venv/bin/python`
becomes this interpreter, and small-scale flags are appended (absl takes the
last value of a repeated flag). A README command that this test does not know
how to run fails the test, so the README cannot show an untested command.

Every trainer command here, and each one `make demo --scale tiny` starts,
builds the tiny network (`--model_layout tiny`): these tests check the
commands, their flags and outputs; ResNet-18 itself trains in
tests/training and tests/backends."""

import csv
import os
import re
import shlex
import subprocess
import sys

import pytest

from benchmark.analysis import dataset_report
from benchmark.core import constants
from download_server import build_tree
from download_server import FileServer
import run_dirs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO_ROOT, "README.md")
# Small crops and the tiny network (see the module docstring).
SMALL_MODEL = ["--image_height=24", "--image_width=24", "--model_layout=tiny"]

# Program -> flags appended to make the README's command small.
SMALL_SCALE_FLAGS = {
    "download_dataset.py": ["--num_workers=2", "--noprogress"],
    "prepare_tfrecords.py": ["--num_workers=1"],
    "benchmark.explore": ["--num_sample_users=2"],
    "benchmark.central_main": ["--num_epochs=1", "--train_batch_size=8",
                               "--eval_batch_size=16"] + SMALL_MODEL,
    # Fixed clipping: with 3 clients per round, adaptive clipping cannot
    # reach the noise multiplier of epsilon 2 and the command refuses (its
    # error is tested in test_dp.py; adaptive runs in test_federated.py).
    "benchmark.federated_main": [
        "--total_rounds=2", "--rounds_per_eval=1", "--clients_per_round=3",
        "--client_batch_size=4", "--max_elements_per_client=8",
        "--client_epochs_per_round=1", "--eval_batch_size=16",
        "--target_unclipped_quantile=0"] + SMALL_MODEL,
    "benchmark.active_main": [
        "--num_cycles=2", "--rounds_per_cycle=1", "--clients_per_round=3",
        "--client_batch_size=4", "--max_elements_per_client=8",
        "--client_epochs_per_round=1", "--eval_batch_size=16",
        "--budget_per_cycle=2"] + SMALL_MODEL,
    "benchmark.synthetic_dataset": ["--num_users=12"],
    "benchmark.report": [],
}
# `make test` is the command that runs this test (CI runs it on every
# submission); running it from here would recurse.
NOT_RUN_HERE = {"make test"}


def readme_commands() -> list[str]:
  """The lines of the README's ```bash blocks, without comments."""
  with open(README, encoding="utf-8") as f:
    text = f.read()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
    for line in block.splitlines():
      line = line.split(" #", 1)[0].strip()
      if line and not line.startswith("#"):
        commands.append(line)
  return commands


def program_of(argv: list[str]) -> str:
  """The script or module a README command runs ("make demo" for make)."""
  if argv[:2] == ["make", "demo"]:
    return "make demo"
  if argv[0].endswith("python") and len(argv) > 2 and argv[1] == "-m":
    return argv[2]
  if argv[0].endswith("python") and len(argv) > 1:
    return argv[1]
  return " ".join(argv)


def test_every_readme_command_is_known():
  commands = readme_commands()
  assert len(commands) >= 8, commands
  for command in commands:
    program = program_of(shlex.split(command))
    assert (program in SMALL_SCALE_FLAGS or command in NOT_RUN_HERE or
            program == "make demo"), (
                f"README command not exercised by tests/test_readme.py: "
                f"{command}")


def _write_imagenet_like_weights(path: str) -> None:
  """Stands in for the published resnet18.h5: weights of the BatchNorm
  network with a 1000-way classifier, saved by layer name (in the tiny
  layout that the commands here build)."""
  from benchmark.model import resnet  # pylint: disable=g-import-not-at-top
  net = resnet.build_resnet(num_classes=1000, pretrained=True,
                            crop_size=(24, 24), seed=3, layout=resnet.TINY)
  net.save_weights(path)


def _run(argv: list[str], cwd: str) -> subprocess.CompletedProcess:
  # TensorFlow's C++ log level as users have it: the commands' consoles are
  # quiet by their own filtering (checked on the demo's console below).
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  env["PYTHONPATH"] = REPO_ROOT
  result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900, stdin=subprocess.DEVNULL)
  assert result.returncode == 0, (
      f"{' '.join(argv)} failed ({result.returncode}):\n"
      f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
  return result


# What TensorFlow, TFF and the suite printed on `make demo`'s console before
# it was made quiet (2026-12-03), none of which it may print now: the C++
# errors of plugin registration and of Grappler, the deprecation of
# tf_record_iterator, TFF's INFO about default metrics, the final metrics
# as JSON, and step commands without their interpreter.
_NOT_ON_THE_DEMOS_CONSOLE = re.compile("|".join([
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"meta_optimizer\.cc.*function_optimizer failed",
    r"grappler_item_builder\.cc.*Failed to detect the fetch node",
    r"Grappler has raised the error",
    r"tf_record_iterator .* is deprecated",
    r"Adding default num_(examples|batches) metric",
    r'^\s*"(macro|micro)_averaged_precision": ',
    r"^\$ -m ",
]))


def _check_demo_console(result: subprocess.CompletedProcess,
                        work: str) -> None:
  """`make demo`'s console: none of `_NOT_ON_THE_DEMOS_CONSOLE`; each step
  printed as it runs (the interpreter first; the report step run again as
  printed, from another folder); the report's table and files, and each
  step's log."""
  lines = (result.stdout + result.stderr).splitlines()
  noisy = [l for l in lines if _NOT_ON_THE_DEMOS_CONSOLE.search(l)]
  assert not noisy, "\n".join(noisy)
  steps = [shlex.split(l[2:]) for l in result.stdout.splitlines()
           if l.startswith("$ ")]
  assert len(steps) == 6 and all(s[0] == sys.executable for s in steps)
  last_line = result.stdout.strip().splitlines()[-1]
  assert last_line.startswith("Results: "), last_line
  results = last_line[len("Results: "):]
  assert any(l.startswith("| central ") for l in lines)
  for name in ("results.md", "results.csv", "val_curves.png", "log.txt"):
    assert os.path.isfile(os.path.join(results, name)), name
  for step in ("central", "fedavg", "fedavg_dp"):
    assert os.path.isfile(os.path.join(results, step, "log.txt")), step
  # Beside the data, which keeps its bytes.
  for data in ("dataset", "tfrecords"):
    assert os.path.isfile(os.path.join(results, data + ".log")), data
    assert not os.path.exists(os.path.join(results, data, "log.txt")), data
  os.remove(os.path.join(results, "results.md"))
  _run(steps[-1], cwd=work)
  assert os.path.isfile(os.path.join(results, "results.md"))


@pytest.fixture(scope="module")
def source_dir(request):
  """The real FLAIR sample, or the synthetic dataset where it is absent."""
  try:
    return request.getfixturevalue("flair_sample_dir")
  except pytest.skip.Exception:
    return request.getfixturevalue("synthetic_dataset_dir")


def _argv_at_small_scale(command: str, work: str,
                         server_url: str = "") -> list[str]:
  """A README command as this test runs it in the working directory `work`
  (see the module docstring)."""
  argv = shlex.split(command)
  program = program_of(argv)
  if program == "make demo":
    return ["make", "--no-print-directory", "-C", REPO_ROOT,
            "-o", ".venv/.installed", "demo", f"VPY={sys.executable}",
            f"DEMO_FLAGS=--scale=tiny --results_dir={work}/demo_results"]
  if argv[0].endswith("python"):
    argv[0] = sys.executable
  if program.endswith(".py"):
    argv[1] = os.path.join(REPO_ROOT, program)
  argv += SMALL_SCALE_FLAGS[program]
  if program == "download_dataset.py":
    argv.append(f"--data_url={server_url}")
  return argv


# The README's first steps, which the other commands read from: run in order
# by the `readme_workdir` fixture.
SETUP_PROGRAMS = ("download_dataset.py", "prepare_tfrecords.py")


def _setup_commands() -> list[str]:
  return [c for c in readme_commands()
          if program_of(shlex.split(c)) in SETUP_PROGRAMS]


def _later_commands() -> list[str]:
  return [c for c in readme_commands()
          if c not in NOT_RUN_HERE and
          program_of(shlex.split(c)) not in SETUP_PROGRAMS]


@pytest.fixture(scope="module")
def readme_workdir(source_dir, tmp_path_factory):
  """A working directory where the README's download and prepare commands
  ran, in README order, from a local server holding `source_dir`; it also
  holds `resnet18.h5` for the README's --restore_model_path command. The
  README's other commands each run in it (tests below), which write to
  paths of their own."""
  root = tmp_path_factory.mktemp("readme")
  work = str(root / "work")
  os.makedirs(work)
  server_root = str(root / "server")
  build_tree(source_dir, server_root)
  _write_imagenet_like_weights(os.path.join(work, "resnet18.h5"))
  with FileServer(server_root, max_lifetime_s=600) as server:
    for command in _setup_commands():
      _run(_argv_at_small_scale(command, work, server.url), cwd=work)
  return work


@pytest.mark.slow
def test_readme_download_and_prepare_commands(readme_workdir):
  """download_dataset.py and prepare_tfrecords.py as the README shows them
  produce what the README's later commands read."""
  assert [program_of(shlex.split(c)) for c in _setup_commands()] == list(
      SETUP_PROGRAMS)
  assert os.path.isfile(os.path.join(readme_workdir, "flair_data",
                                     constants.METADATA_FILE))
  assert os.path.isfile(os.path.join(readme_workdir, "flair_tfrecords",
                                     constants.LABEL_INDEX_FILE))


def _flag_value(argv: list[str], flag: str) -> str:
  """The last value of `--flag V` or `--flag=V` in `argv`."""
  value = None
  for i, arg in enumerate(argv):
    if arg == flag and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith(flag + "="):
      value = arg[len(flag) + 1:]
  assert value is not None, f"{flag} not in {argv}"
  return value


def _command_id(command: str) -> str:
  """A short test id: the program, and its --save_model_dir's name if any."""
  argv = shlex.split(command)
  name = program_of(argv).split(".")[-1].replace(" ", "_")
  if "--save_model_dir" in argv:
    name += "-" + os.path.basename(_flag_value(argv, "--save_model_dir"))
  return name


@pytest.mark.slow
@pytest.mark.parametrize("command", _later_commands(), ids=_command_id)
def test_readme_command_runs_at_small_scale(readme_workdir, command):
  """Each later README command runs in the prepared working directory and
  writes what the README says it writes."""
  argv = _argv_at_small_scale(command, readme_workdir)
  program = program_of(shlex.split(command))
  if program == "benchmark.report":
    # A finished run to compare, whichever trainer commands ran before.
    run_dirs.central_run(os.path.join(readme_workdir, "runs", "finished"))
  result = _run(argv, cwd=readme_workdir)
  if program == "make demo":
    _check_demo_console(result, readme_workdir)
  elif program in ("benchmark.central_main", "benchmark.federated_main",
                   "benchmark.active_main"):
    save_dir = os.path.join(readme_workdir, _flag_value(argv, "--save_model_dir"))
    assert os.path.isfile(os.path.join(save_dir, constants.FINAL_METRICS_FILE))
    if "--epsilon" in argv:
      # The README's DP command at small scale has fixed clipping
      # (--target_unclipped_quantile=0): the clip stays --l2_norm_clip's
      # default, 0.1, and noise is added in every round.
      with open(os.path.join(save_dir, constants.METRICS_CSV_FILE), newline="",
                encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[1:]
      assert [float(r["dp_clip"]) for r in rows] == pytest.approx(
          [0.1] * len(rows))
      assert all(float(r["dp_noise_stddev"]) > 0 for r in rows)
  elif program == "benchmark.report":
    output_dir = os.path.join(readme_workdir, _flag_value(argv, "--output_dir"))
    with open(os.path.join(output_dir, "results.md"), encoding="utf-8") as f:
      assert "| finished " in f.read()
    assert os.path.isfile(os.path.join(output_dir, "val_curves.png"))
  elif program == "benchmark.explore":
    output_dir = os.path.join(readme_workdir, _flag_value(argv, "--output_dir"))
    assert os.path.isfile(os.path.join(output_dir, dataset_report.REPORT_TEXT_FILE)), (
        os.listdir(output_dir))
  else:
    assert program == "benchmark.synthetic_dataset", program
    dataset_dir = os.path.join(readme_workdir, _flag_value(argv, "--dataset_dir"))
    assert os.path.isfile(os.path.join(dataset_dir, constants.METADATA_FILE))


def test_readme_runs_the_benchmarks_it_documents():
  """The README's commands include the demo and both trainers, with and
  without DP (so the tests above run each of them)."""
  later = [(program_of(shlex.split(c)), c) for c in _later_commands()]
  assert ("make demo", "make demo") in later
  save_dirs = {os.path.basename(_flag_value(shlex.split(c),
                                            "--save_model_dir"))
               for p, c in later if p.endswith("_main")}
  assert {"central", "central_pretrained", "fedavg", "fedavg_dp"} <= save_dirs


def test_the_layout_section_names_every_module_of_the_package():
  """The README's "Layout" names each package folder and each module of
  benchmark/ (as it stands in the tree)."""
  with open(README, encoding="utf-8") as f:
    text = f.read()
  layout = text[text.index("## Layout"):]
  layout = layout[:layout.index("\n## ", 1)]
  package = os.path.join(REPO_ROOT, "benchmark")
  missing = []
  for folder, _, names in os.walk(package):
    if "__pycache__" in folder:
      continue
    relative = os.path.relpath(folder, package)
    if relative != "." and f"{os.path.basename(folder)}/" not in layout:
      missing.append(relative + "/")
    missing += [os.path.join(relative, n) for n in names
                if n.endswith(".py") and n not in layout]
  assert not missing, f"README layout misses {missing}"
