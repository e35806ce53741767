#!/usr/bin/env bash
# Issue 6's runs, in priority order; every step is resumable (rerun the script after a kill: finished
# points are reused, a cut point resumes at its first missing problem).
# Usage: bash results/humaneval/run_study.sh   (from the repository root; PIPOWER=... to override)
set -euo pipefail
cd "$(dirname "$0")/../.."
PIPOWER=${PIPOWER:-pipower}
COMMON="--mode chat --threads 2 -n 384"
Q=results/humaneval/qwen2.5-coder-0.5b-chat-sweep
S=results/humaneval/smollm2-135m-chat-sweep
QP=results/sparsity/qwen2.5-coder-0.5b/predictors.safetensors
QS=results/sparsity/qwen2.5-coder-0.5b/stats.safetensors       # both from results/sparsity/run.sh
# Oracle points: per-layer tau_act calibrated to skip this fraction of (token, neuron) pairs. Qwen's
# Pass@1 collapses between 0.5 and 0.7, so the later points fill that interval (0.4, 0.6).
# 1. Qwen2.5-Coder-0.5B dense + the first oracle points
$PIPOWER sweep humaneval -m qwen2.5-coder-0.5b $COMMON --target-sparsities 0.25,0.5,0.7 --out $Q
# 2. SmolLM2-135M (the small-model point): dense + oracle sweep
$PIPOWER sweep humaneval -m smollm2-135m $COMMON --target-sparsities 0.25,0.5,0.6,0.7 --out $S
# 3. Qwen: the predictor sweep (finished oracle points are reused at once)
$PIPOWER sweep humaneval -m qwen2.5-coder-0.5b $COMMON --target-sparsities 0.25,0.5,0.7 \
    --pred-thresholds 0,1,2 --predictors "$QP" --out $Q
# 4. placement at two budgets (~25% and ~50% of the FFN hot, q8, after 231 MiB of attention/output/
#    norms/KV and the 96 MiB scratch reserve): the hybrid scheduler (device emulated on the CPU engine
#    when there is no GPU). Pass@1 must equal dense.
$PIPOWER sweep humaneval -m qwen2.5-coder-0.5b $COMMON --target-sparsities 0.25,0.4,0.5,0.7 \
    --pred-thresholds 0,1,2 --predictors "$QP" --vram-budgets 406MiB,486MiB --stats "$QS" --out $Q
# 5. Qwen2.5-Coder-1.5B (the larger-model point) on the CPU, ~20-30 min per point on the 2 cores: dense,
#    the oracle point where the 0.5B model's Pass@1 drops (0.5), the mild one (0.25), the collapse (0.7).
L=results/humaneval/qwen2.5-coder-1.5b-chat-sweep
$PIPOWER sweep humaneval -m qwen2.5-coder-1.5b $COMMON --target-sparsities 0.5,0.25,0.7 --out $L
# 6. the collapse interval of the small models (0.6 for Qwen, 0.4 for SmolLM2).
$PIPOWER sweep humaneval -m qwen2.5-coder-0.5b $COMMON --target-sparsities 0.25,0.4,0.5,0.6,0.7 \
    --pred-thresholds 0,1,2 --predictors "$QP" --vram-budgets 406MiB,486MiB --stats "$QS" --out $Q
$PIPOWER sweep humaneval -m smollm2-135m $COMMON --target-sparsities 0.25,0.4,0.5,0.6,0.7 --out $S
