#!/usr/bin/env bash
# Screen training levers on the real data, one full default-length run per variant, one after another.
#
#   nohup benchmarks/ablation.sh ../shared/data/fashion-mnist > runs/ablation.log 2>&1 &
#
# Variants are the lines "name flags..." of benchmarks/ablation_variants.txt, re-read before each run, so
# lines may be added while it runs. Each writes runs/ablation/NAME/ (metrics.json, plots, model, log).
# Interrupted? Start it again: finished variants are skipped, an unfinished one goes on with --resume.
# To stop after the current variant: touch runs/ablation/PAUSE (removed when the script starts again).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: benchmarks/ablation.sh DATA_DIR}
list=benchmarks/ablation_variants.txt

next_variant() {
    grep -v '^\s*\(#\|$\)' "$list" | while read -r name flags; do
        done_file=runs/ablation/$name/metrics.json unfinished=runs/ablation/$name/.model.resume
        [ -e "$done_file" ] && [ ! -d "$unfinished" ] || { echo "$name $flags"; break; }
    done
}

rm -f runs/ablation/PAUSE
while line=$(next_variant) && [ -n "$line" ]; do
    [ -e runs/ablation/PAUSE ] && { echo "$(date -u +%FT%TZ) paused (runs/ablation/PAUSE)"; exit 0; }
    read -r name flags <<< "$line"
    out=runs/ablation/$name
    mkdir -p "$out"
    resume=()
    [ -d "$out/.model.resume" ] && resume=(--resume)
    echo "$(date -u +%FT%TZ) start $name: $flags ${resume[*]}"
    # shellcheck disable=SC2086  # flags are words on purpose
    if ! python3 ConvolutionalNN.py --data-dir "$data" --plots-dir "$out" --model-path "$out/model.keras" \
            $flags "${resume[@]}" >> "$out/log.txt" 2>&1; then
        echo "$(date -u +%FT%TZ) $name failed (see $out/log.txt)"; exit 1
    fi
    echo "$(date -u +%FT%TZ) done $name: $(grep -o 'Test accuracy: .*' "$out/log.txt" | tail -1)"
done
echo "$(date -u +%FT%TZ) all variants done"
