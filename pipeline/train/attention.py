"""`attn_implementation="varlen"`: attention for padding-free packed rows that never builds a (T x T) mask.

A packed row is one flat sequence of several examples with position ids restarting at each; TRL's collator also
passes the examples' boundaries (`cu_seq_lens_q/k`, `max_length_q/k`). Through `sdpa`, transformers turns them into
a dense block-diagonal mask over the whole row: on an H200, a 16k-token row took a 13.8 GiB mask and ran out of
memory. Here each example attends only to itself:
- on CUDA in bf16/fp16, PyTorch's own FlashAttention varlen kernel (`torch.nn.attention.varlen.varlen_attn`,
  torch >= 2.9), so no extra package is needed;
- elsewhere (CPU, fp32), one causal `scaled_dot_product_attention` per example: O(sum of L_i^2), not O(T^2),
  left out of `torch.compile`'s graph so that a new number of examples per row does not recompile the model.
Boundaries missing, they are read from position ids that restart at 0; rows with none (a padded batch,
generation) take plain `sdpa`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

NAME = "varlen"


def register() -> None:
    """Make `attn_implementation="varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(NAME, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)  # None or the 2D padding mask: never T x T


def varlen_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: Any = None,
    cu_seq_lens_k: Any = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention interface: query (B, Hq, T, D), key/value (B, Hkv, T, D); returns (B, T, Hq, D)."""
    if cu_seq_lens_q is None and query.shape[0] == 1 and attention_mask is None:
        cu_seq_lens_q, max_length_q = _bounds_from_positions(kwargs.get("position_ids"), query.shape[2])
    if cu_seq_lens_q is None or query.shape[0] != 1:
        return _dense(module, query, key, value, attention_mask, dropout, scaling)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    bounds = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and _CUDA_VARLEN is not None:
        # An int (TRL's collator, or read from the positions above) passes as it is: int() would make torch.compile
        # specialise on it and recompile for every new longest example. A tensor is read once.
        longest = int(max_length_q) if isinstance(max_length_q, torch.Tensor) else max_length_q
        out = _CUDA_VARLEN(q, k, v, bounds, longest, scaling)
    else:
        out = _per_example(q, k, v, bounds, scaling)
    return out.unsqueeze(0), None


@torch.compiler.disable
def _per_example(q: Any, k: Any, v: Any, bounds: Any, scaling: float | None) -> Any:
    """One causal attention per example, (T, H, D) in and out; left out of `torch.compile`'s graph (a graph break):
    traced, its loop over the examples specialised on their count, and every packed row with a new count
    recompiled the model."""
    edges = bounds.tolist()
    return torch.cat([_causal(q[a:b], k[a:b], v[a:b], scaling) for a, b in zip(edges, edges[1:], strict=False)])


def _bounds_from_positions(position_ids: Any, length: int) -> tuple[Any, int | None]:
    """Examples' boundaries from position ids that restart at 0 (a packed row given without them)."""
    if position_ids is None:
        return None, None
    starts = (position_ids[0] == 0).nonzero().flatten()
    if starts.numel() < 2 or int(starts[0]) != 0:
        return None, None  # one sequence (or a continuation, as in generation): plain causal attention
    bounds = torch.cat([starts, starts.new_tensor([length])])
    return bounds, int(bounds.diff().max())


def _causal(q: Any, k: Any, v: Any, scaling: float | None) -> Any:
    """One example, (L, H, D) in and out, GQA by repeating key/value heads."""
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, L, D)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling).transpose(0, 1)


def _repeat_kv(t: Any, heads: int) -> Any:
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _dense(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float, scaling: float | None):
    """An ordinary batch: transformers' sdpa with a 4D mask built from the 2D padding mask (or none: causal)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.dim() == 2:
        q_len, kv_len = query.shape[2], attention_mask.shape[-1]
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        attention_mask = causal[None, None] & attention_mask[:, None, None, :].bool()
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)


def _cuda_varlen_kernel():
    """PyTorch's varlen FlashAttention with a causal mask, whatever this torch version calls the options
    (`is_causal` in 2.9, `window_size=(-1, 0)` from 2.10; `enable_gqa` from 2.12, else heads repeated). Looked up
    once at import, so that `torch.compile` does not trace the lookup."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    options = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    takes_scale, takes_gqa = "scale" in params, "enable_gqa" in params

    def run(q, k, v, bounds, max_length, scaling):
        extra = dict(options)
        if takes_scale:
            extra["scale"] = scaling
        if takes_gqa and k.shape[1] != q.shape[1]:
            extra["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
        return varlen_attn(q, k, v, bounds, bounds, max_length, max_length, **extra)

    return run


_CUDA_VARLEN = _cuda_varlen_kernel()


def cuda_kernel_available() -> bool:
    return _CUDA_VARLEN is not None
