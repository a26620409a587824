#!/bin/bash
# One call of the device tool (a lent GPU machine): gpu_check.py, then the DeepForest recipe sweep
# (benchmarks/detection_sweep.py) for RECIPES side by side until BUDGET seconds (default 520) are used.
# Prepared here, run there, e.g. `RECIPES=adamw-5e-4,sgd-0.005 bash benchmarks/gpu_device_run.sh` with
# carry [.whl, .devdata]: .whl/ holds a pycocotools wheel for the machine's Python (pip download
# --only-binary=:all: --python-version 3.12 ...), .devdata/deepforest the fetched set's fit/tune tiles
# (repghost detect fetch deepforest --cache .devdata); neither is committed.
# If no run of RECIPES has logged a step PROBE seconds (default 75) after the sweep started, every
# trainer gets SIGABRT, so faulthandler prints where each thread is, and the call ends. The run folders
# (last.pth included, so runs stopped by the budget resume elsewhere with the same sweep command) and
# the sweep's log come back as one tar in 15 MB parts (`cat sweep.tar.part-* | tar xf -`): the tool
# returns at most 8 files and 64 MiB, so two runs fit (an AdamW run's last.pth is about 22 MB), three may not.
: "${RECIPES:?name the recipes, e.g. RECIPES=adamw-5e-4,sgd-0.005}" "${OUT:?OUT is the folder that comes back}"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
nproc; python3 -c "import torch,torchvision,timm,pycocotools;print(torch.__version__,torchvision.__version__,timm.__version__)"
timeout 150 python3 benchmarks/gpu_check.py ${COMPILE:+--compile} --steps 10 --out $OUT > /tmp/gpu_check.log 2>&1
echo "gpu_check rc=$? after $(elapsed) s"; tail -7 /tmp/gpu_check.log
mkdir -p data && cp -r .devdata/deepforest data/
SW=docs/results/detection/recipe-sweep
RUNS=$(for r in ${RECIPES//,/ }; do echo $SW/runs/$r; done)
python3 benchmarks/detection_sweep.py --data data/deepforest --output $SW --jobs 2 --threads 4 \
  --recipes $RECIPES > $SW/sweep-device.log 2>&1 &
PID=$!
PROBE_AT=$(( $(elapsed) + ${PROBE:-75} ))
LOGS=$(for r in $RUNS; do echo $r/train.log; done)
BEFORE=$(cat $LOGS 2>/dev/null | grep -c ' step ')  # a resumed run's log already holds steps
while kill -0 $PID 2>/dev/null && [ $(elapsed) -lt ${BUDGET:-520} ]; do
  sleep 5
  if [ -z "$PROBED" ] && [ $(elapsed) -ge $PROBE_AT ]; then
    PROBED=1
    if [ $(cat $LOGS 2>/dev/null | grep -c ' step ') -le $BEFORE ]; then
      echo "no step logged $(( ${PROBE:-75} )) s into the sweep: SIGABRT to the trainers (stacks in sweep-device.log)"
      pkill -ABRT -f 'detection_sweep.py.*--one'; sleep 5; break
    fi
  fi
done
if kill -0 $PID 2>/dev/null; then pkill -TERM -f detection_sweep.py; sleep 5; pkill -KILL -f detection_sweep.py; fi
wait $PID; echo "sweep rc=$? after $(elapsed) s"
grep -v WARNING $SW/sweep-device.log | tail -40 | cut -c1-250
for r in $SW/runs/*; do [ -f $r/train.log ] && { echo "== $r"; grep -v WARNING $r/train.log | tail -3 | cut -c1-250; }; done
tar cf - --exclude='*.safetensors' $SW/sweep-device.log $RUNS | split -b 15M - $OUT/sweep.tar.part-
echo "done after $(elapsed) s"
