#!/usr/bin/env bash
# The speed issue's GPU checks as one command, for a lent GPU machine whose
# python3 holds CUDA PyTorch (and numpy, scipy, h5py, tensorboard) but not the
# rest of fedzip's dependencies.
#
# Here, once: `make gpu-wheels` (the missing wheels, for Python 3.12, into .whl/).
# Then one device call, carrying .whl:  bash benchmarks/gpu_check.sh
#   (about 5 minutes after the machine starts; nothing is written but $OUT)
#
# 1. fedzip on CUDA against the CPU: the same bits, the same metrics within
#    float tolerance, the server state on the CPU (tests/test_fedavg.py; clients
#    trained together, tests/test_batched.py), and
#    a codec's bytes from a CUDA input (tests/test_codecs.py);
# 2. seconds per round of the seed workload with --device cuda against the
#    floor and the naive loop on the same GPU (benchmarks/round_time.py).
set -uo pipefail
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_check: installing .whl/ failed (run 'make gpu-wheels' here and carry .whl)"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, fedzip; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_fedavg.py tests/test_codecs.py tests/test_batched.py -k "device or cuda" 2>&1 \
  | tee "$out/tests.txt"
python3 benchmarks/round_time.py --device cuda --rounds 15 --threads 4 2>&1 | tee "$out/round_time_cuda.txt"
# 3. clients trained together (torch.func.vmap) against one at a time on the
#    same GPU: the seed workload's 10 clients, then 100 clients a round.
python3 benchmarks/round_time.py --device cuda --rounds 10 --threads 4 --batch-clients 10 2>&1 \
  | tee "$out/round_time_cuda_batched.txt"
python3 benchmarks/round_time.py --device cuda --rounds 5 --threads 4 --clients 100 --batch-clients 100 2>&1 \
  | tee "$out/round_time_cuda_100.txt"
