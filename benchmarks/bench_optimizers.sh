#!/usr/bin/env bash
# Peak memory and steps/s of the SD 1.5-shaped full fine-tune (64 px, batch 1, fp32) with each optimizer
# issue 20 asks about, with and without --fused_backward_pass, one run after the other (each holds up to
# ~14 GiB; on a shared machine run the whole script under the lock). Results go to benchmarks/results.jsonl;
# benchmarks/optimizers.md reads them.
# usage: flock /tmp/sdft-heavy.lock benchmarks/bench_optimizers.sh [STEPS]   (timed steps after one warm-up; default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-3}
first=$(( $(wc -l < benchmarks/results.jsonl) + 1 ))
for optimizer in AdamW AdamW8bit Lion8bit CAME Adafactor; do
  for fused in "" "--fused_backward_pass"; do
    echo "$(date -u +%FT%TZ) $optimizer ${fused:-unfused} load: $(uptime | sed 's/.*load average: //')"
    .venv/bin/python benchmarks/bench_train.py --model sd15-shaped --steps "$steps" \
      --warmup-steps 1 -- --optimizer_type "$optimizer" $fused 2>&1 | grep -E "steps/s|peak|RSS|trainable|rror" || true
  done
done
# The lines these runs appended, as the table in benchmarks/optimizers.md.
tail -n "+$first" benchmarks/results.jsonl | .venv/bin/python -c '
import json, sys
print("| optimizer | fused backward | peak RSS | RSS at last step | estimate | steps/s | s/step | load before/after |")
print("|---|---|---|---|---|---|---|---|")
for r in map(json.loads, sys.stdin):
    load = r["load_average_1min"]
    print("| %s (%s) | %s | %.1f GiB | %.1f GiB | %.1f GiB | %.3f | %.1f | %.1f / %.1f |" % (
        r["optimizer_flag"], r["optimizer"], "yes" if r["fused_backward_pass"] else "no", r["peak_rss_mib"] / 1024,
        r["rss_mib_at_last_step"] / 1024, r["estimated_mib"] / 1024, r["steps_per_s"], r["s_per_step"],
        load["before"], load["after"]))
'
