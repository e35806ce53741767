#!/usr/bin/env bash
# GPU check of pipower's CuPy backend (pipower/_gpu: CupyOps and its .cu kernels) on a machine with an
# NVIDIA GPU (CUDA 12 or 13 driver). Run from the repository root:
#
#     OUT=/path/to/output bash bench/gpu_check.sh
#
# Writes under $OUT:
#   summary.txt     timestamped steps and the verdict
#   env.txt         nvidia-smi, Python / CuPy / NumPy versions, CuPy's config
#   install.log     only when a venv had to be made and filled
#   pytest.log      `pytest -m gpu tests/test_backend_ops.py tests/test_gpu_ops.py` output (skip reasons, slowest tests)
#   junit-gpu.xml   the same run as JUnit XML
#   hybrid.json/.md, hybrid.log   bench/hybrid.py on the GPU (synthetic LLaMA-2-7B shape, q8)
#   hybrid-qwen1.5b.json/.md/.log the Qwen2.5-Coder-1.5B shape all on the GPU vs the CPU engine
#   gpu-batch.json/.md/.log       bench/gpu_batch.py: T-token forward cost in decode steps on that shape,
#                   and whether a forward is bitwise T decode steps
#   pytest-hybrid.log, junit-hybrid.xml   `pytest -m gpu tests/test_hybrid.py` (the scheduler on CupyOps),
#                   when pipower's Python dependencies import there
# Exit status: pytest's; 3 when no gpu test ran (all skipped: CuPy sees no device); 2 when setup failed.
#
# Python: the first of $PYTHON, python3, /opt/torch/.venv/bin/python3 that imports cupy, numpy and pytest
# and sees a CUDA device is used as it is. Only when none does, a fresh venv outside the tree gets
# `pip install numpy pytest cupy-cuda12x` (needs PyPI). Either way pipower runs from this source tree on
# PYTHONPATH: the GPU tests import neither pipower's Cython extension nor its other dependencies, so
# nothing is built and the tree is left as it was (no `pip install -e .`, which would rebuild the
# extension in place and pull torch for [test]; a GPU box may also have no network at all).
# Every step runs under `timeout`, cut to what is left of a 540-second budget, so the whole run ends
# within 9 minutes (one device call may run 10).
set -u

if [ -z "${OUT:-}" ]; then
    echo "gpu_check.sh: set OUT to an output folder" >&2
    exit 2
fi
mkdir -p "$OUT"
: >"$OUT/summary.txt"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset CUPY_TF32                       # cuBLAS in plain float32: the tests compare with float32 NumPy
DEADLINE=$((SECONDS + 540))

log() { echo "[$(date -u +%Y-%m-%dT%H:%M:%SZ) +$((SECONDS))s] $*" | tee -a "$OUT/summary.txt"; }
# seconds for a step: at most $1, never past the deadline (at least 5, so the step can fail cleanly)
budget() { local left=$((DEADLINE - SECONDS)); [ "$left" -lt "$1" ] && echo $((left > 5 ? left : 5)) || echo "$1"; }

log "gpu_check start in $(pwd) (git $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
if [ ! -f pipower/_gpu/ops.py ] || [ ! -f tests/test_gpu_ops.py ]; then
    log "not at the pipower repository root"
    exit 2
fi

{ echo "== nvidia-smi"; timeout "$(budget 30)" nvidia-smi; echo "rc=$?"; } >"$OUT/env.txt" 2>&1
log "nvidia-smi: $(grep -m1 -o 'NVIDIA [A-Z0-9].*' "$OUT/env.txt" | head -c 120 || echo 'not found')"

PROBE='import cupy, numpy, pytest; n = cupy.cuda.runtime.getDeviceCount(); assert n > 0, "no device"; print("devices", n)'
PY=""
for cand in "${PYTHON:-}" python3 /opt/torch/.venv/bin/python3; do
    [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 || continue
    echo "== probe $cand" >>"$OUT/env.txt"
    if timeout "$(budget 90)" "$cand" -c "$PROBE" >>"$OUT/env.txt" 2>&1; then
        PY="$cand"
        break
    fi
done

if [ -z "$PY" ]; then
    VENV="${TMPDIR:-/tmp}/pipower-gpu-venv"
    log "no Python with CuPy and a device: venv $VENV + pip install numpy pytest cupy-cuda12x"
    if ! timeout "$(budget 60)" python3 -m venv "$VENV" >"$OUT/install.log" 2>&1; then
        log "venv creation failed (install.log)"
        exit 2
    fi
    if ! timeout "$(budget 300)" "$VENV/bin/python" -m pip install numpy pytest cupy-cuda12x \
            >>"$OUT/install.log" 2>&1; then
        log "pip install failed or timed out (install.log: $(tail -n 1 "$OUT/install.log"))"
        exit 2
    fi
    PY="$VENV/bin/python"
fi
log "python: $PY; pipower from the source tree $(pwd)"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"

{
    echo "== versions"
    timeout "$(budget 60)" "$PY" -c 'import sys, numpy, cupy
print("python", sys.version.split()[0], sys.executable)
print("numpy", numpy.__version__, "cupy", cupy.__version__)
cupy.show_config()'
} >>"$OUT/env.txt" 2>&1
log "$(grep -m1 '^numpy' "$OUT/env.txt" || echo 'versions not read')"

log "pytest -m gpu tests/test_backend_ops.py tests/test_gpu_ops.py"
timeout "$(budget 300)" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --durations=15 \
    --junitxml="$OUT/junit-gpu.xml" -o junit_family=xunit2 tests/test_backend_ops.py tests/test_gpu_ops.py >"$OUT/pytest.log" 2>&1
rc=$?
summary=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/pytest.log" | tail -n 1)
if [ "$rc" -eq 124 ]; then
    log "pytest timed out"
elif [ "$rc" -eq 0 ] && ! grep -qE '[0-9]+ passed' "$OUT/pytest.log"; then
    log "no gpu test ran: ${summary:-no summary}"
    rc=3
fi
log "pytest rc=$rc: ${summary:-no summary line (see pytest.log)}"

# The hybrid scheduler with the real CupyOps (tests/test_hybrid.py, gpu variants). It imports the
# whole pipower package (safetensors, tokenizers, gguf, ... must be importable); without them this step
# is reported and skipped, the kernel verdict above stands.
if timeout "$(budget 60)" "$PY" -c 'import pipower.hybrid, pipower.model' >>"$OUT/env.txt" 2>&1; then
    log "pytest -m gpu tests/test_hybrid.py"
    timeout "$(budget 120)" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider \
        --junitxml="$OUT/junit-hybrid.xml" -o junit_family=xunit2 tests/test_hybrid.py >"$OUT/pytest-hybrid.log" 2>&1
    log "hybrid rc=$?: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/pytest-hybrid.log" | tail -n 1)"
else
    log "hybrid scheduler tests skipped: pipower's Python dependencies are not importable (env.txt)"
fi
# The hybrid benchmark (bench/hybrid.py) needs the CPU engine: build the Cython extension here if it is
# not importable yet (needs Cython and a C compiler on the image).
if timeout "$(budget 30)" "$PY" -c 'import pipower._cpu as c; assert c.AVAILABLE' >>"$OUT/env.txt" 2>&1 \
   || timeout "$(budget 240)" "$PY" setup.py build_ext --inplace -q >"$OUT/build.log" 2>&1; then
    log "bench/hybrid.py --device gpu --shape llama2-7b (budgets 25%, 50% of the FFN)"
    timeout "$(budget 400)" "$PY" bench/hybrid.py --device gpu --shape llama2-7b --weights q8 --budgets 0.25,0.5 \
        --tokens 16 --repeats 3 --out "$OUT/hybrid.json" >"$OUT/hybrid.log" 2>&1
    log "hybrid bench rc=$?: $(tail -n 3 "$OUT/hybrid.log" | tr '\n' ' ')"
    # Qwen2.5-Coder-1.5B's shape all on the GPU (random weights: the real ones cannot
    # be carried here), next to the CPU engine on the same shape
    log "bench/hybrid.py --shape qwen2.5-1.5b (all on device vs CPU)"
    timeout "$(budget 150)" "$PY" bench/hybrid.py --device gpu --shape qwen2.5-1.5b --weights q8 --budgets '' \
        --predictor-rank 0 --tokens 16 --repeats 3 --out "$OUT/hybrid-qwen1.5b.json" >"$OUT/hybrid-qwen1.5b.log" 2>&1
    log "qwen1.5b bench rc=$?: $(tail -n 3 "$OUT/hybrid-qwen1.5b.log" | tr '\n' ' ')"
    # the batched kernels: T-token forward cost in decode steps, and bitwise = T decode steps (rc 1 if not)
    log "bench/gpu_batch.py --shape qwen2.5-1.5b (T-cost, batch invariance)"
    timeout "$(budget 120)" "$PY" bench/gpu_batch.py --device gpu --shape qwen2.5-1.5b --weights q8,f16 \
        --tokens 1,2,4,8,16,32,64 --repeats 5 --out "$OUT/gpu-batch.json" >"$OUT/gpu-batch.log" 2>&1
    log "gpu batch bench rc=$?: $(tail -n 2 "$OUT/gpu-batch.log" | tr '\n' ' ')"
else
    log "hybrid bench skipped: the Cython extension is not importable and did not build (build.log)"
fi
log "gpu_check end"
exit "$rc"
