"""Every shell command the README shows is run here, in README order, at small
scale: paths stay as written (relative to a temporary working directory),
`.venv/bin/python` becomes this interpreter, and small-scale flags are
appended (absl takes the last value of a repeated flag). A README command that
this test does not know how to run fails the test, so the README cannot show
an untested command."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from download_server import FileServer
from test_download_dataset import build_tree

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO_ROOT, "README.md")
CROP = ["--image_height=24", "--image_width=24"]

# Program -> flags appended to make the README's command small.
SMALL_SCALE_FLAGS = {
    "download_dataset.py": ["--num_workers=2", "--noprogress"],
    "prepare_tfrecords.py": ["--num_workers=1"],
    "benchmark.explore": ["--num_sample_users=2"],
    "benchmark.central_main": ["--num_epochs=1", "--train_batch_size=8",
                               "--eval_batch_size=16"] + CROP,
    # Fixed clipping: with 3 clients per round, adaptive clipping cannot
    # reach the noise multiplier of epsilon 2 and the command refuses (its
    # error is tested in test_dp.py; adaptive runs in test_federated.py).
    "benchmark.federated_main": [
        "--total_rounds=2", "--rounds_per_eval=1", "--clients_per_round=3",
        "--client_batch_size=4", "--max_elements_per_client=8",
        "--client_epochs_per_round=1", "--eval_batch_size=16",
        "--target_unclipped_quantile=0"] + CROP,
    "benchmark.synthetic_dataset": ["--num_users=12"],
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
  ResNet-18 with a 1000-way classifier, saved by layer name."""
  from benchmark import model as model_lib
  net = model_lib.resnet18(num_classes=1000, pretrained=True,
                           crop_size=(24, 24), seed=3)
  net.save_weights(path)


def _run(argv: list[str], cwd: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900, stdin=subprocess.DEVNULL)
  assert result.returncode == 0, (
      f"{' '.join(argv)} failed ({result.returncode}):\n"
      f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
  return result


@pytest.fixture(scope="module")
def source_dir(request):
  """The real FLAIR sample, or the synthetic dataset where it is absent."""
  try:
    return request.getfixturevalue("flair_sample_dir")
  except pytest.skip.Exception:
    return request.getfixturevalue("synthetic_dataset_dir")


@pytest.mark.slow
def test_readme_commands_run_at_small_scale(source_dir, tmp_path):
  work = str(tmp_path / "work")
  os.makedirs(work)
  server_root = str(tmp_path / "server")
  build_tree(source_dir, server_root)
  _write_imagenet_like_weights(os.path.join(work, "resnet18.h5"))
  ran = []
  with FileServer(server_root, max_lifetime_s=600) as server:
    for command in readme_commands():
      if command in NOT_RUN_HERE:
        continue
      argv = shlex.split(command)
      program = program_of(argv)
      if program == "make demo":
        argv = ["make", "--no-print-directory", "-C", REPO_ROOT,
                "-o", ".venv/.installed", "demo",
                f"VPY={sys.executable}",
                f"DEMO_FLAGS=--scale=tiny --results_dir={work}/demo_results"]
      else:
        if argv[0].endswith("python"):
          argv[0] = sys.executable
        if program.endswith(".py"):
          argv[1] = os.path.join(REPO_ROOT, program)
        argv += SMALL_SCALE_FLAGS[program]
        if program == "download_dataset.py":
          argv.append(f"--data_url={server.url}")
      result = _run(argv, cwd=work)
      ran.append(program)
      if program == "make demo":
        last_line = result.stdout.strip().splitlines()[-1]
        assert last_line.startswith("Results: "), last_line
        results = last_line[len("Results: "):]
        assert os.path.isfile(os.path.join(results, "val_metrics.png"))
        assert os.path.isfile(os.path.join(results, "summary.csv"))

  # The chain really produced what the README says each step produces.
  assert os.path.isfile(os.path.join(work, "flair_data",
                                     "labels_and_metadata.json"))
  assert os.path.isfile(os.path.join(work, "flair_tfrecords",
                                     "label_index.json"))
  for run in ("central", "central_pretrained", "fedavg", "fedavg_dp"):
    assert os.path.isfile(os.path.join(work, "runs", run,
                                       "final_metrics.json")), run
  assert "make demo" in ran and "benchmark.federated_main" in ran
