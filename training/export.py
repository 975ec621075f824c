"""Ship a run: copy its ``best/`` adapters into ``checkpoints/<name>/`` with a model card.

    python -m training.export --run runs/rsicd_backbone-full --out checkpoints/rs-backbone --dtype fp16

The card states the data (and its licence), the recipe (the run's resolved config), the validation
metrics per epoch, what the backbone was initialised from, and how to load the checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch
import yaml

from harma import CheckpointError, HarmaError, HarmaModel, load_adapters, read_adapter_config, save_adapters
from harma.io import atomic_write_bytes
from harma.weights import base_weight_keys, open_clip_names
from training.cli import DISK_FULL, CliError, os_error_message, run_command
from training.config import NO_CARVE
from training.rundir import RunError, read_metrics, read_saved_config
from training.state import write_folder

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LICENCES = {
    "rsicd": "RSICD (Lu et al. 2017) captions on AID imagery (Xia et al. 2017, Google Earth): research use",
    "ucm": "UCM-Captions (Qu et al. 2016) on UC Merced Land Use imagery (Yang & Newsam 2010, USGS public "
           "domain, released for research)",
}


def _licence(root: str) -> str:
    name = Path(root).name.lower()
    return next((text for key, text in LICENCES.items() if key in name), "see the dataset's own licence")


def _selection(data: dict) -> str:
    """Where the epoch was selected, in words (a named split or how val was carved from train)."""
    if data.get("val_split"):
        return f"split `{data['val_split']}`"
    fraction = data.get("val_fraction")
    if data.get("carve", "random") == "block":
        return (f"a block carve of train (the first {fraction} of the ids of every class, a contiguous block as "
                "UCM's test split is)")
    return f"a random {fraction} carve of train (seed {data.get('carve_seed')}; leaky on tiled scenes such as UCM)"


def model_card(name: str, meta: dict, config: dict, rows: list[dict], dtype: str, origin: Optional[str] = None) -> str:
    """Markdown card from an adapter config, the run's resolved config and its metrics rows."""
    model, data, extra = meta["model"], config.get("data", {}), meta.get("extra", {})
    validated = data.get("carve") != NO_CARVE
    base = meta["base"]
    init = ("open_clip tag " + str(base.get("pretrained"))) if base.get("pretrained") else "random initialisation"
    hf_text = ((base.get("model_cfg") or {}).get("text_cfg") or {}).get("hf_model_name")
    if hf_text and not base.get("pretrained"):
        init = f"random initialisation, except the text tower: pretrained HF model `{hf_text}`"
    if model.get("lock_text"):
        k = model.get("lock_text_unlocked_layers") or 0
        init += (f" (text tower locked except its last {k} blocks: embeddings not trained)" if k
                 else " (text tower locked: not trained)")
    if base.get("base_weights"):
        init += f" + base weights {base['base_weights']} (sha256 {str(base.get('base_weights_sha256'))[:16]}...)"
    lines = [f"# {name}", "",
             f"- method: `{meta['method']}`, {meta['trainable_params']:,} trained parameters, stored in {dtype}",
             f"- open_clip architecture: `{base.get('model_name')}`; backbone initialised from: {init}",
             "- **not CLIP-pretrained**: no CLIP weights were available; see the README for what the backbone is"
             if not base.get("pretrained") else "- CLIP-pretrained backbone",
             f"- training data: `{data.get('root')}` split `{data.get('train_split')}`, "
             + (f"selected on {_selection(data)}" if validated else "all of it (data.carve=none: no validation carve)"),
             f"- data licence: {_licence(str(data.get('root', '')))}",
             *([origin] if origin else []),
             (f"- selected epoch: {extra.get('epoch')} (validation mR, never test)" if validated else
              f"- weights after epoch {extra.get('epoch')}, the last of a fixed schedule: nothing was selected")
             + (f"; weights: their moving average (optim.ema_decay={extra['ema_decay']})" if extra.get("ema_decay") else ""),
             ""]
    lines += _per_epoch(rows) if validated else _per_epoch_training(rows)
    lines += ["", "## Recipe (resolved config of the run)", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(),
              "```", "", "## Load", "", "```python", "import harma",
              f'model, _, preprocess, tokenizer = harma.load_adapters("checkpoints/{name}")', "```", ""]
    return "\n".join(lines)


def _per_epoch(rows: list[dict]) -> list[str]:
    """The card's table of validation metrics per epoch."""
    lines = ["## Validation metrics per epoch", "",
             "| epoch | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | mR | centroid gap | samples/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v, g = r.get("val", {}), r.get("val_gap", {})
        cells = [f"{v.get(k, float('nan')):.2f}" for k in
                 ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mR")]
        lines.append(f"| {r.get('epoch')} | " + " | ".join(cells) +
                     f" | {g.get('centroid_distance', float('nan')):.3f} | {r.get('samples_per_s', 0):.1f} |")
    return lines


def _per_epoch_training(rows: list[dict]) -> list[str]:
    """The card's table per epoch for a run with no validation: its training loss and speed."""
    lines = ["## Training per epoch (no validation)", "",
             "| epoch | training loss | samples/s | minutes |", "|---|---|---|---|"]
    for r in rows:
        loss = (r.get("train") or {}).get("loss", float("nan"))
        lines.append(f"| {r.get('epoch')} | {loss:.4f} | {r.get('samples_per_s', 0):.1f} | "
                     f"{r.get('epoch_s', 0) / 60:.1f} |")
    return lines


def supersede_base(model: HarmaModel) -> Optional[str]:
    """Make a ``full`` checkpoint standalone when it stores every tensor its base weights provided.

    A backbone continued from an earlier ``full`` checkpoint (stage 2 from stage 1) would otherwise
    name that checkpoint as its base, so it could not replace it in place. Returns a line for the
    model card saying what the run started from, or None when nothing changed.
    """
    base = model.base_info.get("base_weights")
    if model.config.method != "full" or not base or not Path(base).exists():
        return None
    if not base_weight_keys(base) <= set(open_clip_names(model.trainable_state_dict())):
        return None
    sha = str(model.base_info.get("base_weights_sha256"))
    model.config.base_weights = None
    model.base_info.update(base_weights=None, base_weights_sha256=None)
    return (f"- continued from base weights `{base}` (sha256 {sha[:16]}...{_provenance(Path(base))}); this checkpoint "
            "stores every tensor they provided, so it loads without them")


def _provenance(base: Path) -> str:
    """``, run X epoch N, val mR M`` from the base weights' own adapter config, when they have one."""
    try:
        extra = read_adapter_config(base).get("extra") or {}
    except CheckpointError:  # a plain weight file, not one of our folders
        return ""
    mr = (extra.get("val") or {}).get("mR")
    parts = [f"run `{extra['run']}`" if extra.get("run") else "", f"epoch {extra['epoch']}" if "epoch" in extra else "",
             f"val mR {mr:.2f}" if isinstance(mr, (int, float)) else ""]
    return "".join(", " + part for part in parts if part)


def export(run: Path, out: Path, dtype: str = "fp32") -> Path:
    """Re-save ``run/best`` (or an adapter folder) into ``out`` in ``dtype`` and write MODEL_CARD.md.

    The folder is written whole into a temporary sibling and then renamed into place (replacing an
    earlier export), so a failure (a full disk) leaves the previous ``out``, or nothing, never
    weights without their card. A ``full`` run continued from earlier base weights that it entirely
    supersedes is saved standalone (see :func:`supersede_base`), so ``out`` may be the folder of
    those base weights.
    """
    src = run / "best" if (run / "best").is_dir() else run
    meta = read_adapter_config(src)
    model = load_adapters(src)[0]
    origin = supersede_base(model)
    base = model.base_info.get("base_weights")
    if base and (Path(base).resolve() == out.resolve() or out.resolve() in Path(base).resolve().parents):
        raise CliError(f"--out {out} holds the base weights {base} these adapters need; export to another folder")
    config, rows = _run_config(run, meta), read_metrics(run)

    def fill(tmp: Path) -> None:
        save_adapters(model, tmp, extra=meta.get("extra"), dtype=DTYPES[dtype])
        card = model_card(out.name, read_adapter_config(tmp), config, rows, dtype, origin)
        atomic_write_bytes(tmp / "MODEL_CARD.md", card.encode())

    write_folder(out, fill)
    return out


def _run_config(run: Path, meta: dict) -> dict:
    """The run's resolved ``config.yaml`` (its adapter config's model section when there is none)."""
    path = run / "config.yaml"
    return read_saved_config(path) if path.is_file() else {"model": meta["model"]}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run folder (uses best/) or an adapter folder")
    p.add_argument("--out", required=True, help="destination, e.g. checkpoints/rs-backbone")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="storage dtype of the tensors")
    args = p.parse_args(argv)
    return run_command(lambda: _export_and_report(args), (HarmaError, CliError, RunError, OSError))


def _export_and_report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    try:
        export(Path(args.run), out, args.dtype)
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise CliError(f"--out {out}: {os_error_message(e)}; nothing was changed there (an earlier export stays as it "
                       "was): free space and run the export again") from None
    print(f"wrote {out} ({args.dtype}) and {out / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    sys.exit(main())
