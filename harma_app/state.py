"""The app's configuration (``--flags`` over ``HARMA_*`` variables), its model sources and the state the
handlers share: loaded models, galleries and retrievers, each loaded once and kept (LRU-bounded)."""

from __future__ import annotations

import argparse
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
from harma.errors import ConfigError, one_line
from harma.presets import Preset
from harma.retrieval import Retriever, RetrieverOptions
from harma.sources import ModelSource
from harma.sources import discover_sources as find_sources

from .common import DEFAULT_PRESET, DEMO, HOW_TO_DATA, MAX_ENCODE, ROOT, SHIPPED, USER_ERRORS, AppError
from .galleries import Gallery, dataset_gallery, index_gallery, upload_gallery, uploaded_gallery

DESCRIPTION = ("HarMA demo: remote-sensing image-text retrieval, the frozen backbone (baseline) next to the adapted "
               "model.")
ENV_NAMES = {"cache_dir": "HARMA_CACHE"}  # AppConfig fields whose variable is not HARMA_<FIELD>
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
    device: str = "cpu"  # cpu | cuda | auto (HARMA_DEVICE)
    batch_size: int = 64
    follow_links: bool = False  # accept images resolving outside --data / the index root (HARMA_FOLLOW_LINKS)

    @classmethod
    def from_env(cls, env: Optional[dict] = None) -> "AppConfig":
        """The ``HARMA_*`` variables (empty ones ignored), read with the project's one config parser."""
        env = os.environ if env is None else env
        names = {f.name: ENV_NAMES.get(f.name, f"HARMA_{f.name.upper()}") for f in fields(cls)}
        given = {field: env[var] for field, var in names.items() if env.get(var)}
        for field, value in given.items():  # one at a time, so an error names its variable
            try:
                from_dict(cls, {field: value})
            except ConfigError as e:
                raise ConfigError(f"{names[field]}={value!r}: {e}") from None
        cfg = from_dict(cls, given)
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
    p.add_argument("--split", default=base.split, help="split to show (default: test, val or train, first present)")
    p.add_argument("--checkpoint", default=base.checkpoint, help="adapter directory (env HARMA_CHECKPOINT)")
    p.add_argument("--model", default=base.model, help="preset name or model key to select at start")
    p.add_argument("--cache-dir", default=base.cache_dir, help="embedding cache folder (default .cache/harma-app)")
    p.add_argument("--umap-points", type=int, default=base.umap_points, help="max points per modality in the plot")
    p.add_argument("--follow-links", action="store_true", default=base.follow_links,
                   help="accept images that resolve outside the --data folder or the --index's image root (symlinks "
                   "to an image store, ../ references); env HARMA_FOLLOW_LINKS=1; docs/security.md")
    p.add_argument("--allow-download", action="store_true", default=base.allow_download,
                   help="let open_clip download pretrained weights (network)")
    p.add_argument("--device", default=base.device, help="cpu | cuda | auto")
    p.add_argument("--host", default=None, help="server name (default: Gradio's, or GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=None, help="server port (default: Gradio's, or GRADIO_SERVER_PORT)")
    args = p.parse_args(argv)
    cfg = AppConfig(data=args.data, index=",".join(args.index) if args.index else None, split=args.split,
                    checkpoint=args.checkpoint, model=args.model, cache_dir=args.cache_dir,
                    umap_points=args.umap_points, allow_download=args.allow_download, device=args.device,
                    batch_size=base.batch_size, follow_links=args.follow_links)
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

    def adapted_label(self, key: Optional[str]) -> str:
        """"Adapted (<method>)" for the model ``key`` (read from its adapter config; no model is loaded)."""
        try:
            source = self.sources[self.model_key(key)]
            method = read_adapter_config(source.adapters)["method"] if source.adapters else None
        except (AppError, *USER_ERRORS):
            method = None
        return f"Adapted ({METHOD_NAMES[method]})" if method in METHOD_NAMES else "Adapted"

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
                    self._galleries[key] = dataset_gallery(self.config.data, self.config.split,
                                                           self.config.follow_links)
                elif key == "index" and self.config.index:
                    self._galleries[key] = index_gallery(self.config.index.split(","), self.config.follow_links)
                else:  # uploads of an earlier run stay in the cache folder
                    self._galleries[key] = uploaded_gallery(key, self.cache_dir)
            return self._galleries[key]

    def add_uploads(self, files: list) -> tuple[str, Gallery, list[str]]:
        key, gallery, skipped = upload_gallery(files, self.cache_dir)
        with self._lock:
            self._galleries[key] = gallery
        return key, gallery, skipped

    def retrievers(self, model_key: Optional[str], gallery_key: Optional[str],
                   progress: Optional[Callable[[float, str], None]] = None) -> tuple[Retriever, Retriever]:
        """(baseline, adapted) over the gallery; embeddings come from those shipped with the bundled gallery
        or the disk cache when present, else are computed (and cached). ``progress(fraction, desc)``
        follows one bar through the steps: loading the models, then each model's images and captions."""
        model_key = self.model_key(model_key)
        gallery = self.gallery(gallery_key)
        key = (model_key, gallery_key)
        with self._lock:
            if key not in self._retrievers:
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
                    built.append(Retriever.build(*bundle, gallery.images, gallery.pool, options, progress=cb))
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
