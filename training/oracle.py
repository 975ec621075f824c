"""Reference points for a retrieval split: what knowing only the scene class is worth, and what a
frozen text tower allows. No image is read; the numbers depend on the captions and class labels.

    python -m training.oracle --data ../shared/datasets/rsicd --split val

Rows (R@K and mR exactly as ``training.evaluate`` computes them):

- ``scene class only``: an image scores 1 against every caption of its own class and 0 otherwise,
  ties broken at random (the mean of ``--seeds`` draws): a perfect scene classifier that knows
  nothing else.
- ``class centroid (text space)``: each image embedded as the mean text embedding of all captions
  of its class: a perfect classifier that maps each class to one point in the text space.
- ``own captions (text space)``: each image embedded as the mean text embedding of its own
  captions: the ceiling for an image tower trained against this frozen text tower.

Class labels come from the annotations when they have them, else from image names of the form
``CLASS_N.ext`` (AID and RSICD, e.g. ``airport_109.jpg``).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, Optional

import torch
import torch.nn.functional as F

from harma import ModelConfig, create_model
from harma.data import RetrievalSplit, clean_caption
from harma.encode import encode_texts
from harma.metrics import METRIC_KEYS, format_table, retrieval_metrics
from training.cli import CliError, resolve_split, run_command, write_json
from training.config import DataConfig

_NAMED = re.compile(r"^(?P<cls>.+?)_\d+$")
DATA = DataConfig()  # the trainer's defaults: val carve (train:val) and caption cleaning


def class_labels(split: RetrievalSplit) -> list[str]:
    """Per-image class names: the annotations' labels, else the ``CLASS_N`` part of each file name."""
    if split.labels is not None:
        return list(split.labels)
    out = []
    for path in split.images:
        m = _NAMED.match(path.stem)
        if m is None:
            raise CliError(f"{split.name}: no class labels in the annotations and image {path.name} is not "
                           "named CLASS_N (e.g. airport_109.jpg), so its scene class is unknown")
        out.append(m["cls"])
    return out


def _class_ids(labels: list[str]) -> tuple[torch.Tensor, int]:
    """Per-image class index (classes in sorted order) and the number of classes."""
    names = {c: i for i, c in enumerate(sorted(set(labels)))}
    return torch.tensor([names[c] for c in labels]), len(names)


def class_only(split: RetrievalSplit, labels: list[str], seeds: int = 5) -> dict[str, float]:
    """Expected metrics of a model that ranks by scene class alone (mean over ``seeds`` random tie orders)."""
    img_cls, _ = _class_ids(labels)
    t2i = torch.tensor(split.text_to_image)
    same = (img_cls[:, None] == img_cls[t2i][None, :]).float()
    runs = []
    for seed in range(seeds):
        noise = torch.rand(same.shape, generator=torch.Generator().manual_seed(seed))
        runs.append(retrieval_metrics(same + 1e-3 * noise, t2i))
    return {k: sum(r[k] for r in runs) / len(runs) for k in METRIC_KEYS}


def text_space(text: torch.Tensor, split: RetrievalSplit, labels: list[str]) -> dict[str, dict[str, float]]:
    """The two text-space oracles from normalised caption embeddings ``text`` (N_txt, D)."""
    t2i = torch.tensor(split.text_to_image)
    own = F.normalize(torch.zeros(split.num_images, text.shape[1]).index_add_(0, t2i, text), dim=-1)
    img_cls, num_classes = _class_ids(labels)
    centroids = F.normalize(torch.zeros(num_classes, text.shape[1]).index_add_(0, img_cls[t2i], text), dim=-1)
    return {"class centroid (text space)": retrieval_metrics(centroids[img_cls] @ text.T, t2i),
            "own captions (text space)": retrieval_metrics(own @ text.T, t2i)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.oracle", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--split", default="val", help="split name, or train:val for the seeded carve of train")
    p.add_argument("--model", default="RS-ViT-S16-MiniLM", help="open_clip model whose text tower embeds the captions")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag for --model")
    p.add_argument("--no-text", action="store_true", help="only the scene-class row (no model is built)")
    p.add_argument("--seeds", type=int, default=5, help="random tie orders averaged for the scene-class row")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p


def oracle(args: argparse.Namespace) -> dict[str, Any]:
    split = resolve_split(args.data, args.split, DATA.val_fraction, DATA.carve_seed, DATA.carve, DATA.carve_class_size)
    if split.num_captions == 0:
        raise CliError(f"{split.name}: the split has no captions")
    labels = class_labels(split)
    rows = {"scene class only": class_only(split, labels, args.seeds)}
    if not args.no_text:
        model, _, _, tokenizer = create_model(ModelConfig(model_name=args.model, pretrained=args.pretrained,
                                                          method="zeroshot"))
        text = encode_texts(model, [clean_caption(c, DATA.max_words) for c in split.captions], tokenizer)
        rows.update(text_space(text, split, labels))
    return {"split": split.name, "num_images": split.num_images, "num_captions": split.num_captions,
            "num_classes": len(set(labels)), "text_model": None if args.no_text else args.model, "rows": rows}


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _report(args))


def _report(args: argparse.Namespace) -> None:
    out = oracle(args)
    print(f"{out['split']}: {out['num_images']:,} images, {out['num_captions']:,} captions, "
          f"{out['num_classes']} classes; text model {out['text_model']}")
    print(format_table(out["rows"]))
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    sys.exit(main())
