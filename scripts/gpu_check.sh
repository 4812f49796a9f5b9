#!/usr/bin/env bash
# One FedAvg round per backend at 224x224 with 20 clients on a GPU machine:
# prints the time to the first round (on a GPU that TensorFlow 2.14 ships only
# PTX for, mostly kernel compilation; a rerun shows the cached start), images/s
# (scripts/bench_fedavg_throughput.py, 1 warm-up + 1 timed round) and the GPU
# utilisation nvidia-smi saw during each backend's run.
#
#   bash scripts/gpu_check.sh            # installs with GPU=1 if needed
#   BACKENDS="inprocess ray" bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null || { echo "error: nvidia-smi not found: no GPU driver on this machine" >&2; exit 1; }
make install GPU=1 >/dev/null
PY=.venv/bin/python
BACKENDS=${BACKENDS:-"inprocess ray tff_worker"}
WORK=$(mktemp -d)
SAMPLER=
cleanup() { [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
$PY -c "import tensorflow as tf; print('TensorFlow sees', tf.config.list_physical_devices('GPU'))" 2>/dev/null
$PY -m benchmark.synthetic_dataset --dataset_dir "$WORK/data" --num_users 200 --seed 0 >/dev/null
$PY prepare_tfrecords.py --dataset_dir "$WORK/data" --tfrecords_dir "$WORK/tfr" >/dev/null 2>&1
for backend in $BACKENDS; do
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 > "$WORK/smi_$backend.csv" &
  SAMPLER=$!
  echo "== $backend"
  TF_CPP_MIN_LOG_LEVEL=2 $PY scripts/bench_fedavg_throughput.py --tfrecords_dir "$WORK/tfr" \
    --crop 224 --batch_size 16 --num_clients 20 --images_per_client 64 --epochs 1 \
    --rounds 1 --backends "$backend" --nokeras 2>&1 | grep -v "^WARNING\|^I0\|^W0" || true
  kill "$SAMPLER"; wait "$SAMPLER" 2>/dev/null || true; SAMPLER=
  awk -F', ' '{u+=$1; if ($1>m) m=$1; if ($2>mem) mem=$2; n++} END {if (n) printf "GPU utilisation during the run: mean %.0f%%, max %d%% (%d samples); max memory used %d MiB\n", u/n, m, n, mem}' "$WORK/smi_$backend.csv"
done
