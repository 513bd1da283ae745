#!/usr/bin/env bash
# Every run whose numbers appear in README.md and docs/: each writes the JSON file that the
# docs' generated blocks name, then `python -m gald.bench.docs` rewrites those blocks. Run it
# from the repository root on an idle machine (about 40 minutes on a 2-core CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
run() { echo "+ python -m gald.bench $*" >&2; python -m gald.bench --quiet "$@" >/dev/null; }
d=docs/data

# the GA table, the LD against the authors, the figure (README, benchmarks page)
run --ga all --ld --json "$d/all.json" --plot docs/benchmarks.png
# run-to-run spread: the same commands twice, one after the other (benchmarks page)
for i in 1 2; do run --shape 1,64,33,33 --json "$d/spread-small-$i.json"; done
for i in 1 2; do run --json "$d/spread-default-$i.json"; done
# the LD against the authors in both memory formats and thread counts (performance page)
for i in 1 2; do
  run --ga none --ld --json "$d/ld-nchw-$i.json"
  run --ga none --ld --channels-last --json "$d/ld-cl-$i.json"
done
run --ga none --ld --threads 1 --json "$d/ld-nchw-1thread.json"
run --ga none --ld --threads 1 --channels-last --json "$d/ld-cl-1thread.json"
# the same at a small map, where the per-call cost decides (performance page)
run --ga none --ld --shape 1,64,33,33 --json "$d/ld-small.json"
run --ga none --ld --shape 1,64,33,33 --threads 1 --json "$d/ld-small-1thread.json"
# each GA alone: parameters, FLOPs, saved bytes; no timing (GA page)
run --ga all --cost --json "$d/cost.json"
# first-call latency in fresh processes (performance page)
run --ga none --first-call --json "$d/first-call.json"
# the paired-seed ablation of the LD (the "what the LD does" page)
echo "+ python -m gald.bench --ablation --json $d/ablation.json" >&2
python -m gald.bench --ablation --json "$d/ablation.json" >/dev/null
echo "+ python -m gald.bench --ablation --seeds 5 --no-final-act --offset 1 --json $d/ablation-free-gate.json" >&2
python -m gald.bench --ablation --seeds 5 --no-final-act --offset 1 \
  --json "$d/ablation-free-gate.json" >/dev/null

python -m gald.bench.docs
