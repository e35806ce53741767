#!/usr/bin/env bash
# Issue 4's "show" runs: profile -> plot -> train predictors -> bench dense vs 3 predictor thresholds (one run),
# for SmolLM2-135M and Qwen2.5-Coder-0.5B (q8 weights, 2 threads). Resumable: a step whose output exists
# is skipped. Usage: bash results/sparsity/run.sh [smollm2-135m|qwen2.5-coder-0.5b ...]
set -euo pipefail
cd "$(dirname "$0")"
PIPOWER=${PIPOWER:-pipower}
for model in "${@:-smollm2-135m qwen2.5-coder-0.5b}"; do
  for m in $model; do
    mkdir -p "$m"
    # rank 128 for both in this run (the default is 256; 128 keeps the Qwen training inside one session)
    tokens=16384; rank=${RANK:-128}
    [ -f "$m/stats.safetensors" ] || /usr/bin/time -v $PIPOWER profile -m "$m" --tokens $tokens --target-sparsity 0.5 \
        --samples 16384 --out "$m/stats.safetensors" --plot "$m/frequencies.png" > "$m/profile.log" 2>&1
    [ -f "$m/predictors.safetensors" ] || /usr/bin/time -v $PIPOWER train-predictors --stats "$m/stats.safetensors" \
        --rank $rank --out "$m/predictors.safetensors" > "$m/train.log" 2>&1
    [ -f "$m/bench-thresholds.json" ] || $PIPOWER bench -m "$m" --predictors "$m/predictors.safetensors" \
        --pred-thresholds 0,1,2 --tokens 32 --repeats 5 --json > "$m/bench-thresholds.json"
  done
done
