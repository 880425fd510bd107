#!/usr/bin/env bash
# The Fashion-MNIST ablation ladder, as reported in the README:
#   1. data and teachers (recipes/fashion_mnist.yaml),
#   2. baselines tuned on the validation split: the CE student's learning rate, then tau for avg_kd,
#   3. rungs L0-L4 with seeds 0, 1, 2, at the chosen learning rate and tau,
#   4. the summary table (mean and spread over seeds) from every run's summary.json.
#   5. single-seed ablations around L3 (ablate; REVERSE=1 walks the list backwards, ONLY="name ..."
#      runs only those).
#   6. the rungs that matter (LONG_RUNGS, default "L0 L1 L3") at twice the schedule, 8 student
#      epochs per stage, with SEEDS (long), into runs/ladder/long/<rung><LONG_TAG>_s<seed>
#      (LONG_TAG=_tau4 TAU=4 for a variant; LONG_SETS="key=value ..." adds overrides).
#   7. stronger teachers (strong-teachers: 30 epochs, no label smoothing, into runs/fashion_mnist_strong/),
#      then `TEACHERS=strong LONG_TAG=_strong scripts/ladder.sh long` distils from them.
# Usage: scripts/ladder.sh [data|tune-lr|tune-tau|ladder|ablate|long|strong-teachers|table]
# (default: data to ablate, then table).
# LR and TAU set the chosen values for the ladder and ablations; SEEDS the ladder's seeds
# (default "0 1 2") and RUNGS its rungs (default "L0 L1 L2 L3 L4"). Runs already finished
# are kept, so two shells may split the work.
set -euo pipefail
ASIB=${ASIB:-asib}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
LR=${LR:-1.0e-2}
TAU=${TAU:-1}

run() {  # run OUT RECIPE [--set ...]: one distill run, skipped when its summary exists
  local out=$1; shift
  local recipe=$1; shift
  if [ -f "$out/summary.json" ]; then echo "have $out"; return; fi
  "$ASIB" distill "$recipe" --out "$out" --force -q "$@"
}

step_data() {
  "$ASIB" prepare-data recipes/fashion_mnist.yaml || true   # refuses to overwrite a prepared folder
  for t in resnet20 wrn_16_1; do
    [ -f "runs/fashion_mnist/teachers/$t/summary.json" ] || "$ASIB" finetune-teacher recipes/fashion_mnist.yaml --teacher "$t" --force -q
  done
}

step_tune_lr() {
  for lr in 1.0e-3 3.0e-3 1.0e-2 3.0e-2; do
    run "runs/ladder/tune/ce_lr$lr" recipes/ladder/L0.yaml --set "distill.student_optim.lr=$lr"
  done
}

step_tune_tau() {
  for tau in 1 2 4; do
    run "runs/ladder/tune/avgkd_tau$tau" recipes/ladder/L1.yaml --set "distill.tau=$tau" --set "distill.student_optim.lr=$LR"
  done
}

step_ladder() {
  for seed in ${SEEDS:-0 1 2}; do
    for rung in ${RUNGS:-L0 L1 L2 L3 L4}; do
      run "runs/ladder/${rung}_s$seed" "recipes/ladder/$rung.yaml" --set "seed=$seed" \
        --set "distill.student_optim.lr=$LR" --set "distill.tau=$TAU"
    done
  done
}

step_ablate() {  # single-seed ablations around L3 (ASIB with the IB, nothing else), seed 0
  local base=(--set seed=0 --set "distill.student_optim.lr=$LR" --set "distill.tau=$TAU")
  local other_tau=4; [ "$TAU" = "4" ] && other_tau=1
  local runs=(
    "L3_target_mu L3 --set distill.synergy_target=mu"
    "L3_no_gate L3 --set distill.synergy_gate=false"
    "L3_ens_only L3 --set distill.kd_alpha=0 --set distill.kd_ens_alpha=0.7 --set distill.synergy_gate=false"
    "L3_tau$other_tau L3 --set distill.tau=$other_tau"
    "L3_long L3 --set distill.student_epochs=8"
    "L0_long L0 --set distill.student_epochs=8"
    "L3_cccp L3 --set distill.cccp=true"
    "L4_no_unfreeze L4 --set distill.teacher_freeze_schedule=null"
    # a synergy head trained longer before and between the student's epochs
    "L3_adapt3 L3 --set distill.teacher_adapt_epochs=3 --set distill.synergy_warmup_epochs=2"
    "L3_adapt3_tau4 L3 --set distill.teacher_adapt_epochs=3 --set distill.synergy_warmup_epochs=2 --set distill.tau=4"
    "L3_adapt3_ens_only L3 --set distill.teacher_adapt_epochs=3 --set distill.synergy_warmup_epochs=2 --set distill.kd_alpha=0 --set distill.kd_ens_alpha=0.7 --set distill.synergy_gate=false"
  )
  [ -n "${REVERSE:-}" ] && mapfile -t runs < <(printf '%s\n' "${runs[@]}" | tac)
  for item in "${runs[@]}"; do
    read -r name rung sets <<<"$item"
    [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]] && continue
    # shellcheck disable=SC2086  # the --set pairs are meant to split
    run "runs/ladder/ablate/$name" "recipes/ladder/$rung.yaml" "${base[@]}" $sets
  done
}

# TEACHERS=strong: every distill run reads the teachers of step_strong_teachers instead.
teacher_sets=()
if [ "${TEACHERS:-}" = strong ]; then
  teacher_sets=(--set "teachers[0].checkpoint=runs/fashion_mnist_strong/teachers/resnet20/model.safetensors"
                --set "teachers[1].checkpoint=runs/fashion_mnist_strong/teachers/wrn_16_1/model.safetensors")
fi

step_strong_teachers() {  # STRONG_TEACHER picks one (two shells may train one each)
  for t in ${STRONG_TEACHER:-resnet20 wrn_16_1}; do
    [ -f "runs/fashion_mnist_strong/teachers/$t/summary.json" ] && { echo "have $t"; continue; }
    "$ASIB" finetune-teacher recipes/fashion_mnist.yaml --teacher "$t" --out runs/fashion_mnist_strong --force -q \
      --set "teachers[0].train.epochs=30" --set "teachers[0].train.label_smoothing=0" \
      --set "teachers[1].train.epochs=30" --set "teachers[1].train.label_smoothing=0"
  done
}

step_long() {  # twice the schedule: 16 student epochs in 2 stages; LONG_TAG names a variant (e.g. _tau4)
  local extra=""  # LONG_SETS="key=value ...": more overrides for the variant
  for kv in ${LONG_SETS:-}; do extra+=" --set $kv"; done
  for seed in ${SEEDS:-0 1 2}; do
    for rung in ${LONG_RUNGS:-L0 L1 L3}; do
      # shellcheck disable=SC2086  # $extra holds --set pairs meant to split
      run "runs/ladder/long/${rung}${LONG_TAG:-}_s$seed" "recipes/ladder/$rung.yaml" --set "seed=$seed" \
        --set "distill.student_optim.lr=$LR" --set "distill.tau=$TAU" --set distill.student_epochs=8 \
        ${teacher_sets[@]+"${teacher_sets[@]}"} $extra
    done
  done
}

step_table() {
  python - <<'PY'
import json, pathlib, statistics
for folder, schedule in (("runs/ladder", "8 student epochs"), ("runs/ladder/long", "16 student epochs")):
    rows = {}
    for p in sorted(pathlib.Path(folder).glob("L*_s*/summary.json")):
        rows.setdefault(p.parent.name.rsplit("_s", 1)[0], []).append(json.loads(p.read_text()))
    if not rows:
        continue
    print(f"\n{folder} ({schedule})\n")
    print("| rung | student test top-1 (mean ± sd) | seeds | synergy test top-1 | student val top-1 |")
    print("|---|---|---|---|---|")
    for rung, runs in sorted(rows.items()):
        acc = [r["student_test_top1"] for r in runs]
        syn = [r["synergy_test_top1"] for r in runs if r["synergy_test_top1"] is not None]
        val = [r["student_val_top1"] for r in runs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        syn_s = f"{statistics.mean(syn):.2f}" if syn else "-"
        print(f"| {rung} | {statistics.mean(acc):.2f} ± {sd:.2f} | {len(acc)} | {syn_s} | {statistics.mean(val):.2f} |")
PY
}

case "${1:-all}" in
  data) step_data ;;
  tune-lr) step_tune_lr ;;
  tune-tau) step_tune_tau ;;
  ladder) step_ladder ;;
  ablate) step_ablate ;;
  long) step_long ;;
  strong-teachers) step_strong_teachers ;;
  table) step_table ;;
  all) step_data; step_tune_lr; step_tune_tau; step_ladder; step_ablate; step_table ;;
  *) echo "usage: $0 [data|tune-lr|tune-tau|ladder|ablate|long|strong-teachers|table]" >&2; exit 2 ;;
esac
