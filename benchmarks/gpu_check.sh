#!/usr/bin/env bash
# Device checks for a machine with a CUDA GPU, in one go (about 5 minutes at most):
#   1. the CUDA tests: device-parametrised tests and property tests on CUDA, the Triton
#      kernels compiled (tests/test_triton.py, a float32 selection), CUDA graph capture;
#   2. ops and host syncs per step on CUDA (benchmarks/launches.py, resnet50 and resnet101);
#   3. step and training-step times against torch.optim.SGD(fused=True) and (foreach=True),
#      resnet50 and seresnet50, batch 128, 224x224, bf16 autocast, with kernels launched per
#      step from torch.profiler (benchmarks/gpu_bench.py).
#
# Usage, from anywhere:  bash benchmarks/gpu_check.sh
# Assumes torch with CUDA is installed (its wheels bring triton). Whatever else is missing
# (geoopt, timm, triton, pytest, hypothesis) is installed from a folder of wheels when there is
# one, else from the package index: on a machine without network, fill the folder beforehand
# on one with network, e.g.  pip download geoopt timm hypothesis pytest -d wheels
# Environment:
#   PYTHON            interpreter to use (default: python, else python3)
#   VENV              create / reuse this virtual environment (with system site packages)
#   GEOOPT_WHEEL_DIR  folder of wheels (default ./wheels), installed with --no-index
#   OUT               when set, the reports are also written there
#   MODELS            models of the timing benchmark (default resnet50,seresnet50)
# Exits non-zero when CUDA is missing, a test fails or a benchmark cannot run. The timing
# targets (pio4 step <= 2x SGD fused, training overhead <= 2%) are reported, not enforced.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-$(command -v python || command -v python3)}
if [[ -n "${VENV:-}" ]]; then
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv --system-site-packages "$VENV"
    PYTHON="$VENV/bin/python"
fi
WHEEL_DIR=${GEOOPT_WHEEL_DIR:-./wheels}
MODELS=${MODELS:-resnet50,seresnet50}
PIP=("$PYTHON" -m pip install -q --disable-pip-version-check)

have() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }

# install PACKAGE...: from the wheel folder when it has wheels, else from the package index.
install() {
    if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
        echo "installing $* from $WHEEL_DIR"
        "${PIP[@]}" --no-index --find-links "$WHEEL_DIR" "$@" ||
            "${PIP[@]}" --no-index --find-links "$WHEEL_DIR" --no-deps "$@"
    else
        echo "installing $* from the package index"
        "${PIP[@]}" --timeout 20 --retries 1 "$@"
    fi
}

have torch || { echo "torch is not importable with $PYTHON" >&2; exit 1; }
# A wheel of geoopt in the wheel folder wins over whatever is installed.
if compgen -G "$WHEEL_DIR/geoopt-*.whl" >/dev/null; then
    install geoopt
fi
missing=()
for pair in geoopt:geoopt timm:timm triton:triton pytest:pytest hypothesis:hypothesis; do
    have "${pair%%:*}" || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
    install "${missing[@]}"
fi
# The package itself, without touching torch: editable, offline-safe.
if ! "$PYTHON" -m pip show -q fgo-geoopt >/dev/null 2>&1; then
    "${PIP[@]}" --no-deps --no-build-isolation -e . ||
        echo "editable install failed; using the source tree through PYTHONPATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled kernels on the GPU, not the interpreter

echo "== machine"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi
else
    echo "nvidia-smi not found"
fi
"$PYTHON" - <<'EOF'
import sys

import geoopt
import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__}, geoopt {geoopt.__version__}")
if not torch.cuda.is_available():
    sys.exit("CUDA is not available to torch: nothing to check")
print("cuda device:", torch.cuda.get_device_name(0))
try:
    import triton

    print("triton", triton.__version__)
except ImportError:
    print("triton is not importable: backend='auto' takes the flat torch step")
EOF

report() {  # report NAME: tee stdin to the terminal and, with OUT, to $OUT/NAME
    if [[ -n "${OUT:-}" ]]; then tee "$OUT/$1"; else cat; fi
}

echo "== tests on CUDA"
export HYPOTHESIS_PROFILE=ci
set +e
timeout 100 "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" \
    "tests/test_triton.py" -k "float32 or nonfinite or first or degenerate or stays or launches" \
    2>&1 | report gpu_tests_triton.txt
status_triton=${PIPESTATUS[0]}
timeout 50 "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" -k "cuda" tests \
    2>&1 | report gpu_tests_cuda.txt
status_cuda=${PIPESTATUS[0]}
set -e
for status in "$status_triton" "$status_cuda"; do
    if ((status == 5)); then
        echo "no CUDA test was collected" >&2
        exit 1
    elif ((status != 0)); then
        echo "tests on CUDA failed (exit $status)" >&2
        exit "$status"
    fi
done

echo "== ops and host syncs per step on CUDA"
timeout 40 "$PYTHON" benchmarks/launches.py --device cuda --models resnet50,resnet101 \
    --backend torch | report gpu_launches.txt

echo "== step and training-step times on CUDA"
timeout 110 "$PYTHON" benchmarks/gpu_bench.py --device cuda --models "$MODELS" \
    --repeats 10 --train-repeats 5 --json |
    report gpu_bench.txt
echo "gpu_check: all checks ran"
