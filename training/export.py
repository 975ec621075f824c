"""Ship a run: copy its ``best/`` adapters into ``checkpoints/<name>/`` with a model card.

    python -m training.export --run runs/rsicd_backbone-full --out checkpoints/rs-backbone --dtype fp16

The card states the data (and its licence), the recipe (the run's resolved config), the validation
metrics per epoch, what the backbone was initialised from, and how to load the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch
import yaml

from harma import CheckpointError, load_adapters, read_adapter_config, save_adapters
from harma.checkpoint import atomic_write_bytes

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LICENCES = {
    "rsicd": "RSICD (Lu et al. 2017) captions on AID imagery (Xia et al. 2017, Google Earth): research use",
    "ucm": "UCM-Captions (Qu et al. 2016) on UC Merced Land Use imagery (Yang & Newsam 2010, USGS public "
           "domain, released for research)",
}


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _licence(root: str) -> str:
    name = Path(root).name.lower()
    return next((text for key, text in LICENCES.items() if key in name), "see the dataset's own licence")


def model_card(name: str, meta: dict, config: dict, rows: list[dict], dtype: str) -> str:
    """Markdown card from an adapter config, the run's resolved config and its metrics rows."""
    model, data, extra = meta["model"], config.get("data", {}), meta.get("extra", {})
    base = meta["base"]
    init = ("open_clip tag " + str(base.get("pretrained"))) if base.get("pretrained") else "random initialisation"
    hf_text = ((base.get("model_cfg") or {}).get("text_cfg") or {}).get("hf_model_name")
    if hf_text and not base.get("pretrained"):
        init = f"random initialisation, except the text tower: pretrained HF model `{hf_text}`"
    if model.get("lock_text"):
        init += " (text tower locked: not trained)"
    if base.get("base_weights"):
        init += f" + base weights {base['base_weights']} (sha256 {str(base.get('base_weights_sha256'))[:16]}...)"
    lines = [f"# {name}", "",
             f"- method: `{meta['method']}`, {meta['trainable_params']:,} trained parameters, stored in {dtype}",
             f"- open_clip architecture: `{base.get('model_name')}`; backbone initialised from: {init}",
             "- **not CLIP-pretrained**: no CLIP weights were available; see the README for what the backbone is"
             if not base.get("pretrained") else "- CLIP-pretrained backbone",
             f"- training data: `{data.get('root')}` split `{data.get('train_split')}`, selected on "
             f"`{data.get('val_split') or 'a seeded ' + str(data.get('val_fraction')) + ' carve of train'}`",
             f"- data licence: {_licence(str(data.get('root', '')))}",
             f"- selected epoch: {extra.get('epoch')} (validation mR, never test)", "",
             "## Validation metrics per epoch", "",
             "| epoch | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | mR | centroid gap | samples/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v, g = r.get("val", {}), r.get("val_gap", {})
        cells = [f"{v.get(k, float('nan')):.2f}" for k in
                 ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mR")]
        lines.append(f"| {r.get('epoch')} | " + " | ".join(cells) +
                     f" | {g.get('centroid_distance', float('nan')):.3f} | {r.get('samples_per_s', 0):.1f} |")
    lines += ["", "## Recipe (resolved config of the run)", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(),
              "```", "", "## Load", "", "```python", "import harma",
              f'model, _, preprocess, tokenizer = harma.load_adapters("checkpoints/{name}")', "```", ""]
    return "\n".join(lines)


def export(run: Path, out: Path, dtype: str = "fp32") -> Path:
    """Re-save ``run/best`` (or an adapter folder) into ``out`` in ``dtype`` and write MODEL_CARD.md."""
    src = run / "best" if (run / "best").is_dir() else run
    meta = read_adapter_config(src)
    model = load_adapters(src)[0]
    save_adapters(model, out, extra=meta.get("extra"), dtype=DTYPES[dtype])
    cfg_path = run / "config.yaml"
    config = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {"model": meta["model"]}
    card = model_card(out.name, read_adapter_config(out), config, _rows(run), dtype)
    atomic_write_bytes(out / "MODEL_CARD.md", card.encode())
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run folder (uses best/) or an adapter folder")
    p.add_argument("--out", required=True, help="destination, e.g. checkpoints/rs-backbone")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="storage dtype of the tensors")
    args = p.parse_args(argv)
    try:
        out = export(Path(args.run), Path(args.out), args.dtype)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.dtype}) and {out / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
