#!/usr/bin/env bash
# One call on a lent GPU machine (device tool), sized for its real budget: 15 minutes of device time per issue, the
# machine's start (1-2 min) included. Tiers run most valuable first; each step's results land in $OUT as it ends, so a
# cut-off run keeps everything finished before the cut:
#   a (done by 3.5 min): offline install + build of ditkern._C for this GPU, `python -m ditkern info`, every op test
#                        (tests/ops, one process and log per file, all files at once), compute-sanitizer memcheck
#                        on the CUDA op tests
#   b (done by 6 min):   one bench shape per op against its baselines (`python -m bench.run --tier b`)
#   c (done by 8 min):   the end-to-end table (bench.e2e, FLUX.1-dev 1024x1024, 8 steps), the rest of the test suite,
#                        the rest of the benchmarks (--tier c), racecheck
# The deadlines are cumulative (time a leaves is b's), every step runs under `timeout`, and a failing step never
# stops the next. $OUT/SUMMARY.md (status and seconds per step and tier, GPU, date, git sha) is rewritten after
# every step.
#
# Usage, from the repo root (the device tool's working directory). Its copy of the tree has no .git: write the sha
# into the command here, e.g. the device command `DITKERN_GIT_SHA=a9ed96d8935e bash bench/gpu_suite.sh`, with the
# value `git rev-parse --short=12 HEAD` prints on this side (add -dirty for uncommitted changes).
#   bash bench/gpu_suite.sh --dry-run      (or GPU_SUITE_DRY_RUN=1): print the plan, check every command parses
# Budgets (seconds): GPU_SUITE_BUDGET_A=210 _B=150 _C=120 (per tier; a + b <= 360, the whole <= 480).
# Device call: timeout_s >= 540; carry [".whl"] when it holds wheels (bench/fetch_wheels.sh fetches them: diffusers
# is not on the GPU machine). Results in $OUT (at most 8 files come back):
#   SUMMARY.md, logs.tar.gz (every log, re-packed after each step), bench/<date>_<sha>.{json,csv,md} (tier b,
#   rewritten after every case), e2e.md, bench_c.md + bench_c.json (tier c)
set -uo pipefail

DRY=${GPU_SUITE_DRY_RUN:-0}
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_suite: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/ditkern-gpu-out}
STAGE=${GPU_SUITE_STAGE:-/tmp/ditkern-gpu-suite}
LOGS=$STAGE/logs
BUDGET_A=${GPU_SUITE_BUDGET_A:-210}
BUDGET_B=${GPU_SUITE_BUDGET_B:-150}
BUDGET_C=${GPU_SUITE_BUDGET_C:-120}
export PYTHONUNBUFFERED=1
OP_TESTS=$(echo tests/ops/test_*.py)  # one line: it is spliced into the step commands
# the ops with a CUDA C++ kernel (csrc/<op>/): their tests go under compute-sanitizer
CUDA_TESTS="tests/ops/test_adaln_modulate.py tests/ops/test_taylor.py tests/ops/test_fpx_linear.py tests/ops/test_moe.py"

if [[ -n ${DITKERN_GIT_SHA:-} ]]; then
  SHA=$DITKERN_GIT_SHA
elif SHA=$(git rev-parse --short=12 HEAD 2>/dev/null); then
  [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && SHA="$SHA-dirty"
else
  SHA=unknown
  echo "gpu_suite: no .git here and DITKERN_GIT_SHA unset: results will say git 'unknown'" >&2
fi
SHA=$(tr -c 'A-Za-z0-9._\n-' '-' <<<"$SHA")  # it names result files, which must stay plain to come back
export DITKERN_GIT_SHA=$SHA

T0=$(date +%s)
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
now() { echo $(($(date +%s) - T0)); }
DEADLINE=0 TIER=""
declare -a ROWS=()
PARSE_ERRORS=0

# ---- bookkeeping ------------------------------------------------------------------------------------------------------
pack() { # every log so far -> $OUT/logs.tar.gz (written aside, then renamed: never a half-written archive)
  tar -czf "$OUT/logs.tgz.part" -C "$STAGE" logs 2>/dev/null && mv "$OUT/logs.tgz.part" "$OUT/logs.tar.gz"
}

summary() {
  local gpu
  gpu=$(cat "$LOGS/gpu_name.txt" 2>/dev/null || echo "unknown")
  {
    echo "# ditkern GPU suite"
    echo
    echo "- GPU: $gpu"
    echo "- started: $STARTED, elapsed: $(now) s; git: $SHA"
    echo "- budgets: a ${BUDGET_A} s, b ${BUDGET_B} s, c ${BUDGET_C} s (cumulative deadlines $BUDGET_A / $((BUDGET_A + BUDGET_B)) / $((BUDGET_A + BUDGET_B + BUDGET_C)) s)"
    echo "- logs: logs.tar.gz (logs/<tier>_<step>.log); tier b results: bench/; tier c: bench_c.md, bench_c.json"
    echo
    echo "| tier | status | seconds |"
    echo "|---|---|---|"
    local t
    for t in a b c; do
      local n=0 bad=0 secs=0 r
      for r in "${ROWS[@]}"; do
        IFS=$'\t' read -r rt _ st s _ _ <<<"$r"
        [[ $rt == "$t" ]] || continue
        n=$((n + 1)) secs=$((secs + s))
        [[ $st == ok || $st == skipped* ]] || bad=$((bad + 1))
      done
      if ((n == 0)); then echo "| $t | not started | |"; elif ((bad)); then echo "| $t | $bad of $n steps not ok | $secs |"; else echo "| $t | ok ($n steps) | $secs |"; fi
    done
    echo
    echo "| tier | step | status | seconds | budget | detail |"
    echo "|---|---|---|---|---|---|"
    local r
    for r in "${ROWS[@]}"; do
      IFS=$'\t' read -r rt name st s b detail <<<"$r"
      echo "| $rt | $name | $st | $s | $b | $detail |"
    done
  } >"$OUT/SUMMARY.md"
}

pytest_counts() { # the last "N passed, M failed ..." line of a pytest log, or its last line
  local line
  line=$(grep -E '[0-9]+ (passed|failed|error|skipped|deselected)' "$1" 2>/dev/null | tail -1 | tr -d '=' | sed 's/^ *//;s/ *$//')
  [[ -n $line ]] && echo "$line" || tail -1 "$1" 2>/dev/null | cut -c1-120 | tr '|' '/'
}

tier() { # tier NAME BUDGET: its deadline is cumulative
  TIER=$1
  DEADLINE=$((DEADLINE + $2))
  ((DRY)) && echo "== tier $1: ends by ${DEADLINE} s"
}

# step NAME CAP CMD [DETAIL_FN]: run CMD (bash) under a timeout of min(CAP, time to the tier deadline); CMD sees a
# slightly shorter budget as $BUDGET (for timeouts of its own). Its output -> logs/<tier>_<name>.log.
step() {
  local name=$1 cap=$2 cmd=$3 detail_fn=${4:-}
  local log="$LOGS/${TIER}_${name}.log"
  if ((DRY)); then
    printf '  [%s] %-10s <= %4s s -> logs/%s_%s.log\n' "$TIER" "$name" "$cap" "$TIER" "$name"
    sed 's/^/        /' <<<"$cmd"
    if ! bash -n -c "$cmd"; then
      echo "  !! [$TIER] $name: the command does not parse" >&2
      PARSE_ERRORS=$((PARSE_ERRORS + 1))
    fi
    return 0
  fi
  local left=$((DEADLINE - $(now)))
  local budget=$((cap < left ? cap : left)) note=""
  ((budget < cap)) && note="cut to ${budget} s by the tier deadline; "
  if ((budget < 5)); then
    ROWS+=("$TIER"$'\t'"$name"$'\t'"skipped: tier budget spent"$'\t'0$'\t'"$cap"$'\t'"")
    summary
    echo "gpu_suite: [$TIER] $name skipped (tier $TIER budget spent)"
    return 0
  fi
  echo "gpu_suite: [$TIER] $name (budget ${budget} s) ..."
  local t0 rc status dt
  t0=$(date +%s)
  # a step's own timeouts use $BUDGET, a few seconds short of the step's, so what follows them (a summary line, a
  # copy of partial results) still runs
  BUDGET=$((budget > 8 ? budget - 4 : budget)) timeout -k 5 "$budget" bash -c "$cmd" >"$log" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT (${budget} s)" ;;
    *) status="FAIL (rc $rc)" ;;
  esac
  local detail=""
  [[ -n $detail_fn ]] && detail=$($detail_fn "$log" 2>/dev/null | tr '\n|' '; ' | cut -c1-300)
  ROWS+=("$TIER"$'\t'"$name"$'\t'"$status"$'\t'"$dt"$'\t'"$budget"$'\t'"$note$detail")
  summary
  pack
  echo "gpu_suite: [$TIER] $name: $status in ${dt} s -> $OUT/logs.tar.gz (logs/${TIER}_${name}.log), $OUT/SUMMARY.md"
}

# ---- step bodies (bash snippets; run under `bash -c`, so they must stand alone) -------------------------------------
ENV_CMD="nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader | tee $LOGS/gpu_name.txt
nvidia-smi
$PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)'"

# wheels (carried .whl: diffusers and what the machine lacks) -> /tmp/site; then build ditkern._C for this GPU only
INSTALL_CMD="set -e
if compgen -G '.whl/*.whl' >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  echo 'wheels -> /tmp/site:' .whl/*.whl
else
  echo 'no .whl/ carried: diffusers-dependent tests and the MoE bench will report it missing'
fi
cap=\$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
case \$cap in 90) arch=90a ;; 100) arch=100a ;; '') arch=90a ;; *) arch=\$cap ;; esac
echo \"building ditkern._C for sm_\$arch\"
DITKERN_CUDA_ARCH=\${DITKERN_CUDA_ARCH:-\$arch} $PY -m pip install --no-build-isolation --no-deps -e .
$PY -c 'import ditkern._C as c; print(\"ditkern._C:\", c.__file__)'"

INFO_CMD="$PY -m ditkern info"

# pytest-timeout is on the GPU image; a hung test then fails alone instead of eating the file's budget
PT_TIMEOUT="\$($PY -c 'import pytest_timeout' 2>/dev/null && echo --timeout=60)"

# every op test file in its own process (a CUDA fault poisons only its own file), all at once; each log and JUnit XML
# in logs/, one summary line per file at the end of this step's log
OPS_CMD="pids=()
for f in $OP_TESTS; do
  n=\$(basename \$f .py)
  timeout -k 5 \$BUDGET $PY -m pytest -q -ra -p no:cacheprovider --durations=5 $PT_TIMEOUT \
    --junitxml=$LOGS/a_\$n.xml \$f >$LOGS/a_\$n.log 2>&1 &
  pids+=(\$!)
done
rc=0; i=0
for f in $OP_TESTS; do
  wait \${pids[\$i]}; r=\$?; i=\$((i + 1)); n=\$(basename \$f .py)
  last=\$(grep -E '[0-9]+ (passed|failed|error)' $LOGS/a_\$n.log | tail -1 | tr -d '=')
  [ \$r -eq 124 ] && last=\"TIMEOUT after \$BUDGET s; \$last\"
  echo \"\$n: rc \$r: \$last\"
  [ \$r -eq 0 ] || rc=1
done
exit \$rc"
ops_detail() { grep -E '^test_[a-z0-9_]+: rc' "$1" | grep -v 'rc 0' | sed 's/^/not ok: /' | head -8; grep -c ': rc 0' "$1" | sed 's/$/ files ok/'; }

# memcheck needs the caching allocator off, or an out-of-bounds access inside a pooled block goes unseen
SAN_CMD="command -v compute-sanitizer >/dev/null || { echo 'compute-sanitizer not found'; exit 3; }
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 5 \$BUDGET compute-sanitizer --tool memcheck --error-exitcode 9 \
  --print-limit 30 $PY -m pytest -q -p no:cacheprovider -k 'cuda and not compile' $CUDA_TESTS"
san_detail() { grep -E 'ERROR SUMMARY|[0-9]+ (passed|failed)|not supported|not found' "$1" | tail -3; }

RACE_CMD="command -v compute-sanitizer >/dev/null || { echo 'compute-sanitizer not found'; exit 3; }
timeout -k 5 \$BUDGET compute-sanitizer --tool racecheck --error-exitcode 9 --print-limit 30 \
  $PY -m pytest -q -p no:cacheprovider -m 'not gpu' -k 'cuda and not compile' $CUDA_TESTS"

BENCH_B_CMD="$PY -m bench.run --tier b --out $OUT/bench"  # writes into \$OUT after every case
bench_detail() { grep -E '^bench.run: (wrote|results)' "$1" | tail -3; grep -cE '^\| ' "$1" | sed 's/$/ table lines/'; }

# tests/ops ran in tier a; the GPU-less compile checks (minutes of CPU for four architectures) are CI's job
TESTS_C_CMD="$PY -m pytest tests -q -ra -p no:cacheprovider --ignore=tests/ops --ignore=tests/test_compile.py \
  --ignore=tests/test_cuda_build.py $PT_TIMEOUT --junitxml=$LOGS/c_tests.xml"

BENCH_C_CMD="timeout -k 5 \$BUDGET $PY -m bench.run --tier c --out $STAGE/bench_c
rc=\$?
for f in \$(ls -t $STAGE/bench_c/*.md 2>/dev/null | head -1); do cp \$f $OUT/bench_c.md; cp \${f%.md}.json $OUT/bench_c.json; done
exit \$rc"

# the end-to-end table (issue 16): FLUX.1-dev at 1024x1024 with random weights, the rows that say most per second of
# lease first (8 steps, one timed image each; the full 28-step table with compile needs a lease of its own: ~6-9 min).
# Only the markdown comes back ($OUT holds at most 8 files); the JSON goes into logs.tar.gz with the stage.
E2E_CMD="timeout -k 5 \$BUDGET $PY -m bench.e2e --models flux --steps 8 --rows eager,lossless,+cache,+window,+w4a8,+all \
  --out $STAGE/e2e
rc=\$?
for f in \$(ls -t $STAGE/e2e/*.md 2>/dev/null | head -1); do cp \$f $OUT/e2e.md; cp \${f%.md}.json $LOGS/e2e.json; done
exit \$rc"
e2e_detail() { grep -E '^bench.e2e: wrote' "$1" | tail -2; }

# ---- the plan -----------------------------------------------------------------------------------------------------------
if ((!DRY)); then
  rm -rf "$STAGE" && mkdir -p "$LOGS" "$OUT" || exit 1
  summary
  echo "gpu_suite: git $SHA; results -> $OUT (SUMMARY.md after every step)"
else
  mkdir -p "$LOGS" 2>/dev/null
  echo "gpu_suite dry run: git $SHA; OUT=$OUT; python: $PY"
fi

tier a "$BUDGET_A"
step env 15 "$ENV_CMD"
step install 100 "$INSTALL_CMD"
[[ -d /tmp/site ]] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
step info 20 "$INFO_CMD"
step ops 100 "$OPS_CMD" ops_detail
step memcheck 60 "$SAN_CMD" san_detail

tier b "$BUDGET_B"
step bench 150 "$BENCH_B_CMD" bench_detail

tier c "$BUDGET_C"
step e2e 110 "$E2E_CMD" e2e_detail
step tests 150 "$TESTS_C_CMD" pytest_counts
step bench 300 "$BENCH_C_CMD" bench_detail
step racecheck 60 "$RACE_CMD" san_detail

if ((DRY)); then
  # beyond syntax: the selections the plan relies on resolve, and the files it names exist
  echo "== checks"
  for f in $OP_TESTS $CUDA_TESTS; do [[ -f $f ]] || { echo "  !! missing $f" >&2; PARSE_ERRORS=$((PARSE_ERRORS + 1)); }; done
  grep -q '"gpu:' pyproject.toml || { echo "  !! the gpu pytest marker is not declared in pyproject.toml" >&2; PARSE_ERRORS=$((PARSE_ERRORS + 1)); }
  for t in b c; do
    if n=$($PY -m bench.run --tier $t --list 2>"$LOGS/dry_list_$t.err" | grep -c '\['); then
      echo "  bench tier $t: $n cases"
    else
      echo "  !! python -m bench.run --tier $t --list failed: $(tail -3 "$LOGS/dry_list_$t.err")" >&2
      PARSE_ERRORS=$((PARSE_ERRORS + 1))
    fi
  done
  if ((PARSE_ERRORS)); then echo "gpu_suite dry run: $PARSE_ERRORS problem(s)" >&2; exit 1; fi
  echo "gpu_suite dry run: ok (tiers a+b end by $((BUDGET_A + BUDGET_B)) s, all by $((BUDGET_A + BUDGET_B + BUDGET_C)) s)"
  exit 0
fi

summary
pack
echo "gpu_suite: done in $(now) s. Wrote:"
find "$OUT" -type f -printf '  %p (%s bytes)\n' | sort
