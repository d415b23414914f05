"""Static KV cache + CUDA-graph batch decode for ``MedPLIBLanguageModel`` (GPU fast path, item 2).

Why: at batch 1 a 7B decode step is ~4 ms of HBM traffic but ~32 layers x 10+ kernel launches;
replaying one captured CUDA graph removes the launch overhead. That needs fixed shapes and addresses
and no host syncs: a preallocated KV cache, the write position as a device tensor, an attention
mask computed from it on device, and the MoE layers on the Triton path (the PyTorch expert loop
calls ``nonzero`` and cannot be captured).

``StaticDecoder`` drives the model's own layers (same weights, same math as ``llm.py``); prefill runs
eagerly, ``decode_step`` replays the graph on CUDA (``use_graph=True``) or runs eagerly anywhere.
Sequences in a batch must have the same prompt length (no padding support here).

Decode attention (``attention=``):

* ``"span"`` (default): the step attends over the written span only. On CUDA that is the split-K
  Triton kernel ``kernels.decode_attention.decode_attention``, which takes the length as a device
  tensor (graph-capturable; blocks past the length exit early); elsewhere its PyTorch twin (SDPA over
  the sliced span, which reads the length on the host). The layer's attention is driven here with its
  own projections, RoPE and the cache hook, so the numbers are those of ``LlamaAttention``.
* ``"masked"``: the layer's own SDPA over all ``max_len`` slots with a mask hiding the unwritten ones
  (reads the whole cache every step; kept as the reference path).
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """Per-layer K/V buffers [B, H_kv, max_len, head_dim]; ``position`` (device) = tokens written."""

    def __init__(self, num_layers, batch, kv_heads, max_len, head_dim, dtype, device) -> None:
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.max_len = max_len
        self.visible_len: int | None = None  # host-known length during prefill (shorter attention)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """LlamaAttention's cache hook: write the new K/V at ``position``, return the readable span."""
        new = key_states.shape[2]
        slots = self.position + torch.arange(new, device=self.position.device)
        self.keys[layer_idx].index_copy_(2, slots, key_states)
        self.values[layer_idx].index_copy_(2, slots, value_states)
        end = self.visible_len or self.max_len
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # host sync; not used inside the graph
        return int(self.position)


class StaticDecoder:
    """Prefill + greedy decode with a static cache; CUDA-graph replay of the decode step on CUDA."""

    def __init__(self, model, max_len: int, batch: int = 1, use_graph: bool | None = None,
                 attention: str = "span", span_kernel: bool | None = None) -> None:
        """``span_kernel``: use the Triton kernel for ``attention="span"`` (default: on CUDA when Triton is
        installed; on CPU it needs ``TRITON_INTERPRET=1``, for tests); otherwise the PyTorch twin, which
        cannot be captured in a graph."""
        if attention not in ("span", "masked"):
            raise ValueError(f"StaticDecoder: attention must be 'span' or 'masked', got {attention!r}")
        cfg = model.config
        param = next(model.parameters())
        self.model, self.batch, self.device, self.dtype = model, batch, param.device, param.dtype
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.cache = StaticKVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, head_dim,
                                   self.dtype, self.device)
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and self.device.type != "cuda":
            raise ValueError("StaticDecoder: use_graph=True needs the model on a CUDA device")
        self.static_embeds = torch.zeros(batch, 1, cfg.hidden_size, dtype=self.dtype, device=self.device)
        self.static_logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key_positions = torch.arange(max_len, device=self.device)
        self.attention = attention
        self._span_fn = None
        if attention == "span":
            if span_kernel is None:
                import importlib.util

                span_kernel = self.device.type == "cuda" and importlib.util.find_spec("triton") is not None
            self._span_fn = _span_attention_fn(span_kernel)
            if self.use_graph and self._span_fn is _span_twin:
                raise ValueError("StaticDecoder: the CUDA graph with attention='span' needs Triton (the span "
                                 "kernel); install triton or use attention='masked'")

    def _layers(self, hidden_states, position_ids, mask):
        position_embeddings = self.model.rotary_emb(hidden_states, position_ids)
        for layer in self.model.layers:
            hidden_states = layer(hidden_states, attention_mask=mask, position_ids=position_ids,
                                  cache=self.cache, use_cache=True, position_embeddings=position_embeddings)
        return self.model.lm_head(self.model.norm(hidden_states[:, -1:])).float()[:, -1]  # [B, V]

    @torch.inference_mode()
    def prefill(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """inputs_embeds [B, L, D] on an empty cache -> logits of the last position [B, V] (fp32)."""
        batch, length, _ = inputs_embeds.shape
        if batch != self.batch or length >= self.cache.max_len:
            raise ValueError(f"StaticDecoder.prefill: need batch {self.batch} and fewer than {self.cache.max_len} "
                             f"tokens, got {tuple(inputs_embeds.shape)}; build it with a larger max_len")
        self.cache.position.zero_()
        self.cache.visible_len = length
        positions = torch.arange(length, device=self.device)
        mask = (positions[None, :] <= positions[:, None])[None, None]  # causal [1, 1, L, L]
        logits = self._layers(inputs_embeds.to(self.dtype), positions[None], mask)
        self.cache.visible_len = None
        self.cache.position.fill_(length)
        return logits

    def _span_layer(self, layer, hidden_states, position_embeddings, lengths):
        """One decoder layer for a one-token step, its attention over the written span only."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = layer.self_attn
        batch = hidden_states.shape[0]
        normed = layer.input_layernorm(hidden_states)
        shape = (batch, 1, -1, attn.head_dim)
        query = attn.q_proj(normed).view(shape).transpose(1, 2)  # [B, Hq, 1, d]
        key = attn.k_proj(normed).view(shape).transpose(1, 2)
        value = attn.v_proj(normed).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        keys, values = self.cache.update(key, value, attn.layer_idx)  # full static buffers
        out = self._span_fn(query, keys, values, lengths, attn.scaling)  # [B, Hq, 1, d]
        hidden_states = hidden_states + attn.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))
        return hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))

    def _decode_body(self) -> torch.Tensor:
        position_ids = self.cache.position.view(1, 1)
        if self.attention == "span":
            hidden_states = self.static_embeds
            position_embeddings = self.model.rotary_emb(hidden_states, position_ids)
            lengths = self.cache.position + 1  # the new token's K/V is written at ``position``
            for layer in self.model.layers:
                hidden_states = self._span_layer(layer, hidden_states, position_embeddings, lengths)
            logits = self.model.lm_head(self.model.norm(hidden_states)).float()[:, -1]
        else:
            mask = (self.key_positions <= self.cache.position).view(1, 1, 1, -1)  # only written slots
            logits = self._layers(self.static_embeds, position_ids, mask)
        self.cache.position.add_(1)
        return logits

    def _capture(self) -> None:
        saved = self.cache.position.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (autotune, allocator) outside the graph
            for _ in range(2):
                self._decode_body()
                self.cache.position.copy_(saved)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_logits = self._decode_body()
        self.cache.position.copy_(saved)  # capture records but does not run the body

    @torch.inference_mode()
    def decode_step(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds [B, 1, D] of the newest tokens -> logits [B, V] (fp32); advances the cache by one.

        With the graph, the returned tensor is the graph's output buffer: the next step overwrites it.
        """
        self.static_embeds.copy_(embeds)
        if not self.use_graph:
            return self._decode_body()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.static_logits

    @torch.inference_mode()
    def generate(self, inputs_embeds: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy tokens [B, n] (stops early only when every sequence produced ``eos_token_id``)."""
        next_ids = self.prefill(inputs_embeds).argmax(-1)  # [B]
        tokens = [next_ids]
        for _ in range(max_new_tokens - 1):
            if eos_token_id is not None and bool((next_ids == eos_token_id).all()):
                break
            next_ids = self.decode_step(self.model.embed_tokens(next_ids)[:, None]).argmax(-1)
            tokens.append(next_ids)
        return torch.stack(tokens, dim=1)


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """The PyTorch twin: SDPA of each sequence's query over its sliced span ``k[b, :, :len_b]``."""
    batch, q_heads = q.shape[:2]
    group = q_heads // k.shape[1]
    lens = lengths.expand(batch) if lengths.dim() == 0 else lengths
    outs = []
    for b, length in enumerate(lens.tolist()):  # host sync: the twin is for eager use and tests
        keys = k[b : b + 1, :, :length].repeat_interleave(group, dim=1)
        values = v[b : b + 1, :, :length].repeat_interleave(group, dim=1)
        outs.append(torch.nn.functional.scaled_dot_product_attention(q[b : b + 1], keys, values, scale=scale))
    return torch.cat(outs, dim=0)


def _span_twin(query, keys, values, lengths, scale):
    return decode_attention_reference(query, keys, values, lengths, scale)


def _span_attention_fn(use_kernel: bool):
    """The span attention callable: the Triton kernel, or the PyTorch twin (no Triton import)."""
    if not use_kernel:
        return _span_twin
    from .decode_attention import decode_attention

    return lambda query, keys, values, lengths, scale: decode_attention(query, keys, values, lengths, scale)
