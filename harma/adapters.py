"""Adapter modules: HarMA's MGA and MMS-Adapter, and PE-RSITR's MRS-Adapter.

HarMA (Huang et al., arXiv 2404.18253) as in the released code (method.md §1.2-§1.4); PE-RSITR
(Yuan et al., arXiv 2308.12509) as in its ``layers/MRS_Adapter.py`` (method.md §6.1). Written from
the spec, not copied. Pure ``nn.Module``s: nothing here knows about open_clip; ``inject.py`` does.

Every adapter ends in a zero-initialised projection, so an adapted model equals its base model
exactly at initialisation.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def _zero_(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


def _self_attention(attn: nn.MultiheadAttention, x: torch.Tensor, mask: Optional[torch.Tensor],
                    padding: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``padding``: (batch, tokens), True = a key every query ignores."""
    return attn(x, x, x, need_weights=False, attn_mask=mask, key_padding_mask=padding)[0]


def _causal_mask(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    n = x.shape[1] if batch_first else x.shape[0]
    return torch.ones(n, n, dtype=torch.bool, device=x.device).triu_(1)  # True = blocked


class PaddingMask(threading.local):
    """Which text tokens are padding, for the text adapters' attention (``harma.text_padding_mask``).

    The adapter seam (a block's MLP) sees only hidden states, so a hook where token ids enter the
    text tower (``HarmaModel``) sets ``value`` (bool, True = padding, shape (batch, tokens)) and the
    text MGAs read it. Per thread, so concurrent encodes (the app's worker threads) do not mix.
    """

    value: Optional[torch.Tensor] = None

    def __reduce__(self):  # a copied or pickled model gets a fresh, empty mask (thread-locals do not copy)
        return (PaddingMask, ())

    def get(self, x: torch.Tensor, batch_first: bool) -> torch.Tensor:
        """The mask for hidden states ``x``; an error if it does not belong to them."""
        m = self.value
        if m is None:
            raise RuntimeError("text_padding_mask is on but no token ids were seen: encode text through the "
                               "model's encode_text (the hook that reads the padding sits at the tower's input)")
        n, length = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
        if tuple(m.shape) != (n, length):
            raise RuntimeError(f"padding mask of shape {tuple(m.shape)} does not match hidden states with "
                               f"batch {n} and {length} tokens")
        return m


class MMSAdapter(nn.Module):
    """Shared mini-adapter (released ``BiShareAdapter``): 128 -> 64 -> self-attention -> gated -> 128.

    ``forward(z) = z + l2(beta * attn(p) + (1 - beta) * p)`` with ``p = l1(z)``, ``beta = sigmoid(gate)``.
    The released code computes ``GELU(p)`` and discards it; ``gelu=True`` applies it to ``p``.
    """

    def __init__(self, dim: int = 128, inner: int = 64, heads: int = 8, gate_init: float = 0.6,
                 batch_first: bool = True, gelu: bool = False) -> None:
        super().__init__()
        self.l1 = nn.Linear(dim, inner)
        self.attn = nn.MultiheadAttention(inner, heads, batch_first=batch_first)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.l2 = _zero_(nn.Linear(inner, dim))
        self.gelu = gelu

    def forward(self, z: torch.Tensor, mask: Optional[torch.Tensor] = None,
                padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        p = self.l1(z)
        if self.gelu:
            p = F.gelu(p)
        q = _self_attention(self.attn, p, mask, padding)
        beta = torch.sigmoid(self.gate)
        return z + self.l2(beta * q + (1 - beta) * p)


class MGA(nn.Module):
    """Multimodal Gated Adapter (released ``MMadapter``) for one block of one tower.

    ``delta(x) = up(alpha * h + (1 - alpha) * A(S(A(h))))`` with ``h = GELU(down(x))``,
    ``alpha = sigmoid(gate)``, ``A`` the adapter self-attention (applied twice with tied weights,
    as released, unless ``tie_attn=False``) and ``S`` the optional MMS adapter, which may be shared
    with the other tower. ``forward(x) = x + delta(x)``.

    Args:
        dim: width of the tower (768 image / 512 text for ViT-B-32).
        bottleneck: down-projection width (128).
        heads: heads of the adapter self-attention (8).
        mms: an ``MMSAdapter`` (possibly shared) or None.
        gate_init: raw gate value (0.6).
        batch_first: layout of the tower's residual stream, read from the open_clip transformer.
        tie_attn: reuse one attention module for both applications (released behaviour).
        causal: mask the adapter attention causally (the released text adapter uses no mask).
        padding: where to read which tokens are padding; they are then ignored as attention keys
            (the released text adapter attends to padding too).
    """

    def __init__(self, dim: int, bottleneck: int = 128, heads: int = 8, mms: Optional[MMSAdapter] = None,
                 gate_init: float = 0.6, batch_first: bool = True, tie_attn: bool = True,
                 causal: bool = False, padding: Optional[PaddingMask] = None) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.attn = nn.MultiheadAttention(bottleneck, heads, batch_first=batch_first)
        self.attn2 = None if tie_attn else nn.MultiheadAttention(bottleneck, heads, batch_first=batch_first)
        self.mms = mms
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.up = _zero_(nn.Linear(bottleneck, dim))
        self.batch_first = batch_first
        self.causal = causal
        self.padding = padding

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        mask = _causal_mask(x, self.batch_first) if self.causal else None
        pad = self.padding.get(x, self.batch_first) if self.padding is not None else None
        h = F.gelu(self.down(x))
        z = _self_attention(self.attn, h, mask, pad)
        if self.mms is not None:
            z = self.mms(z, mask, pad)
        z = _self_attention(self.attn2 if self.attn2 is not None else self.attn, z, mask, pad)
        alpha = torch.sigmoid(self.gate)
        return self.up(alpha * h + (1 - alpha) * z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta(x)


class _Wrapper(nn.Module):
    """Base for PEFT-style wrappers: keeps the original module as ``base_layer`` and forwards
    unknown attributes to it (open_clip reads e.g. ``block.mlp.c_fc`` to find the cast dtype)."""

    base_layer: nn.Module
    enabled: bool = True  # False: the wrapper returns the base layer's output (see HarmaModel.disable_adapters)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


class GatedMLP(_Wrapper):
    """Wraps a block's MLP: ``m = mlp(h)``, returns ``m + sigmoid(gate) * MGA.delta(m)``. With
    ``harma.attn_seam`` a second one wraps the module producing the attention output the same way.

    This equals the released ``sigmoid(g) * MGA(m) + (1 - sigmoid(g)) * m`` (method.md §1.2).
    """

    def __init__(self, base_layer: nn.Module, adapter: MGA, gate_init: float = 0.6) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m = self.base_layer(h)
        if not self.enabled:
            return m
        return m + torch.sigmoid(self.gate) * self.adapter.delta(m)

    def __repr__(self) -> str:
        return f"harma.GatedMLP(\n  (base_layer): {self.base_layer!r}\n  (adapter): {self.adapter!r}\n)"


class MRSAdapter(nn.Module):
    """PE-RSITR MRS-Adapter: one instance serves every block of both towers.

    Modality-specific down-projection (D -> bottleneck), ReLU, dropout, then the concatenation of a
    modality-specific up-projection (bottleneck -> D - shared_dim) and an up-projection shared by
    both modalities (bottleneck -> shared_dim). Computed in fp32; zero at initialisation.
    """

    def __init__(self, image_dim: int, text_dim: int, bottleneck: int = 64, shared_dim: int = 64,
                 dropout: float = 0.5) -> None:
        super().__init__()
        for name, dim in (("image", image_dim), ("text", text_dim)):
            if dim <= shared_dim:
                raise ValueError(f"MRS-Adapter: {name} width {dim} must exceed shared_dim {shared_dim}")
        self.down = nn.ModuleDict({"image": nn.Linear(image_dim, bottleneck), "text": nn.Linear(text_dim, bottleneck)})
        for lin in self.down.values():
            nn.init.zeros_(lin.bias)  # weights keep PyTorch's kaiming-uniform(a=sqrt(5)), as released
        self.up = nn.ModuleDict({
            "image": _zero_(nn.Linear(bottleneck, image_dim - shared_dim)),
            "text": _zero_(nn.Linear(bottleneck, text_dim - shared_dim)),
        })
        self.shared_up = _zero_(nn.Linear(bottleneck, shared_dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        h = self.dropout(F.relu(self.down[modality](x.float())))
        return torch.cat([self.up[modality](h), self.shared_up(h)], dim=-1)


class ParallelAdapterBlock(_Wrapper):
    """Wraps an open_clip ``ResidualAttentionBlock``; adds an adapter in parallel with the MLP:
    ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)) + A(x)`` (PE-RSITR, method.md §6.1)."""

    def __init__(self, base_layer: nn.Module, adapter: MRSAdapter, modality: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.modality = modality

    def forward(self, q_x: torch.Tensor, k_x: Optional[torch.Tensor] = None, v_x: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if k_x is not None or v_x is not None:
            raise NotImplementedError("MRS-Adapter blocks support self-attention only")
        b = self.base_layer
        if not self.enabled:
            return b(q_x, attn_mask=attn_mask)
        x = q_x + b.ls_1(b.attention(q_x=b.ln_1(q_x), attn_mask=attn_mask))
        a = self.adapter(x, self.modality).to(x.dtype)
        return x + b.ls_2(b.mlp(b.ln_2(x))) + a

    def __repr__(self) -> str:
        return f"harma.ParallelAdapterBlock[{self.modality}](\n  (base_layer): {self.base_layer!r}\n)"


class ParallelAdapterBertOutput(_Wrapper):
    """The MRS-Adapter in a HF BERT layer (e.g. MiniLM): wraps ``layer.output`` (``BertOutput``), whose
    ``input_tensor`` is the post-attention stream: ``LN(dropout(dense(h)) + x + A(x))``."""

    def __init__(self, base_layer: nn.Module, adapter: MRSAdapter, modality: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.modality = modality

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        if not self.enabled:
            return b(hidden_states, input_tensor)
        h = b.dropout(b.dense(hidden_states))
        return b.LayerNorm(h + input_tensor + self.adapter(input_tensor, self.modality).to(h.dtype))

    def __repr__(self) -> str:
        return f"harma.ParallelAdapterBertOutput[{self.modality}](\n  (base_layer): {self.base_layer!r}\n)"


def output_projections(module: nn.Module) -> list[nn.Parameter]:
    """The adapters' zero-initialised output projections inside ``module``, found by module type:
    ``MGA.up``, ``MMSAdapter.l2`` and the MRS-Adapter's up-projections. Each shared module once.

    LoRA+ (Hayou et al., 2024) gives such zero-initialised "B" matrices a higher rate than the input
    side; ``optim.up_lr_scale`` in the training CLI does that for these."""
    parts: list[nn.Module] = []
    for m in module.modules():
        if isinstance(m, MGA):
            parts.append(m.up)
        elif isinstance(m, MMSAdapter):
            parts.append(m.l2)
        elif isinstance(m, MRSAdapter):
            parts += [m.up, m.shared_up]
    seen: dict[int, nn.Parameter] = {}
    for part in parts:
        for p in part.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())
