#!/usr/bin/env bash
# What a GPU machine of the `device` tool needs to run the product benchmarks, and the runs themselves.
#
#   bench/device_kit.sh pack            (here) fill .devrun/: wheels for the device's Python 3.12 (what its
#                                       image lacks: aiortc, PyAV, aiohttp, pydantic, ...), silero-vad's ONNX
#                                       model, and the fixture files a real-size checkpoint is built from
#   bash bench/device_kit.sh run PLAN   (on the device, from the copied working tree) install the wheels, restore
#                                       those fixture files, run PLAN's benchmarks; every result lands in
#                                       $OUT/runs.tgz and the log in $OUT/log.txt
#
# The working tree travels with each call (64 MiB at most) and tests/fixtures alone is ~40 MiB, PyAV's wheel 36:
# before a call, `mv tests/fixtures /tmp/fixtures-hold` (back after it), and pass carry [".devrun"] (.devrun/ is
# ignored through .git/info/exclude; `pack` adds it there). docs/PERFORMANCE.md records what each plan measured.
#
# Plans (several may be named; they share one real-size checkpoint, built first, ~60 s):
#   omniab    omni 48 with and without frames ahead, on one server, then bench/units_report.py on both
#   omniabt   the same under the shipped H100 table (on an H200: the H100's capacity and memory budget)
#   omniopen  omni 48 with its units opened ahead (`prefill_ahead`), then without, on one server
#   (one plan per call: each takes ~550 s of the 600 a command may run, most of it the server's warm-up)
#   audio     audio 64
#   product   omni 48 and audio 64 on one server (the two targets)
set -euo pipefail

KIT=.devrun
REAL_DIR=/tmp/realsize
H100_TABLE=MiniCPMO45/engine/capacity_tables/h100-80gb.json
E2E=(--gpus 0 --build-realsize "$REAL_DIR" --seconds 15 --warmup 4 --client-procs 8)
# the runtime's packages and their needs, as pinned in requirements.txt; torch, numpy, Pillow, tokenizers,
# safetensors, onnxruntime and PyYAML are in the device's image
WHEELS=(
    aiohappyeyeballs==2.7.1 aiohttp==3.14.5 aioice==0.13.0 aiortc==1.16.0 aiosignal==1.4.0 annotated-types==0.8.0
    attrs==26.1.0 av==18.1.0 cffi==2.1.1 cryptography==50.0.2 dnspython==2.9.2 frozenlist==1.8.0
    google-crc32c==1.9.0 idna==3.21 ifaddr==0.2.0 multidict==7.2.1 packaging==26.4 propcache==0.5.4
    pycparser==3.12 pydantic==2.14.4 pydantic-core==2.50.5 pyee==13.0.1 pylibsrtp==1.0.0 pyOpenSSL==26.4.0
    typing-inspection==0.4.5 yarl==1.25.1
)
# chat's VAD needs only the ONNX model of this wheel (11 MB in all; the model 2.3): `pack` keeps just that
VAD_WHEEL=silero-vad==6.2.3
FIXTURE_FILES=(minicpmo45-fullsize-config.json minicpmo45-tiny/model/{vocab.json,merges.txt,added_tokens.json}
    minicpmo45-tiny/model/{tokenizer_config.json,special_tokens_map.json,preprocessor_config.json}
    minicpmo45-tiny/model/generation_config.json)

pack() {
    local fixtures=${MINICPMO45_FIXTURES:-tests/fixtures}
    grep -qx '/.devrun/' .git/info/exclude 2>/dev/null || echo '/.devrun/' >>.git/info/exclude
    mkdir -p "$KIT/whl" "$KIT/fixtures/minicpmo45-tiny/model"
    local platforms=()
    for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 "${platforms[@]}" -d "$KIT/whl" "${WHEELS[@]}"
    local vad
    vad=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$vad" "$VAD_WHEEL"
    mkdir -p "$KIT/site/silero_vad/data"
    : >"$KIT/site/silero_vad/__init__.py"
    unzip -q -o -j "$vad"/silero_vad-*.whl silero_vad/data/silero_vad.onnx -d "$KIT/site/silero_vad/data"
    rm -r "$vad"
    for f in "${FIXTURE_FILES[@]}"; do cp "$fixtures/$f" "$KIT/fixtures/$f"; done
    du -sh "$KIT"
    echo "next: mv tests/fixtures /tmp/fixtures-hold, the device call (carry [\"$KIT\"]), then move it back"
}

# PLAN -> the e2e levels (`--runs`) and extra flags of that plan, in RUNS and EXTRA; false for an unknown plan
plan_levels() {
    EXTRA=()
    case "$1" in
        omniab) RUNS=(omni_duplex:48 omni_duplex:48:frames_ahead=false) ;;
        omniabt) RUNS=(omni_duplex:48 omni_duplex:48:frames_ahead=false); EXTRA=(--capacity-table "$H100_TABLE") ;;
        omniopen) RUNS=(omni_duplex:48:prefill_ahead=true omni_duplex:48) ;;
        audio) RUNS=(audio_duplex:64) ;;
        product) RUNS=(omni_duplex:48 audio_duplex:64) ;;
        *) return 1 ;;
    esac
}

on_device() {
    [ $# -gt 0 ] || { echo "name a plan" >&2; return 2; }
    for plan in "$@"; do  # before anything is installed: a misspelt plan costs no device time
        plan_levels "$plan" || { echo "unknown plan $plan" >&2; return 2; }
    done
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$KIT"/whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/$KIT/site PYTHONUNBUFFERED=1
    mkdir -p tests/fixtures
    cp -rn "$KIT"/fixtures/. tests/fixtures/
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import torch, aiortc, av; print("torch", torch.__version__, "aiortc", aiortc.__version__, "av", av.__version__)'
    local results=/tmp/results
    mkdir -p "$results"
    for plan in "$@"; do
        plan_levels "$plan"
        echo "== $plan $(date -u +%T)"
        python3 bench/e2e.py "${E2E[@]}" "${EXTRA[@]}" --out "$results/$plan" --runs "${RUNS[@]}" || echo "$plan: exit $?"
        for units in "$results/$plan"/units-*.jsonl; do
            [ -e "$units" ] && python3 bench/units_report.py "$units" || true
        done
        tar -C "$results" -czf "$OUT/runs.tgz" .  # after every plan: what ran comes back if a later one runs out of time
    done
}

case "${1:-}" in
    pack) pack ;;
    run) shift; on_device "$@" 2>&1 | tee "$OUT/log.txt"; exit "${PIPESTATUS[0]}" ;;
    *) sed -n '2,20p' "$0"; exit 2 ;;
esac
