"""``HarmaModel``: an open_clip CLIP plus the adapters of one method, and the factory that builds it.

One class serves every method so that all comparisons run through the same code:
``harma`` (MGA + MMS adapters), ``mrs`` (PE-RSITR MRS-Adapter), ``full`` (all backbone weights
trained) and ``zeroshot`` (nothing trained). Trainability is set by structure (the modules the
injector created), never by parameter-name substrings (method.md §7.5).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapters import PaddingMask
from .archs import arch_config, ensure_arch
from .config import TOWERS, ModelConfig
from .data.transforms import CLIP_MEAN, CLIP_STD, eval_transform, train_transform
from .errors import BaseWeightsError, ConfigError
from .inject import (
    adapter_wrappers,
    find_towers,
    inject_harma,
    inject_mrs,
    locked_text_parameters,
    output_projection_parameters,
    remove_adapters,
    text_token_input,
    text_tower_parameters,
    text_tower_parts,
)
from .io import CONFIG_NAME, read_json
from .weights import load_base_weights, quiet_pickle_warnings

log = logging.getLogger(__name__)


class HarmaModel(nn.Module):
    """A CLIP with adapters. ``forward`` returns a dict of normalised features and the temperature.

    Args:
        clip: an open_clip ``CLIP``/``CustomTextCLIP`` with its base weights already loaded.
        cfg: the model config (method and adapter settings).
        base_info: identity of the base weights (model name, tag, file hash), stored in checkpoints.
    """

    def __init__(self, clip: nn.Module, cfg: ModelConfig, base_info: Optional[dict] = None) -> None:
        super().__init__()
        self.config = cfg
        self.base_info = dict(base_info or {"model_name": cfg.model_name, "pretrained": cfg.pretrained})
        self.targeted_modules: list[str] = []
        # Shared adapters are registered here *before* `clip`, so their canonical parameter names
        # are `mms.*` / `mrs.*` and each is saved once.
        self.mms: Optional[nn.ModuleList] = None
        self.mrs: Optional[nn.Module] = None
        self._hooks = []
        self._padding: Optional[PaddingMask] = None  # which text tokens are padding, for the text adapters
        if cfg.method == "harma":
            if cfg.harma.text_padding_mask and "text" in cfg.harma.towers:
                self._padding = PaddingMask()
                token_input, self._pad_id = text_token_input(clip)
            self.targeted_modules, self.mms = inject_harma(clip, cfg.harma, self._padding)
            if self._padding is not None:  # hooked once injection succeeded, so a failure leaves clip untouched
                self._hooks.append(token_input.register_forward_pre_hook(self._read_padding))
        elif cfg.method == "mrs":
            self.targeted_modules, self.mrs = inject_mrs(clip, cfg.mrs)
        self.clip = clip
        device = next(clip.parameters()).device
        self.temperature = nn.Parameter(torch.tensor(float(cfg.temperature_init), device=device))
        self._augment = False
        # Token dropout for PE-RSITR's augmented views, applied where the token sequence enters a tower:
        # the input of an open_clip transformer, or the output of a HF model's embeddings.
        for t in find_towers(clip).values() if cfg.method == "mrs" else []:
            if t.entry is not None:
                self._hooks.append(t.entry.register_forward_pre_hook(self._token_dropout))
            elif t.embeddings is not None:
                self._hooks.append(t.embeddings.register_forward_hook(self._token_dropout_output))
        # model.also_train: those backbone parameters, their tower and base values (for disable_adapters / unload)
        text = {id(p) for p in text_tower_parameters(clip)}
        self._also_base = [("text" if id(p) in text else "image", p, p.detach().clone()) for p in self._also_trained()]
        self._trainable = self._select_trainable()
        self.requires_grad_(False)
        for p in self._trainable.values():
            p.requires_grad_(True)

    # -- trainability -------------------------------------------------------------------------
    def _select_trainable(self) -> dict[str, nn.Parameter]:
        method = self.config.method
        chosen: list[nn.Module | nn.Parameter] = []
        if method in ("harma", "mrs"):
            chosen += self._adapter_modules()
            if method == "harma":
                chosen += [w.gate for _, w in adapter_wrappers(self.clip)]
            chosen += [p for _, p, _ in self._also_base]
        elif method == "full":
            frozen = {id(getattr(self.clip, n, None)) for n in ("logit_scale", "logit_bias")}
            if self.config.lock_text:
                frozen |= {id(p) for p in locked_text_parameters(self.clip, self.config.lock_text_unlocked_layers)}
            chosen += [p for p in self.clip.parameters() if id(p) not in frozen]
        if self.config.learn_temperature and method != "zeroshot":
            chosen.append(self.temperature)
        ids = set()
        for item in chosen:
            ids.update(id(p) for p in (item.parameters() if isinstance(item, nn.Module) else [item]))
        return {n: p for n, p in self.named_parameters() if id(p) in ids}  # named_parameters de-duplicates

    @property
    def also_trained_parameters(self) -> list[nn.Parameter]:
        """The backbone parameters trained beside the adapters (``model.also_train``); [] without it."""
        return [p for _, p, _ in self._also_base]

    def _adapter_modules(self) -> list[nn.Module]:
        """Every module the method added: each wrapper's adapter, and the shared MMS / MRS adapters."""
        return [w.adapter for _, w in adapter_wrappers(self.clip)] + [m for m in (self.mms, self.mrs) if m is not None]

    def _backbone_modules(self) -> list[nn.Module]:
        """Every module of the CLIP outside the adapters the method added (a wrapper's wrapped layer counts)."""
        skip = {id(m) for a in self._adapter_modules() for m in a.modules()}
        return [m for m in self.clip.modules() if id(m) not in skip]

    def _also_trained(self) -> list[nn.Parameter]:
        """The backbone parameters ``model.also_train`` names: LayerNorm weights and biases ("norms");
        biases of linear and convolution layers and of attention input projections ("biases");
        convolution weights, the ViT's patch embedding ("convs"); the towers' output projection
        matrices into the shared embedding space ("proj"). Each but "proj" by module type."""
        kinds = self.config.also_train
        found: dict[str, list[nn.Parameter]] = {k: [] for k in kinds}
        for m in self._backbone_modules():
            if "norms" in kinds and isinstance(m, nn.LayerNorm):
                found["norms"] += [p for p in (m.weight, m.bias) if p is not None]
            if "biases" in kinds:
                if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.bias is not None:
                    found["biases"].append(m.bias)
                if isinstance(m, nn.MultiheadAttention) and m.in_proj_bias is not None:
                    found["biases"].append(m.in_proj_bias)
            if "convs" in kinds and isinstance(m, nn.modules.conv._ConvNd):
                found["convs"].append(m.weight)
        if "proj" in kinds:
            found["proj"] = output_projection_parameters(self.clip)
        for kind, params in found.items():
            if not params:
                raise ConfigError(f"model.also_train={kind!r}: the backbone {self.config.model_name!r} has no such "
                                  "parameters")
        return [p for params in found.values() for p in params]

    @property
    def text_is_frozen(self) -> bool:
        """True when text features cannot change during training (no trainable text weight, text
        tower kept in eval mode): the trainer may then cache them."""
        c = self.config
        return c.method == "zeroshot" or (c.method == "full" and c.lock_text and not c.lock_text_unlocked_layers)

    def train(self, mode: bool = True) -> "HarmaModel":
        super().train(mode)
        if mode and self.text_is_frozen:
            for part in text_tower_parts(self.clip):
                part.eval()  # e.g. BERT dropout off: a locked tower gives deterministic features
        if mode and not self.config.backbone_dropout:
            for m in self._backbone_dropout_modules():
                m.training = False  # this module only: an adapter may sit inside it (HarMA's, in BertOutput)
        return self

    def _backbone_dropout_modules(self) -> list[nn.Module]:
        """The backbone's dropout layers and their parents (HF attention reads its own ``training``
        flag to pick the attention-dropout rate), adapters excluded."""
        return [m for m in self._backbone_modules() if any(isinstance(c, nn.modules.dropout._DropoutNd) for c in (m, *m.children()))]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores: exactly the trainable parameters, each shared one once."""
        return {n: p.detach() for n, p in self._trainable.items()}

    def num_parameters(self, trainable_only: bool = False) -> int:
        params = self._trainable.values() if trainable_only else self.parameters()
        return sum(p.numel() for p in params)

    def trainable_summary(self) -> str:
        """PEFT-style one-liner: ``trainable params: 5,934,397 of 157,211,710 (3.7748%)``."""
        n, total = self.num_parameters(True), self.num_parameters()
        return f"trainable params: {n:,} of {total:,} ({100 * n / max(total, 1):.4f}%)"

    # -- encoding -------------------------------------------------------------------------------
    def _read_padding(self, module: nn.Module, args: tuple) -> None:
        self._padding.value = args[0] == self._pad_id  # a bound method, so a deep copy hooks its own mask

    def _token_dropout(self, module: nn.Module, args: tuple) -> Optional[tuple]:
        if not self._augment:
            return None
        return (F.dropout(args[0], self.config.mrs.aug_dropout, training=True),) + tuple(args[1:])

    def _token_dropout_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
        if not self._augment:
            return None
        return F.dropout(output, self.config.mrs.aug_dropout, training=True)

    @contextlib.contextmanager
    def augmented(self) -> Iterator[None]:
        """Inside this context the token sequences entering both towers go through dropout
        (``mrs.aug_dropout``): PE-RSITR's augmented views for the intra-modal loss terms."""
        self._augment = True
        try:
            yield
        finally:
            self._augment = False

    @contextlib.contextmanager
    def disable_adapters(self, *towers: str) -> Iterator[None]:
        """Inside this context the adapters of ``towers`` ("image", "text"; default both) are
        bypassed, so those towers compute their base features (PEFT's ``disable_adapter``). For
        ablations: how much each tower's adapters contribute to a trained model. Backbone parameters
        trained through ``model.also_train`` hold their base values meanwhile."""
        found = find_towers(self.clip)
        towers = towers or tuple(found)
        unknown = [t for t in towers if t not in TOWERS]
        if unknown:
            raise ConfigError(f"disable_adapters: unknown tower(s) {unknown}; expected 'image' and/or 'text'")
        prefixes = tuple(found[t].path + "." for t in towers if t in found)
        chosen = [w for name, w in adapter_wrappers(self.clip) if name.startswith(prefixes)]
        trained = [(p, p.detach().clone()) for tower, p, _ in self._also_base if tower in towers]
        for w in chosen:
            w.enabled = False
        self._restore_base(towers)
        try:
            yield
        finally:
            for w in chosen:
                w.enabled = True
            with torch.no_grad():
                for p, value in trained:
                    p.copy_(value)

    def _restore_base(self, towers: tuple[str, ...] = TOWERS) -> None:
        """Put the base values back into the backbone parameters ``model.also_train`` trained."""
        with torch.no_grad():
            for tower, p, base in self._also_base:
                if tower in towers:
                    p.copy_(base)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=normalize)

    def forward(self, images: torch.Tensor, texts: Optional[torch.Tensor], augmented_views: bool = False,
                text_features: Optional[torch.Tensor] = None) -> dict[str, Any]:
        """Normalised features of a batch. ``text_features`` (already normalised) replaces encoding
        ``texts``; valid only when :attr:`text_is_frozen` (the trainer's text cache)."""
        out = {
            "image_features": self.encode_image(images),
            "text_features": text_features if text_features is not None else self.encode_text(texts),
            "temperature": self.temperature,
        }
        if augmented_views:
            with self.augmented():
                out["image_features_aug"] = self.encode_image(images)
                out["text_features_aug"] = self.encode_text(texts)
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable and self._padding is not None:
            # recomputation may run in autograd's threads, which never saw the (per-thread) padding mask
            raise ConfigError("harma.text_padding_mask does not work with gradient checkpointing; turn one off")
        self.clip.set_grad_checkpointing(enable)

    def unload(self) -> nn.Module:
        """Remove hooks and adapters and return the plain open_clip model (PEFT ``unload``), with the
        base values back in any backbone parameter ``model.also_train`` trained."""
        for h in self._hooks:
            h.remove()
        remove_adapters(self.clip)
        self._restore_base()
        return self.clip


def build_clip(cfg: ModelConfig, device: str | torch.device = "cpu", *,
               weights_follow: bool = False) -> tuple[nn.Module, dict]:
    """Create the open_clip backbone with its base weights; returns the model and its identity.

    ``weights_follow``: the caller loads the rest of the model right after (a saved ``full``
    checkpoint), so open_clip's "initialized partially" warning would mislead and is dropped."""
    ensure_arch(cfg.model_name)
    try:
        with _quiet_transformers(), quiet_pickle_warnings(), \
                _partial_init_warning(dropped=bool(cfg.base_weights) or weights_follow):
            clip = open_clip.create_model(cfg.model_name, pretrained=cfg.pretrained, device=device,
                                          force_patch_dropout=cfg.patch_dropout or None)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, KeyError) as e:
        if not cfg.pretrained:
            raise
        # a file open_clip reads with torch.load(weights_only=True): a pickle that would run code, a
        # corrupt or foreign file, or a tag with no weights here; one line, not torch's traceback
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise BaseWeightsError(f"model.pretrained={cfg.pretrained}: cannot be loaded for {cfg.model_name} "
                               f"({type(e).__name__}: {first[:200]}); weights are read with "
                               "torch.load(weights_only=True), so pickled code is refused") from None
    if cfg.patch_dropout and not hasattr(clip.visual, "patch_dropout"):
        raise ConfigError(f"model.patch_dropout={cfg.patch_dropout} needs a ViT image tower; "
                         f"{cfg.model_name}'s is {type(clip.visual).__name__}")
    info = {"model_name": cfg.model_name, "pretrained": cfg.pretrained,
            "model_cfg": arch_config(cfg.model_name)}
    if cfg.base_weights:
        _check_base_checkpoint_model(cfg)
        report = load_base_weights(clip, cfg.base_weights)
        info.update(base_weights=str(cfg.base_weights), base_weights_sha256=report.sha256)
        log.info("loaded %d base tensors from %s", report.loaded, cfg.base_weights)
    return clip, info


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' per-load report and progress bar while open_clip builds an HF text tower: the
    report lists the unused pooler weights of sentence encoders (MiniLM) on every load. Restored after."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


class _DropPartialInit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith("initialized partially.")


@contextlib.contextmanager
def _partial_init_warning(dropped: bool):
    """open_clip warns "Model X initialized partially." (root logger) when only a tower's weights
    loaded, e.g. the pretrained HF text tower of the project backbone. With base weights to load
    next that is misleading, so it is dropped then; without them it is true and kept."""
    if not dropped:
        yield
        return
    root, filt = logging.getLogger(), _DropPartialInit()
    root.addFilter(filt)
    try:
        yield
    finally:
        root.removeFilter(filt)


def _check_base_checkpoint_model(cfg: ModelConfig) -> None:
    """A checkpoint folder used as base weights must have been trained on the same architecture."""
    meta_path = Path(cfg.base_weights) / CONFIG_NAME
    if meta_path.is_file():
        meta = read_json(meta_path, BaseWeightsError)
        base = meta.get("base") if isinstance(meta, dict) else None
        needed = base.get("model_name") if isinstance(base, dict) else None
        if needed and needed != cfg.model_name:
            raise BaseWeightsError(f"{cfg.base_weights} was trained on {needed}, not {cfg.model_name}")


def create_model(cfg: ModelConfig, device: str | torch.device = "cpu", *,
                 weights_follow: bool = False) -> tuple[HarmaModel, Callable, Callable, Callable]:
    """open_clip-style factory: ``(model, preprocess_train, preprocess_val, tokenizer)``.

    The backbone comes from ``cfg.pretrained`` (an open_clip tag) and/or ``cfg.base_weights`` (a
    local file), loaded *before* the adapters are injected. Random initialisation is seeded by
    ``cfg.init_seed``. Preprocessing follows the released
    recipe (method.md §3): RandomResizedCrop + flip + RandAugment for training, a plain square
    bicubic resize for evaluation. ``weights_follow`` as in :func:`build_clip`.
    """
    # Seeded in a forked RNG: the same config always builds the same model (a random backbone of a
    # saved run included), and building consumes nothing from the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        clip, info = build_clip(cfg, device, weights_follow=weights_follow)
        model = HarmaModel(clip, cfg, info)
    pp = getattr(clip.visual, "preprocess_cfg", {}) or {}
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean, std = pp.get("mean", CLIP_MEAN), pp.get("std", CLIP_STD)
    return model, train_transform(size, mean, std), eval_transform(size, mean, std), open_clip.get_tokenizer(cfg.model_name)
