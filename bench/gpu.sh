#!/usr/bin/env bash
# GPU figures in one go, for a CUDA machine whose Python already holds PyTorch, timm, onnx and onnxruntime
# (mlflow and the rest come in .whl/site.tar.xz, made by bench/gpu_bundle.sh, for a machine without a
# package registry):
#   1. the whole default training run (`experiments/stage.py train`, every default: decode, 22 epochs,
#      test, calibration, ONNX export, registration, robustness) on a dataset of CIFAKE's size and layout,
#      built from a folder of images repeated K times (`bench/memory.py`'s byte-distinct copies): its
#      timings are what CIFAKE would cost, its AUC means nothing (the copies leak into the test split);
#      with COPIES=0 the run trains on SOURCE_FOLDER itself (the real CIFAKE: then its AUC counts);
#   2. with GPU_RECIPES set ("batch_size=128;image_size=64", `;` between recipes), those recipes trained
#      at once on the full dataset by `bench/recipe.py --parallel`, each with its own store (copied to OUT);
#   3. unless GPU_STEP_BENCH=0, the training step at the default batch, 256 (`bench/training_step.py`: eager,
#      channels_last, with and without a host sync each step, cudnn.benchmark, bf16).
# Every figure lands in OUT_FOLDER.
#
# Usage:
#   bash bench/gpu.sh OUT_FOLDER SOURCE_FOLDER [COPIES [TRAINING FLAGS...]]
#   bash bench/gpu.sh /tmp/gpu ~/.cache/cifake/demo-v1 24              # 5,000 demo images x 24 = 120,000, as CIFAKE
#   bash bench/gpu.sh /tmp/gpu ~/.cache/cifake/demo-v1 24 --epochs 1   # the flags after COPIES go to the training run
#   GPU_RECIPES="batch_size=128;image_size=64" GPU_STEP_BENCH=0 bash bench/gpu.sh /tmp/gpu /tmp/cifake 0
set -uo pipefail
usage="usage: bash bench/gpu.sh OUT_FOLDER SOURCE_FOLDER [COPIES [TRAINING FLAGS...]]"
out=${1:?$usage}
source_folder=${2:?$usage}
copies=${3:-24}
shift $(( $# < 3 ? $# : 3 ))  # what is left overrides the training run's flags
mkdir -p "$out"
if [[ -f .whl/site.tar.xz ]]; then  # made by bench/gpu_bundle.sh
    mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site || exit 1
    export PYTHONPATH=/tmp/site
fi
# A fresh cache each time: the timed run must scan and decode, as a first run does.
CIFAKE_CACHE_DIR=$(mktemp -d /tmp/cifake_gpu_cache.XXXXXX) || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CIFAKE_CACHE_DIR
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, timm, mlflow; print('torch', torch.__version__, 'timm', timm.__version__, 'mlflow', mlflow.__version__)" \
    | tee -a "$out/gpu.txt" || exit 1

data=$source_folder
if (( copies > 0 )); then
    data=/tmp/cifake_gpu_x$copies
    python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); import memory; \
memory.build_copies(Path(sys.argv[1]).resolve(), Path(sys.argv[2]), int(sys.argv[3]))" \
        "$source_folder" "$data" "$copies" >/dev/null || exit 1
fi
started=$(date +%s%N)
MLFLOW_TRACKING_URI=sqlite:///$CIFAKE_CACHE_DIR/runs.db timeout 300 \
    python3 experiments/stage.py train --data_dir "$data" --device cuda "$@" 2>&1 | tee "$out/default_run.log"
echo "whole default run: exit ${PIPESTATUS[0]}, $(( ($(date +%s%N) - started) / 1000000 )) ms wall" | tee -a "$out/default_run.log"
cp "$CIFAKE_CACHE_DIR/runs.db" "$out/"  # the run's metrics carry timestamps: where the time went

if [[ -n ${GPU_RECIPES:-} ]]; then
    IFS=';' read -ra recipes <<< "$GPU_RECIPES"
    python3 bench/recipe.py --data_dir "$data" --max_train_per_class 0 --max_test_per_class 0 --epochs 8 \
        --device cuda --parallel ${#recipes[@]} --work_dir /tmp/cifake_gpu_recipes --recipes "${recipes[@]}" \
        --output "$out/recipes.json" 2>&1 | tee "$out/recipes.log"
    for store in /tmp/cifake_gpu_recipes/recipe*/recipe.db; do
        cp "$store" "$out/$(basename "$(dirname "$store")").db"
    done
fi
[[ ${GPU_STEP_BENCH:-1} == 0 ]] && exit 0
timeout 150 python3 bench/training_step.py --device cuda --batch_size 256 --steps 200 --warmup 20 \
    --output "$out/step_256.json" 2>&1 | tee "$out/step_256.log"
