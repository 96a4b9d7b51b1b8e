"""The core-op decompositions agree with torch's fused kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jetgraph.taylor import decompositions as d

torch.manual_seed(0)


def test_layer_norm_matches_torch() -> None:
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    w, b = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    expected = F.layer_norm(x, (16,), w, b, 1e-5)
    torch.testing.assert_close(d.eager(d.layer_norm, x, [16], w, b, 1e-5), expected)
    torch.testing.assert_close(d.eager(d.layer_norm, x, [16], None, None, 1e-5),
                               F.layer_norm(x, (16,), eps=1e-5))


def test_rms_norm_matches_torch() -> None:
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    w = torch.randn(16, dtype=torch.float64)
    torch.testing.assert_close(d.eager(d.rms_norm, x, [16], w, 1e-6), F.rms_norm(x, (16,), w, 1e-6))


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal"])
@pytest.mark.parametrize("gqa", [False, True])
def test_attention_matches_sdpa(mask_kind: str, gqa: bool) -> None:
    q = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    kv_heads = 2 if gqa else 4
    k = torch.randn(2, kv_heads, 6, 8, dtype=torch.float64)
    v = torch.randn(2, kv_heads, 6, 8, dtype=torch.float64)
    kwargs: dict[str, object] = {"enable_gqa": gqa}
    if mask_kind == "bool":
        kwargs["attn_mask"] = torch.ones(6, 6, dtype=torch.bool).tril()
    elif mask_kind == "float":
        kwargs["attn_mask"] = torch.randn(6, 6, dtype=torch.float64)
    elif mask_kind == "causal":
        kwargs["is_causal"] = True
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    actual = d.eager(d.scaled_dot_product_attention, q, k, v, **kwargs)
    torch.testing.assert_close(actual, expected)


def test_attention_rejects_dropout() -> None:
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(NotImplementedError, match="dropout_p must be 0"):
        d.eager(d.scaled_dot_product_attention, q, q, q, dropout_p=0.1)
