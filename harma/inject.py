"""Attach adapters to an open_clip CLIP by wrapping modules (PEFT-style), and remove them again.

The only module that knows open_clip internals: towers expose ``.transformer.resblocks`` (image:
``visual.transformer``; text: ``transformer`` on ``CLIP`` or ``text.transformer`` on
``CustomTextCLIP``), each block has ``mlp`` and ``ln_2``, and each transformer says whether its
residual stream is ``batch_first``. open_clip's HF text towers (BERT-style ``encoder.layer``) are
supported too: their MLP output is ``layer.output.dense``. HarMA wraps the MLP (method.md §1.2);
the MRS-Adapter wraps the whole block because it reads the post-attention stream (method.md §6.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

from .adapters import (
    MGA,
    GatedMLP,
    MMSAdapter,
    MRSAdapter,
    PaddingMask,
    ParallelAdapterBertOutput,
    ParallelAdapterBlock,
    _Wrapper,
)
from .config import HarmaConfig, MRSConfig
from .errors import UnsupportedModelError


@dataclass
class Tower:
    """One tower's stack of blocks and where its MLP output (the adapter seam) lives."""

    name: str  # "image" | "text"
    path: str  # qualified name of the block list, e.g. "visual.transformer.resblocks"
    blocks: nn.ModuleList
    width: int
    batch_first: bool
    mlp_attr: tuple[str, ...] = ("mlp",)  # open_clip: block.mlp; HF BERT: layer.output.dense
    # the attention sub-layer's output before the residual add (harma.attn_seam): open_clip's ls_1
    # (identity or LayerScale, applied to the attention output); HF BERT: layer.attention.output.dense
    attn_attr: tuple[str, ...] = ("ls_1",)
    entry: Optional[nn.Module] = None  # module whose first input is the token sequence (open_clip transformer)
    embeddings: Optional[nn.Module] = None  # HF: module whose output is the token sequence entering the layers

    @property
    def is_open_clip(self) -> bool:
        return self.mlp_attr == ("mlp",)

    def get_mlp(self, i: int) -> nn.Module:
        return self._get(i, self.mlp_attr)

    def set_mlp(self, i: int, module: nn.Module) -> None:
        self._set(i, self.mlp_attr, module)

    def mlp_name(self, i: int) -> str:
        return ".".join((self.path, str(i)) + self.mlp_attr)

    def get_attn_out(self, i: int) -> Optional[nn.Module]:
        """The module producing block ``i``'s attention output (None if the block has no such seam)."""
        try:
            return self._get(i, self.attn_attr)
        except AttributeError:
            return None

    def set_attn_out(self, i: int, module: nn.Module) -> None:
        self._set(i, self.attn_attr, module)

    def attn_out_name(self, i: int) -> str:
        return ".".join((self.path, str(i)) + self.attn_attr)

    def _get(self, i: int, attrs: tuple[str, ...]) -> nn.Module:
        module = self.blocks[i]
        for attr in attrs:
            module = getattr(module, attr)
        return module

    def _set(self, i: int, attrs: tuple[str, ...], module: nn.Module) -> None:
        setattr(self._get(i, attrs[:-1]) if len(attrs) > 1 else self.blocks[i], attrs[-1], module)


def find_towers(clip: nn.Module) -> dict[str, Tower]:
    """Locate the image and text block stacks of an open_clip model (open_clip or HF text tower)."""
    towers: dict[str, Tower] = {}
    visual = getattr(clip, "visual", None)
    if _is_transformer(getattr(visual, "transformer", None)):
        towers["image"] = _open_clip_tower("image", "visual.transformer", visual.transformer)
    if _is_transformer(getattr(clip, "transformer", None)):
        towers["text"] = _open_clip_tower("text", "transformer", clip.transformer)
    elif _is_transformer(getattr(getattr(clip, "text", None), "transformer", None)):
        towers["text"] = _open_clip_tower("text", "text.transformer", clip.text.transformer)
    elif (layers := _hf_layers(getattr(getattr(clip, "text", None), "transformer", None))) is not None:
        # open_clip HFTextEncoder (e.g. BERT/MiniLM): the MLP output is layer.output.dense, added to
        # the residual inside BertOutput's LayerNorm: the same seam HarMA adapts in CLIP blocks.
        towers["text"] = Tower("text", "text.transformer.encoder.layer", layers,
                               clip.text.transformer.config.hidden_size, True, ("output", "dense"),
                               ("attention", "output", "dense"),
                               embeddings=getattr(clip.text.transformer, "embeddings", None))
    return towers


def _open_clip_tower(name: str, path: str, transformer: nn.Module) -> Tower:
    return Tower(name, f"{path}.resblocks", transformer.resblocks, transformer.width,
                 getattr(transformer, "batch_first", True), entry=transformer)


def _hf_layers(hf_model: Optional[nn.Module]) -> Optional[nn.ModuleList]:
    layers = getattr(getattr(hf_model, "encoder", None), "layer", None)
    if isinstance(layers, nn.ModuleList) and all(isinstance(getattr(getattr(l, "output", None), "dense", None),
                                                             (nn.Linear, _Wrapper)) for l in layers):
        return layers
    return None


def _is_transformer(module: Optional[nn.Module]) -> bool:
    return module is not None and isinstance(getattr(module, "resblocks", None), nn.ModuleList)


def _require_towers(clip: nn.Module, wanted: tuple[str, ...]) -> list[Tower]:
    towers = find_towers(clip)
    missing = [t for t in wanted if t not in towers]
    if missing:
        parts = {"image": type(getattr(clip, "visual", None)).__name__,
                 "text": type(getattr(clip, "text", getattr(clip, "transformer", None))).__name__}
        detail = ", ".join(f"{t} tower is {parts[t]}" for t in missing)
        raise UnsupportedModelError(
            f"{type(clip).__name__}: cannot attach adapters ({detail}); HarMA needs open_clip transformer "
            "towers (`.transformer.resblocks`, ViT-* configs) or a BERT-style HF text tower (`encoder.layer`)"
        )
    if any(isinstance(b, _Wrapper) or isinstance(t.get_mlp(i), _Wrapper) or isinstance(getattr(b, "output", None), _Wrapper)
           or isinstance(t.get_attn_out(i), _Wrapper) for t in towers.values() for i, b in enumerate(t.blocks)):
        raise UnsupportedModelError("this model already has adapters; call remove_adapters() first")
    return [towers[t] for t in wanted]


def _selected(blocks: nn.ModuleList, layers: Optional[list[int]], tower: str) -> list[int]:
    n = len(blocks)
    if layers is None:
        return list(range(n))
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise UnsupportedModelError(f"layer indices {bad} out of range for the {tower} tower ({n} blocks)")
    return sorted({i % n for i in layers})


def inject_harma(clip: nn.Module, cfg: HarmaConfig,
                 padding: Optional[PaddingMask] = None) -> tuple[list[str], Optional[nn.ModuleList]]:
    """Wrap ``mlp`` of the selected blocks with HarMA's gated MGA.

    Returns the qualified names of the wrapped modules and the per-layer MMS adapters (None when
    ``share_mode == "none"``). The caller owns the MMS list (it is shared across towers in
    ``shared`` mode, and used by the text tower only in ``text_only`` mode, as released).
    ``padding`` (with ``cfg.text_padding_mask``): the text MGAs read which tokens are padding from
    it; the caller fills it where token ids enter the text tower (see :func:`text_token_input`).
    """
    if cfg.text_padding_mask and "text" in cfg.towers and padding is None:
        raise ValueError("harma.text_padding_mask needs a PaddingMask the caller fills from the token ids")
    towers = _require_towers(clip, cfg.towers)
    for tower in towers:
        for block in tower.blocks:
            if tower.is_open_clip and not isinstance(block, (ResidualAttentionBlock, CustomResidualAttentionBlock)):
                raise UnsupportedModelError(f"{tower.path}: block type {type(block).__name__} is not supported")
    mms_towers = {"text_only": {"text"}, "shared": {"image", "text"}, "none": set()}[cfg.share_mode]
    mms_towers &= set(cfg.towers)
    mms = None
    if mms_towers:
        depth = max(len(t.blocks) for t in towers if t.name in mms_towers)
        layouts = {t.batch_first for t in towers if t.name in mms_towers}
        if len(layouts) > 1:
            raise UnsupportedModelError("shared MMS adapters need both towers in the same batch_first layout")
        batch_first = layouts.pop()
        mms_width = cfg.bottleneck_for(sorted(mms_towers)[0])  # the config checks shared towers agree
        mms = nn.ModuleList(
            MMSAdapter(mms_width, cfg.mms_dim, cfg.mms_heads, cfg.gate_init, batch_first, cfg.mms_gelu)
            for _ in range(depth)
        )
    names = []
    for tower in towers:
        for i in _selected(tower.blocks, cfg.layers, tower.name):
            mga_mms = mms[i] if tower.name in mms_towers else None
            tower.set_mlp(i, _gated(tower, i, tower.get_mlp(i), cfg.bottleneck_for(tower.name), mga_mms, cfg, padding))
            names.append(tower.mlp_name(i))
            if tower.name in cfg.attn_seam:  # a second MGA, without an MMS, on the attention output
                base = tower.get_attn_out(i)
                if base is None:
                    raise UnsupportedModelError(f"{tower.path}.{i}: no attention output at "
                                                f"{'.'.join(tower.attn_attr)} for harma.attn_seam")
                tower.set_attn_out(i, _gated(tower, i, base, cfg.attn_seam_bottleneck, None, cfg, padding))
                names.append(tower.attn_out_name(i))
    if mms is not None:
        ref = next(towers[0].blocks[0].parameters())
        mms.to(device=ref.device, dtype=ref.dtype)
    return names, mms


def _gated(tower: Tower, i: int, base: nn.Module, bottleneck: int, mms: Optional[MMSAdapter], cfg: HarmaConfig,
           padding: Optional[PaddingMask]) -> GatedMLP:
    """``base`` (a sub-layer of block ``i``) wrapped with a gated MGA on its output, on the block's
    device and dtype (read from the block: open_clip's ``ls_1`` is often a parameter-free Identity)."""
    text = tower.name == "text"
    mga = MGA(tower.width, bottleneck, cfg.attn_heads, mms=mms, gate_init=cfg.gate_init,
              batch_first=tower.batch_first, tie_attn=cfg.tie_attn, causal=cfg.text_causal and text,
              padding=padding if cfg.text_padding_mask and text else None)
    ref = next(tower.blocks[i].parameters())
    return GatedMLP(base, mga.to(device=ref.device, dtype=ref.dtype), cfg.gate_init)


def inject_mrs(clip: nn.Module, cfg: MRSConfig) -> tuple[list[str], MRSAdapter]:
    """Wrap every block of both towers so one shared MRS-Adapter runs in parallel with each MLP."""
    image, text = _require_towers(clip, ("image", "text"))
    if not image.is_open_clip:
        raise UnsupportedModelError("the MRS-Adapter needs an open_clip transformer image tower")
    adapter = MRSAdapter(image.width, text.width, cfg.bottleneck, cfg.shared_dim, cfg.dropout)
    adapter.to(device=image.blocks[0].ln_2.weight.device)  # kept fp32, as released
    names = []
    for tower in (image, text):
        for i, block in enumerate(tower.blocks):
            if not tower.is_open_clip:  # HF BERT layer: BertOutput gets the post-attention stream
                if not hasattr(block.output, "LayerNorm"):
                    raise UnsupportedModelError(f"{tower.path}: MRS-Adapter needs BERT-style layers (output.LayerNorm)")
                block.output = ParallelAdapterBertOutput(block.output, adapter, tower.name)
                names.append(f"{tower.path}.{i}.output")
                continue
            if type(block) is not ResidualAttentionBlock:
                raise UnsupportedModelError(f"{tower.path}: MRS-Adapter needs ResidualAttentionBlock, got {type(block).__name__}")
            tower.blocks[i] = ParallelAdapterBlock(block, adapter, tower.name)
            names.append(f"{tower.path}.{i}")
    return names, adapter


def text_token_input(clip: nn.Module) -> tuple[nn.Module, int]:
    """The text-tower module whose first argument is the token-id tensor, and the padding id.

    open_clip ``CLIP``: ``token_embedding`` (pad id 0, open_clip's tokenizer); ``CustomTextCLIP``
    with an open_clip text tower: ``text.token_embedding`` (``text.pad_id``); with a HF tower:
    ``text`` itself (``HFTextEncoder``, the HF config's ``pad_token_id``).
    """
    text = getattr(clip, "text", None)
    if isinstance(text, nn.Module):
        if isinstance(getattr(text, "token_embedding", None), nn.Module):
            return text.token_embedding, int(getattr(text, "pad_id", 0))
        pad = getattr(getattr(text, "config", None), "pad_token_id", None)
        if pad is not None:
            return text, int(pad)
    elif isinstance(getattr(clip, "token_embedding", None), nn.Module):
        return clip.token_embedding, 0
    raise UnsupportedModelError(f"{type(clip).__name__}: cannot tell where token ids enter the text tower "
                                "(needed by harma.text_padding_mask)")


def text_tower_parts(clip: nn.Module) -> list[nn.Module]:
    """Submodules of the text tower (embeddings, blocks, final norm; the projection if a module)."""
    if isinstance(getattr(clip, "text", None), nn.Module):  # CustomTextCLIP (HF or open_clip text tower)
        return [clip.text]
    names = ("token_embedding", "transformer", "ln_final", "text_projection")
    return [m for n in names if isinstance(m := getattr(clip, n, None), nn.Module)]


def text_tower_parameters(clip: nn.Module) -> list[nn.Parameter]:
    """Every text-tower weight, including the bare parameters ``CLIP`` keeps on itself."""
    params = [p for part in text_tower_parts(clip) for p in part.parameters()]
    if not isinstance(getattr(clip, "text", None), nn.Module):
        params += [p for n in ("positional_embedding", "text_projection")
                   if isinstance(p := getattr(clip, n, None), nn.Parameter)]
    return params


def locked_text_parameters(clip: nn.Module, unlocked_layers: int = 0) -> list[nn.Parameter]:
    """The text-tower weights a ``lock_text`` run freezes: all of them, or, with ``unlocked_layers``
    = N > 0, the embeddings and every block but the last N (the final norm and projection after the
    blocks train with them, as they sit above the unlocked layers)."""
    params = text_tower_parameters(clip)
    if unlocked_layers <= 0:
        return params
    tower = find_towers(clip).get("text")
    if tower is None:
        raise UnsupportedModelError(f"{type(clip).__name__}: no text block stack found to unlock layers of")
    n = len(tower.blocks)
    if unlocked_layers > n:
        raise UnsupportedModelError(f"lock_text_unlocked_layers={unlocked_layers}: the text tower has {n} blocks")
    in_blocks = {id(p) for b in tower.blocks for p in b.parameters()}
    unlocked = {id(p) for b in list(tower.blocks)[n - unlocked_layers:] for p in b.parameters()}
    names = {id(p): name for name, p in clip.named_parameters()}
    head = {id(p) for p in params if id(p) not in in_blocks and "emb" not in names.get(id(p), "emb")}
    return [p for p in params if id(p) not in unlocked | head]


def output_projection_parameters(clip: nn.Module) -> list[nn.Parameter]:
    """The weight matrices that map each tower's pooled feature into the shared embedding space:
    the ViT's ``visual.proj``; the text tower's ``text_projection`` (``CLIP`` or an open_clip text
    tower of ``CustomTextCLIP``) or a HF tower's ``proj`` head. Absent ones (open_clip's
    ``hf_proj_type: null``: the identity) are skipped."""
    text = getattr(clip, "text", None)
    heads = [getattr(getattr(clip, "visual", None), "proj", None), getattr(clip, "text_projection", None),
             getattr(text, "text_projection", None), getattr(text, "proj", None)]
    found: dict[int, nn.Parameter] = {}
    for head in heads:
        params = [head] if isinstance(head, nn.Parameter) else list(head.parameters()) if isinstance(head, nn.Module) else []
        for p in params:
            if p.ndim >= 2:
                found.setdefault(id(p), p)
    return list(found.values())


def adapter_wrappers(clip: nn.Module) -> list[tuple[str, _Wrapper]]:
    """All wrappers this module created, with their qualified names."""
    return [(n, m) for n, m in clip.named_modules() if isinstance(m, _Wrapper)]


def remove_adapters(clip: nn.Module) -> int:
    """Put every wrapped module's ``base_layer`` back (PEFT ``unload``). Returns how many were removed."""
    removed = 0
    for tower in find_towers(clip).values():
        for i, block in enumerate(tower.blocks):
            if isinstance(block, ParallelAdapterBlock):
                tower.blocks[i] = block.base_layer
                removed += 1
            if isinstance(getattr(block, "output", None), ParallelAdapterBertOutput):
                block.output = block.output.base_layer
                removed += 1
            if isinstance(mlp := tower.get_mlp(i), GatedMLP):
                tower.set_mlp(i, mlp.base_layer)
                removed += 1
            if isinstance(out := tower.get_attn_out(i), GatedMLP):
                tower.set_attn_out(i, out.base_layer)
                removed += 1
    return removed
