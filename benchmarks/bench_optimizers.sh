#!/usr/bin/env bash
# Peak memory and steps/s of the SD 1.5-shaped full fine-tune (64 px, batch 1, fp32) with each optimizer
# issue 20 asks about, with and without --fused_backward_pass, one run after the other (each holds up to
# ~14 GiB; on a shared machine run the whole script under the lock). Results go to benchmarks/results.jsonl;
# benchmarks/optimizers.md reads them.
# usage: flock /tmp/sdft-heavy.lock benchmarks/bench_optimizers.sh [STEPS]   (timed steps after one warm-up; default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-3}
for optimizer in AdamW AdamW8bit Lion8bit CAME Adafactor; do
  for fused in "" "--fused_backward_pass"; do
    echo "$(date -u +%FT%TZ) $optimizer ${fused:-unfused} load: $(uptime | sed 's/.*load average: //')"
    .venv/bin/python benchmarks/bench_train.py --model sd15-shaped --steps "$steps" \
      --warmup-steps 1 -- --optimizer_type "$optimizer" $fused 2>&1 | grep -E "steps/s|peak|RSS|trainable|rror" || true
  done
done
