#!/usr/bin/env bash
# One prepared accelerator benchmark (issue #26, item 5): in at most --budget seconds (default 480, compiles
# included) on one GPU, at yan_1p6b's layer shape (configs/yan_1p6b.py: width 2560, 10 channels, 40 attention
# heads), bfloat16:
#   mixer      forward + backward of the MCSD block per recurrence form (--forms) and of attention, at 2048 and
#              8192 tokens (benchmarks/mixer.py; one process per form, so a form that fails is recorded and the
#              others still run)
#              (--attention_kernels xla,cudnn in the first form's process: XLA beside cuDNN's flash attention)
#   train      the train step's tokens/s and MFU (benchmarks/train.py) of yan_1p6b on one device (the plan's
#              verdict picks the whole model, else --layers_if_short layers) for MCSD (the auto form, then
#              pallas), attention (model.attention_kernel=cudnn on a GPU), selective and the hybrid, at 8192
#              then 4096 tokens, 16384 tokens per step
#   selective  dense vs capacity vs dropless (XLA's ragged_dot and tokamax's) at yan_1p6b's width, 2 layers,
#              4096 tokens (benchmarks/selective.py)
#   decode     per-token decode of yan_1p6b's layer shape (2 layers) at 2048 and 32768 tokens of context,
#              batches 1 and 16 (benchmarks/decode.py)
# Each step runs under its own `timeout` (its cap, or what is left of the budget); a step that fails, times out
# or is skipped is a status line in its benchmark's file, and the rest go on. Output in OUT (--out, else $OUT,
# else benchmarks/results/accelerator-<date>): one JSON-lines file per benchmark, env.txt (versions, devices,
# nvidia-smi), steps.jsonl (each step's status and wall time), logs/ and summary.txt (also printed at the end:
# the per-step wall times, the figures and the issue's three goals). --smoke runs the same steps at tiny shapes
# (yan_tiny, width 64) in seconds each, to check the plumbing on a CPU.
#
# --wheels DIR first installs what a bare GPU machine lacks (grain, ml_collections, tensorboardX, array-record,
# portpicker, tokamax and its dependencies) from a folder of wheels, without an index. --only runs the named steps
# (or name prefixes: --only train,decode), e.g. those a first run had no budget left for, into another --out.
# Compiled programs are cached in $JAX_COMPILATION_CACHE_DIR (default /tmp/yanjax-jax-cache): a second run on the
# same machine skips most compiles. An --out folder must be new, empty or an earlier run's (it has steps.jsonl),
# whose files are replaced: the script deletes nothing it did not write.
#
# Usage: bash benchmarks/accelerator.sh [--smoke] [--out DIR] [--wheels DIR] [--budget SECONDS]
#            [--forms chunked,associative,pallas] [--only STEP,...] [--layers_if_short 4]
set -u -o pipefail

usage() { sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

SMOKE=0 OUT_DIR="" WHEELS="" BUDGET="" FORMS_WANTED="chunked,associative,pallas" ONLY="" LAYERS_IF_SHORT=4
while (( $# )); do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT_DIR=${2:?--out needs a directory}; shift ;;
    --wheels) WHEELS=${2:?--wheels needs a directory of wheels}; shift ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    --forms) FORMS_WANTED=${2:?--forms needs a comma-separated list}; shift ;;
    --only) ONLY=${2:?--only needs comma-separated step names}; shift ;;
    --layers_if_short) LAYERS_IF_SHORT=${2:?--layers_if_short needs a number}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' of benchmarks/accelerator.sh; see --help" >&2; exit 2 ;;
  esac
  shift
done
if [[ -n "$WHEELS" && ! -d "$WHEELS" ]]; then
  echo "error: --wheels $WHEELS is not a directory; give the folder of wheels (e.g. .whl)" >&2; exit 2
fi
if [[ -n "$BUDGET" && ! "$BUDGET" =~ ^[0-9]+$ ]]; then
  echo "error: --budget $BUDGET is not a whole number of seconds" >&2; exit 2
fi

cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
# The trainer's memory check reads the allocator's limit: give it 90% of the device (JAX's default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/yanjax-jax-cache}
if [[ $SMOKE == 1 ]]; then  # the plumbing, not the speed: compile as the tests do (tests/conftest.py)
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
fi
suffix=$([[ $SMOKE == 1 ]] && echo "-smoke")
OUT_DIR=${OUT_DIR:-${OUT:-benchmarks/results/accelerator$suffix-$(date +%Y-%m-%d)}}
if [[ -d $OUT_DIR && -n "$(ls -A "$OUT_DIR")" && ! -f $OUT_DIR/steps.jsonl ]]; then
  echo "accelerator.sh: --out $OUT_DIR holds files this script did not write; give a new or empty folder" >&2
  exit 2
fi
mkdir -p "$OUT_DIR/logs" || exit 2
rm -f "$OUT_DIR"/*.jsonl "$OUT_DIR"/{env,summary}.txt "$OUT_DIR"/logs/*.{out,log}  # an earlier run's
BUDGET=${BUDGET:-$([[ $SMOKE == 1 ]] && echo 1800 || echo 480)}
DEADLINE=$(( $(date +%s) + BUDGET ))
RESERVE=10  # seconds kept for the summary
echo "[accelerator] output in $OUT_DIR, budget ${BUDGET} s$([[ $SMOKE == 1 ]] && echo ', smoke (tiny shapes)')"

wanted() {  # is step $1 selected by --only (names or their prefixes)? install and env always are, plan with a train
  [[ -z "$ONLY" || "$1" == install-* || "$1" == env ]] && return 0
  local name
  for name in ${ONLY//,/ }; do [[ "$1" == "$name"* || ( "$1" == plan && "$name" == train* ) ]] && return 0; done
  return 1
}

record() { "$PY" benchmarks/accelerator.py record "$OUT_DIR" "$@"; }

# step NAME BENCH CAP TAGS COMMAND...: runs COMMAND under `timeout` (CAP seconds, or what the budget has left),
# stdout to logs/NAME.out (its JSON lines go to BENCH.jsonl), stderr to logs/NAME.log.
step() {
  local name=$1 bench=$2 cap=$3 tags=${4:-\{\}}; shift 4
  wanted "$name" || return 0
  local left=$(( DEADLINE - $(date +%s) - RESERVE - 5 ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 10 )); then
    record "$name" "$bench" skipped 0 "$limit" "$tags"
    return 0
  fi
  echo "[accelerator] $name (limit $limit s): $*"
  local start=${EPOCHREALTIME//[!0-9]/}
  timeout -k 5 "$limit" "$@" >"$OUT_DIR/logs/$name.out" 2>"$OUT_DIR/logs/$name.log"
  local rc=$? micros=$(( ${EPOCHREALTIME//[!0-9]/} - start ))
  record "$name" "$bench" "$rc" "$(( micros / 1000000 )).$(printf %03d $(( micros / 1000 % 1000 )))" "$limit" "$tags"
}

# ---- 1. wheels (the device has no internet) and the environment -------------------------------------------
if [[ -n "$WHEELS" ]]; then
  step install-base install 60 "" "$PY" -m pip install --no-index --find-links "$WHEELS" \
    grain ml_collections tensorboardX array-record portpicker
  step install-tokamax install 60 "" "$PY" -m pip install --no-index --find-links "$WHEELS" tokamax
fi
BACKEND=unknown FORMS=${FORMS_WANTED//,/ }
step env env 60 "" "$PY" benchmarks/accelerator.py probe "$OUT_DIR"
if [[ -s "$OUT_DIR/logs/env.out" ]]; then source "$OUT_DIR/logs/env.out"; fi
{ echo "--- nvidia-smi"; nvidia-smi 2>&1 || true; } >>"$OUT_DIR/env.txt"

# ---- shapes -------------------------------------------------------------------------------------------------
FLASH=(--attention_kernels xla,cudnn) CUDNN_SET=()
if [[ $BACKEND == gpu ]]; then CUDNN_SET=(--set model.attention_kernel=cudnn); fi
SELECTIVE=(--variants dense,capacity,dropless_tokamax,dropless --layers 2)
if [[ $SMOKE == 1 ]]; then
  CONFIG=configs/yan_tiny.py SEQ_LENS=256,128 TOKENS=512 STEPS=1 LONGEST=256
  MIXER=(--width 64 --channels 2 --heads 2 --batch 1 --seq_lens 64,128 --repeats 1)
  SELECTIVE+=(--config configs/yan_tiny.py --seq_lens 128 --tokens_per_step 256 --steps 1)
  DECODE=(--config configs/yan_tiny.py --contexts 32,64 --batches 1 --repeats 2)
  CAP_TRAIN=300 CAP_MIXER=300 CAP_OTHER=300
else
  CONFIG=configs/yan_1p6b.py SEQ_LENS=8192,4096 TOKENS=16384 STEPS=3 LONGEST=8192
  MIXER=(--width 2560 --channels 10 --heads 40 --batch 2 --seq_lens 2048,8192 --repeats 5)
  SELECTIVE+=(--config configs/yan_1p6b.py --dtype bfloat16 --seq_lens 4096 --tokens_per_step 16384 --steps 3)
  DECODE=(--config configs/yan_1p6b.py --set model.layers=2 --contexts 2048,32768 --batches 1,16 --repeats 10)
  CAP_TRAIN=80 CAP_MIXER=40 CAP_OTHER=75
fi

# The plan decides between the whole model and a few of its layers (one device, MCSD at the longest length).
TRAIN_SETS=(--set mesh.fsdp=1 --set mesh.tensor=1)
step plan plan 45 "" "$PY" -m yanjax.main.plan --config "$CONFIG" --devices 1 --json \
  --config.mesh.fsdp=1 --config.mesh.tensor=1 --config.train.seq_len=$LONGEST \
  --config.train.global_batch=$(( TOKENS / LONGEST )) --config.model.max_decode_len=$LONGEST
if grep -q '"fits": false' "$OUT_DIR/logs/plan.out" 2>/dev/null; then
  echo "[accelerator] the plan says the whole model does not fit one device: timing $LAYERS_IF_SHORT layers"
  TRAIN_SETS+=(--set model.layers=$LAYERS_IF_SHORT)
fi

train() {  # train NAME TAG ARGS...: one benchmarks/train.py process, the longest length first
  local name=$1 tag=$2; shift 2
  step "$name" train "$CAP_TRAIN" "$tag" "$PY" benchmarks/train.py --config "$CONFIG" --seq_lens "$SEQ_LENS" \
    --tokens_per_step "$TOKENS" --steps "$STEPS" "${TRAIN_SETS[@]}" "$@"
}

mixer() {  # mixer FORM: the MCSD form and attention; the first form's process compares attention's kernels
  local form=$1
  if [[ " $FORMS " != *" $form "* ]]; then
    wanted "mixer-$form" && record "mixer-$form" mixer unavailable 0 0 \
      "{\"form\": \"$form\", \"error\": \"not a recurrence form of this checkout ($FORMS)\"}"
    return 0
  fi
  step "mixer-$form" mixer "$CAP_MIXER" "{\"form\": \"$form\"}" "$PY" benchmarks/mixer.py "${MIXER[@]}" \
    --dtype bfloat16 --forms "$form" "${FLASH[@]}"
  FLASH=()
}

# ---- 2. the steps, most wanted first (the goals: MCSD vs flash attention, MFU, selective vs dense) ----------
# Realistic times are unknown until a GPU run: the caps are guesses (a 1.6B-width compile takes tens of seconds);
# the budget keeps the whole run within --budget whatever they are, by cutting or skipping the last steps.
train train-mcsd '{"variant": "mcsd"}' --variants mcsd --recurrence auto
train train-attention '{"variant": "attention"}' --variants attention "${CUDNN_SET[@]}"
train train-mcsd-pallas '{"variant": "mcsd", "recurrence": "pallas"}' --variants mcsd --recurrence pallas
train train-selective '{"variant": "selective"}' --variants selective
for form in ${FORMS_WANTED//,/ }; do mixer "$form"; done
step selective selective "$CAP_OTHER" "" "$PY" benchmarks/selective.py "${SELECTIVE[@]}"
step decode decode "$CAP_OTHER" "" "$PY" benchmarks/decode.py "${DECODE[@]}" --dtype bfloat16 --numpy_tokens 0
train train-hybrid '{"variant": "hybrid"}' --variants hybrid "${CUDNN_SET[@]}"

# ---- 3. the summary -------------------------------------------------------------------------------------------
"$PY" benchmarks/accelerator.py summary "$OUT_DIR"
