"""Build the app's bundled demo gallery, ``assets/demo/``, from UCM-Captions' official test split, and
its demo scene for the Scene search tab (``assets/demo/scene/``, a GeoTIFF copied as it is, with its credit).

    python -m training.build_demo --data ../shared/datasets/ucm --out assets/demo
    python -m training.build_demo --scene ../shared/datasets/scenes/manila_pasig_bridge_oam.tif --out assets/demo

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
from harma.errors import HarmaError
from harma.io import atomic_write_bytes, folder_bytes
from harma.scene import Scene
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

SCENE_HEADING = "## Demo scene"  # the section of CREDITS.md that python -m training.build_demo --scene writes
SCENE_CREDIT = ("Aerial orthophoto over the Pasig river, Manila (2048 x 2048 px, 0.10 m, EPSG:3395), bundled as it "
                "is for the app's Scene search tab. Licence: CC BY 4.0. Imagery: OpenAerialMap contributors; tile "
                "`5b90f92da0d7280005fab355_4310` of the OAM-TCD dataset (Veitch-Michaelis et al. 2024, "
                "\"OAM-TCD: a globally diverse dataset of high-resolution tree cover maps\", arXiv 2407.11743).")


def _scene_section(credits: str) -> str:
    """The demo scene's section of a CREDITS.md text ("" when it has none)."""
    at = credits.find(SCENE_HEADING)
    return credits[at:].rstrip() + "\n" if at >= 0 else ""


def build_scene(scene: Path, out: Path, credit: str = SCENE_CREDIT) -> int:
    """Copy the GeoTIFF ``scene`` as it is to ``out/scene/`` (the app's demo scene; anything there before
    is replaced) and its credit into ``out/CREDITS.md``; returns the demo folder's size in bytes. Refuses a
    file that is not a georeferenced raster (:meth:`harma.scene.Scene.open`) and a folder over its budget."""
    Scene.open(scene)  # one clear message for a non-raster, a raster without a CRS, a tiny one
    folder = out / "scene"
    old = {p: p.read_bytes() for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}
    credits_path = out / "CREDITS.md"
    credits = credits_path.read_text() if credits_path.is_file() else ""
    for p in old:
        p.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / scene.name, scene.read_bytes())
    kept = credits[:credits.find(SCENE_HEADING)] if SCENE_HEADING in credits else credits
    section = f"{SCENE_HEADING}\n\n`scene/{scene.name}`: {credit.strip()}\n"
    atomic_write_bytes(credits_path, ((kept.rstrip() + "\n\n" if kept.strip() else "") + section).encode())
    size = folder_bytes(out)
    if size > MAX_BYTES:  # put back what was there
        (folder / scene.name).unlink()
        for p, data in old.items():
            atomic_write_bytes(p, data)
        if credits:
            atomic_write_bytes(credits_path, credits.encode())
        else:
            credits_path.unlink()
        raise DatasetError(f"{out} would take {size / 2**20:.1f} MiB with the scene {scene.name} (limit "
                           f"{MAX_BYTES / 2**20:.0f} MiB, with the gallery and the app's shipped embeddings); "
                           "bundle a smaller scene")
    return size


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
    scene_credit = _scene_section((out / "CREDITS.md").read_text()) if (out / "CREDITS.md").is_file() else ""
    if (out / "scene").is_dir():  # the demo scene (build_scene) stays, with its credit
        shutil.copytree(out / "scene", tmp / "scene")
    gallery_credit = CREDITS.format(side=side)
    atomic_write_bytes(tmp / "CREDITS.md", (gallery_credit + ("\n" + scene_credit if scene_credit else "")).encode())
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
    p.add_argument("--data", help="UCM-Captions folder (PE-RSITR txt with a test split): (re)build the gallery")
    p.add_argument("--scene", help="a GeoTIFF to bundle as the Scene search tab's demo scene (copied as it is)")
    p.add_argument("--scene-credit", default=SCENE_CREDIT, help="its credit and licence for CREDITS.md (default: "
                   "the Manila OAM-TCD tile's)")
    p.add_argument("--out", default="assets/demo", help="demo folder (the gallery is replaced; its scene/ is kept)")
    p.add_argument("--split", default="test", help="split to bundle (default: test)")
    p.add_argument("--side", type=int, default=192, help="longest image side in pixels")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality")
    args = p.parse_args(argv)
    if not args.data and not args.scene:
        p.error("give --data (the gallery), --scene (the demo scene) or both")
    return run_command(lambda: _build_and_report(args), (HarmaError, OSError))


def _build_and_report(args: argparse.Namespace) -> None:
    if args.data:
        size = build(Path(args.data), Path(args.out), args.split, args.side, args.quality)
        print(f"wrote {args.out} ({size / 2**20:.2f} MB)")
    if args.scene:
        size = build_scene(Path(args.scene), Path(args.out), args.scene_credit)
        print(f"wrote {Path(args.out) / 'scene' / Path(args.scene).name} (demo folder {size / 2**20:.2f} MB)")


if __name__ == "__main__":
    sys.exit(main())
