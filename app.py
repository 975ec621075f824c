"""HarMA demo: remote-sensing image-text retrieval, the frozen backbone (baseline) next to the adapted model.

Tabs: text -> image, image -> text, the embedding space (UMAP + modality-gap numbers) and the R@K table.

    python app.py --data /path/to/ucm                 # a dataset folder in any supported format (or HARMA_DATA)
    python app.py --checkpoint runs/x/best --data D   # any adapter directory (or HARMA_CHECKPOINT)
    python app.py --checkpoint C --index indexes/A    # an image folder indexed by python -m training.build_index

Ranking, caching and metrics live in the library (``harma.index``, ``harma.metrics``, ``harma.gap``);
this file wires them to Gradio. Importing it loads no model and makes no network call.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls (the app runs offline)

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from harma import BaseWeightsError, CheckpointError, ConfigError, ModelConfig, create_model, load_adapters  # noqa: E402
from harma.checkpoint import read_adapter_config  # noqa: E402
from harma.config import from_dict  # noqa: E402
from harma.data import DatasetError, RetrievalSplit, load_split, open_image  # noqa: E402
from harma.index import CaptionPool, EmbeddingIndex, Hit, IndexFormatError, Retriever  # noqa: E402
from harma.metrics import METRIC_KEYS, retrieval_metrics  # noqa: E402
from harma.projection import embedding_projection  # noqa: E402
from harma.presets import Preset, PresetError  # noqa: E402
from harma.sources import ModelSource, one_line  # noqa: E402
from harma.sources import discover_sources as find_sources  # noqa: E402

log = logging.getLogger("harma.app")

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"
DEMO = ASSETS / "demo"  # the bundled gallery (UCM test split; python -m training.build_demo)
DEFAULT_PRESET = "rs-minilm-harma"
MAX_QUERY_CHARS = 300
MAX_K = 50
QUERY_CONCURRENCY = int(os.environ.get("HARMA_QUERY_CONCURRENCY", "16"))  # query events served at once (Gradio: 1)
MAX_UPLOADS = 500
ENV_NAMES = {"cache_dir": "HARMA_CACHE"}  # AppConfig fields whose variable is not HARMA_<FIELD>
MAX_ENCODE = 20_000  # images the app encodes itself for an --index gallery lacking one model's index
PICKER_SIZE = 48
MAX_METRIC_CELLS = 10**8  # image x caption similarities the Metrics tab computes in memory
USER_ERRORS = (DatasetError, CheckpointError, BaseWeightsError, ConfigError, PresetError, ValueError, OSError)

HOW_TO_DATA = ("Start the app with `--data DIR` (or set `HARMA_DATA=DIR`): a dataset folder in any supported format "
               "(HarMA JSON, PE-RSITR txt, csv/tsv, jsonl, or a plain folder of images). Or upload images under "
               "**Gallery source**.")
DEFAULT_MISSING = (f"The default model **{DEFAULT_PRESET}** needs `checkpoints/rs-backbone/` (its backbone, a `full` "
                   "checkpoint) and `checkpoints/ucm-harma/` (its HarMA adapters); missing here: {missing}. "
                   "Produce them with the training commands in `checkpoints/README.md`, or start the app on any "
                   "adapter directory: `python app.py --checkpoint DIR` (or `HARMA_CHECKPOINT=DIR`).")
MATCH_NOTE = ("✓ marks an image whose ground-truth captions contain the query as a whole-word phrase, after both are "
              "normalised with `harma.data.clean_caption` (lower case, no punctuation); exact matches count.")
GAP_ROWS = [  # harma.gap.modality_gap keys shown next to the plots, with what they measure
    ("centroid_distance", "‖mean image − mean caption‖ (Liang et al. 2022); lower = modalities closer"),
    ("centroid_cosine", "cosine of the two modality means"),
    ("alignment", "mean ‖x − y‖² over matched image-caption pairs (Wang & Isola); lower = better aligned"),
    ("uniformity_joint", "log E exp(−2‖u − v‖²) over both modalities; lower = more spread out"),
    ("uniformity_image", "the same within images"),
    ("uniformity_text", "the same within captions"),
    ("mean_cosine_image", "mean cosine between images (cone effect)"),
    ("mean_cosine_text", "mean cosine between captions (cone effect)"),
    ("knn_modality_purity", "share of each point's 10 nearest neighbours of its own modality (chance ≈ 0.5)"),
    ("linear_probe_accuracy", "held-out accuracy of predicting the modality (0.5 = mixed, 1 = separated)"),
]
CSS = "#status {font-size: 0.95em} .harma-note {color: var(--body-text-color-subdued); font-size: 0.9em}"


class AppError(Exception):
    """A problem to show to the user as it is (no traceback)."""


# -- configuration -------------------------------------------------------------------------------
@dataclass
class AppConfig:
    """Where the gallery and the models come from. CLI flags override the ``HARMA_*`` variables."""

    data: Optional[str] = None  # dataset folder (HARMA_DATA)
    index: Optional[str] = None  # prebuilt image index folder(s), comma-separated (HARMA_INDEX)
    split: Optional[str] = None  # split name (HARMA_SPLIT); default: the first of test, val, train present
    checkpoint: Optional[str] = None  # adapter directory to offer first (HARMA_CHECKPOINT)
    model: Optional[str] = None  # preset name or model key selected at start (HARMA_MODEL)
    cache_dir: str = str(ROOT / ".cache" / "harma-app")  # embeddings, projections, uploads (HARMA_CACHE)
    umap_points: int = 1000  # per modality, for the embedding plot (HARMA_UMAP_POINTS)
    allow_download: bool = False  # let open_clip download pretrained tags (HARMA_ALLOW_DOWNLOAD=1)
    device: str = "cpu"  # cpu | cuda | auto (HARMA_DEVICE)
    batch_size: int = 64

    @classmethod
    def from_env(cls, env: Optional[dict] = None) -> "AppConfig":
        env = os.environ if env is None else env
        cfg = cls()
        for f in fields(cls):
            value = env.get(ENV_NAMES.get(f.name, f"HARMA_{f.name.upper()}"))
            if value in (None, ""):
                continue
            if f.name == "allow_download":
                value = value.lower() in ("1", "true", "yes")
            elif f.name in ("umap_points", "batch_size"):
                value = int(value)
            setattr(cfg, f.name, value)
        if not cfg.data and not cfg.index and (DEMO / "test.csv").is_file():
            cfg.data = str(DEMO)  # no dataset given: the bundled demo gallery, so every tab works
        return cfg


def parse_args(argv: Optional[list[str]] = None) -> tuple[AppConfig, argparse.Namespace]:
    base = AppConfig.from_env()
    p = argparse.ArgumentParser(prog="python app.py", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=base.data,
                   help="dataset folder (env HARMA_DATA; default: the bundled demo gallery, assets/demo)")
    p.add_argument("--index", nargs="+", default=base.index.split(",") if base.index else None,
                   help="image index folder(s) from python -m training.build_index (adapted and/or --baseline); "
                   "the gallery is the indexed images (env HARMA_INDEX, comma-separated)")
    p.add_argument("--split", default=base.split, help="split to show (default: test, val or train, first present)")
    p.add_argument("--checkpoint", default=base.checkpoint, help="adapter directory (env HARMA_CHECKPOINT)")
    p.add_argument("--model", default=base.model, help="preset name or model key to select at start")
    p.add_argument("--cache-dir", default=base.cache_dir, help="embedding cache folder (default .cache/harma-app)")
    p.add_argument("--umap-points", type=int, default=base.umap_points, help="max points per modality in the plot")
    p.add_argument("--allow-download", action="store_true", default=base.allow_download,
                   help="let open_clip download pretrained weights (network)")
    p.add_argument("--device", default=base.device, help="cpu | cuda | auto")
    p.add_argument("--host", default=None, help="server name (default: Gradio's, or GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=None, help="server port (default: Gradio's, or GRADIO_SERVER_PORT)")
    args = p.parse_args(argv)
    cfg = AppConfig(data=args.data, index=",".join(args.index) if args.index else None, split=args.split, checkpoint=args.checkpoint, model=args.model,
                    cache_dir=args.cache_dir, umap_points=args.umap_points, allow_download=args.allow_download,
                    device=args.device, batch_size=base.batch_size)
    return cfg, args


# -- model sources -------------------------------------------------------------------------------
def _missing_message(preset: Preset, names: str) -> str:
    if preset.name == DEFAULT_PRESET:
        return DEFAULT_MISSING.format(missing=names)
    return f"preset {preset.name} needs {names}, which this checkout does not have"


def discover_sources(config: AppConfig) -> dict[str, ModelSource]:
    """``--checkpoint``, then the presets, then ``checkpoints/*/`` adapter folders (:mod:`harma.sources`)."""
    return find_sources(ROOT, config.checkpoint, config.allow_download, _missing_message)


# -- models and galleries ------------------------------------------------------------------------
Bundle = tuple[Any, Callable, Callable]  # (model, eval preprocess, tokenizer)


@dataclass
class ModelPair:
    source: ModelSource
    adapted: Bundle
    baseline: Bundle
    method: str


def load_models(source: ModelSource, device: str = "cpu") -> ModelPair:
    """The adapted model from ``source.adapters`` and its backbone without adapters (method zeroshot)."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        meta = read_adapter_config(source.adapters)
        cfg = from_dict(ModelConfig, meta["model"], "model")
        if source.base_weights:
            cfg.base_weights = source.base_weights
        model, _, preprocess, tokenizer = load_adapters(source.adapters, device, cfg.base_weights)
        cfg.method = "zeroshot"
        base, _, base_preprocess, base_tokenizer = create_model(cfg, device)
    except (*USER_ERRORS, RuntimeError) as e:
        raise AppError(f"cannot load {source.label}: {one_line(e)}") from None
    except Exception as e:  # safetensors' own error type for a corrupt weights file
        if type(e).__name__ != "SafetensorError":
            raise
        raise AppError(f"cannot load {source.label}: unreadable weights ({one_line(e)})") from None
    model.eval()
    base.eval()
    return ModelPair(source, (model, preprocess, tokenizer), (base, base_preprocess, base_tokenizer), meta["method"])


@dataclass
class Gallery:
    name: str
    split: RetrievalSplit
    pool: Optional[CaptionPool]  # None: no captions (image-to-text and the metrics need them)
    prebuilt: tuple = ()  # EmbeddingIndex(es) from training.build_index over these images

    @property
    def images(self) -> list[Path]:
        return self.split.images

    def describe(self) -> str:
        caps = (f", {self.split.num_captions:,} captions ({len(self.pool):,} distinct)" if self.pool
                else " (no captions: text → image only)")
        return f"**{self.name}**: {self.split.num_images:,} images{caps}"


def dataset_gallery(root: str, split: Optional[str] = None) -> Gallery:
    """Load a split (missing images are dropped with a warning); default: the first of test, val, train."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise AppError(f"dataset folder `{path}` does not exist or is not a folder. {HOW_TO_DATA}")
    errors = []
    for name in [split] if split else ["test", "val", "train"]:
        try:
            s = load_split(path, name, allow_missing=True)
            break
        except DatasetError as e:
            errors.append(e)
    else:
        raise AppError(one_line(errors[-1]))
    pool = CaptionPool.from_captions(s.captions, s.text_to_image) if s.num_captions else None
    if path.resolve() == DEMO.resolve():
        name = ("bundled demo gallery: UCM-Captions test split (USGS public-domain imagery, captions by "
                "Qu et al. 2016; assets/demo/CREDITS.md); `--data DIR` for your own")
        return Gallery(name, s, pool)
    return Gallery(s.name, s, pool)


def index_gallery(folders: list[str]) -> Gallery:
    """A gallery of the images of prebuilt indexes (all over the same images, e.g. adapted + baseline)."""
    indexes = []
    for folder in folders:
        try:
            indexes.append(EmbeddingIndex.load(Path(folder).expanduser()))
        except IndexFormatError as e:
            raise AppError(f"--index {folder}: {one_line(e)}") from None
    images = indexes[0].image_paths()
    for folder, other in zip(folders[1:], indexes[1:]):
        if other.image_paths() != images:
            raise AppError(f"--index {folder} indexes other images than {folders[0]}")
    if indexes[0].extra.get("kind") != "images":
        raise AppError(f"--index {folders[0]} is not an image index from python -m training.build_index")
    name = Path(folders[0]).name
    split = RetrievalSplit(f"index {name}", Path(indexes[0].extra.get("root") or "."), images, [], [])
    return Gallery(f"index {name}", split, None, tuple(indexes))


def upload_gallery(files: list, cache_dir: Path) -> tuple[str, Gallery, list[str]]:
    """Copy readable uploaded images (as PNG, longest side <= 1024) into the cache; returns (key, gallery, skipped)."""
    paths = [str(getattr(f, "name", f)) for f in (files or [])]
    if not paths:
        raise AppError("choose one or more image files first")
    if len(paths) > MAX_UPLOADS:
        raise AppError(f"{len(paths)} files: upload at most {MAX_UPLOADS} images, or start the app with `--data DIR`")
    good, skipped, h = [], [], hashlib.sha256()
    for p in paths:
        try:
            img = open_image(p)
        except DatasetError as e:
            skipped.append(f"{Path(p).name} ({one_line(e).split(': ', 1)[-1]})")
            continue
        good.append((Path(p).stem, img))
        h.update(Path(p).read_bytes())
    if not good:
        raise AppError("none of the uploaded files is a readable image: " + "; ".join(skipped))
    key = f"upload:{h.hexdigest()[:16]}"
    folder = cache_dir / "uploads" / key.split(":")[1]
    if not (folder / ".complete").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for i, (stem, img) in enumerate(good):
            img.thumbnail((1024, 1024))
            img.save(folder / f"{i:04d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)[:60]}.png")
        (folder / ".complete").touch()
    s = load_split(folder, format="image_folder")
    return key, Gallery(f"uploaded images ({s.num_images})", s, None), skipped


class AppState:
    """Model choices, loaded models, galleries and retrievers, each loaded once and kept (LRU-bounded)."""

    def __init__(self, config: AppConfig, loader: Callable[[ModelSource, str], ModelPair] = load_models) -> None:
        self.config = config
        self.loader = loader
        self.cache_dir = Path(config.cache_dir).expanduser().resolve()
        self.sources = discover_sources(config)
        self.default_model = self._default_model()
        self.default_gallery = "index" if config.index else "data" if config.data else ""
        self._lock = threading.RLock()
        self._models: OrderedDict[str, ModelPair] = OrderedDict()
        self._galleries: dict[str, Gallery] = {}
        self._retrievers: OrderedDict[tuple, tuple[Retriever, Retriever]] = OrderedDict()
        self._results: dict[tuple, Any] = {}  # embedding views and metric tables

    def _default_model(self) -> str:
        if self.config.model:
            return self.model_key(self.config.model)
        if self.config.checkpoint:
            return next(iter(self.sources))
        default = f"preset:{DEFAULT_PRESET}"
        if self.sources[default].problem is None:
            return default
        return next((k for k, s in self.sources.items() if s.problem is None), default)

    def model_key(self, key: Optional[str]) -> str:
        """Accept a key (``preset:NAME``, ``checkpoint:PATH``) or a bare preset name."""
        key = key or self.default_model
        if key in self.sources:
            return key
        if f"preset:{key}" in self.sources:
            return f"preset:{key}"
        raise AppError(f"unknown model {key!r}; choose one of: {', '.join(self.sources)}")

    def model_problem(self, key: Optional[str]) -> Optional[str]:
        return self.sources[self.model_key(key)].problem

    def models(self, key: Optional[str]) -> ModelPair:
        key = self.model_key(key)
        source = self.sources[key]
        if source.problem:
            raise AppError(source.problem)
        with self._lock:
            if key not in self._models:
                self._models[key] = self.loader(source, self.config.device)
                while len(self._models) > 2:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return self._models[key]

    def gallery(self, key: Optional[str]) -> Gallery:
        if not key:
            raise AppError(f"No gallery yet. {HOW_TO_DATA}")
        with self._lock:
            if key not in self._galleries:
                if key == "data":
                    self._galleries[key] = dataset_gallery(self.config.data, self.config.split)
                elif key == "index" and self.config.index:
                    self._galleries[key] = index_gallery(self.config.index.split(","))
                else:  # uploads of an earlier run stay in the cache folder
                    folder = self.cache_dir / "uploads" / key.partition(":")[2]
                    if not key.startswith("upload:") or not (folder / ".complete").is_file():
                        raise AppError("this uploaded gallery is gone; upload the images again")
                    s = load_split(folder, format="image_folder")
                    self._galleries[key] = Gallery(f"uploaded images ({s.num_images})", s, None)
            return self._galleries[key]

    def add_uploads(self, files: list) -> tuple[str, Gallery, list[str]]:
        key, gallery, skipped = upload_gallery(files, self.cache_dir)
        with self._lock:
            self._galleries[key] = gallery
        return key, gallery, skipped

    def retrievers(self, model_key: Optional[str], gallery_key: Optional[str],
                   progress: Optional[Callable] = None) -> tuple[Retriever, Retriever]:
        """(baseline, adapted) over the gallery; embeddings come from the disk cache when present."""
        model_key = self.model_key(model_key)
        gallery, pair = self.gallery(gallery_key), self.models(model_key)
        key = (model_key, gallery_key)
        with self._lock:
            if key not in self._retrievers:
                pool = gallery.pool
                built = []
                for side, bundle, ckpt in (("baseline", pair.baseline, None),
                                           ("adapted", pair.adapted, pair.source.adapters)):
                    cb = None if progress is None else partial(progress, side)
                    built.append(Retriever.build(
                        *bundle, gallery.images, pool.texts if pool else None, checkpoint=ckpt,
                        cache_dir=self.cache_dir / "index", progress=cb, batch_size=self.config.batch_size,
                        caption_metadata=pool.metadata() if pool else None,
                        prebuilt=gallery.prebuilt, max_encode=MAX_ENCODE if gallery.prebuilt else None))
                self._retrievers[key] = (built[0], built[1])
                while len(self._retrievers) > 4:
                    self._retrievers.popitem(last=False)
            self._retrievers.move_to_end(key)
            return self._retrievers[key]

    def cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._results:
                self._results[key] = compute()
            return self._results[key]


# -- helpers shared by the handlers --------------------------------------------------------------
def _progress_cb(progress: Any) -> Callable[[str, str, int, int], None]:
    def cb(side: str, stage: str, done: int, total: int) -> None:
        progress((done, total), desc=f"Encoding the gallery's {stage} with the {side} model (cached afterwards)")
    return cb


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/:])/(?:[^\s/'\"():,;]+/)+([^\s/'\"():,;]+)")


def file_names_only(msg: str) -> str:
    """A message for a visitor: absolute paths (server upload folders, the dataset's location)
    shortened to their file names."""
    return _ABSOLUTE_PATH.sub(r"\1", msg)


def _fail(e: BaseException) -> str:
    """Log (with paths), show a warning toast and return the message for the status box (file names only)."""
    msg = str(e) if isinstance(e, AppError) else one_line(e)
    log.warning("%s", msg)
    msg = file_names_only(msg)
    gr.Warning(msg)
    return f"⚠️ {msg}"


def _clamp_k(k: Any) -> int:
    try:
        return max(1, min(MAX_K, int(k)))
    except (TypeError, ValueError):
        return 8


def _displayable(path: Path, thumbs: Path) -> str:
    """Browsers do not show TIFF: a JPEG copy (longest side <= 256) is written once under ``thumbs``
    and served instead, so repeated queries cost no image encoding."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return str(path)
    st = path.stat()
    out = thumbs / (hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24] + ".jpg")
    if not out.is_file():
        img = open_image(path)
        img.thumbnail((256, 256))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.stem}.{os.getpid()}.{threading.get_ident()}.jpg")
        img.save(tmp, quality=92)
        os.replace(tmp, out)
    return str(out)


def _tiles(app: AppState, gallery: Gallery, hits: list[Hit], matches: set[int]) -> list[tuple[Any, str]]:
    thumbs = app.cache_dir / "thumbs"
    return [(_displayable(gallery.images[h.index], thumbs), f"#{h.rank} · {h.score:.3f}{' ✓' if h.index in matches else ''}")
            for h in hits]


def _caption_rows(hits: list[Hit], truth: Optional[int]) -> list[list]:
    return [[h.rank, round(h.score, 4), h.metadata.get("caption", ""),
             "✓" if truth is not None and truth in h.metadata.get("images", []) else ""] for h in hits]


def picker_indices(gallery: Gallery) -> list[int]:
    """Evenly spaced images of the gallery (so every class of a sorted dataset shows up)."""
    n = gallery.split.num_images
    step = max(1, n // PICKER_SIZE)
    return list(range(0, n, step))[:PICKER_SIZE]


# -- handlers ------------------------------------------------------------------------------------
def status_text(app: AppState, model_key: Optional[str], gallery_key: Optional[str]) -> str:
    lines, key = [], None
    try:
        key = app.model_key(model_key)
        source = app.sources[key]
        lines.append(f"**Model:** {source.label} — " + (f"⚠️ {source.problem}" if source.problem else
                     "baseline = the same backbone without adapters (zero-shot)"))
    except AppError as e:
        lines.append(f"**Model:** ⚠️ {e}")
    default = app.sources.get(f"preset:{DEFAULT_PRESET}")
    if default is not None and default.problem and key != default.key:
        lines.append(f"ℹ️ {default.problem}")
    try:
        lines.append("**Gallery:** " + app.gallery(gallery_key).describe())
    except (AppError, *USER_ERRORS) as e:
        lines.append(f"**Gallery:** ⚠️ {file_names_only(str(e) if isinstance(e, AppError) else one_line(e))}")
    return "\n\n".join(lines)


def search_text(app: AppState, query: Optional[str], k: Any, model_key: Optional[str], gallery_key: Optional[str],
                progress: Any = gr.Progress()) -> tuple[list, list, str]:
    """Text -> image: top-k gallery tiles (image, "#rank · score [✓]") for the baseline and the adapted model."""
    try:
        query = str(query or "").strip()
        if not query:
            raise AppError("type a query first (e.g. one of the examples)")
        note = ""
        if len(query) > MAX_QUERY_CHARS:
            query, note = query[:MAX_QUERY_CHARS], f" The query was cut to {MAX_QUERY_CHARS} characters."
        k = _clamp_k(k)
        gallery = app.gallery(gallery_key)
        base, adapted = app.retrievers(model_key, gallery_key, _progress_cb(progress))
        matches = gallery.pool.images_matching(query) if gallery.pool else set()
        out, times = [], []
        for r in (base, adapted):
            t0 = time.perf_counter()
            hits = r.search_text(query, k)
            times.append(1000 * (time.perf_counter() - t0))
            out.append(_tiles(app, gallery, hits, matches))
        status = (f"Top {k} of {len(gallery.images):,} images for “{query}” — baseline {times[0]:.0f} ms, "
                  f"adapted {times[1]:.0f} ms.{note}")
        if matches:
            status += f" {len(matches)} images have a matching ground-truth caption. {MATCH_NOTE}"
        return out[0], out[1], status
    except (AppError, *USER_ERRORS) as e:
        return [], [], _fail(e)


def _rank_captions(app: AppState, model_key, gallery_key, k, progress, query_fn) -> tuple[list, list]:
    gallery = app.gallery(gallery_key)
    if gallery.pool is None:
        raise AppError(f"{gallery.name} has no captions to rank; start with a dataset that has captions "
                       "(`--data DIR`)")
    base, adapted = app.retrievers(model_key, gallery_key, _progress_cb(progress))
    return query_fn(base, _clamp_k(k)), query_fn(adapted, _clamp_k(k))


def search_image(app: AppState, image: Optional[str], k: Any, model_key: Optional[str], gallery_key: Optional[str],
                 progress: Any = gr.Progress()) -> tuple[Optional[str], list, list, str]:
    """Image -> text: ranked captions of the gallery's caption pool, rows (rank, score, caption, ✓)."""
    try:
        if not image:
            raise AppError("upload an image, or pick one from the gallery below")
        path = str(getattr(image, "name", image))
        pil = open_image(path)  # refuses non-images, corrupt files and decompression bombs
        base, adapted = _rank_captions(app, model_key, gallery_key, k, progress, lambda r, kk: r.search_image(pil, kk))
        return path, _caption_rows(base, None), _caption_rows(adapted, None), f"Captions ranked for {Path(path).name}."
    except (AppError, *USER_ERRORS) as e:
        return None, [], [], _fail(e)


def pick_image(app: AppState, index: int, k: Any, model_key: Optional[str], gallery_key: Optional[str],
               progress: Any = gr.Progress()) -> tuple[Optional[str], list, list, str]:
    """Image -> text for tile ``index`` of the picker (its stored embedding; ✓ = its ground-truth captions)."""
    try:
        gallery = app.gallery(gallery_key)
        indices = picker_indices(gallery)
        if not 0 <= int(index) < len(indices):
            raise AppError(f"no picker tile {index}")
        i = indices[int(index)]
        base, adapted = _rank_captions(app, model_key, gallery_key, k, progress,
                                       lambda r, kk: r.search_gallery_image(i, kk))
        return (str(gallery.images[i]), _caption_rows(base, i), _caption_rows(adapted, i),
                f"Captions ranked for {gallery.images[i].name}; ✓ = one of its ground-truth captions.")
    except (AppError, *USER_ERRORS) as e:
        return None, [], [], _fail(e)


def picker_items(app: AppState, gallery_key: Optional[str]) -> list[tuple[Any, str]]:
    try:
        gallery = app.gallery(gallery_key)
    except (AppError, *USER_ERRORS):
        return []
    return [(_displayable(gallery.images[i], app.cache_dir / "thumbs"), gallery.images[i].name) for i in picker_indices(gallery)]


def use_uploads(app: AppState, files: Optional[list], model_key: Optional[str], current: Optional[str],
                progress: Any = gr.Progress()) -> tuple[str, str, list]:
    """Make the uploaded images the gallery (embeddings computed now, with a progress bar)."""
    try:
        key, gallery, skipped = app.add_uploads(files)
        msg = f"Gallery: {gallery.name}."
        if skipped:
            msg += " Skipped (not readable images): " + "; ".join(skipped)
            gr.Warning(msg)
        if app.model_problem(model_key) is None:
            app.retrievers(model_key, key, _progress_cb(progress))
        return key, status_text(app, model_key, key) + "\n\n" + msg, picker_items(app, key)
    except (AppError, *USER_ERRORS) as e:
        return current or "", _fail(e), picker_items(app, current)


def use_dataset(app: AppState, model_key: Optional[str]) -> tuple[str, str, list]:
    key = app.default_gallery
    return key, status_text(app, model_key, key), picker_items(app, key)


def projection(r: Retriever, gallery: Gallery, max_points: int, cache_dir: Path, seed: int = 0) -> dict:
    """2-D UMAP of a seeded sample (<= max_points per modality) and modality-gap numbers on all embeddings,
    cached on disk (:func:`harma.projection.embedding_projection`)."""
    pool = gallery.pool if r.captions is not None else None
    return embedding_projection(
        r.images.embeddings, r.captions.embeddings if r.captions is not None else None,
        caption_rows=pool.caption_to_text if pool else None,
        text_to_image=gallery.split.text_to_image if pool else None,
        max_points=max_points, cache_dir=cache_dir, seed=seed)


def _figure(view: dict, r: Retriever, gallery: Gallery):
    import plotly.graph_objects as go

    n = len(view["img_rows"])
    xy = view["xy"]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[p[0] for p in xy[:n]], y=[p[1] for p in xy[:n]], mode="markers", name="images",
                             marker=dict(size=6, color="#2563eb", opacity=0.75), hoverinfo="text",
                             hovertext=[gallery.images[i].name for i in view["img_rows"]]))
    if view["txt_rows"]:
        fig.add_trace(go.Scatter(x=[p[0] for p in xy[n:]], y=[p[1] for p in xy[n:]], mode="markers", name="captions",
                                 marker=dict(size=6, color="#f97316", opacity=0.75), hoverinfo="text",
                                 hovertext=[r.captions.metadata[j]["caption"][:120] for j in view["txt_rows"]]))
    fig.update_layout(height=440, margin=dict(l=10, r=10, t=40, b=10), template="plotly_white",
                      legend=dict(orientation="h", y=-0.05), xaxis=dict(showticklabels=False, title=None),
                      yaxis=dict(showticklabels=False, title=None))
    return fig


def embedding_view(app: AppState, model_key: Optional[str], gallery_key: Optional[str],
                   progress: Any = gr.Progress()) -> tuple[Any, Any, list, str]:
    """UMAP plots (baseline, adapted) and the modality-gap table [metric, baseline, adapted, meaning]."""
    try:
        gallery = app.gallery(gallery_key)
        base, adapted = app.retrievers(model_key, gallery_key, _progress_cb(progress))
        progress(None, desc="UMAP projection (cached after the first time)")
        views = app.cached(("view", app.model_key(model_key), gallery_key), lambda: [
            projection(r, gallery, app.config.umap_points, app.cache_dir) for r in (base, adapted)])
        figs = [_figure(v, r, gallery) for v, r in zip(views, (base, adapted))]
        rows = [[name, round(views[0]["gap"][name], 4), round(views[1]["gap"][name], 4), meaning]
                for name, meaning in GAP_ROWS if name in views[0]["gap"]]
        n_img, n_txt = len(views[0]["img_rows"]), len(views[0]["txt_rows"])
        note = (f"UMAP (cosine, random_state=0) of {n_img:,} images and {n_txt:,} distinct captions "
                f"(a seeded sample of at most {app.config.umap_points:,} per modality), fit separately per model. "
                "The numbers are computed on all original embeddings, not on the 2-D projection, which distorts "
                "global distances.")
        if not rows:
            note += " Modality-gap numbers need a gallery with captions."
        return figs[0], figs[1], rows, note
    except (AppError, *USER_ERRORS) as e:
        return None, None, [], _fail(e)


def metrics_table(app: AppState, model_key: Optional[str], gallery_key: Optional[str],
                  progress: Any = gr.Progress()) -> tuple[list, str]:
    """R@1/5/10 in both directions and mR (percent) of baseline and adapted on the gallery's split."""
    try:
        gallery = app.gallery(gallery_key)
        if gallery.pool is None:
            raise AppError(f"{gallery.name} has no captions, so R@K cannot be computed")
        if gallery.split.num_images * gallery.split.num_captions > MAX_METRIC_CELLS:
            raise AppError(f"{gallery.name} is too large for the in-app table; use `python -m training.evaluate`")
        base, adapted = app.retrievers(model_key, gallery_key, _progress_cb(progress))
        rows_of = torch.tensor(gallery.pool.caption_to_text)

        def compute() -> list[list]:
            rows = []
            for name, r in (("baseline (zero-shot)", base), ("adapted", adapted)):
                sim = r.images.embeddings @ r.captions.embeddings[rows_of].T  # (N_img, N_captions)
                m = retrieval_metrics(sim, gallery.split.text_to_image)
                rows.append([name] + [round(m[key], 2) for key in METRIC_KEYS])
            return rows

        rows = app.cached(("metrics", app.model_key(model_key), gallery_key), compute)
        note = (f"Split scored: **{gallery.split.name}**, {gallery.split.num_images:,} images, "
                f"{gallery.split.num_captions:,} captions (cleaned as in evaluation; an image's i2t rank is the best "
                "rank among its captions; tied scores count at their expected rank, so the order of the file does "
                "not matter). Same protocol as `python -m training.evaluate --baseline`. If the adapters were "
                "trained on this split, the numbers measure fit, not generalisation.")
        return rows, note
    except (AppError, *USER_ERRORS) as e:
        return [], _fail(e)


# -- UI ------------------------------------------------------------------------------------------
def load_examples() -> list[str]:
    try:
        return [str(q) for q in json.loads((ASSETS / "examples.json").read_text())["queries"]]
    except (OSError, ValueError, KeyError, TypeError):
        return ["many planes parked at an airport"]


def build_demo(config: Optional[AppConfig] = None,
               loader: Callable[[ModelSource, str], ModelPair] = load_models) -> gr.Blocks:
    """The whole UI. Cheap: models, galleries and embeddings load on first use.

    Args:
        config: gallery and model sources; default :meth:`AppConfig.from_env`.
        loader: ``loader(source, device) -> ModelPair``; tests and other front ends can inject models.
    """
    app = AppState(config or AppConfig.from_env(), loader)
    choices = [(s.label + (" — unavailable" if s.problem else ""), k) for k, s in app.sources.items()]
    with gr.Blocks(title="HarMA: remote-sensing image-text retrieval") as demo:
        demo.harma_state = app  # for tests and launch_options
        gr.Markdown("# HarMA: remote-sensing image–text retrieval\nThe frozen backbone (**baseline**) next to "
                    "the same backbone with **HarMA adapters** (arXiv 2404.18253).")
        gallery_key = gr.State(app.default_gallery)
        with gr.Row():
            model = gr.Dropdown(choices, value=app.default_model, label="Model", scale=3)
            k = gr.Slider(1, MAX_K, value=8, step=1, label="Top k", scale=1)
        status = gr.Markdown(elem_id="status", label="status")
        with gr.Accordion("Gallery source", open=False):
            gr.Markdown(HOW_TO_DATA)
            files = gr.File(file_count="multiple", file_types=["image"], label="Images to search")
            with gr.Row():
                use_files = gr.Button("Use the uploaded images")
                use_data = gr.Button("Back to the dataset", visible=bool(app.config.data))
        with gr.Tabs():
            with gr.Tab("Text → image", id="t2i"):
                with gr.Row():
                    query = gr.Textbox(label="Query", placeholder="many planes parked at an airport",
                                       max_length=MAX_QUERY_CHARS, scale=4, elem_id="query")
                    search = gr.Button("Search", variant="primary", scale=1, elem_id="search")
                gr.Examples([[q] for q in load_examples()], inputs=[query], label="Example queries")
                gr.Markdown(MATCH_NOTE, elem_classes="harma-note")
                with gr.Row():
                    base_gallery = gr.Gallery(label="Baseline (zero-shot)", columns=4,
                                              elem_id="baseline-gallery")
                    adapted_gallery = gr.Gallery(label="Adapted (HarMA)", columns=4,
                                                 elem_id="adapted-gallery")
            with gr.Tab("Image → text", id="i2t"):
                with gr.Row():
                    with gr.Column(scale=1):
                        upload = gr.File(file_types=["image"], label="Query image (upload)", type="filepath")
                        preview = gr.Image(label="Query image", interactive=False, height=200)
                    picker = gr.Gallery(label="…or pick one from the gallery", columns=6, height=340, scale=2,
                                        allow_preview=False, elem_id="picker")
                headers = ["rank", "score", "caption", "✓"]
                with gr.Row():
                    base_caps = gr.Dataframe(headers=headers, label="Baseline (zero-shot)", wrap=True,
                                             column_widths=["10%", "15%", "67%", "8%"])
                    adapted_caps = gr.Dataframe(headers=headers, label="Adapted (HarMA)", wrap=True,
                                                column_widths=["10%", "15%", "67%", "8%"])
            with gr.Tab("Embedding space", id="space") as space_tab:
                with gr.Row():
                    base_plot = gr.Plot(label="Baseline (zero-shot)", elem_id="baseline-plot")
                    adapted_plot = gr.Plot(label="Adapted (HarMA)", elem_id="adapted-plot")
                gap_table = gr.Dataframe(headers=["metric", "baseline", "adapted", "what it measures"],
                                         label="Modality gap (original embedding space)", wrap=True)
                space_note = gr.Markdown(elem_classes="harma-note", label="note")
            with gr.Tab("Metrics", id="metrics") as metrics_tab:
                metric_table = gr.Dataframe(headers=["model"] + [m.replace("_", " ") for m in METRIC_KEYS],
                                            label="Retrieval on the current split (%)")
                metrics_note = gr.Markdown(elem_classes="harma-note", label="note")

        common = [k, model, gallery_key]
        # queries are served concurrently (one pool for all query events); the model calls inside
        # are serialised by harma.index.Retriever, everything else (search, files, streaming) overlaps
        fast = dict(concurrency_limit=QUERY_CONCURRENCY, concurrency_id="queries")
        t2i = dict(fn=partial(search_text, app), inputs=[query] + common,
                   outputs=[base_gallery, adapted_gallery, status], **fast)
        search.click(**t2i, api_name="search_text")
        query.submit(**t2i, api_visibility="private")
        upload.upload(partial(search_image, app), [upload] + common, [preview, base_caps, adapted_caps, status],
                      api_name="search_image", **fast)

        def on_pick(k_, model_, gallery_, evt: gr.SelectData, progress=gr.Progress()):
            return pick_image(app, evt.index, k_, model_, gallery_, progress)

        picker.select(on_pick, common, [preview, base_caps, adapted_caps, status], api_visibility="private", **fast)
        space_tab.select(partial(embedding_view, app), [model, gallery_key],
                         [base_plot, adapted_plot, gap_table, space_note], api_name="embedding_view")
        metrics_tab.select(partial(metrics_table, app), [model, gallery_key], [metric_table, metrics_note],
                           api_name="metrics")
        model.change(partial(status_text, app), [model, gallery_key], status, api_name="status")
        use_files.click(partial(use_uploads, app), [files, model, gallery_key], [gallery_key, status, picker],
                        api_visibility="private")
        use_data.click(partial(use_dataset, app), [model], [gallery_key, status, picker], api_visibility="private")
        demo.load(partial(status_text, app), [model, gallery_key], status, api_visibility="private")
        demo.load(partial(picker_items, app), [gallery_key], picker, api_visibility="private")
    return demo


def served_folders(app: AppState) -> list[str]:
    """The folders the app must serve files from: its thumbnails and uploads (not its embedding
    cache), and the real (symlinks resolved) folders of the gallery's images, so a dataset whose
    ``images/`` is a link to an image store works."""
    folders = {app.cache_dir / "thumbs", app.cache_dir / "uploads"}
    for key in {app.default_gallery, "data" if app.config.data else "", "index" if app.config.index else ""} - {""}:
        try:
            folders.update(p.resolve().parent for p in app.gallery(key).images)
        except (AppError, *USER_ERRORS) as e:  # shown in the status line when the gallery is used
            log.warning("gallery %s: %s", key, one_line(e))
    if app.config.data:
        folders.add(Path(app.config.data).expanduser().resolve())
    return sorted(str(f) for f in folders)


def launch_options(demo: gr.Blocks) -> dict[str, Any]:
    """``launch()`` arguments: theme and css (Gradio 6 takes them here), the folders files are served
    from (:func:`served_folders`) and the embedding cache, which is never served."""
    app: AppState = demo.harma_state
    return dict(allowed_paths=served_folders(app), blocked_paths=[str(app.cache_dir / "index")],
                theme=gr.themes.Soft(), css=CSS, max_file_size="25mb")


demo = build_demo()


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config, args = parse_args(argv)
    ui = demo if config == demo.harma_state.config else build_demo(config)
    ui.queue().launch(server_name=args.host, server_port=args.port, **launch_options(ui))


if __name__ == "__main__":
    main()
