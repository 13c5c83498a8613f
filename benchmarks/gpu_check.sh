#!/usr/bin/env bash
# The engines on a GPU: what CPU CI cannot check. Run from the repository root on a CUDA
# machine with rlhfkit's environment (.venv) and a vLLM environment for the GPU
# (`pip install vllm` in a venv of its own; docs/engines.md):
#   VLLM_PYTHON=~/venvs/vllm/bin/python bash benchmarks/gpu_check.sh
# 1. the vllm tests (GRPO and PPO with LoRA, weight sync checked after every update,
#    kill and resume) with the policy on the GPU; 2. rollout tokens/s, hf vs vllm, on the
#    ~110M Qwen2-style model; 3. one GRPO iteration, rlhfkit (hf and vllm) against TRL.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${VLLM_PYTHON:?set VLLM_PYTHON to the interpreter of an environment with vLLM for CUDA}"
PYTHON="${PYTHON:-.venv/bin/python}"
TRL_PYTHON="${TRL_PYTHON:-$HOME/venvs/rlhfkit-trl/bin/python}"
nvidia-smi --query-gpu=name,memory.total --format=csv
RLHFKIT_VLLM_PYTHON="$VLLM_PYTHON" RLHFKIT_TEST_ACCELERATOR=gpu "$PYTHON" -m pytest -q -m vllm tests/test_vllm.py
"$PYTHON" benchmarks/rollout_engines.py --device cuda --threads 4 --vllm-python "$VLLM_PYTHON" \
  --prompts 32 --samples 8 --new-tokens 256 --rollouts 3 --repeats 1
if [ -x "$TRL_PYTHON" ]; then
  "$TRL_PYTHON" benchmarks/grpo_iteration.py --device cuda --threads 4 --sides rlhfkit,rlhfkit-vllm,trl \
    --vllm-python "$VLLM_PYTHON" --layers 12 --hidden 768 --heads 12 --new-tokens 256 --prompts 16
fi
