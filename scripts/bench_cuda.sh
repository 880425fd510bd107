#!/usr/bin/env bash
# The engine on a GPU, in one go: `asib bench` of recipes/bench_cuda.yaml (two ResNet-50
# teachers, a ResNet-18 student, 50,000 synthetic CIFAR-shaped images of 100 classes) in three
# settings: bf16 autocast (the default on CUDA), fp32 (no autocast, no TF32), and bf16 with
# torch.compile. Each writes its figures to OUT_DIR/<setting>.json and prints its tables;
# the end prints one summary table of the three.
# Usage: scripts/bench_cuda.sh [OUT_DIR [asib bench options...]]   (default runs/bench_cuda)
# Environment: ASIB (the command), SETTINGS (default "bf16 fp32 compile"), SYNTHETIC (image
# count), WORKERS (DataLoader workers of the PIL pipeline), DEVICE (cuda; cpu for a dry run).
set -euo pipefail
ASIB=${ASIB:-asib}
OUT_DIR=${1:-runs/bench_cuda}
[ $# -gt 0 ] && shift
RECIPE=${RECIPE:-recipes/bench_cuda.yaml}
mkdir -p "$OUT_DIR"
common=(--device "${DEVICE:-cuda}" --synthetic "${SYNTHETIC:-50000}" --classes 100 --workers "${WORKERS:-0,4}" --quiet)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for setting in ${SETTINGS:-bf16 fp32 compile}; do
  case $setting in
    bf16) sets=() ;;
    fp32) sets=(--set precision=fp32) ;;
    compile) sets=(--set compile=true) ;;
  esac
  echo "== $setting"
  "$ASIB" bench "$RECIPE" "${common[@]}" "${sets[@]}" --output "$OUT_DIR/$setting.json" "$@" \
    | tee "$OUT_DIR/$setting.txt" || echo "bench $setting failed (exit $?)"
done

python - "$OUT_DIR" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
if not runs:
    sys.exit("no figures were written")
print("\n| setting | step | engine img/s | bare img/s | engine/bare | engine MiB |")
print("|---|---|---|---|---|---|")
for name, f in runs.items():
    for step, c in f["steps"].items():
        e, b = c["engine"], c["bare"]
        print(f"| {name} | {step} | {e['images_per_s']:,.0f} | {b['images_per_s']:,.0f} | {c['ratio']:.3f} | {e['peak_mib']:,.0f} |")
d = next(iter(runs.values()))["data"]
print(f"\ndata pipeline: in-memory {d['in_memory']['images_per_s']:,.0f} img/s;"
      f" {d['speedup_vs_w0']:.1f}x DataLoader+PIL with 0 workers")
PY
