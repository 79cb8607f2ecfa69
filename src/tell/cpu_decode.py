"""Generate-stage helper — the CPU decoding kernels: packed prefill, a KV cache that grows in place and
keeps the prompts' shared prefix once, and decode attention by batched matmuls.

In: a model on the CPU, prompts' token ids (after the shared prefix every prompt starts with). Out: the
decode-ready state (`packed_prefill`: KV cache, last logits, attention mask) and the attention function and
cache class that `generate.decode_batch` runs its decode steps with. Which path runs where: on a CPU, for
full-attention models whose attention goes through HF's attention interface (`switches_attention`), these
kernels (the packed prefill also needs a plain LM head); everywhere else — GPUs, sliding-window or
soft-capped models — transformers' own SDPA attention, cache and a left-padded prefill (generate.py).
Measured gains (2-core CPUs, both kinds) are in PERFORMANCE.md.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from tell.model import attention_routed

CACHED_ATTENTION = "tell_cached_matmul"
# Above this many attention scores per layer (batch × heads × queries × keys) prefill falls back to SDPA,
# which never materialises them: 64M fp32 scores are 256 MB.
MATMUL_SCORES_LIMIT = 1 << 26
# Prefill (many queries) stays with SDPA: measured at 16 prompts x 600 tokens, matmuls took 11.5 s vs 6.1 s.
MATMUL_MAX_QUERIES = 4


def _cached_matmul_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Masked attention over a KV cache by batched matmuls, the query heads of each KV head grouped.

    On the 2-core CPU the SDPA kernel with a padding mask was 41% of a decode batch's time; this reads the
    cache once per KV head (no repeat of K/V for grouped-query attention), and a prefix that every row
    shares once for all rows. Numerics follow HF's eager attention: scores in the model dtype, softmax in
    fp32. Without a mask (no padding, causal) or on a GPU it is plain SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    prefix = getattr(key, "prefix", None)  # a GrowingLayer's shared prefix: (keys, values), each (1, KV, P, d)
    if attention_mask is None and hasattr(key, "filled"):  # a GrowingLayer buffer and no mask: drop its spare slots
        key, value = key[..., :key.filled, :], value[..., :key.filled, :]
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    shared = prefix[0].shape[2] if prefix is not None else 0
    if (attention_mask is None or query.device.type != "cpu" or dropout or q_len > MATMUL_MAX_QUERIES
            or batch * heads * q_len * (shared + k_len) > MATMUL_SCORES_LIMIT):
        if prefix is not None:
            key, value = (torch.cat([p.expand(batch, -1, -1, -1), s], dim=2) for p, s in zip(prefix, (key, value)))
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = heads // kv_heads  # HF's repeat_kv order: query head h reads KV head h // groups
    grouped = query.reshape(batch, kv_heads, groups * q_len, dim)
    scores = grouped @ key.transpose(-1, -2)
    if prefix is not None:  # every row's queries against the one copy of the prefix keys, in one matmul
        across = grouped.transpose(0, 1).reshape(kv_heads, batch * groups * q_len, dim)
        on_prefix = (across @ prefix[0][0].transpose(1, 2)).view(kv_heads, batch, groups * q_len, shared)
        scores = torch.cat([on_prefix.transpose(0, 1), scores], dim=-1)
    scores = scores.view(batch, kv_heads, groups, q_len, shared + k_len)
    scores = scores * (scaling if scaling is not None else dim ** -0.5)
    mask = attention_mask[:, :, None, :, -(shared + k_len):]
    if mask.dtype == torch.bool:  # a fully masked row (a padding query) gets uniform weights, never NaN
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype).view(batch, kv_heads, groups * q_len, -1)
    out = probs[..., shared:] @ value
    if prefix is not None:
        weights = probs[..., :shared].transpose(0, 1).reshape(kv_heads, batch * groups * q_len, shared)
        out += (weights @ prefix[1][0]).view(kv_heads, batch, groups * q_len, -1).transpose(0, 1)
    value_dim = value.shape[-1]  # may differ from the query/key head size (MLA-style models)
    out = out.view(batch, kv_heads, groups, q_len, value_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, heads, value_dim), None


def switches_attention(model) -> bool:
    """Return True when `cached_attention` reroutes this model: an SDPA model that takes attention through
    HF's attention interface."""
    return (getattr(model.config, "_attn_implementation", None) in ("sdpa", CACHED_ATTENTION)
            and getattr(type(model), "_supports_attention_backend", False))


def cached_attention(model):
    """Return a context in which the model's attention goes through _cached_matmul_attention (SDPA-style
    boolean masks), for models where `switches_attention` holds; for others, a context that changes nothing
    (the config setter rewrites sub-configs too, so it is left alone)."""
    if switches_attention(model) and model.config._attn_implementation == "sdpa":
        from transformers.masking_utils import sdpa_mask
        return attention_routed(model.config, CACHED_ATTENTION, _cached_matmul_attention, sdpa_mask)
    return contextlib.nullcontext()


@functools.cache
def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A KV cache layer with spare capacity: a decode step writes its keys/values in place, and attention
        reads the whole (contiguous) buffer, the unused tail hidden by the causal mask.

        DynamicLayer concatenates the whole cache with every new token: on the 2-core CPU that copy was 28% of
        a decode step (batch 16, 600-token prompts). A view of only the filled part is no cure: matmuls over
        a strided view were slower still. Reading up to SPARE zeroed, masked slots costs less than either.
        """

        SPARE = 64
        prefix = None
        """(keys, values) of a prefix every row shares, each (1, KV, P, d), kept once (set by packed_prefill);
        the buffers then hold only each row's own part."""

        def _shared(self) -> int:
            return self.prefix[0].shape[2] if self.prefix is not None else 0

        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            self._length = 0

        def _capacity(self, query_length: int) -> int:
            needed = self._length + query_length
            if self.is_initialized and self.keys.numel() and needed <= self.keys.shape[-2]:
                return self.keys.shape[-2]
            # No spare slots for a prompt, nor for a layer's first write: the mask of the call that creates the
            # layer is sized before the layer exists (query length only).
            return needed + (self.SPARE if query_length == 1 and self._length else 0)

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            new = key_states.shape[-2]
            capacity = self._capacity(new)
            if not self.keys.numel() or capacity != self.keys.shape[-2]:
                self.keys, self.values = self._resized(self.keys, key_states, capacity), \
                    self._resized(self.values, value_states, capacity)
            self.keys[..., self._length:self._length + new, :] = key_states
            self.values[..., self._length:self._length + new, :] = value_states
            self._length += new
            self.keys.filled = self._length  # read by _cached_matmul_attention when no mask is given
            self.keys.prefix = self.prefix
            return self.keys, self.values

        def _resized(self, old: torch.Tensor, like: torch.Tensor, capacity: int) -> torch.Tensor:
            # zeros, not empty: masked slots get weight 0, and 0 x garbage could be NaN
            buffer = like.new_zeros((*like.shape[:-2], capacity, like.shape[-1]))
            if self._length:
                buffer[..., :self._length, :] = old[..., :self._length, :]
            return buffer

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self._shared() + self._capacity(query_length), 0

        def get_seq_length(self) -> int:
            return self._shared() + self._length if self.is_initialized else 0

        def crop(self, tokens_to_remove: int) -> None:
            if self.is_initialized and tokens_to_remove < 0:
                self._length = max(0, self._length + tokens_to_remove)
                self.keys[..., self._length:, :] = 0
                self.values[..., self._length:, :] = 0

    return GrowingLayer


def new_cache(model):
    """Return an empty KV cache for generation: growing in place for plain full-attention models on CPU,
    the model's default (None) for sliding-window or hybrid ones, for models `cached_attention` does not
    switch, and on GPUs (where SDPA kernels with a causal mask are what transformers tunes for)."""
    from transformers.cache_utils import DynamicCache
    config = model.config.get_text_config(decoder=True)
    full_attention = set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"}
    if (next(model.parameters()).device.type != "cpu" or getattr(config, "sliding_window", None)
            or not full_attention or not switches_attention(model)):
        return None
    cache = DynamicCache()
    cache.layer_class_to_replicate = _growing_layer_class()
    return cache



PACKED_PREFILL = "tell_packed_prefill"


def _row_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention of each packed row over the shared prefix and its own earlier tokens (query (1, H, T, d), key
    and value (1, KV, P + T, d) after the cache update); returns (1, T, H, d) like HF's attention functions."""
    _, heads, total, dim = query.shape
    kv_heads, prefix = key.shape[1], key.shape[2] - total
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    out = query.new_empty(1, total, heads, value.shape[-1])
    for a, b, bias in kwargs["tell_rows"]:
        length = b - a
        keys = torch.cat([key[0, :, :prefix], key[0, :, prefix + a:prefix + b]], dim=1)
        values = torch.cat([value[0, :, :prefix], value[0, :, prefix + a:prefix + b]], dim=1)
        # query heads sharing a KV head stacked into one matmul (HF's repeat_kv order: head h reads h // groups)
        stacked = query[0, :, a:b].reshape(kv_heads, groups * length, dim)
        scores = torch.baddbmm(bias, stacked, keys.transpose(1, 2), alpha=scale)
        rows = torch.bmm(torch.softmax(scores, dim=-1), values)  # (KV, groups·length, d)
        out[0, a:b] = rows.view(heads, length, -1).transpose(0, 1)
    return out, None


def _prefix_causal_bias(prefix: int, length: int, groups: int, dtype, device) -> torch.Tensor:
    """Return the additive mask (groups·length, prefix + length): every query sees the whole prefix and its
    row's tokens up to itself."""
    bias = torch.zeros((length, prefix + length), dtype=dtype, device=device)
    bias[:, prefix:] = torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu(1)
    return bias.repeat(groups, 1)


def packs(model) -> bool:
    """Return True when the packed prefill can run this model (see the module docstring)."""
    from tell.packing import _has_plain_head
    config = model.config.get_text_config(decoder=True)
    full_attention = set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"}
    return (next(model.parameters()).device.type == "cpu" and switches_attention(model) and full_attention
            and not getattr(config, "sliding_window", None) and _has_plain_head(model)
            and getattr(model, "base_model_prefix", "") != "")


def packed_prefill(model, rows: list[list[int]], prefix) -> tuple[object, torch.Tensor, torch.Tensor]:
    """Return (KV cache, last-position logits (B, V) in fp32, attention mask (B, P + W)) after reading `rows`
    (each row's token ids after the shared `prefix`, a generate.SharedPrefix or None).

    The rows' tokens form one padding-free sequence (one set of large matmuls; a left-padded batch of Halu
    prompts spent half its prefill on padding), and attention runs row by row over the prefix and the row's
    own earlier tokens. The cache keeps the prefix once and each row's tokens right-aligned after it (the
    mask hides the padding between them), which is what the decode steps read."""
    from transformers.cache_utils import DynamicCache
    device = next(model.parameters()).device
    prefix_length = prefix.length if prefix is not None else 0
    lengths = [len(r) for r in rows]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    ids = torch.tensor([[t for r in rows for t in r]], device=device)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device) + prefix_length
    cache = DynamicCache()  # plain layers: the packed row is appended to the prefix once, then re-laid out
    if prefix is not None:
        for layer_index, layer in enumerate(prefix.cache.layers):
            cache.update(*_filled(layer), layer_index)
    decoder = getattr(model, model.base_model_prefix)
    config = model.config.get_text_config(decoder=True)
    groups = config.num_attention_heads // getattr(config, "num_key_value_heads", None) or 1
    dtype = next(model.parameters()).dtype
    rows_with_bias = [(a, b, _prefix_causal_bias(prefix_length, b - a, groups, dtype, device))
                      for a, b in zip(bounds[:-1], bounds[1:])]  # built once, read by every layer
    with attention_routed(model.config, PACKED_PREFILL, _row_attention):  # no mask function: none is built
        hidden = decoder(input_ids=ids, position_ids=positions, cache=cache, use_cache=True,
                         tell_rows=rows_with_bias).last_hidden_state[0]
    last = torch.tensor([b - 1 for b in bounds[1:]], device=device)
    logits = model.get_output_embeddings()(hidden[last]).float()
    return _left_padded(model, cache, prefix_length, lengths, bounds), logits, _mask(prefix_length, lengths, device)


def _filled(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a cache layer's keys and values without spare capacity (growing layers keep some)."""
    filled = getattr(layer, "_length", layer.keys.shape[-2])
    return layer.keys[..., :filled, :], layer.values[..., :filled, :]


# Keep the shared prefix's keys/values once for all rows (else copy them into every row, as a padded prefill
# would): decode attention then reads them once per step instead of once per row.
SHARE_PREFIX = True


def _left_padded(model, packed_cache, prefix_length: int, lengths: list[int], bounds: list[int]):
    """Return the decode cache: per layer the prefix once (the layer's `prefix`) and a (B, KV, W, d) buffer of
    each row's keys/values right-aligned after zeros (with SHARE_PREFIX off: the prefix, zeros, the row's)."""
    width = max(lengths)
    shared = prefix_length if SHARE_PREFIX else 0
    copied = prefix_length - shared
    cache = new_cache(model)
    for layer_index, layer in enumerate(packed_cache.layers):
        keys, values = layer.keys[0], layer.values[0]  # (KV, P + T, d)
        laid = []
        for states in (keys, values):
            batch = states.new_zeros(len(lengths), states.shape[0], copied + width, states.shape[-1])
            batch[:, :, :copied] = states[:, :copied]
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                batch[i, :, copied + width - (b - a):] = states[:, prefix_length + a:prefix_length + b]
            laid.append(batch)
        cache.update(laid[0], laid[1], layer_index)
        if shared:
            cache.layers[layer_index].prefix = (keys[None, :, :shared].clone(), values[None, :, :shared].clone())
    return cache


def _mask(prefix_length: int, lengths: list[int], device) -> torch.Tensor:
    """Return the (B, P + W) attention mask of the left-padded layout: 1 on the prefix and on each row's tokens."""
    width = max(lengths)
    mask = torch.zeros((len(lengths), prefix_length + width), dtype=torch.long)
    mask[:, :prefix_length] = 1
    for i, n in enumerate(lengths):
        mask[i, prefix_length + width - n:] = 1
    return mask.to(device)
