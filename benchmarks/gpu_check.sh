#!/usr/bin/env bash
# Device checks for a machine with a CUDA GPU (about 5 minutes at most):
#   1. the device-parametrised and cuda-marked tests, on CUDA;
#   2. the step benchmark on CUDA, with kernel launches per step for two POM counts.
#
# Usage, from anywhere:  bash benchmarks/gpu_check.sh
# Environment:
#   PYTHON            interpreter to use (default: python, else python3)
#   VENV              create / reuse this virtual environment (with system site packages)
#   GEOOPT_WHEEL_DIR  folder of wheels (default ./wheels): missing packages are installed from
#                     it with --no-index, for machines without a package index
#   OUT               when set, the benchmark's report and JSON line are also written there
#   MODEL             benchmark model (default resnet50)
# Exits non-zero when CUDA is missing, a test fails, or the benchmark fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-$(command -v python || command -v python3)}
if [[ -n "${VENV:-}" ]]; then
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv --system-site-packages "$VENV"
    PYTHON="$VENV/bin/python"
fi
WHEEL_DIR=${GEOOPT_WHEEL_DIR:-./wheels}
MODEL=${MODEL:-resnet50}
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
for pair in geoopt:geoopt numba:numba timm:timm pytest:pytest hypothesis:hypothesis; do
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
EOF

echo "== tests on CUDA"
export HYPOTHESIS_PROFILE=ci
set +e
timeout 200 "$PYTHON" -m pytest -q -m "not slow" -k "cuda" -p no:cacheprovider tests
status=$?
set -e
if ((status == 5)); then
    echo "no CUDA test was collected" >&2
    exit 1
elif ((status != 0)); then
    echo "tests on CUDA failed (exit $status)" >&2
    exit "$status"
fi

echo "== step benchmark on CUDA"
report=$(mktemp)
timeout 240 "$PYTHON" benchmarks/step.py --device cuda --model "$MODEL" --json | tee "$report"
if [[ -n "${OUT:-}" ]]; then
    cp "$report" "$OUT/gpu_step_benchmark.txt"
fi
rm -f "$report"
echo "gpu_check: all checks ran"
