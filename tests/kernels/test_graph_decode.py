"""Static-KV-cache decoder vs the model's own DynamicCache path (CPU eager; CUDA graph on GPU)."""

import pytest
import torch

from napari_medplib.kernels.graph_decode import StaticDecoder, StaticKVCache
from napari_medplib.model.config import MedPLIBConfig, MoEConfig
from napari_medplib.model.llm import MedPLIBLanguageModel


def _model(device="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = MedPLIBConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, moe=MoEConfig(num_experts=2, top_k=1))
    return MedPLIBLanguageModel(cfg).eval().to(device, dtype)


def _dynamic_greedy(model, embeds, steps):
    """Reference: the model's forward with transformers' DynamicCache; per-step logits."""
    with torch.no_grad():
        out = model(embeds, use_cache=True, logits_positions=slice(-1, None))
        cache, logits = out.past_key_values, [out.logits[:, -1]]
        for _ in range(steps - 1):
            nxt = logits[-1].argmax(-1)
            logits.append(model(model.embed_tokens(nxt)[:, None], past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits, 1)


def test_static_decoder_matches_dynamic_cache_logits_and_tokens():
    model = _model()
    embeds = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    ref_logits = _dynamic_greedy(model, embeds, 6)
    dec = StaticDecoder(model, max_len=16, batch=2)
    logits = [dec.prefill(embeds)]
    for _ in range(5):
        logits.append(dec.decode_step(model.embed_tokens(logits[-1].argmax(-1))[:, None]))
    torch.testing.assert_close(torch.stack(logits, 1), ref_logits, rtol=1e-4, atol=1e-5)
    assert int(dec.cache.position) == 7 + 5
    # generate() from scratch reuses the buffers and gives the same greedy tokens
    assert torch.equal(dec.generate(embeds, 6), ref_logits.argmax(-1))


def test_cache_writes_at_position_and_hides_unwritten_slots():
    cache = StaticKVCache(1, 1, 2, 8, 4, torch.float32, "cpu")
    cache.position.fill_(3)
    k, v = torch.ones(1, 2, 2, 4), torch.full((1, 2, 2, 4), 2.0)
    keys, values = cache.update(k, v, 0)
    assert keys.shape == (1, 2, 8, 4)
    assert (keys[:, :, 3:5] == 1).all() and (keys[:, :, :3] == 0).all() and (values[:, :, 3:5] == 2).all()
    cache.visible_len = 5
    assert cache.update(k, v, 0)[0].shape[2] == 5


def test_bad_use_is_explained():
    model = _model()
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(model, max_len=8, use_graph=True)
    with pytest.raises(ValueError, match="max_len"):
        StaticDecoder(model, max_len=8).prefill(torch.randn(1, 8, 32))


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager_static_decode():
    pytest.importorskip("triton", reason="triton is not installed")
    model = _model("cuda", torch.float32)
    embeds = torch.randn(1, 9, 32, device="cuda")
    eager = StaticDecoder(model, max_len=32, use_graph=False).generate(embeds, 8)
    graphed = StaticDecoder(model, max_len=32, use_graph=True).generate(embeds, 8)
    assert torch.equal(eager, graphed)
    assert torch.equal(graphed.cpu(), _dynamic_greedy(model.cpu(), embeds.cpu(), 8).argmax(-1))
