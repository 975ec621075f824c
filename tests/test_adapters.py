"""Adapter modules in isolation: shapes, zero-init identity, gate init, batch independence."""

from __future__ import annotations

import math

import pytest
import torch

from harma.adapters import MGA, GatedMLP, MMSAdapter, MRSAdapter


def test_gate_init_sigmoid():
    mga = MGA(32, 16, 4)
    assert math.isclose(torch.sigmoid(mga.gate).item(), 0.645656, rel_tol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_zero_init_is_identity(batch_first):
    x = torch.randn(3, 5, 32)
    mms = MMSAdapter(16, 8, 2, batch_first=batch_first)
    mga = MGA(32, 16, 4, mms=mms, batch_first=batch_first)
    assert torch.equal(mga(x), x)
    z = torch.randn(3, 5, 16)
    assert torch.equal(mms(z), z)


def _perturbed_mga(batch_first, **kw):
    torch.manual_seed(0)
    mga = MGA(32, 16, 4, mms=MMSAdapter(16, 8, 2, batch_first=batch_first), batch_first=batch_first, **kw)
    for p in mga.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return mga.eval()


@pytest.mark.parametrize("batch_first", [True, False])
def test_batch_independence(batch_first):
    """Changing sample 1 must not change sample 0: guards the batch_first pitfall (method.md §1.1)."""
    mga = _perturbed_mga(batch_first)
    x = torch.randn(4, 6, 32) if batch_first else torch.randn(6, 4, 32)
    y = x.clone()
    if batch_first:
        y[1] += 1.0
    else:
        y[:, 1] += 1.0
    a, b = mga(x), mga(y)
    sel = (lambda t: t[0]) if batch_first else (lambda t: t[:, 0])
    assert torch.allclose(sel(a), sel(b), atol=1e-6)
    assert not torch.allclose(a, b)


def test_wrong_layout_would_mix_the_batch():
    """The same module fed the other layout attends across the batch: the test above can fail."""
    mga = _perturbed_mga(batch_first=False)
    x = torch.randn(4, 6, 32)  # (B, L, D) fed to a sequence-first adapter
    y = x.clone()
    y[1] += 1.0
    assert not torch.allclose(mga(x)[0], mga(y)[0], atol=1e-6)


def test_causal_adapter_ignores_future_tokens():
    mga = _perturbed_mga(batch_first=True, causal=True)
    x = torch.randn(2, 6, 32)
    y = x.clone()
    y[:, 4:] += 1.0
    assert torch.allclose(mga(x)[:, :4], mga(y)[:, :4], atol=1e-6)
    bidirectional = _perturbed_mga(batch_first=True)
    assert not torch.allclose(bidirectional(x)[:, :4], bidirectional(y)[:, :4], atol=1e-6)


def test_untied_attention_has_second_module():
    tied, untied = MGA(32, 16, 4), MGA(32, 16, 4, tie_attn=False)
    extra = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert extra == 4 * 16 * 16 + 4 * 16  # one more MHA(16)


def test_gated_mlp_matches_released_formula():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    mga = _perturbed_mga(batch_first=True)
    wrapped = GatedMLP(base, mga, gate_init=0.3)
    h = torch.randn(2, 5, 32)
    m = base(h)
    g = torch.sigmoid(torch.tensor(0.3))
    expected = g * mga(m) + (1 - g) * m  # sigma(g) MGA(m) + (1 - sigma(g)) m
    assert torch.allclose(wrapped(h), expected, atol=1e-6)


def test_gated_mlp_forwards_unknown_attributes():
    base = torch.nn.Sequential()
    base.add_module("c_fc", torch.nn.Linear(4, 8))
    wrapped = GatedMLP(base, MGA(4, 4, 1))
    assert wrapped.c_fc is base.c_fc
    with pytest.raises(AttributeError):
        wrapped.does_not_exist


def test_mrs_adapter_shapes_and_counts():
    a = MRSAdapter(768, 512)
    assert sum(p.numel() for p in a.parameters()) == 161_088  # PE-RSITR's "0.16M"
    x = torch.randn(2, 50, 768)
    out = a.eval()(x, "image")
    assert out.shape == x.shape and torch.count_nonzero(out) == 0
    assert a(torch.randn(2, 77, 512), "text").shape == (2, 77, 512)
    with pytest.raises(ValueError, match="shared_dim"):
        MRSAdapter(64, 64, shared_dim=64)
