"""Static KV cache + CUDA-graph batch decode for ``MedPLIBLanguageModel`` (GPU fast path, item 2).

Why: at batch 1 a 7B decode step is ~4 ms of HBM traffic but ~32 layers x 10+ kernel launches;
replaying one captured CUDA graph removes the launch overhead. That needs fixed shapes and addresses
and no host syncs: a preallocated KV cache, the write position as a device tensor, an attention
mask computed from it on device, and the MoE layers on the Triton path (the PyTorch expert loop
calls ``nonzero`` and cannot be captured).

``StaticDecoder`` drives the model's own layers (same weights, same math as ``llm.py``); prefill runs
eagerly, ``decode_step`` replays the graph on CUDA (``use_graph=True``) or runs eagerly anywhere.
Sequences in a batch must have the same prompt length (no padding support here).
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

    def __init__(self, model, max_len: int, batch: int = 1, use_graph: bool | None = None) -> None:
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

    def _decode_body(self) -> torch.Tensor:
        position_ids = self.cache.position.view(1, 1)
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
