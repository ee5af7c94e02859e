#!/usr/bin/env bash
# The GPU benchmarks in one prepared run (one H200: under 9 minutes), writing every report into one folder:
#   1. the Llama-3.2-1B shape, bf16, batch 8 x seq 1024, eager and torch.compile: full fine-tuning, LoRA and QLoRA,
#      deltatune beside peft (python benchmarks/bench.py, alternating processes);
#   2. the real SmolLM2-135M-Instruct, batch 4 x seq 512, bf16: full, LoRA, QLoRA, IA3, P-tuning v2, beside peft;
#   3. the SmolLM2 SFT budget: the quick start's identity SFT and the GSM8K SFT recipe, timed, on the GPU.
#
#   bash benchmarks/gpu.sh [--out DIR] [--dry-run]
#
# --dry-run plans without CUDA: it prints each command, checks that every configuration and recipe it names exists,
# and builds each model shape on the meta device to report its parameter count; nothing is trained.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=runs/gpu-bench
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "gpu.sh: error: --out needs a folder (use --out DIR, --dry-run)" >&2; exit 2; }
           OUT="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "gpu.sh: error: unknown option $1 (use --out DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
case "$OUT" in  # the steps below are split on spaces, and their words glob-expanded
  "") echo "gpu.sh: error: --out needs a folder name, got ''" >&2; exit 2 ;;
  *[[:space:]]*) echo "gpu.sh: error: --out '$OUT': a folder name without spaces" >&2; exit 2 ;;
  *[\*\?\[]*) echo "gpu.sh: error: --out '$OUT': a folder name without the glob characters * ? [" >&2; exit 2 ;;
esac

STEPS=(
  "$PY benchmarks/bench.py --configs llama1b,llama1b-compile --methods full,lora,lora-4bit --device cuda --repeats 2 --startup-repeats 0 --out $OUT/llama1b.md --json $OUT/llama1b.json"
  "$PY benchmarks/bench.py --configs smollm2-bf16 --methods full,lora,lora-4bit,ia3,prefix_tuning-v2 --device cuda --repeats 2 --startup-repeats 0 --out $OUT/smollm2.md --json $OUT/smollm2.json"
  "$PY -m deltatune.cli train recipes/quickstart.yaml model.dtype=bfloat16 output.dir=$OUT/quickstart --overwrite"
  "$PY -m deltatune.cli train recipes/gsm8k-sft-lora.yaml model.dtype=bfloat16 output.dir=$OUT/gsm8k-sft --overwrite"
)

if [ "$DRY" = 1 ]; then
  echo "gpu.sh --dry-run: the plan (writes into $OUT)"
  for s in "${STEPS[@]}"; do echo "  $s"; done
  exec "$PY" - <<'EOF'
import sys

import torch
import yaml

sys.path.insert(0, "benchmarks")
import bench
import bench_worker as bw

for name in ("llama1b", "llama1b-compile", "smollm2-bf16"):
    assert name in bench.CONFIGS, name
for name in ("full", "lora", "lora-4bit", "ia3", "prefix_tuning-v2"):
    assert name in bench.METHODS, name
for recipe in ("recipes/quickstart.yaml", "recipes/gsm8k-sft-lora.yaml"):
    assert yaml.safe_load(open(recipe))["model"]["name_or_path"] == "smollm2", recipe
from transformers import AutoModelForCausalLM, LlamaConfig

shape = bw.SHAPES["llama1b"]
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(LlamaConfig(**shape.model))
params = sum(p.numel() for p in model.parameters())
print(f"llama1b: {params / 1e9:.2f}B parameters, batch {shape.batch} x seq {shape.seq}, {shape.dtype}")
s = bw.SHAPES["smollm2-bf16"]
print(f"smollm2-bf16: the embedded SmolLM2-135M-Instruct, batch {s.batch} x seq {s.seq}, {s.dtype}")
print("dry run: ok (no CUDA used)")
EOF
fi

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: error: torch sees no CUDA device')"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
# A failed step (bench.py exits 1 when a cell has no successful process) does not stop the later ones: the GPU is
# lent for minutes, and the steps are independent.
failed=()
for s in "${STEPS[@]}"; do
  echo "== $s" | tee -a "$OUT/log.txt"
  start=$(date +%s)
  status=0
  $s 2>&1 | tee -a "$OUT/log.txt" | tail -n 3 || status=$?
  echo "== $(( $(date +%s) - start )) s, exit status $status" | tee -a "$OUT/log.txt"
  [ "$status" = 0 ] || failed+=("$s")
done
echo "reports in $OUT"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu.sh: ${#failed[@]} of ${#STEPS[@]} steps failed (their lines in $OUT/log.txt):" >&2
  printf '  %s\n' "${failed[@]}" >&2
  exit 1
fi
