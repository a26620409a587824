#!/usr/bin/env bash
# The benchmark runs behind docs/benchmarks.md. Run on a quiet machine, from the repository root,
# after `make setup`:   bash benchmarks/run_all.sh [OUT_DIR]
# Each step writes JSON + markdown (+ PNG) into OUT_DIR (default docs/results).
set -euo pipefail
OUT=${1:-docs/results}
BIN=${VENV:-.venv}/bin
mkdir -p "$OUT"

# 1. Issue "core": eager deployed latency vs timm (0.5x/1.0x/2.0x) and training-step throughput.
$BIN/python benchmarks/model_speed.py --out "$OUT" --train-rounds 20

# Model keys (repghost bench --help): timm:NAME = timm's model given the same treatment as ours
# (every conv-BN pair folded, channels_last): the architecture comparisons rest on these;
# timm:NAME:shipped = as timm ships it (BatchNorm kept, NCHW), shown beside them.

# 2. The paper's comparisons and the baselines (1 thread, batch 1, 224x224). Eager PyTorch with both
#    treatments (the treatment alone moves eager latency a lot); the exported runtimes with the
#    equal-treatment keys (ONNX Runtime, MNN and XNNPACK fold BatchNorms themselves).
BASELINES="timm:repghostnet_050 timm:repghostnet_100 timm:ghostnet_050 timm:ghostnet_100 timm:ghostnet_130 \
  timm:mobilenetv3_small_100 timm:mobilenetv3_large_075 timm:mobilenetv3_large_100 timm:ghostnetv3_100 timm:mobileone_s0"
OURS="repghostnet_050 repghostnet_058 repghostnet_100 repghostnet_130"
mkdir -p "$OUT/eager" "$OUT/main"
$BIN/repghost bench --out "$OUT/eager" --rounds 150 --reference timm:ghostnet_050 --runtimes eager \
  --models $OURS $BASELINES timm:repghostnet_050:shipped timm:repghostnet_100:shipped \
           timm:ghostnet_050:shipped timm:ghostnet_100:shipped timm:mobilenetv3_large_075:shipped
$BIN/repghost bench --out "$OUT/main" --rounds 100 --reference timm:ghostnet_050 \
  --runtimes onnxruntime mnn executorch --models $OURS $BASELINES

# 3. Our exports vs timm's exports, same width, ONNX Runtime and MNN (more rounds: small ratios);
#    timm's model both with the same treatment and as shipped.
mkdir -p "$OUT/exports"
$BIN/repghost bench --out "$OUT/exports" --rounds 300 --no-plot --runtimes onnxruntime mnn \
  --models repghostnet_050 timm:repghostnet_050 timm:repghostnet_050:shipped \
           repghostnet_100 timm:repghostnet_100 timm:repghostnet_100:shipped \
           repghostnet_200 timm:repghostnet_200 timm:repghostnet_200:shipped

# 4. Train form vs deploy form, every width.
mkdir -p "$OUT/forms"
models=""
for w in 050 058 080 100 111 130 150 200; do models="$models repghostnet_$w repghostnet_$w:train"; done
$BIN/repghost bench --out "$OUT/forms" --rounds 60 --no-plot --runtimes eager onnxruntime mnn --models $models

# 5. PyTorch's fastest paths for the deployed 1.0x model, next to ONNX Runtime.
mkdir -p "$OUT/pytorch"
$BIN/repghost bench --out "$OUT/pytorch" --rounds 100 --no-plot \
  --runtimes eager torchscript compile onnxruntime --models repghostnet_100
#    Every inductor setting (each given to its own torch.compile(options=...)) and the X86 int8 path.
mkdir -p "$OUT/int8"
$BIN/python benchmarks/pytorch_paths.py --out "$OUT/int8/pytorch_paths.json"

# 6. Research question 1: concat vs add at the network's real feature shapes.
mkdir -p "$OUT/rq1"
$BIN/repghost bench --rq1 --out "$OUT/rq1"

# 7. int8 against fp32 in every runtime with an int8 path (docs/quantization.md), and the
#    cross-runtime ratios, each pair timed in one interleaved phase of its own.
$BIN/repghost bench --out "$OUT/int8" --rounds 100 --runtimes eager compile onnxruntime mnn executorch \
  --reference repghostnet_100 --models repghostnet_100 repghostnet_100:int8 repghostnet_050 repghostnet_050:int8 \
  timm:ghostnet_100 timm:ghostnet_100:int8 timm:mobilenetv3_large_100 timm:mobilenetv3_large_100:int8 \
  --pair repghostnet_100@executorch repghostnet_100@onnxruntime \
  --pair repghostnet_100:int8@executorch repghostnet_100@onnxruntime

# 8. The ablation variants' deploy copies (relu-pre folded as far as it goes), docs/ablation.md.
$BIN/python benchmarks/ablation_latency.py --config configs/ablation/fashion_mnist.yaml --rounds 100 \
  --out "$OUT/ablation/latency.json"
