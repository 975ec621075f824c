"""Build the app's bundled demo gallery, ``assets/demo/``, from UCM-Captions' official test split.

    python -m training.build_demo --data ../shared/datasets/ucm --out assets/demo

210 images (10 per class, 21 classes), downscaled to JPEG, their 1,050 captions and class labels in
``test.csv`` (image, caption, label_name), and ``CREDITS.md``. ``python app.py`` with no dataset
uses it, so the app works on a fresh clone and on a Hugging Face Space. The pixels are USGS
public-domain orthoimagery (UC Merced Land Use, Yang & Newsam 2010); the captions are UCM-Captions
(Qu et al. 2016). The gallery is the *test* split: nothing here is used for training or selection.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import sys
from pathlib import Path
from typing import Optional

from harma.data import DatasetError, load_split, open_image, scene_names
from harma.io import atomic_write_bytes, folder_bytes
from training.cli import run_command

MAX_BYTES = 8 * 2**20  # the demo folder's budget, images and the app's shipped embeddings and maps together

CREDITS = """# Demo gallery: credits and licence

The app's bundled gallery: UCM-Captions' official test split (210 images, 10 per class, 21 classes;
1,050 captions), made by `python -m training.build_demo --data <UCM-Captions folder> --out assets/demo`.
It is used for demonstration only; nothing in this folder is used for training or model selection.

- **Images**: UC Merced Land Use dataset, Yang & Newsam, "Bag-of-visual-words and spatial extensions
  for land-use classification", ACM SIGSPATIAL 2010. Tiles of USGS National Map Urban Area Imagery,
  which is in the public domain. Downscaled here to {side} px JPEG.
- **Captions**: UCM-Captions, Qu, Zhang, Li, Li & Wang, "Deep semantic understanding of high
  resolution remote sensing image", CITS 2016; the test split as published with PE-RSITR
  (Yuan et al. 2023). Class labels follow the image ids (100 per class, in alphabetical order).

Obtain the full dataset from its authors (see the project README, "Datasets").
"""


def build(data: Path, out: Path, split: str = "test", side: int = 192, quality: int = 85) -> int:
    """Write the gallery; returns its size in bytes."""
    s = load_split(data, split)
    labels = scene_names(s)  # UCM's numbered blocks by name (harma.data.scene_names)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    names = []
    for path in s.images:
        img = open_image(path)
        img.thumbnail((side, side))
        name = f"images/{path.stem}.jpg"
        img.save(tmp / name, quality=quality, optimize=True)
        names.append(name)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "caption", "label_name"])
    for caption, i in zip(s.captions, s.text_to_image):
        writer.writerow([names[i], caption.strip(), labels[i]])
    atomic_write_bytes(tmp / f"{split}.csv", buf.getvalue().encode())
    atomic_write_bytes(tmp / "CREDITS.md", CREDITS.format(side=side).encode())
    size = folder_bytes(tmp)
    if size > MAX_BYTES:
        shutil.rmtree(tmp)
        raise DatasetError(f"the demo gallery would take {size / 2**20:.1f} MiB (limit {MAX_BYTES / 2**20:.0f} MiB, "
                           "with the app's shipped embeddings and maps); lower --side or --quality")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return size


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.build_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="UCM-Captions folder (PE-RSITR txt with a test split)")
    p.add_argument("--out", default="assets/demo", help="gallery folder (replaced)")
    p.add_argument("--split", default="test", help="split to bundle (default: test)")
    p.add_argument("--side", type=int, default=192, help="longest image side in pixels")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality")
    args = p.parse_args(argv)
    return run_command(lambda: _build_and_report(args), (DatasetError, OSError))


def _build_and_report(args: argparse.Namespace) -> None:
    size = build(Path(args.data), Path(args.out), args.split, args.side, args.quality)
    print(f"wrote {args.out} ({size / 2**20:.2f} MB)")


if __name__ == "__main__":
    sys.exit(main())
