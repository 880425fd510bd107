#!/usr/bin/env bash
# The study of ASIB against tuned baselines (README, "The study"). Every step is an
# `asib compare` call into runs/study/<yardstick>/<step>; a step that is stopped is continued
# by running it again (finished runs are kept, unfinished ones resumed).
#
#   scripts/study.sh data                # prepare yardsticks A and B, train the two teachers on A
#   scripts/study.sh data H              # the held-out yardstick: the two teachers trained on the 49,500
#                                        # training images B's transfer set leaves out, then H itself
#   scripts/study.sh lr B                # the CE student's learning rate on validation (seed 0)
#   scripts/study.sh baselines B         # ce, avg_kd, dkd, ca_mkd, dist: knobs tuned on validation
#                                        # (seed 0), then SEEDS at the chosen values
#   scripts/study.sh search B --variant NAME:key=value,...   # ASIB's validation search (seed 0), in
#                                        # runs/study/B/search (SEARCH_DIR=NAME: in runs/study/B/NAME)
#   scripts/study.sh final B             # ASIB (its shipped defaults) added to the baselines' study,
#                                        # paired against AGAINST (default dist, the best tuned baseline)
#   scripts/study.sh transfer A          # yardstick A at the values B's validation chose (CE's lr, each
#                                        # baseline's knobs as one-value grids), paired against AGAINST;
#                                        # the same for H (scripts/study.sh transfer H)
#   scripts/study.sh snapshot            # copy what the study found (no weights) into studies/fmnist/
#   scripts/study.sh restore             # put studies/fmnist/ back under runs/ (teachers included), so
#                                        # a study started on another machine continues where it stopped
#
# B is yardstick B (recipes/study/fmnist_transfer.yaml: 5,500 transfer images), A is yardstick A
# (recipes/study/fmnist_full.yaml: 55,000), H the held-out yardstick (recipes/study/fmnist_heldout.yaml:
# B's transfer set, teachers that never saw it). JOBS runs at once (default 2, one thread each);
# SEEDS (default 0-4). METHODS=a,b runs the baselines or final step for those methods only (the
# others' runs are kept and added by a later call), e.g. METHODS=dist scripts/study.sh baselines B.
# STUDENT=ARCH runs a step for a second student (the study's: shufflev2) in
# runs/study/<yardstick>/<step>-ARCH, e.g. STUDENT=shufflev2 scripts/study.sh lr B.
set -euo pipefail
ASIB=${ASIB:-asib}  # e.g. ASIB="python -m asib"
JOBS=${JOBS:-2}
SEEDS=${SEEDS:-0-4}
PY=${PY:-python3}

recipe_of() {
  case "$1" in
    A) echo recipes/study/fmnist_full.yaml ;;
    B) echo recipes/study/fmnist_transfer.yaml ;;
    H) echo recipes/study/fmnist_heldout.yaml ;;
    *) echo "yardstick A, B or H, not '$1'" >&2; exit 2 ;;
  esac
}

chosen_lr() {  # the learning rate the lr step chose on validation (for STUDENT's lr step when set)
  local file="runs/study/$1/lr${STUDENT:+-$STUDENT}/compare.json"
  [ -f "$file" ] || { echo "run 'scripts/study.sh lr $1' first" >&2; exit 1; }
  "$PY" -c "import json,sys; a=json.load(open(sys.argv[1]))['arms'][0]['tuned']; print(a['values']['student_optim.lr'])" "$file"
}

compare() {  # compare YARDSTICK STEP ARGS...; STUDENT=ARCH: the same step for another student, in <step>-ARCH
  local y=$1 step=$2; shift 2
  local student=()
  if [ -n "${STUDENT:-}" ]; then student=(--set "student.arch=$STUDENT"); step="$step-$STUDENT"; fi
  $ASIB compare "$(recipe_of "$y")" --out "runs/study/$y/$step" --jobs "$JOBS" --threads 1 "${student[@]}" "$@"
}

BASELINES=ce,avg_kd,dkd,ca_mkd,dist
# The teachers a snapshot keeps (RECIPE_NAME:PREFIX): yardstick A's as teachers/<name>.*, the
# held-out yardstick's (trained on fmnist_rest) as teachers/rest-<name>.*.
TEACHER_SETS=(fmnist_full: fmnist_rest:rest-)
TUNE_ALL=(avg_kd:tau=1,2,4 ca_mkd:tau=1,2,4 dist:tau=1,2,4,8 dkd:tau=1,4 dkd:dkd.beta=2,8)

methods_and_tunes() {  # methods_and_tunes DEFAULT_METHODS: --methods (METHODS if set) and their --tune grids
  local methods=${METHODS:-$1} grid
  echo --methods "$methods"
  for grid in "${TUNE_ALL[@]}"; do
    [[ ",$methods," == *",${grid%%:*},"* ]] && echo --tune "$grid"
  done
  return 0
}

case "${1:-}" in
  data)
    teachers_of=fmnist_full student_data=fmnist_transfer
    [ "${2:-}" = H ] && teachers_of=fmnist_rest student_data=fmnist_heldout
    $ASIB prepare-data "recipes/study/$teachers_of.yaml" || true   # refuses to overwrite a prepared folder
    for t in resnet20 mobilenetv2; do
      [ -f "runs/$teachers_of/teachers/$t/summary.json" ] ||
        $ASIB finetune-teacher "recipes/study/$teachers_of.yaml" --teacher "$t" --resume ||
        $ASIB finetune-teacher "recipes/study/$teachers_of.yaml" --teacher "$t"
    done
    $ASIB prepare-data "recipes/study/$student_data.yaml" || true
    ;;
  lr)
    compare "$2" lr --methods ce --seeds 0 --tune ce:student_optim.lr=0.003,0.01,0.03
    ;;
  baselines)
    lr=$(chosen_lr "$2")
    # shellcheck disable=SC2046  # the methods and grids are single words
    compare "$2" main --set "distill.student_optim.lr=$lr" --seeds "$SEEDS" $(methods_and_tunes "$BASELINES")
    ;;
  search)
    # ASIB's validation search, one stage at a time from the recipe's settings: each stage adds
    # a few variants on seed 0 and keeps the best validation top-1 (the test split chooses nothing).
    y=$2
    lr=$(chosen_lr "$y")
    shift 2
    compare "$y" "${SEARCH_DIR:-search}" --set "distill.student_optim.lr=$lr" --methods asib --seeds 0 --against asib "$@"
    ;;
  final)
    lr=$(chosen_lr "$2")
    # shellcheck disable=SC2046
    compare "$2" main --set "distill.student_optim.lr=$lr" --seeds "$SEEDS" --against "${AGAINST:-dist}" \
      $(methods_and_tunes "$BASELINES,asib")
    ;;
  transfer)
    # A yardstick run at the knobs yardstick B's validation chose, where tuning again is out of
    # reach (a yardstick-A run costs about ten yardstick-B runs on a CPU): CE's lr, and each
    # baseline's chosen value as a one-value grid (its seed-0 run is that grid's only candidate).
    lr=$(chosen_lr B)
    file=runs/study/B/main/compare.json
    [ -f "$file" ] || { echo "run 'scripts/study.sh baselines B' first" >&2; exit 1; }
    methods=${METHODS:-$BASELINES,asib}
    # shellcheck disable=SC2207  # one word a grid
    grids=($("$PY" -c '
import json, sys
methods = sys.argv[2].split(",")
for arm in json.load(open(sys.argv[1]))["arms"]:
    tuned = arm.get("tuned")
    if arm["arm"] in methods and tuned:
        print(arm["arm"] + ":" + "+".join(f"{k}={v}" for k, v in tuned["values"].items()))
' "$file" "$methods"))
    tunes=()
    for g in "${grids[@]}"; do
      arm=${g%%:*}
      IFS=+ read -r -a kvs <<<"${g#*:}"
      for kv in "${kvs[@]}"; do tunes+=(--tune "$arm:$kv"); done
    done
    compare "$2" main --set "distill.student_optim.lr=$lr" --seeds "$SEEDS" --against "${AGAINST:-dist}" \
      --methods "$methods" "${tunes[@]}" "${@:3}"
    ;;
  snapshot)
    # Every run's recipe.yaml, summary.json and metrics.jsonl and every study's compare.* files:
    # enough for `asib compare` to count a run as finished. Weights stay out, but the teachers'.
    mkdir -p studies/fmnist/teachers
    for set in "${TEACHER_SETS[@]}"; do
      for t in resnet20 mobilenetv2; do
        src="runs/${set%%:*}/teachers/$t" kept="studies/fmnist/teachers/${set#*:}$t"
        [ -f "$src/summary.json" ] || continue   # not trained (yet)
        cp "$src/model.safetensors" "$kept.safetensors" && cp "$src/summary.json" "$kept.summary.json"
      done
    done
    (cd runs/study && find . -name train_state.safetensors -printf '%h\n' | sort -u > /tmp/asib_unfinished)
    (cd runs/study && find . \( -name recipe.yaml -o -name summary.json -o -name metrics.jsonl \
        -o -name 'compare.*' -o -name study.json \) -print) | while read -r f; do
      grep -qx "$(dirname "$f")" /tmp/asib_unfinished && continue   # unfinished runs are run again
      mkdir -p "studies/fmnist/$(dirname "$f")" && cp "runs/study/$f" "studies/fmnist/$f"
    done
    ;;
  restore)
    for set in "${TEACHER_SETS[@]}"; do
      for t in resnet20 mobilenetv2; do
        dst="runs/${set%%:*}/teachers/$t" kept="studies/fmnist/teachers/${set#*:}$t"
        [ -f "$kept.safetensors" ] && [ ! -f "$dst/model.safetensors" ] || continue
        mkdir -p "$dst" && cp "$kept.safetensors" "$dst/model.safetensors" &&
          cp "$kept.summary.json" "$dst/summary.json"   # the data step then skips it
      done
    done
    mkdir -p runs/study
    for y in A B H; do [ -d "studies/fmnist/$y" ] && cp -rn "studies/fmnist/$y" runs/study/; done
    true
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d'
    exit 2
    ;;
esac
