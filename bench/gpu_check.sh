#!/usr/bin/env bash
# One prepared GPU check (issues 10, 19): at most 9 minutes on one H100/H200, figures as a table
# in $OUT (figures.md, figures.json) with every part's log beside it.
#
#   bash bench/gpu_check.sh [--out DIR] [--wheels DIR] [--budget SECONDS] [--python PY]
#   bash bench/gpu_check.sh --cpu-dry-run      # the same script at CPU sizes, here
#
# Parts, in order, each under its own `timeout` (never past the overall --budget, default 540 s):
#   env         nvidia-smi, torch/CUDA, prolong.versions, the workers' allocator setting
#               (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, exported)         (env.txt)
#   install     carried wheels (--wheels, default .whl; see bench/fetch_wheels.sh) into a private
#               --target with pip --no-index --no-deps; nothing is fetched          (parts.log)
#   memory plan bench/peak_memory.py: both sides' estimated peaks at 1B and 64K/32K/16K on this
#               card; the ratio runs at the longest length where both fit (the transformers
#               baseline's full 64K logits alone are 78 GiB), our MFU at 64K    (parts.log)
#   matmul      the card's two ceilings: bf16 8192^3 matmul rate, 4 GiB copy rate   (parts.log)
#   ratio       bench/train_throughput.py at 1B and the plan's ratio length, one document: ours
#               vs the transformers baseline (2 warm-up + 4 timed steps each)      (throughput.log)
#   mfu         the same at 1B/64K, ours alone: tokens/s and MFU                    (throughput.log)
#   memory probe  world 1, 4 of the 8B shape's 32 layers, 65,536 tokens: peak CUDA memory of our
#               step beside the plan's estimate for that same spec (one rank holding the whole
#               optimizer state, no SP; not a 512K SP=8 rank)                     (probe.log)
#   gpu tests   pytest -m gpu -k "not flex": flash_attn and torch_varlen, forward and backward,
#               against the SDPA reference on random document lengths with GQA      (tests.log)
#   flex test   last, alone: compiled FlexAttention at one static shape, with a per-test
#               timeout (a cold compile takes minutes)                             (tests.log)
# A part that cannot run (no CUDA, no deepspeed: only the baseline runs, no time left) is a
# SKIPPED row that says why; a part that fails or times out is a FAILED/TIMEOUT row. Following the
# device notes (METHOD.md): warm-up steps before timing, the device synchronised around each
# timed step, medians with every sample kept in figures.json, random data, the card's settings
# left alone (nothing here changes clocks or modes).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check.sh: $*" >&2; exit 2; }

ARGS_LINE="$*"  # for the table's title, before the loop below consumes the arguments
OUT_DIR=${OUT:-}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
WHEELS_GIVEN=0
BUDGET=540
PY=
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT_DIR=$2; shift 2 ;;
    --wheels) [ $# -ge 2 ] || die "--wheels needs a directory"; WHEELS=$2; WHEELS_GIVEN=1; shift 2 ;;
    --budget) [ $# -ge 2 ] || die "--budget needs seconds"; BUDGET=$2; shift 2 ;;
    --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PY=$2; shift 2 ;;
    --cpu-dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
case "$BUDGET" in ''|*[!0-9]*) die "--budget must be a whole number of seconds, got '$BUDGET'" ;; esac
[ "$BUDGET" -ge 60 ] || die "--budget must be at least 60 seconds, got $BUDGET"
if [ "$WHEELS_GIVEN" = 1 ] && [ ! -d "$WHEELS" ]; then die "--wheels $WHEELS is not a directory"; fi
if [ -z "$PY" ]; then
  if [ "$DRY" = 1 ] && [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python; else PY=python3; fi
fi
command -v "$PY" >/dev/null 2>&1 || die "python '$PY' not found (--python)"
if [ -z "$OUT_DIR" ]; then
  [ "$DRY" = 1 ] || die "no output directory: set \$OUT or pass --out"
  OUT_DIR=$(mktemp -d /tmp/gpu-check.XXXXXX)
fi
mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$REPO" || die "cannot enter $REPO"
WORK=$(mktemp -d /tmp/gpu-check-work.XXXXXX)  # numbered results; raw ones in $WORK/raw
mkdir -p "$WORK/raw"
START=$(date +%s)
LOG=$OUT_DIR/parts.log
: >"$LOG"

export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
if [ "$DRY" = 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi
export DS_ACCELERATOR=$DEVICE  # over an inherited value (the Makefile exports cpu)

# The workers' allocator setting (prolong.model.memory.allocator_env), unless the caller set one.
if [ -z "${PYTORCH_CUDA_ALLOC_CONF:-}" ]; then
  PYTORCH_CUDA_ALLOC_CONF=$("$PY" -c 'from prolong.model.memory import CUDA_ALLOC_CONF as c; print(c["PYTORCH_CUDA_ALLOC_CONF"])' 2>/dev/null) || PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  export PYTORCH_CUDA_ALLOC_CONF
fi

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG" >&2; }
left() { echo $(( BUDGET - ( $(date +%s) - START ) )); }
# part NAME STATUS SECONDS DETAIL: one row of the table (a JSON result of kind "part").
N=0
part() {
  N=$((N + 1))
  "$PY" -c 'import json, sys; n, s, sec, d = sys.argv[1:5]
json.dump({"bench": "part", "name": n, "status": s, "seconds": float(sec), "detail": d},
          open(sys.argv[5], "w"))' "$1" "$2" "$3" "$4" "$WORK/$(printf %02d "$N")-part.json"
  say "$1: $2${4:+ ($4)}"
}
# limited NAME MAX LOGFILE CMD...: run CMD under min(MAX, time left - 20 s); sets RC and SECS.
limited() {
  local name=$1 max=$2 logfile=$3; shift 3
  local limit; limit=$(( $(left) - 20 ))
  [ "$limit" -gt "$max" ] && limit=$max
  if [ "$limit" -lt 15 ]; then RC=-1; SECS=0; part "$name" skipped 0 "no time left in the ${BUDGET} s budget"; return; fi
  say "$name: running (limit ${limit} s)"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$logfile" 2>&1
  RC=$?
  SECS=$(( $(date +%s) - t0 ))
  if [ "$RC" = 124 ] || [ "$RC" = 137 ]; then
    part "$name" timeout "$SECS" "killed at its ${limit} s limit; see $(basename "$logfile")"; RC=-1
  fi
}
# result NAME JSON: the part's figures, numbered so the table keeps the run's order.
result() { N=$((N + 1)); cp "$2" "$WORK/$(printf %02d "$N")-${1// /_}.json"; }

finish() {
  local title files
  title="GPU check ($([ "$DRY" = 1 ] && echo 'CPU dry run' || echo device)), $(date -u '+%Y-%m-%d %H:%M UTC'), $(( $(date +%s) - START )) s of a ${BUDGET} s budget
$(grep -E '^(device|versions|imports|PYTORCH_CUDA_ALLOC_CONF)' "$OUT_DIR/env.txt" 2>/dev/null)
command: bash bench/gpu_check.sh ${ARGS_LINE}"
  shopt -s nullglob
  files=("$WORK"/[0-9][0-9]-*.json)  # the glob sorts: the table keeps the run's order
  "$PY" "$REPO/bench/table.py" --title "$title" --markdown "$OUT_DIR/figures.md" \
    --merged-json "$OUT_DIR/figures.json" "${files[@]}" || \
    echo "gpu_check.sh: the table could not be written (see above)" >&2
  rm -rf "$WORK"
}
trap finish EXIT

# ---- env ----------------------------------------------------------------------------------
{
  "$PY" -c 'import torch, platform
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"Python {platform.python_version()}")' 2>&1
  echo "PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-<unset: torch default>}"
  timeout 20 nvidia-smi 2>&1 || echo "nvidia-smi: not available"
} >"$OUT_DIR/env.txt"
say "env: $(head -n 1 "$OUT_DIR/env.txt")"
if [ "$DRY" = 0 ] && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  part "env" failed 0 "torch sees no CUDA device (use --cpu-dry-run on a CPU machine)"
  exit 1
fi

# ---- install ------------------------------------------------------------------------------
SITE=/tmp/gpu-check-site
wheels=$(ls "$WHEELS"/*.whl 2>/dev/null)
if [ -z "$wheels" ]; then
  part "install" skipped 0 "no wheels in $WHEELS (bench/fetch_wheels.sh makes them); using what is installed"
elif [ "$DRY" = 1 ]; then
  part "install" skipped 0 "dry run: $(echo "$wheels" | wc -l) wheels in $WHEELS not installed (they are for the device's Python 3.12)"
else
  # shellcheck disable=SC2086
  limited "install" 90 "$LOG" "$PY" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE" $wheels
  if [ "$RC" = 0 ]; then
    export PYTHONPATH=$SITE:$PYTHONPATH
    part "install" ok "$SECS" "$(echo "$wheels" | xargs -n1 basename | tr '\n' ' ')"
  elif [ "$RC" != -1 ]; then
    part "install" failed "$SECS" "pip exit $RC; see parts.log"
  fi
fi
have() { "$PY" -c "import $1" >/dev/null 2>&1; }
MISSING=""
for m in pydantic deepspeed transformers; do have "$m" || MISSING="$MISSING $m"; done
if [ "$DEVICE" = cpu ]; then FLASH="CPU dry run: both sides use SDPA"
elif have flash_attn; then FLASH="flash-attn importable"
else FLASH="no flash-attn: ours auto-selects torch_varlen, the baseline sdpa"; fi
say "imports: missing [${MISSING# }]; $FLASH"
{
  "$PY" -c 'import prolong.versions as v; print("versions:", v.summary())' 2>&1
  echo "imports missing: [${MISSING# }]; $FLASH"
} >>"$OUT_DIR/env.txt"  # after the install: the versions the parts below run with

# ---- memory plan --------------------------------------------------------------------------
# Estimated for the real card even in the dry run (an 80 GB H100 there): the sizes it picks are
# the device's; the dry run then trains at CPU sizes.
RATIO_SEQ_LEN=0
if echo "$MISSING" | grep -qw pydantic; then
  part "memory plan" skipped 0 "cannot import pydantic: carry the wheels"
else
  DEVBYTES=$("$PY" -c 'import torch; print(torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else "")' 2>/dev/null)
  GPUTYPE=$("$PY" -c 'import torch; n = torch.cuda.get_device_name().upper() if torch.cuda.is_available() else "H100"; print(next((k for k in ("H200", "H100", "A100", "B200") if k in n), "H100"))' 2>/dev/null)
  limited "memory plan" 30 "$LOG" "$PY" "$REPO/bench/peak_memory.py" --shape 1b --lengths 32768,16384 \
    --mfu-length 65536 --gpu-type "${GPUTYPE:-H100}" ${DEVBYTES:+--device-bytes "$DEVBYTES"} --json "$WORK/raw/plan.json"
  if [ "$RC" = 0 ] && [ -s "$WORK/raw/plan.json" ]; then
    result "memory plan" "$WORK/raw/plan.json"
    RATIO_SEQ_LEN=$(grep -E '^RATIO_SEQ_LEN=' "$LOG" | tail -n 1 | cut -d= -f2)
    grep -E '^  (S=|ratio|no candidate)' "$LOG" | tail -n 5 >&2
  elif [ "$RC" != -1 ]; then part "memory plan" failed "$SECS" "exit $RC; see parts.log"; fi
fi

# ---- matmul ceiling -----------------------------------------------------------------------
if [ "$DRY" = 1 ]; then MM=(--n 256 --copy-mib 64 --device cpu --repeats 3); else MM=(--n 8192 --copy-mib 4096 --device cuda); fi
limited "matmul" 60 "$LOG" "$PY" "$REPO/bench/matmul_ceiling.py" "${MM[@]}" --json "$WORK/raw/mm.json"
if [ "$RC" = 0 ]; then result matmul "$WORK/raw/mm.json"; elif [ "$RC" != -1 ]; then part "matmul" failed "$SECS" "exit $RC; see parts.log"; fi

# ---- throughput and memory probe ----------------------------------------------------------
if [ "$DRY" = 1 ]; then
  TP=(--device cpu --shape tiny --seq-len 512 --warmup 1 --steps 2)
  MFU=(--device cpu --shape tiny --seq-len 1024 --warmup 0 --steps 1)
  PROBE=(--device cpu --shape tiny --seq-len 512 --warmup 1 --steps 1)
else
  TP=(--device cuda --shape 1b --seq-len "${RATIO_SEQ_LEN:-0}" --warmup 2 --steps 4)
  MFU=(--device cuda --shape 1b --seq-len 65536 --warmup 2 --steps 4)
  PROBE=(--device cuda --shape 8b --layers 4 --seq-len 65536 --warmup 1 --steps 2)
fi
bench_part() {  # bench_part NAME MAX LOG JSON ONLY ARGS...
  local name=$1 max=$2 logfile=$3 json=$4 only=$5; shift 5
  if echo "$MISSING" | grep -qw pydantic || echo "$MISSING" | grep -qw transformers; then
    part "$name" skipped 0 "cannot import${MISSING}: carry the wheels (bench/fetch_wheels.sh)"; return
  fi
  if echo "$MISSING" | grep -qw deepspeed; then
    if [ "$only" = ours ]; then part "$name" skipped 0 "deepspeed not importable: our engine cannot run"; return; fi
    part "$name (ours)" skipped 0 "deepspeed not importable: only the transformers baseline runs"
    only=baseline
  fi
  echo "==== $name: train_throughput.py $*" >>"$logfile"
  limited "$name" "$max" "$logfile" "$PY" "$REPO/bench/train_throughput.py" "$@" --only "$only" --json "$json"
  if [ -s "$json" ]; then result "$name" "$json"
  elif [ "$RC" != -1 ]; then part "$name" failed "$SECS" "exit $RC: $(tail -n 1 "$logfile" | cut -c1-200)"; fi
}
: >"$OUT_DIR/throughput.log"
: >"$OUT_DIR/probe.log"
if [ "$DRY" = 0 ] && [ "${RATIO_SEQ_LEN:-0}" = 0 ]; then
  part "ratio" skipped 0 "the memory plan found no length at which both sides fit (see parts.log)"
else
  bench_part "ratio" 180 "$OUT_DIR/throughput.log" "$WORK/raw/tp.json" both "${TP[@]}" \
    --purpose "ratio at the plan's length"
fi
bench_part "mfu" 110 "$OUT_DIR/throughput.log" "$WORK/raw/mfu.json" ours "${MFU[@]}" \
  --purpose "MFU, ours alone"
bench_part "memory probe" 80 "$OUT_DIR/probe.log" "$WORK/raw/probe.json" ours "${PROBE[@]}" \
  --purpose "memory probe (world 1, whole optimizer state, no SP)"

# ---- gpu-marked tests ---------------------------------------------------------------------
TESTS=$(grep -rl --include='*.py' 'pytest.mark.gpu' tests | sort | tr '\n' ' ')
if ! have pytest || ! have hypothesis; then
  part "gpu tests" skipped 0 "pytest or hypothesis not importable"
elif [ -z "$TESTS" ]; then
  part "gpu tests" skipped 0 "no gpu-marked tests found"
else
  : >"$OUT_DIR/tests.log"
  # A per-test timeout where pytest-timeout is there (a hung compile fails one test, not the part).
  PER_TEST=()
  have pytest_timeout && PER_TEST=(--timeout 60)
  pytest_part() {  # pytest_part NAME MAX PYTEST-ARGS...
    local name=$1 max=$2; shift 2
    echo "==== $name: pytest $*" >>"$OUT_DIR/tests.log"
    # shellcheck disable=SC2086
    limited "$name" "$max" "$OUT_DIR/tests.log" "$PY" -m pytest -q -p no:cacheprovider "$@" $TESTS
    local summary
    summary=$(grep -E '(passed|failed|skipped|deselected|error)' "$OUT_DIR/tests.log" | tail -n 1 | tr -d '=' | sed 's/^ *//')
    case "$RC" in
      -1) ;;
      0) part "$name" ok "$SECS" "$summary" ;;
      5) part "$name" skipped "$SECS" "no gpu test collected: $summary" ;;
      *) part "$name" failed "$SECS" "pytest exit $RC: $summary" ;;
    esac
  }
  pytest_part "gpu tests" 90 -m gpu -k "not flex" "${PER_TEST[@]}"
  # Flex last and alone: a cold compile can take minutes, and nothing after it is lost.
  [ "${#PER_TEST[@]}" -gt 0 ] && PER_TEST=(--timeout 150)
  pytest_part "flex test" 170 -m gpu -k "gpu_flex_one_shape" "${PER_TEST[@]}"
  if [ "$DEVICE" = cpu ]; then
    say "gpu tests: on CPU every gpu test skips; this only proves the invocation"
  fi
fi
exit 0
