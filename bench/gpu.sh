#!/usr/bin/env bash
# The one script a lent GPU machine runs, in a single call, in under 9 minutes:
#   1. install fastpeft against the machine's own torch/triton/transformers/peft (no registry);
#   2. the gpu-marked tests on real CUDA (TRITON_INTERPRET=0: compiled kernels, bf16 included);
#   3. `fastpeft bench` (CUDA shapes), one section at a time into bench-out/<section>/.
# Every step and every bench section has its own timeout, and a failing one does not stop the
# next: a slow section costs its own table, not the others'. The last thing printed is the card,
# date, commit, step statuses and the bench's Markdown tables: paste that block into
# bench/RESULTS.md. If $OUT is set (the device runner's output folder), bench-out/ and the logs
# are copied there. BENCH_ARGS (default "--device cuda") lets a CPU machine dry-run the script:
#   BENCH_ARGS="--device cpu --quick" bash bench/gpu.sh /tmp/dry
#
# usage: bash bench/gpu.sh [OUT_DIR]        (default OUT_DIR: bench-out)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
BENCH_OUT=${1:-bench-out}
case $BENCH_OUT in /*) ;; *) BENCH_OUT="$ROOT/$BENCH_OUT" ;; esac
LOGS=$(mktemp -d)
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
PY=${PYTHON:-python}

# budgets in seconds: 60 + 30 + 120 + (40 + 55 + 45 + 75 + 25) = 450 s, 7.5 min (+10 s kill
# grace for each step that times out) for nf4 with its autotuning, multi with a 1000-adapter
# bank, methods incl. qlora, and decode cases timed eagerly and again from CUDA graphs.
# Estimates, not measurements: the first GPU run should trim or rebalance them.
T_INSTALL=60 T_INFO=30 T_TESTS=120
BENCH_SECTIONS=(kernels:40 nf4:55 multi:45 methods:75 training:25)
read -r -a BENCH_ARGS <<<"${BENCH_ARGS:---device cuda}"

card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
card=${card:-"unknown (nvidia-smi failed)"}
commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) || commit="unknown (no git)"
when=$(date -u '+%Y-%m-%d %H:%M UTC')
echo "== fastpeft gpu run: $card, $when, commit $commit"

step() {  # step NAME SECONDS CMD...: run with a timeout, log to $LOGS/NAME.log, echo its status
    local name=$1 secs=$2; shift 2
    local t0=$SECONDS rc
    timeout -k 10 "$secs" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    local how="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then how="TIMEOUT after ${secs}s"
    elif [ "$rc" -eq 5 ] && [ "$name" = tests ]; then how="no tests collected"
    elif [ "$rc" -ne 0 ]; then how="FAILED (exit $rc)"; fi
    echo "== $name: $how, $((SECONDS - t0)) s"
    return "$rc"
}

# 1. install: no deps, no build isolation, no index: the machine's own packages only.
step install "$T_INSTALL" "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
rc_install=$?
RUN_DIR=$ROOT
if [ "$rc_install" -eq 0 ]; then
    if command -v fastpeft >/dev/null 2>&1; then FASTPEFT=(fastpeft); else FASTPEFT=("$PY" -m fastpeft); fi
else
    # Fallback (e.g. a setuptools too old for this pyproject): import the tree in place through
    # a shadow package whose `kernels` entry maps kernels/ to fastpeft.kernels, run from there.
    tail -n 12 "$LOGS/install.log"
    SHADOW=$(mktemp -d)
    mkdir "$SHADOW/fastpeft"
    for f in "$ROOT"/fastpeft/*; do ln -s "$f" "$SHADOW/fastpeft/"; done
    ln -s "$ROOT/kernels" "$SHADOW/fastpeft/kernels"
    RUN_DIR=$SHADOW
    FASTPEFT=("$PY" -m fastpeft)
    echo "== install failed: running fastpeft from the tree via $SHADOW"
fi
cd "$RUN_DIR"
step info "$T_INFO" "${FASTPEFT[@]}" info
cat "$LOGS/info.log"

# 2. GPU tests (exit 5 = none collected).
if [ "$RUN_DIR" = "$ROOT" ]; then
    step tests "$T_TESTS" "$PY" -m pytest -m gpu -q tests
else
    step tests "$T_TESTS" "$PY" -m pytest -c "$ROOT/pyproject.toml" --rootdir "$ROOT" -m gpu -q "$ROOT/tests"
fi
rc_tests=$?
tail -n 25 "$LOGS/tests.log"
case $rc_tests in
    0) if grep -q ' passed' "$LOGS/tests.log"; then tests_status="passed"
       else tests_status="nothing ran"; fi ;;
    5) tests_status="no gpu tests collected" ;;
    124|137) tests_status="TIMEOUT after ${T_TESTS}s" ;;
    *) tests_status="FAILED (exit $rc_tests)" ;;
esac
tests_line=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$LOGS/tests.log" | tail -n1)

# 3. the bench, a section at a time: tables on stdout, notes on stderr.
rc_bench=0 bench_status=""
: >"$LOGS/bench.md"
for entry in "${BENCH_SECTIONS[@]}"; do
    section=${entry%%:*} secs=${entry##*:} t0=$SECONDS
    timeout -k 10 "$secs" "${FASTPEFT[@]}" bench "${BENCH_ARGS[@]}" --no-progress --sections "$section" \
        --out "$BENCH_OUT/$section" >"$LOGS/bench-$section.md" 2>"$LOGS/bench-$section.err"
    rc=$?
    how="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then how="TIMEOUT after ${secs}s"
    elif [ "$rc" -ne 0 ]; then how="FAILED (exit $rc)"; fi
    echo "== bench $section: $how, $((SECONDS - t0)) s"
    if [ "$rc" -ne 0 ]; then rc_bench=1; tail -n 20 "$LOGS/bench-$section.err"; fi
    bench_status+="${bench_status:+, }$section $how"
    cat "$LOGS/bench-$section.md" >>"$LOGS/bench.md"
done

if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    mkdir -p "$OUT/logs" && cp "$LOGS"/* "$OUT/logs/" 2>/dev/null
    [ -d "$BENCH_OUT" ] && cp -r "$BENCH_OUT" "$OUT/" 2>/dev/null
fi

# Last: the block to record in bench/RESULTS.md.
echo
echo "### $card — $when — commit $commit"
echo
echo "- install: $([ "$rc_install" -eq 0 ] && echo ok || echo "FAILED (exit $rc_install)")"
echo "- gpu tests (\`pytest -m gpu\`): $tests_status${tests_line:+ — $tests_line}"
echo "- bench: $bench_status"
echo
cat "$LOGS/bench.md"

if [ "$rc_install" -ne 0 ] || [ "$rc_bench" -ne 0 ] || { [ "$rc_tests" -ne 0 ] && [ "$rc_tests" -ne 5 ]; }; then
    exit 1
fi
