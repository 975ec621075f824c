"""Typed configuration for the model and its adapters.

Dataclasses are the single source of truth: YAML/JSON files and ``key=value`` overrides only fill
them in, and unknown keys are an error. Defaults follow the released HarMA code (method.md §1) and
the PE-RSITR MRS-Adapter (method.md §6).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .errors import ConfigError

METHODS = ("harma", "mrs", "full", "zeroshot")
SHARE_MODES = ("text_only", "shared", "none")
TOWERS = ("image", "text")
ALSO_TRAIN = ("norms", "biases", "convs", "proj")  # model.also_train: backbone parameter kinds trained beside the adapters


@dataclass
class HarmaConfig:
    """HarMA adapters: one MGA per block of each tower, plus the MMS mini-adapters."""

    bottleneck: int = 128  # MGA down-projection width
    image_bottleneck: Optional[int] = None  # image-tower MGA width (None = bottleneck)
    text_bottleneck: Optional[int] = None  # text-tower MGA width (None = bottleneck)
    attn_heads: int = 8  # heads of the MGA self-attention (head dim = bottleneck / heads)
    mms_dim: int = 64  # MMS mini-adapter inner width
    mms_heads: int = 8  # heads of the MMS self-attention
    gate_init: float = 0.6  # raw value of every gate; sigmoid(0.6) = 0.6457
    share_mode: str = "text_only"  # text_only: as released; shared: as in the paper; none: no MMS
    tie_attn: bool = True  # released code applies the same MGA attention twice
    mms_gelu: bool = False  # released MMS computes GELU(p) and discards it; True applies it
    text_causal: bool = False  # released text adapters attend bidirectionally (no mask)
    text_padding_mask: bool = False  # released text adapters attend to padding tokens too; True ignores them
    towers: tuple[str, ...] = TOWERS  # which towers get adapters
    layers: Optional[list[int]] = None  # block indices to adapt (None = all)
    # towers whose adapted blocks also get an MGA (no MMS) on the attention sub-layer's output, the
    # block's other residual branch (Houlsby et al. 2019 adapt both). () = the MLP seam only, as released.
    attn_seam: tuple[str, ...] = ()
    attn_seam_bottleneck: int = 64  # width of those attention-seam MGAs

    def __post_init__(self) -> None:
        self.towers = tuple(self.towers)
        self.attn_seam = tuple(self.attn_seam)
        for t in self.attn_seam:
            _check_choice("harma.attn_seam", t, TOWERS)
            if t not in self.towers:
                raise ConfigError(f"harma.attn_seam lists {t!r}, which harma.towers does not adapt ({list(self.towers)})")
        if len(set(self.attn_seam)) != len(self.attn_seam):
            raise ConfigError(f"harma.attn_seam lists a tower twice: {list(self.attn_seam)}")
        _check_choice("harma.share_mode", self.share_mode, SHARE_MODES)
        for t in self.towers:
            _check_choice("harma.towers", t, TOWERS)
        for name in ("bottleneck", "image_bottleneck", "text_bottleneck", "attn_seam_bottleneck"):
            value = getattr(self, name)
            if value is None:
                continue
            if value < 1:
                raise ConfigError(f"harma.{name} must be >= 1, got {value!r}")
            if value % self.attn_heads:
                raise ConfigError(f"harma.{name} ({value}) must be divisible by harma.attn_heads ({self.attn_heads})")
        if self.mms_dim % self.mms_heads:
            raise ConfigError(f"harma.mms_dim ({self.mms_dim}) must be divisible by harma.mms_heads ({self.mms_heads})")
        if self.share_mode == "shared" and set(self.towers) != set(TOWERS):
            raise ConfigError("harma.share_mode='shared' needs adapters in both towers")
        if self.share_mode == "shared" and self.bottleneck_for("image") != self.bottleneck_for("text"):
            raise ConfigError(
                "harma.share_mode='shared' runs one MMS adapter in both towers, so the image and text "
                f"bottlenecks must match (got {self.bottleneck_for('image')} and {self.bottleneck_for('text')})"
            )

    def bottleneck_for(self, tower: str) -> int:
        """MGA width of ``tower`` ("image" or "text"): its own override, else ``bottleneck``."""
        own = self.image_bottleneck if tower == "image" else self.text_bottleneck
        return self.bottleneck if own is None else own


@dataclass
class MRSConfig:
    """PE-RSITR MRS-Adapter: one instance shared by every block of both towers."""

    bottleneck: int = 64  # modality-specific down-projection width
    shared_dim: int = 64  # width of the cross-modal shared up-projection
    dropout: float = 0.5  # dropout after ReLU in the adapter
    aug_dropout: float = 0.2  # dropout on input tokens for the augmented views of the HMMC loss

    def __post_init__(self) -> None:
        if not 0 <= self.dropout < 1 or not 0 <= self.aug_dropout < 1:
            raise ConfigError("mrs.dropout and mrs.aug_dropout must be in [0, 1)")


@dataclass
class ModelConfig:
    """Backbone + method. Every comparison (zero-shot, full, harma, mrs) runs through this one config."""

    model_name: str = "ViT-B-32"  # open_clip architecture name
    pretrained: Optional[str] = None  # open_clip pretrained tag, e.g. "laion2b_s34b_b79k" or "openai"
    base_weights: Optional[str] = None  # local file loaded after `pretrained` (GeoRSCLIP, RemoteCLIP, ours)
    method: str = "harma"  # harma | mrs | full | zeroshot
    temperature_init: float = 0.07  # learnable divisor of the contrastive logits (released: raw, no exp)
    learn_temperature: bool = True  # released code trains it
    lock_text: bool = False  # full: keep the whole text tower frozen and in eval mode (open_clip --lock-text)
    # full + lock_text: the last N text blocks, and the final norm/projection after them, train anyway
    # (open_clip --lock-text-unlocked-layers; here the head is not counted as a layer). 0 = all locked.
    lock_text_unlocked_layers: int = 0
    init_seed: int = 0  # seeds every random initialisation (adapters, random backbones) in create_model
    patch_dropout: float = 0.0  # ViT image tower: share of patch tokens dropped per training step (FLIP); eval keeps all
    # False: the backbone's own dropout layers (e.g. MiniLM's 0.1 in BERT attention and outputs) stay off
    # while training, frozen or not; adapter dropout (MRS) and patch dropout are unaffected.
    backbone_dropout: bool = True
    # harma / mrs: backbone parameters trained beside the adapters, chosen by module type, never by name
    # (PEFT's modules_to_save; BitFit): "norms" = every LayerNorm's weight and bias, "biases" = every
    # linear and convolution bias and attention input-projection bias. Saved in the adapter checkpoint.
    # () = the method as published.
    also_train: tuple[str, ...] = ()
    harma: HarmaConfig = field(default_factory=HarmaConfig)
    mrs: MRSConfig = field(default_factory=MRSConfig)

    def __post_init__(self) -> None:
        _check_choice("model.method", self.method, METHODS)
        if isinstance(self.harma, dict):
            self.harma = from_dict(HarmaConfig, self.harma, "model.harma")
        if isinstance(self.mrs, dict):
            self.mrs = from_dict(MRSConfig, self.mrs, "model.mrs")
        if self.temperature_init <= 0:
            raise ConfigError("model.temperature_init must be > 0")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ConfigError(f"model.patch_dropout must be in [0, 1), got {self.patch_dropout!r}")
        if self.lock_text and self.method != "full":
            raise ConfigError("model.lock_text applies to method 'full' (adapter methods already freeze the backbone)")
        if self.lock_text_unlocked_layers < 0:
            raise ConfigError(f"model.lock_text_unlocked_layers must be >= 0, got {self.lock_text_unlocked_layers}")
        self.also_train = tuple(self.also_train)
        for kind in self.also_train:
            _check_choice("model.also_train", kind, ALSO_TRAIN)
        if len(set(self.also_train)) != len(self.also_train):
            raise ConfigError(f"model.also_train lists an entry twice: {list(self.also_train)}")
        if self.also_train and self.method not in ("harma", "mrs"):
            raise ConfigError(f"model.also_train applies to the adapter methods (harma, mrs), not {self.method!r} "
                              "('full' already trains every backbone weight)")
        if self.lock_text_unlocked_layers and not self.lock_text:
            raise ConfigError("model.lock_text_unlocked_layers needs model.lock_text=true (without it the whole "
                              "text tower trains)")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


def to_dict(cfg: Any) -> dict:
    """Dataclass -> plain JSON/YAML-ready dict (tuples become lists)."""

    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(cfg)


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping (parsed YAML/JSON, ``key=value`` overrides, environment).

    The one config parser of the project (library, training and app). Each value is read as its
    field's declared type where that is unambiguous: a string as int, float or bool (YAML reads
    ``4e-4`` as a string, environment variables are strings), an int as float, a number as str;
    ``Optional[X]`` accepts None. Nested dataclasses are filled recursively. Unknown keys and values
    of the wrong type raise :class:`ConfigError` naming the key (``where`` prefixes the names).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            kwargs[key] = from_dict(hint, value, path)
        elif dataclasses.is_dataclass(hint) and not isinstance(value, hint):
            raise ConfigError(f"{path}: expected a section (a mapping of keys), got {type(value).__name__} "
                              f"{_short(value)}")
        else:
            kwargs[key] = _convert(value, hint, path)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - dataclass arity errors
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _short(value: Any) -> str:
    """``repr(value)`` cut to 60 characters, for a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _convert(value: Any, hint: Any, where: str) -> Any:
    """``value`` read as ``hint`` (see :func:`from_dict`); other types pass through to the dataclass.

    A float must be finite (``nan`` and ``inf`` are refused), a boolean is not a number, and a list
    or tuple field takes a list whose items are read as its item type.
    """
    if typing.get_origin(hint) is Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) in (list, tuple):
        return _convert_items(value, hint, where)
    try:
        if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            value = float(value)
        elif hint is int and isinstance(value, str):
            return int(value)
        elif hint is bool and isinstance(value, str):
            if value.lower() not in TRUE + FALSE:
                raise ValueError(value)
            return value.lower() in TRUE
        elif hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{where}: cannot read {_short(value)} as {getattr(hint, '__name__', hint)}") from None
    if hint in (int, float, bool, str) and value is not None and not isinstance(value, hint):
        if not (hint is float and isinstance(value, int)):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {_short(value)}")
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return value


def _convert_items(value: Any, hint: Any, where: str) -> Any:
    """A list or tuple field: each item read as its declared type (``tuple[float, float]`` takes two)."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {_short(value)}")
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {len(value)}")
        items = args
    else:
        items = [args[0] if args else Any] * len(value)
    converted = [v if item is Any else _convert(v, item, f"{where}[{i}]")
                 for i, (v, item) in enumerate(zip(value, items))]
    return tuple(converted) if typing.get_origin(hint) is tuple else converted
