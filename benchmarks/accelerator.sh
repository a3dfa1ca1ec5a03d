#!/usr/bin/env bash
# The GPU benchmarks of issue 16, in at most 8 minutes, into benchmarks/results/.
#
#   benchmarks/accelerator.sh                 # on a machine with a GPU
#   benchmarks/accelerator.sh --smoke --out /tmp/acc   # tiny shapes, on a CPU (minutes)
#   benchmarks/accelerator.sh --steps grokking,sharding_time   # some steps only
#
# Steps (each under its own time limit, all within BUDGET_S):
#   1. grokking: epochs of the grokking model in JAX and PyTorch (experiments.grokking --timing)
#   2. step_time (a), float32 and bfloat16 Newton-Schulz, with the same-shape grouping rows
#      (ars2_base is the default, ars2_base_grouped / _per_leaf force one or the other)
#   3. step_time (b): the GPT-2-small update, AdamW, optax.contrib.muon, ARS2-Neo base
#   4. sharding --time: the GPT-2-small update on every device present, FSDP / replicated /
#      2-D, ARS2-Neo as XLA lowers it and with ns_sharding
# It installs nothing: a step whose framework is missing (torch, a GPU) is skipped, and
# every skipped or failed step is written to skipped.txt beside the logs.
# PYTHON (default: python) is the interpreter; BUDGET_S (default 480) the time budget.
set -u

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

SMOKE=0
OUT=""
STEPS="grokking,step_time_a_float32,step_time_a_bfloat16,step_time_b,sharding_time"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT="$2"; shift ;;
    --steps) STEPS="$2"; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.." || exit 1
PYTHON="${PYTHON:-python}"
BUDGET_S="${BUDGET_S:-480}"
STAMP="$(date -u +%Y%m%d-%H%M%S)"
OUT="${OUT:-benchmarks/results/accelerator-$STAMP}"
mkdir -p "$OUT"
SKIPPED="$OUT/skipped.txt"
COMMANDS="$OUT/commands.txt"
: > "$SKIPPED"
: > "$COMMANDS"
START=$SECONDS

skip() { echo "$1" | tee -a "$SKIPPED"; }

# step NAME LIMIT_S COMMAND...: runs COMMAND with its output in NAME.log, within the budget.
step() {
  local name="$1" limit="$2"
  shift 2
  case ",$STEPS," in
    *",$name,"*) ;;
    *) return ;;
  esac
  local left=$((BUDGET_S - (SECONDS - START)))
  if [ "$left" -lt 15 ]; then
    skip "$name: skipped, the ${BUDGET_S}s budget is spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo "$name (limit ${limit}s): $*" | tee -a "$COMMANDS"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  if [ "$rc" -eq 124 ]; then
    skip "$name: stopped at its ${limit}s limit (partial log in $name.log)"
  elif [ "$rc" -ne 0 ]; then
    skip "$name: failed with exit status $rc (see $name.log)"
  fi
}

has() { "$PYTHON" -c "import $1" > /dev/null 2>&1; }

if ! has jax; then
  skip "everything: JAX is not installed for $PYTHON"
  exit 1
fi
"$PYTHON" -c "import jax; print(jax.default_backend(), jax.device_count(), jax.devices())" \
  > "$OUT/devices.txt" 2>&1
BACKEND="$(cut -d' ' -f1 "$OUT/devices.txt")"
FRAMEWORKS="jax"
if has torch; then
  FRAMEWORKS="jax,torch"
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    >> "$OUT/devices.txt" 2>&1
else
  skip "PyTorch rows: torch is not installed"
fi
if [ "$BACKEND" = "cpu" ] && [ "$SMOKE" -eq 0 ]; then
  skip "no accelerator: JAX's backend is cpu; the figures below are a CPU's"
fi

if [ "$SMOKE" -eq 1 ]; then
  GROKKING=(--config tiny --epochs 2)
  STEP_TIME=(--quick --scale tiny --effective-k-epochs 1)
  SHARDING=(--scale tiny --repeats 2 --models gpt_like --layouts fsdp)
  LIMIT=120
else
  GROKKING=(--config ars2_neo_base --epochs 30 --no-early-stop)
  STEP_TIME=(--rounds 10 --rounds-b 2 --effective-k-epochs 2)
  SHARDING=(--repeats 10 --models gpt2)
  LIMIT=150
fi

step grokking "$LIMIT" "$PYTHON" -m experiments.grokking "${GROKKING[@]}" \
  --framework "$FRAMEWORKS" --timing --quiet --out "$OUT/grokking"
for dtype in float32 bfloat16; do
  step "step_time_a_$dtype" "$LIMIT" "$PYTHON" -m benchmarks.step_time --workload a \
    --ns-dtype "$dtype" "${STEP_TIME[@]}" --quiet --out "$OUT/step_time_a_$dtype" \
    --optimizers adamw,muon,ars2_base,ars2_base_grouped,ars2_base_per_leaf
done
step step_time_b "$LIMIT" "$PYTHON" -m benchmarks.step_time --workload b --ns-dtype bfloat16 \
  "${STEP_TIME[@]}" --quiet --out "$OUT/step_time_b" --optimizers adamw,muon,ars2_base
step sharding_time "$LIMIT" "$PYTHON" -m benchmarks.sharding --time \
  --optimizers adamw ars2_neo ars2_neo_sharded "${SHARDING[@]}" --out "$OUT/sharding"

{
  echo "# benchmarks/accelerator.sh $([ "$SMOKE" -eq 1 ] && echo --smoke), $STAMP UTC"
  echo
  echo "Devices: $(head -n 1 "$OUT/devices.txt")"
  echo "Wall time: $((SECONDS - START)) s of a ${BUDGET_S} s budget."
  echo
  echo "## Commands"
  sed 's/^/    /' "$COMMANDS"
  echo
  echo "## Skipped or failed"
  if [ -s "$SKIPPED" ]; then sed 's/^/* /' "$SKIPPED"; else echo "nothing"; fi
} > "$OUT/README.md"
echo "wrote $OUT/README.md"
