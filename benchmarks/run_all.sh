#!/usr/bin/env bash
# Run the benchmark suite in one command.
#
#   benchmarks/run_all.sh            # everything: sample CT, 512x512x300 and 512x512x800
#   benchmarks/run_all.sh --quick    # sample CT only (a few minutes)
#   benchmarks/run_all.sh --no-install [--quick]
#
# Installs the 'bench' extra (onnxruntime, onnx, openvino, monai, nnunetv2, psutil) into the project's
# virtual environment .venv (override with VENV=...), keeping the torch that is already there,
# then writes benchmarks/results/*.json and scaling.png. Run it on an otherwise idle machine:
# every figure is a wall-clock time.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
QUICK=""
INSTALL=1
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK="--quick" ;;
        --no-install) INSTALL=0 ;;
        *) echo "unknown option $arg (use --quick, --no-install)" >&2; exit 2 ;;
    esac
done
if [ ! -x "$PY" ]; then
    echo "no virtual environment at $VENV: create it and 'pip install -e .' first" >&2
    exit 1
fi

if [ "$INSTALL" = 1 ]; then
    # nnunetv2 -> dynamic-network-architectures -> timm -> torchvision would otherwise replace the
    # installed torch (e.g. a CPU build) by the newest CUDA build: pin torch to what is installed.
    TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
    CONSTRAINTS=$(mktemp)
    trap 'rm -f "$CONSTRAINTS"' EXIT
    echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
    "$PY" -m pip install -c "$CONSTRAINTS" -e '.[bench]'
    # A torchvision wheel built for another torch variant cannot even be imported; nothing used
    # here needs it (only timm, which nnU-Net imports lazily), so remove a broken one.
    if "$PY" -m pip show torchvision >/dev/null 2>&1 && ! "$PY" -c 'import torchvision' >/dev/null 2>&1; then
        echo "removing torchvision: it does not import with torch $TORCH_VERSION"
        "$PY" -m pip uninstall -y torchvision
    fi
fi

THREADS=$("$PY" -c 'import os; print(os.cpu_count() or 1)')
THREAD_LIST="1"
[ "$THREADS" -gt 1 ] && THREAD_LIST="1 $THREADS"

echo "== FLOPs and parameters of the networks"
if [ -f benchmarks/flops.py ]; then "$PY" benchmarks/flops.py; fi

echo "== seconds per 96x64x96 student window: PyTorch (channels_last_3d on/off) vs ONNX Runtime"
"$PY" benchmarks/segment_speed.py --window-bench 5 --threads $THREAD_LIST

echo "== abdomen-kdseg segment: end-to-end seconds and peak RSS"
"$PY" benchmarks/segment_speed.py $QUICK --variants default torch torch-nocl onnx --threads $THREAD_LIST

if [ -z "$QUICK" ]; then
    echo "== profile of one 512x512x300 segmentation"
    "$PY" benchmarks/segment_speed.py --profile 512x512x300 --threads "$THREADS"
fi

echo "== AbdomenKDSeg vs nnU-Net-style and MONAI sliding-window predictors"
# (as for the README's table: 3d_fullres runs on the sample and is estimated at the clinical
# sizes, where one run would take hours on a small CPU)
"$PY" benchmarks/compare_methods.py $QUICK --threads "$THREADS" --skip-above-mvox 2 --skip-minutes 60

echo "results in benchmarks/results/"
