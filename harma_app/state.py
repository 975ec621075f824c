"""The app's configuration (``--flags`` over ``HARMA_*`` variables), its model sources and the state the
handlers share: loaded models, galleries and retrievers, each loaded once and kept (LRU-bounded)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from harma import ModelConfig, create_model, load_adapters
from harma.checkpoint import read_adapter_config
from harma.config import from_dict
from harma.encode import unreadable_images
from harma.errors import ConfigError, IndexFormatError, one_line
from harma.presets import Preset
from harma.retrieval import CaptionPool, Retriever, RetrieverOptions
from harma.retrieval.identity import cache_problem
from harma.sources import READ_ERRORS, ModelSource, find_source
from harma.sources import discover_sources as find_sources

from .common import (
    DEFAULT_PRESET,
    DEMO,
    HOW_TO_DATA,
    MAX_ENCODE,
    QUERY_CONCURRENCY,
    ROOT,
    SHIPPED,
    USER_ERRORS,
    AppError,
    file_names_only,
    log,
    short_list,
)
from .galleries import Gallery, dataset_gallery, upload_gallery, uploaded_gallery
from .indexes import MissingSide, index_gallery

DESCRIPTION = ("HarMA demo: remote-sensing image-text retrieval, the frozen backbone (baseline) next to the adapted "
               "model.")
ENV_NAMES = {"cache_dir": "HARMA_CACHE"}  # AppConfig fields whose variable is not HARMA_<FIELD>
MINIMUM = {"umap_points": 2, "batch_size": 1, "query_concurrency": 1}  # whole-number settings: their least value
DEVICES = "cpu, cuda, cuda:N, mps or auto"
DEFAULT_MISSING = (f"The default model **{DEFAULT_PRESET}** needs `checkpoints/rs-backbone/` (its backbone, a `full` "
                   "checkpoint) and `checkpoints/ucm-harma/` (its HarMA adapters); missing here: {missing}. "
                   "Produce them with the training commands in `checkpoints/README.md`, or start the app on any "
                   "adapter directory: `python app.py --checkpoint DIR` (or `HARMA_CHECKPOINT=DIR`).")


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
    device: str = "cpu"  # cpu | cuda | cuda:N | mps | auto (HARMA_DEVICE)
    batch_size: int = 64  # images per forward pass when the app encodes a gallery (HARMA_BATCH_SIZE)
    query_concurrency: int = QUERY_CONCURRENCY  # query events served at once (HARMA_QUERY_CONCURRENCY)
    follow_links: bool = False  # accept images resolving outside --data / the index root (HARMA_FOLLOW_LINKS)

    def __post_init__(self) -> None:
        """Refuse values the app would only trip over later (a query pool of 0 hangs every query)."""
        for name, least in MINIMUM.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"{name} must be a whole number >= {least}, got {value!r}")
        if self.device != "auto":
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ConfigError(f"device {self.device!r} is not a device: use {DEVICES}") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ConfigError(f"device {self.device!r}: torch sees no CUDA device here (use cpu or auto)")
            if device.type not in ("cpu", "cuda", "mps"):
                raise ConfigError(f"device {self.device!r} is not supported: use {DEVICES}")

    @classmethod
    def read(cls, values: dict[str, Any], names: dict[str, str]) -> "AppConfig":
        """The config of ``values`` (field -> value, strings read as the field's type), each checked on
        its own first so that an error names its setting as ``names[field]`` (a variable or a flag)."""
        for field, value in values.items():
            try:
                from_dict(cls, {field: value})
            except ConfigError as e:
                raise ConfigError(f"{names[field]}={value!r}: {e}") from None
        return from_dict(cls, values)

    @classmethod
    def from_env(cls, env: Optional[dict] = None) -> "AppConfig":
        """The ``HARMA_*`` variables (empty ones ignored), read with the project's one config parser."""
        env = os.environ if env is None else env
        names = {f.name: ENV_NAMES.get(f.name, f"HARMA_{f.name.upper()}") for f in fields(cls)}
        cfg = cls.read({field: env[var] for field, var in names.items() if env.get(var)}, names)
        if not cfg.data and not cfg.index and (DEMO / "test.csv").is_file():
            cfg.data = str(DEMO)  # no dataset given: the bundled demo gallery, so every tab works
        return cfg


def parse_args(argv: Optional[list[str]] = None) -> tuple[AppConfig, argparse.Namespace]:
    base = AppConfig.from_env()
    p = argparse.ArgumentParser(prog="python app.py", description=DESCRIPTION)
    p.add_argument("--data", default=base.data,
                   help="dataset folder (env HARMA_DATA; default: the bundled demo gallery, assets/demo)")
    p.add_argument("--index", nargs="+", default=base.index.split(",") if base.index else None,
                   help="image index folder(s) from python -m training.build_index (adapted and/or --baseline); "
                   "the gallery is the indexed images (env HARMA_INDEX, comma-separated)")
    p.add_argument("--split", default=base.split,
                   help="split to show (default: test, val or train, first present); all: every split together")
    p.add_argument("--checkpoint", default=base.checkpoint, help="adapter directory (env HARMA_CHECKPOINT)")
    p.add_argument("--model", default=base.model,
                   help="model to select at start: a preset or checkpoint folder name, or a model key (env HARMA_MODEL)")
    p.add_argument("--cache-dir", default=base.cache_dir, help="embedding cache folder (default .cache/harma-app)")
    p.add_argument("--umap-points", type=int, default=base.umap_points, help="max points per modality in the plot")
    p.add_argument("--follow-links", action="store_true", default=base.follow_links,
                   help="accept images that resolve outside the --data folder or the --index's image root (symlinks "
                   "to an image store, ../ references); env HARMA_FOLLOW_LINKS=1; docs/security.md")
    p.add_argument("--allow-download", action="store_true", default=base.allow_download,
                   help="let open_clip download pretrained weights (network)")
    p.add_argument("--device", default=base.device, help="cpu | cuda | cuda:N | mps | auto")
    p.add_argument("--host", default=None, help="server name (default: Gradio's, or GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=None, help="server port (default: Gradio's, or GRADIO_SERVER_PORT)")
    args = p.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(AppConfig) if hasattr(args, f.name)}
    values["index"] = ",".join(args.index) if args.index else None
    changed = {k: v for k, v in values.items() if v != getattr(base, k)}  # the rest was checked by from_env
    cfg = base
    if changed:
        AppConfig.read(changed, {k: "--" + k.replace("_", "-") for k in changed})  # an error names the flag
        cfg = dataclasses.replace(base, **changed)
    if cfg.model:
        sources = discover_sources(cfg)
        if find_source(sources, cfg.model) is None:
            setting = "--model" if "model" in changed else "HARMA_MODEL"
            raise ConfigError(f"{setting}={cfg.model!r}: {unknown_model(cfg.model, sources)}")
    return cfg, args


# -- model sources -------------------------------------------------------------------------------
METHOD_NAMES = {"harma": "HarMA", "mrs": "MRS-Adapter", "full": "full fine-tuning"}
HOW = {"download": "run the app with `--allow-download` (network access) to fetch them",
       "adapters": "train some (docs/cli.md) and start with `--checkpoint DIR`"}


def _missing_message(preset: Preset, names: str) -> str:
    if preset.name == DEFAULT_PRESET:
        return DEFAULT_MISSING.format(missing=names)
    return f"preset {preset.name} needs {names}, which this checkout does not have"


def discover_sources(config: AppConfig) -> dict[str, ModelSource]:
    """``--checkpoint``, then the presets, then ``checkpoints/*/`` adapter folders (:mod:`harma.sources`)."""
    return find_sources(ROOT, config.checkpoint, config.allow_download, _missing_message, HOW)


def unknown_model(name: str, sources: dict[str, ModelSource]) -> str:
    """The message for a model name that names no choice (a path is shown by its last part only)."""
    path = name.removeprefix("checkpoint:")
    shown = f"checkpoint:…/{Path(path).name}" if "/" in path or os.sep in path else name
    return (f"unknown model {shown!r}; choose one of: {', '.join(sources)} "
            "(a preset's or checkpoint folder's name alone works too)")


# -- models --------------------------------------------------------------------------------------
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
    except (*USER_ERRORS, RuntimeError) as e:  # RuntimeError: torch refusing a state dict or a device
        raise AppError(f"cannot load {source.label}: {one_line(e)}") from None
    model.eval()
    base.eval()
    return ModelPair(source, (model, preprocess, tokenizer), (base, base_preprocess, base_tokenizer), meta["method"])


# -- the state the handlers share ----------------------------------------------------------------
class AppState:
    """Model choices, loaded models, galleries and retrievers, each loaded once and kept (LRU-bounded).

    Each item is made under its own lock, so loading one model (or encoding a gallery with it) never
    holds up the visitors of a model that is loaded already; the state's lock guards only its dicts."""

    def __init__(self, config: AppConfig, loader: Callable[[ModelSource, str], ModelPair] = load_models) -> None:
        self.config = config
        self.loader = loader
        self.cache_dir = Path(config.cache_dir).expanduser().resolve()
        self.sources = discover_sources(config)
        self.default_model = self._default_model()
        self.default_gallery = "index" if config.index else "data" if config.data else ""
        self._lock = threading.RLock()
        self._making: dict[tuple, threading.Lock] = {}  # (store, key) -> the lock of the item being made
        self._models: OrderedDict[str, ModelPair] = OrderedDict()
        self._galleries: dict[str, Gallery] = {}
        self._retrievers: OrderedDict[tuple, tuple[Retriever, Retriever]] = OrderedDict()
        self._results: dict[tuple, Any] = {}  # embedding views and metric tables
        self._notes: dict[str, str] = {}  # gallery key -> what loading it left out

    def _default_model(self) -> str:
        if self.config.model:
            key = find_source(self.sources, self.config.model)
            if key is None:
                raise ConfigError(f"HARMA_MODEL / --model={self.config.model!r}: "
                                  + unknown_model(self.config.model, self.sources))
            return key
        if self.config.checkpoint:
            return next(iter(self.sources))
        default = f"preset:{DEFAULT_PRESET}"
        if self.sources[default].problem is None:
            return default
        return next((k for k, s in self.sources.items() if s.problem is None), default)

    def _once(self, name: str, store: dict, key: Any, make: Callable[[], Any], keep: Optional[int] = None) -> Any:
        """``store[key]``, made by ``make()`` under a lock of its own (once, however many ask at the same
        time) while other items are served; ``keep``: most recently used items kept (``store`` an OrderedDict)."""
        with self._lock:
            if key in store:
                if keep:
                    store.move_to_end(key)
                return store[key]
            lock = self._making.setdefault((name, key), threading.Lock())
        with lock:
            with self._lock:
                if key in store:  # made while this thread waited
                    return store[key]
            try:
                value = make()
            except BaseException:
                with self._lock:
                    self._making.pop((name, key), None)
                raise
            with self._lock:
                store[key] = value
                self._making.pop((name, key), None)
                while keep and len(store) > keep:
                    store.popitem(last=False)
            return value

    def model_key(self, key: Optional[str]) -> str:
        """The key of a model choice from a key (``preset:NAME``, ``checkpoint:FOLDER``), a bare preset or
        folder name, or (the earlier keys) an adapter directory's path (:func:`harma.sources.find_source`)."""
        key = key or self.default_model
        found = find_source(self.sources, str(key))
        if found is None:
            raise AppError(unknown_model(str(key), self.sources))
        return found

    def adapted_label(self, key: Optional[str]) -> str:
        """"Adapted (<method>)" for the model ``key`` (read from its adapter config; no model is loaded)."""
        try:
            source = self.sources[self.model_key(key)]
            method = read_adapter_config(source.adapters)["method"] if source.adapters else None
        except (AppError, *READ_ERRORS):
            method = None
        return f"Adapted ({METHOD_NAMES[method]})" if method in METHOD_NAMES else "Adapted"

    def model_problem(self, key: Optional[str]) -> Optional[str]:
        return self.sources[self.model_key(key)].problem

    def models(self, key: Optional[str]) -> ModelPair:
        key = self.model_key(key)
        source = self.sources[key]
        if source.problem:
            raise AppError(source.problem)
        return self._once("model", self._models, key, lambda: self.loader(source, self.config.device), keep=2)

    def gallery(self, key: Optional[str]) -> Gallery:
        if not key:
            raise AppError(f"No gallery yet. {HOW_TO_DATA}")

        def load() -> Gallery:
            if key == "data":
                return self._readable(key, dataset_gallery(self.config.data, self.config.split,
                                                           self.config.follow_links))
            if key == "index" and self.config.index:
                return index_gallery(self.config.index.split(","), self.config.follow_links)
            return uploaded_gallery(key, self.cache_dir)  # uploads of an earlier run stay in the cache folder

        return self._once("gallery", self._galleries, key, load)

    def _readable(self, key: str, gallery: Gallery) -> Gallery:
        """``gallery`` without the images that cannot be decoded (and their captions), so that one bad file
        does not stop every query; what was left out becomes a note in the status line. The bundled gallery
        is trusted; an index's images were checked when it was built."""
        if gallery.bundled:
            return gallery
        bad = unreadable_images(gallery.images, self.cache_dir / "checked")
        if not bad:
            return gallery
        n = len(gallery.images)
        reasons = [file_names_only(why) for _, why in bad]
        if len(bad) == n:
            raise AppError(f"none of the {n:,} images of {gallery.name} can be read; first: {reasons[0]}")
        gone = {i for i, _ in bad}
        split = gallery.split.subset([i for i in range(n) if i not in gone])
        pool = CaptionPool.from_captions(split.captions, split.text_to_image) if split.num_captions else None
        self._notes[key] = f"skipped {len(bad):,} of {n:,} images that cannot be read: " + short_list(reasons)
        log.warning("gallery %s: %s", gallery.name, self._notes[key])
        return dataclasses.replace(gallery, split=split, pool=pool)

    def notes(self, gallery_key: Optional[str]) -> list[str]:
        """What a visitor should know about the gallery and the caches: images left out, caching off."""
        notes = [self._notes[gallery_key]] if gallery_key in self._notes else []
        cache = cache_problem(self.cache_dir / "index")
        return notes + ([cache] if cache else [])

    def add_uploads(self, files: list) -> tuple[str, Gallery, list[str]]:
        key, gallery, skipped = upload_gallery(files, self.cache_dir)
        with self._lock:
            self._galleries[key] = gallery
        return key, gallery, skipped

    def retrievers(self, model_key: Optional[str], gallery_key: Optional[str],
                   progress: Optional[Callable[[float, str], None]] = None) -> tuple[Retriever, Retriever]:
        """(baseline, adapted) over the gallery; embeddings come from those shipped with the bundled gallery
        or the disk cache when present, else are computed (and cached). ``progress(fraction, desc)``
        follows one bar through the steps: loading the models, then each model's images and captions.
        An archive gallery is searched only through an index its model built: a side without one is a
        :class:`MissingSide` (saying so when searched), and with neither the answer is that message."""
        model_key = self.model_key(model_key)
        gallery = self.gallery(gallery_key)

        def build() -> tuple[Retriever, Retriever]:
            stages = ["images"] + (["captions"] if gallery.pool is not None else [])
            steps = 1 + 2 * len(stages)

            def report(step: int, done: float, desc: str) -> None:
                if progress is not None:
                    progress((step + done) / steps, f"Step {step + 1} of {steps}: {desc}")

            report(0, 0.0, "loading the models")
            pair = self.models(model_key)
            built = []
            for s, (side, bundle, ckpt) in enumerate((("baseline", pair.baseline, None),
                                                      ("adapted", pair.adapted, pair.source.adapters))):
                def cb(stage: str, done: int, total: int, s: int = s, side: str = side) -> None:
                    report(1 + s * len(stages) + stages.index(stage), done / max(total, 1),
                           f"encoding the gallery's {stage} with the {side} model (cached afterwards)")

                options = RetrieverOptions(checkpoint=ckpt, cache_dir=self.cache_dir / "index",
                                           shipped_dir=SHIPPED if gallery.bundled else None,
                                           batch_size=self.config.batch_size, prebuilt=gallery.prebuilt,
                                           max_encode=MAX_ENCODE if gallery.prebuilt else None)
                try:
                    built.append(Retriever.build(*bundle, gallery.images, gallery.pool, options, progress=cb))
                except IndexFormatError as e:
                    if not gallery.archive:
                        raise
                    built.append(MissingSide(f"{side} model: {one_line(e)}"))
            if all(isinstance(r, MissingSide) for r in built):
                raise AppError(f"{gallery.name} was not indexed by this model: "
                               + "; ".join(r.problem for r in reversed(built)))
            return built[0], built[1]

        return self._once("retrievers", self._retrievers, (model_key, gallery_key), build, keep=4)

    def cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        return self._once("result", self._results, key, compute)
