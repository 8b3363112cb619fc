#!/usr/bin/env bash
# The one call on the device machine (one H200; Python 3.12 with torch and transformers, none
# of the Jupyter stack, no network), in at most 8 minutes:
#   1. install the carried wheels (.device-wheels/, made here by tools/gather_wheels.py) and
#      mpbook itself, both without an index;
#   2. run every test marked `gpu`;
#   3. tools/device_check.py: the copy bandwidth, a one-GPU cluster (NCCL) with every strategy
#      against the CPU reference, bf16 decode of a 7B-shaped random Llama (eager and compile,
#      batch 1 and 8) against the roofline.
# Everything it writes lands in $OUT (the device tool brings it back): install.log,
# gpu-tests.log, device-check.log, device-check.md (the tables for the README), device-check.json.
#
# Here, first:  python tools/gather_wheels.py
# Then the device tool's call:  run(command="bash tools/device-check.sh", carry=[".device-wheels"], timeout_s=540)
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device-check-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PIP_BREAK_SYSTEM_PACKAGES=1
PY="${PYTHON:-python3}"
LIMIT_S=470  # the whole script, within the 8 minutes the issue gives it
began=$SECONDS
say() { echo "[device-check, $((SECONDS - began)) s] $*"; }
left() { echo $((LIMIT_S - (SECONDS - began))); }

say "the machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || say "nvidia-smi: none"
"$PY" -c "import sys, torch; print('Python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPU seen:', torch.cuda.is_available())"

shopt -s nullglob
wheels=(.device-wheels/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "no wheels in .device-wheels/: run 'python tools/gather_wheels.py' here and carry .device-wheels"
    exit 2
fi
say "installing ${#wheels[@]} carried wheels and mpbook, no index"
if ! "$PY" -m pip install --quiet --no-index --no-deps --no-cache-dir --no-compile --disable-pip-version-check \
        --find-links .device-wheels "${wheels[@]}" >"$OUT/install.log" 2>&1 ||
   ! "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation --disable-pip-version-check \
        -e . >>"$OUT/install.log" 2>&1; then
    tail -30 "$OUT/install.log"
    exit 3
fi
# What pip says is missing: jupyterlab and playwright are left out on purpose (gather_wheels.LEFT_OUT).
"$PY" -m pip check >>"$OUT/install.log" 2>&1 || grep -v -e "requires jupyterlab" -e "requires playwright" \
    -e "^$" "$OUT/install.log" | grep -i "requires\|has requirement" || true
"$PY" -c "import mpbook, transformers; print('mpbook', mpbook.__version__, '| transformers', transformers.__version__)" &&
    "$PY" -m mpbook --help >/dev/null || exit 4

say "the tests marked gpu"
mapfile -t test_files < <(grep -l "pytest.mark.gpu" tests/test_*.py)
timeout -k 10 180 "$PY" -m pytest -m gpu -n 0 -p no:cacheprovider -q -rfEs --timeout 150 "${test_files[@]}" \
    2>&1 | tee "$OUT/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
summary=$(tail -n 1 "$OUT/gpu-tests.log")

# The check stops starting measurements a minute before the limit (a started one finishes).
budget=$(( $(left) - 60 ))
say "the device check, ${budget} s for its measurements"
# DEVICE_CHECK_ARGS: more options for it (the test runs this script on a CPU with --cpu ...).
# shellcheck disable=SC2086
timeout -k 10 $(( $(left) > 30 ? $(left) : 30 )) "$PY" tools/device_check.py --out "$OUT" --budget-s "$budget" \
    ${DEVICE_CHECK_ARGS:-} --note "the tests marked gpu ($(basename -a "${test_files[@]}" | paste -sd, -)): ${summary} (exit ${tests_rc})" \
    2>&1 | tee "$OUT/device-check.log"
check_rc=${PIPESTATUS[0]}
say "done: tests exit ${tests_rc}, device check exit ${check_rc}; the tables are in \$OUT/device-check.md"
[ "$tests_rc" -eq 0 ] && [ "$check_rc" -eq 0 ]
