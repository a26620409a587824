#!/bin/bash
# The GPU-machine check of 2026-12-04 (record docs/results/gpu/device-run.txt): gpu_check.py, then the
# DeepForest recipe sweep on the GPU, three recipes side by side, until BUDGET seconds (default 500) are
# used. Prepared here, run there: .whl/ holds a pycocotools wheel for the machine's Python (pip download
# --only-binary=:all: --python-version 3.12 ...), .devdata/deepforest the fetched set's fit/tune tiles
# (repghost detect fetch deepforest --cache .devdata); both are carried, neither is committed.
START=$(date +%s)
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
nproc; python3 -c "import torch,torchvision,timm,pycocotools;print(torch.__version__,torchvision.__version__,timm.__version__)"
timeout 200 python3 benchmarks/gpu_check.py --compile --out $OUT > $OUT/gpu_check.log 2>&1; echo "gpu_check rc=$? after $(( $(date +%s) - START )) s"
tail -8 $OUT/gpu_check.log
mkdir -p data && cp -r .devdata/deepforest data/
LEFT=$(( ${BUDGET:-500} - ($(date +%s) - START) ))
echo "sweep gets $LEFT s"
SW=docs/results/detection/recipe-sweep-gpu
timeout $LEFT python3 benchmarks/detection_sweep.py --data data/deepforest --output $SW --jobs 3 --threads 4 \
  --recipes ${RECIPES:-sgd-0.01,adamw-2e-3,adamw-1e-3} > $OUT/sweep.log 2>&1; echo "sweep rc=$? after $(( $(date +%s) - START )) s"
tail -15 $OUT/sweep.log
for r in $SW/runs/*; do echo "== $r"; tail -2 $r/train.log | cut -c1-250; done
tar czf $OUT/sweep.tgz --exclude='*.pth' --exclude='*.safetensors' $SW
echo "done after $(( $(date +%s) - START )) s"
