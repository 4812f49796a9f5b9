"""FedAvg on a real two-node Ray cluster on loopback (`ray start` twice, as a
user of a cluster runs it): one node killed in the middle of the run, and
the run trains every round anyway, each client of a lost actor trained again
on the node left, with the numbers of an in-process run (README, "FedAvg
backends"). The cluster's processes, and nothing else on the machine, are
stopped at the end, whatever happens.

The node killed is never the one the driver is attached to, as on a real
cluster, where the driver runs on the head's machine and the node lost is
another machine: a driver whose own raylet and object store die cannot go
on (its next `ray.put` fails with "Broken pipe"). Two nodes on one machine
need care for that: a driver attaches to the raylet whose IP is the one in
the session's `node_ip_address.json` (the first such raylet in the GCS's
node table, whose order is arbitrary), and each `ray start` writes its own
IP there, the last one winning. So the worker node gets an IP of its own
(127.0.0.2), the file is given back the head's IP once the worker has
started, and the test checks the driver's node before killing the other.
"""

import csv
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from benchmark.backends import process_guard
from benchmark.core import constants
from benchmark.model import resnet
import round_harness

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
_START_TIMEOUT_S = 120
_RUN_TIMEOUT_S = 600
# The tolerance of tests/training/test_reproducibility.py across backends.
RTOL = 1e-5
FLAGS = dict(image_height=32, image_width=32, clients_per_round=4,
             client_batch_size=2, max_elements_per_client=4,
             client_epochs_per_round=1, rounds_per_eval=1,
             rounds_per_checkpoint=1, eval_batch_size=16, total_rounds=4,
             model_layout=resnet.TINY)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cmdlines():
  """pid -> command line of every process."""
  found = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/cmdline", "rb") as f:
          found[int(entry)] = f.read().replace(b"\0", b" ").decode(
              errors="replace")
      except OSError:
        pass
  return found


def _processes_with(text):
  """The processes whose command line holds `text`, with their
  descendants (Ray's workers rename themselves): pid -> start time."""
  table = process_guard.descendants(1)
  found = {}
  for pid, line in _cmdlines().items():
    if text in line and pid in table:
      found[pid] = table[pid]
      found.update(process_guard.descendants(pid))
  return found


def _kill(processes):
  for pid in processes:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def _ray_start(node_ip, *args):
  result = subprocess.run(
      [RAY, "start", f"--node-ip-address={node_ip}", "--num-cpus=1",
       "--disable-usage-stats", *args], capture_output=True, text=True,
      timeout=_START_TIMEOUT_S, check=False,
      env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def _start_cluster(temp_dir, port, worker_port):
  """A head (on this machine's IP: Ray turns 127.0.0.1 into it) and a
  worker node on 127.0.0.2; returns the head's IP. A driver started after
  this attaches to the head (the module docstring)."""
  # pylint: disable-next=g-import-not-at-top
  from ray._private import services
  _ray_start("127.0.0.1", "--head", f"--port={port}",
             f"--temp-dir={temp_dir}", "--include-dashboard=false")
  session_dir = os.path.join(temp_dir, "session_latest")
  head_ip = services.get_cached_node_ip_address(session_dir)
  assert head_ip, f"no node IP recorded in {session_dir}"
  _ray_start("127.0.0.2", f"--address=127.0.0.1:{port}",
             f"--node-manager-port={worker_port}")
  services.write_node_ip_address(session_dir, head_ip)
  return head_ip


def _worker_node(worker_port):
  """The worker node's processes (its raylet, with its agents and actors
  below it): pid -> start time; and the raylet's node id."""
  lost = (_processes_with(f"--node_manager_port={worker_port} ")
          | _processes_with(f"--node-manager-port={worker_port} "))
  lines = _cmdlines()
  ids = {m.group(1) for pid in lost
         for m in [re.search(r"--node_id=([0-9a-f]+) ", lines.get(pid, ""))]
         if m}
  assert len(ids) == 1, ("the worker node's raylet was not found", ids)
  return lost, ids.pop()


def _driver_node(temp_dir, pid):
  """The node id of the raylet the driver `pid` attached to (its Ray core
  log)."""
  logs = glob.glob(os.path.join(temp_dir, "session_latest", "logs",
                                f"python-core-driver-*_{pid}.log"))
  assert len(logs) == 1, logs
  with open(logs[0], encoding="utf-8", errors="replace") as f:
    found = re.search(r"Initializing worker at address: .* node_id=([0-9a-f]+)",
                      f.read())
  assert found, f"no node id in {logs[0]}"
  return found.group(1)


def _rows(save_dir):
  """metrics.csv without its wall-time columns, as floats."""
  path = os.path.join(save_dir, constants.METRICS_CSV_FILE)
  try:
    with open(path, newline="", encoding="utf-8") as f:
      return [{k: float(v) for k, v in row.items()
               if v and not k.endswith("_time_s")}
              for row in csv.DictReader(f)]
  except FileNotFoundError:
    return []


def _command(tfrecords_dir, save_dir, **overrides):
  values = dict(FLAGS, tfrecords_dir=tfrecords_dir, save_model_dir=save_dir,
                **overrides)
  return [sys.executable, "-m", "benchmark.federated_main",
          *[f"--{k}={v}" for k, v in values.items()]]


@pytest.mark.slow
def test_a_node_lost_mid_run_costs_no_round_and_changes_no_number(
    prepared_sample_dir, tmp_path):
  temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Short: sockets.
  port, worker_port = _free_port(), _free_port()
  address = f"127.0.0.1:{port}"
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  # Ray's processes name the GCS by the head's IP, not 127.0.0.1.
  gcs_addresses = [address]
  try:
    gcs_addresses.append(f"{_start_cluster(temp_dir, port, worker_port)}:"
                         f"{port}")
    save_dir = str(tmp_path / "ray")
    with open(tmp_path / "ray.log", "w") as log:
      run = subprocess.Popen(
          _command(prepared_sample_dir, save_dir, backend="ray",
                   ray_address=address),
          cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
      try:
        deadline = time.monotonic() + _RUN_TIMEOUT_S
        while len(_rows(save_dir)) < 2 and run.poll() is None:
          assert time.monotonic() < deadline, "round 1 never ended"
          time.sleep(0.2)
        # Round 2 starts: the worker node (its raylet, agents and actor)
        # goes, as a machine would; not the driver's.
        lost, worker_node = _worker_node(worker_port)
        if run.poll() is None:
          assert _driver_node(temp_dir, run.pid) != worker_node, (
              "the driver is attached to the worker node")
        _kill(lost)
        run.wait(timeout=_RUN_TIMEOUT_S)
      finally:
        if run.poll() is None:
          run.kill()
          run.wait()
    output = (tmp_path / "ray.log").read_text()
    assert run.returncode == 0, output[-3000:]
    assert "trained again" in output, output[-3000:]
  finally:
    cluster = _processes_with(temp_dir)
    for gcs_address in gcs_addresses:
      cluster.update(_processes_with(gcs_address))
    _kill(cluster)
    shutil.rmtree(temp_dir, ignore_errors=True)
  left = {}
  for text in [temp_dir, *gcs_addresses]:
    left.update(_processes_with(text))
  assert not round_harness.alive(left), "Ray left behind"
  ray_rows = _rows(save_dir)
  assert [row["round"] for row in ray_rows] == list(
      range(FLAGS["total_rounds"] + 1))
  # The same run in process: the same numbers up to summation order.
  local_dir = str(tmp_path / "inprocess")
  subprocess.run(_command(prepared_sample_dir, local_dir), cwd=REPO_ROOT,
                 env=env, capture_output=True, timeout=_RUN_TIMEOUT_S,
                 check=True)
  for got, want in zip(ray_rows, _rows(local_dir), strict=True):
    assert got.keys() == want.keys()
    for key, value in want.items():
      assert got[key] == pytest.approx(value, rel=RTOL, abs=1e-6), key
