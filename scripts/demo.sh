#!/usr/bin/env bash
# The main job end to end on the embedded default data (scikit-learn's digits):
# prepare the data, fine-tune two teachers, evaluate them, distil a student.
# Every step is one asib command; a rerun starts over (--force).
set -euo pipefail
RECIPE=${RECIPE:-recipes/digits.yaml}
DATA=data/digits
RUN=runs/digits

asib prepare-data "$RECIPE" --force
asib finetune-teacher "$RECIPE" --force
echo
echo "teachers on the test split:"
for t in "$RUN"/teachers/*/model.safetensors; do
  printf '  %-28s ' "$t"
  asib evaluate "$t" --data "$DATA" --json \
    | python -c 'import json, sys; d = json.load(sys.stdin); print("top-1 %.2f  top-5 %.2f  nll %.3f  ece %.3f" % (d["top1"], d["top5"], d["nll"], d["ece"]))'
done
echo
asib distill "$RECIPE" --force
echo
asib export "$RUN"/student.safetensors --format onnx --out exports/digits_student.onnx --data "$DATA" --force
