#!/usr/bin/env bash
# The int8 checks on an x86 CPU with AVX2 but no AVX-512 and no VNNI, emulated: qemu's user-mode
# emulator with its Haswell model (Debian: apt-get install qemu-user) on any x86-64 Linux machine.
# Its CPUID reports AVX2 without AVX-512/VNNI, which is what ONNX Runtime, oneDNN and XNNPACK pick
# their kernels from. Times under an emulator mean nothing: only accuracy and test results.
#
#   bash benchmarks/emulated_avx2.sh accuracy RUN/best.pth   # -> docs/results/int8/onnx_weights_avx2-emulated.*
#   bash benchmarks/emulated_avx2.sh tests                   # -> docs/results/int8/avx2-emulated-tests.txt
#
# Faithful only in one process: a child process (pytest-xdist workers, torchrun, the compiler)
# starts outside the emulator, so the tests run without xdist, and inductor's C++ kernels are
# compiled with -march=haswell instead of -march=native (the host's ISA, AVX-512 here).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?say accuracy CHECKPOINT or tests}
out=docs/results/int8
qemu=(qemu-x86_64 -cpu Haswell)
py=.venv/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
quiet() { grep -v "TCG doesn't support requested feature" || true; }  # qemu names host features it leaves out (emulator.txt)

case "$what" in
accuracy)
    ckpt=${2:?the trained checkpoint to quantize}
    "${qemu[@]}" "$py" benchmarks/ort_int8_weights.py --checkpoint "$ckpt" --rounds 0 \
        --run-under "${qemu[*]}" --out "$out" 2>&1 | quiet
    ;;
tests)
    printf '#!/bin/sh\n# g++ as on an AVX2 machine: -march=native would mean the host ISA\nfor a; do shift; [ "$a" = -march=native ] && a=-march=haswell; set -- "$@" "$a"; done\nexec g++ "$@"\n' > "$work/g++"
    chmod +x "$work/g++"
    base=$("$py" -c 'import sys; print(sys.base_prefix)')  # the interpreter's install: no machine paths in the record
    files=(tests/test_quantize.py tests/test_int8_debug.py tests/test_export.py tests/test_benchmark.py)
    {
        echo "# bash benchmarks/emulated_avx2.sh tests: ${qemu[*]} python -m pytest -v -p no:cacheprovider -p no:xdist ${files[*]}"
        echo "# commit $(git rev-parse --short HEAD), $(date -u +%Y-%m-%dT%H:%M:%SZ), host CPU:$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
        echo "# settings: CXX=<a g++ wrapper turning -march=native into -march=haswell> TORCHINDUCTOR_CACHE_DIR=<a fresh folder> OMP_NUM_THREADS=1 REPGHOST_NO_SKIPS=1"
        echo "# CPUID under the emulator: $("${qemu[@]}" "$py" -c 'import torch; c = torch.cpu.get_capabilities(); print({k: c[k] for k in ("avx2", "avx512_f", "avx512_vnni", "avx_vnni")})' 2>/dev/null)"
        start=$(date +%s)
        rc=0
        CXX="$work/g++" TORCHINDUCTOR_CACHE_DIR="$work/inductor" OMP_NUM_THREADS=1 REPGHOST_NO_SKIPS=1 \
            "${qemu[@]}" "$py" -m pytest -v -p no:cacheprovider -p no:xdist "${files[@]}" 2>&1 | quiet | sed "s#$PWD/##g; s#$PWD#.#g; s#$base#<python>#g; s/[[:space:]]*\$//" || rc=$?
        echo "# exit status $rc, $(( $(date +%s) - start )) s wall"
    } > "$out/avx2-emulated-tests.txt"
    tail -n 3 "$out/avx2-emulated-tests.txt"
    ;;
*)
    echo "say accuracy CHECKPOINT or tests" >&2
    exit 2
    ;;
esac
