#!/usr/bin/env bash
# The accelerator check, one prepared run of at most 8 minutes on one NVIDIA H200 (Python 3.12, JAX with CUDA, flax,
# optax, orbax, diffrax, torch, torchdiffeq), from the repository root:
#
#   bash benchmarks/device_check.sh                      # on the GPU
#   SFD_DEVICE_CHECK_TINY=1 bash benchmarks/device_check.sh  # tiny sizes, any machine (CPU), to test the script
#
# Prints, in this order:
#   1. the SFD-XL train step (bfloat16, the official 32 images per device, no remat) img/s and MFU, the same step of
#      the official-architecture PyTorch model (benchmarks/torch_reference.py, bf16 autocast) eager and under
#      torch.compile, and the ratios (benchmarks/train_step.py);
#   2. guided Dopri5 sampling, SFD-XL with AutoGuidance by B, batch 32: sfd_jax's images/s against the official
#      torchdiffeq dopri5 on the same weights (benchmarks/sampler_speed.py).
# Each stage has its own time limit, so a slow one cannot take the others' time; their JSON goes to $OUT (or
# outputs/device_check).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-outputs/device_check}"
mkdir -p "$OUT_DIR"

if [[ -n "${SFD_DEVICE_CHECK_TINY:-}" ]]; then
  TRAIN=(--config=configs/sfd_xl.py:S --config.batch_size=2 --config.model.input_size=4 --config.model.depth=2
         --config.model.hidden_size=64 --config.model.num_heads=2 --steps=2 --warmup=1)
  SAMPLE=(--preset=S --guide_preset=S --input_size=4 --batch=2 --dtype=float32 --repeats=1)
  LIMIT=600
else
  TRAIN=(--config=configs/sfd_xl.py --config.batch_size=32 --steps=10 --warmup=3)
  SAMPLE=(--preset=XL --guide_preset=B --batch=32 --dtype=bfloat16 --repeats=2)
  LIMIT=210
fi

"$PYTHON" - <<'EOF'
import importlib.util, sys
missing = [m for m in ("jax", "flax", "optax", "orbax.checkpoint", "diffrax", "equinox", "ml_collections", "absl",
                       "torch", "torchdiffeq") if importlib.util.find_spec(m) is None]
if missing:
  sys.exit(f"device_check: missing Python packages {missing}; pip install them first")
import jax, torch
print(f"device_check: jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__}")
EOF
[[ $? -eq 0 ]] || exit 2

echo "== 1. train step: sfd_jax vs the PyTorch reference (eager, torch.compile)"
timeout "$LIMIT" "$PYTHON" benchmarks/train_step.py "${TRAIN[@]}" --config.model.dtype=bfloat16 \
  --config.model.remat_policy=none --torch_compile --out="$OUT_DIR/train_step.json" 2>&1 | grep -v "^W[0-9]\{4\}"
echo "   (exit ${PIPESTATUS[0]})"

echo "== 2. guided Dopri5 sampling: sfd_jax vs the official torchdiffeq dopri5"
timeout "$LIMIT" "$PYTHON" benchmarks/sampler_speed.py "${SAMPLE[@]}" --out="$OUT_DIR/sampler_speed.json" 2>&1 \
  | grep -v "^W[0-9]\{4\}"
echo "   (exit ${PIPESTATUS[0]})"
