"""Print the trainable-parameter line of a method on an open_clip model, without downloading weights.

    python -m harma.summary --model ViT-B-32 --method harma
    trainable params: 5,934,397 of 157,211,710 (3.7748%)

The model is built on PyTorch's ``meta`` device: shapes only, no memory, no weights.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from typing import Optional

import open_clip

from .config import ALSO_TRAIN, METHODS, SHARE_MODES, ConfigError, HarmaConfig, ModelConfig
from .model import HarmaModel


def build_meta_model(model_name: str, method: str, share_mode: str = "text_only", also_train: tuple[str, ...] = ()):
    if model_name not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip model {model_name!r}")
    clip = open_clip.create_model(model_name, device="meta")
    return HarmaModel(clip, ModelConfig(model_name=model_name, method=method, harma=HarmaConfig(share_mode=share_mode),
                                        also_train=also_train))


def breakdown(model) -> dict[str, int]:
    """Trainable parameters grouped by the first path components (for ``--verbose``)."""
    groups: Counter = Counter()
    for name, p in model.trainable_state_dict().items():
        parts = name.split(".")
        key = parts[0] if parts[0] != "clip" else ".".join(q for q in parts[1:4] if not q.isdigit())
        groups[key] += p.numel()
    return dict(groups)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harma.summary", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (default ViT-B-32)")
    parser.add_argument("--method", default="harma", choices=METHODS)
    parser.add_argument("--share-mode", default="text_only", choices=SHARE_MODES, help="HarMA MMS sharing")
    parser.add_argument("--also-train", nargs="*", default=[], choices=ALSO_TRAIN, metavar="KIND",
                        help="backbone parameters trained beside the adapters: norms and/or biases (model.also_train)")
    parser.add_argument("--verbose", action="store_true", help="also print trainable parameters per group")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # open_clip warns that no pretrained weights were loaded: intended here
    try:
        model = build_meta_model(args.model, args.method, args.share_mode, tuple(args.also_train))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(model.trainable_summary())
    if args.verbose:
        for key, n in sorted(breakdown(model).items()):
            print(f"  {key:<40} {n:>12,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
