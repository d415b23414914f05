"""Split-K decode attention over the written span vs its PyTorch twin (interpreter on CPU)."""

import pytest
import torch

from napari_medplib.kernels.graph_decode import decode_attention_reference

da = pytest.importorskip("napari_medplib.kernels.decode_attention", reason="triton is not installed")


def _inputs(device, batch, q_heads, kv_heads, max_len, head_dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, 1, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, kv_heads, max_len, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, kv_heads, max_len, head_dim, generator=gen).to(device, dtype)
    return q, k, v


@pytest.mark.parametrize("batch,q_heads,kv_heads,head_dim", [(1, 2, 2, 16), (2, 4, 2, 16), (3, 8, 2, 24), (2, 6, 3, 32)])
@pytest.mark.parametrize("length", [1, 13, 16, 37, 48])
def test_matches_twin_on_ragged_lengths_gqa_and_batch(device, batch, q_heads, kv_heads, head_dim, length):
    q, k, v = _inputs(device, batch, q_heads, kv_heads, 48, head_dim)
    lengths = torch.tensor(length, device=device)
    out = da.decode_attention(q, k, v, lengths, block_n=16)
    torch.testing.assert_close(out, decode_attention_reference(q, k, v, lengths), rtol=1e-5, atol=1e-5)


def test_per_sequence_lengths_and_several_splits_per_sequence(device):
    q, k, v = _inputs(device, 3, 4, 2, 100, 16, seed=1)
    lengths = torch.tensor([1, 50, 99], device=device)
    for splits in (1, 3, 7):  # 7 splits of 16 keys: the split past 99 (and past 1, 50) exits at once
        out = da.decode_attention(q, k, v, lengths, block_n=16, splits=splits)
        torch.testing.assert_close(out, decode_attention_reference(q, k, v, lengths), rtol=1e-5, atol=1e-5)


def test_reads_nothing_past_the_length(device):
    """Poison the unwritten part of the cache (NaN): a kernel that touched it would return NaN."""
    q, k, v = _inputs(device, 2, 4, 4, 64, 16, seed=2)
    k[:, :, 21:] = float("nan")
    v[:, :, 21:] = float("nan")
    out = da.decode_attention(q, k, v, torch.tensor(21, device=device), block_n=16, splits=4)
    assert torch.isfinite(out).all()
    ref = decode_attention_reference(q[:, :, :, :], k[:, :, :21].contiguous(), v[:, :, :21].contiguous(),
                                        torch.tensor(21))
    torch.testing.assert_close(out, ref.to(out.device), rtol=1e-5, atol=1e-5)


def test_scale_and_half_precision(device):
    q, k, v = _inputs(device, 1, 4, 2, 40, 16, dtype=torch.bfloat16, seed=3)
    lengths = torch.tensor(33, device=device)
    out = da.decode_attention(q, k, v, lengths, scale=0.5, block_n=16)
    ref = decode_attention_reference(q.float(), k.float(), v.float(), lengths, scale=0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)  # output rounded to bf16 once


def test_bad_inputs_are_explained(device):
    q, k, v = _inputs(device, 1, 3, 2, 8, 16)
    with pytest.raises(da.KernelInputError, match="group"):
        da.decode_attention(q, k, v, torch.tensor(4, device=device))
    q, k, v = _inputs(device, 1, 2, 2, 8, 16)
    with pytest.raises(da.KernelInputError, match="lengths"):
        da.decode_attention(q, k, v, torch.tensor(4.0, device=device))
    with pytest.raises(da.KernelInputError, match="q must be"):
        da.decode_attention(q.expand(1, 2, 2, 16), k, v, torch.tensor(4, device=device))


# ---------------------------------------------------------------------------- StaticDecoder wiring
def _tiny_model(kv_heads=2, seed=0):
    from napari_medplib.model.config import MedPLIBConfig, MoEConfig
    from napari_medplib.model.llm import MedPLIBLanguageModel

    torch.manual_seed(seed)
    cfg = MedPLIBConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=kv_heads, moe=MoEConfig(num_experts=2, top_k=1))
    return MedPLIBLanguageModel(cfg).eval()


@pytest.mark.parametrize("span_kernel", [False, True])  # PyTorch twin; Triton kernel (interpreter on CPU)
@pytest.mark.parametrize("kv_heads,batch", [(2, 2), (4, 1)])
def test_static_decoder_span_equals_masked(span_kernel, kv_heads, batch):
    from napari_medplib.kernels.graph_decode import StaticDecoder

    model = _tiny_model(kv_heads)
    embeds = torch.randn(batch, 7, 32, generator=torch.Generator().manual_seed(1))
    masked = StaticDecoder(model, max_len=40, batch=batch, use_graph=False, attention="masked")
    span = StaticDecoder(model, max_len=40, batch=batch, use_graph=False, attention="span", span_kernel=span_kernel)
    ids_masked, ids_span = masked.generate(embeds, 12), span.generate(embeds, 12)
    assert ids_span.shape == (batch, 12) and torch.equal(ids_span, ids_masked)
    # logits of one more step, and both caches advanced to the same place
    with torch.no_grad():
        nxt = model.embed_tokens(ids_masked[:, -1].clone())[:, None]
    torch.testing.assert_close(span.decode_step(nxt), masked.decode_step(nxt), rtol=1e-5, atol=1e-5)
    assert int(span.cache.position) == int(masked.cache.position) == 7 + 12


def test_static_decoder_rejects_unknown_attention():
    from napari_medplib.kernels.graph_decode import StaticDecoder

    with pytest.raises(ValueError, match="span"):
        StaticDecoder(_tiny_model(), max_len=8, attention="flash")


# ---------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
def test_cuda_graph_replay_follows_the_device_length():
    """Capture once at one length, replay at others: the kernel reads the length on device."""
    q, k, v = _inputs("cuda", 2, 8, 2, 300, 64, dtype=torch.bfloat16, seed=7)
    lengths = torch.tensor(5, device="cuda")
    da.decode_attention(q, k, v, lengths)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = da.decode_attention(q, k, v, lengths)
    for length in (1, 63, 64, 65, 211, 300):
        lengths.fill_(length)
        graph.replay()
        ref = decode_attention_reference(q.float(), k.float(), v.float(), lengths)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_7b_attention_shapes_bf16():
    q, k, v = _inputs("cuda", 1, 32, 32, 2048, 128, dtype=torch.bfloat16, seed=8)
    lengths = torch.tensor(1000, device="cuda")
    ref = decode_attention_reference(q.float(), k.float(), v.float(), lengths)
    torch.testing.assert_close(da.decode_attention(q, k, v, lengths).float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_cuda_graph_span_decoder_equals_eager_masked():
    from napari_medplib.kernels.graph_decode import StaticDecoder

    model = _tiny_model(2).cuda()
    embeds = torch.randn(2, 9, 32, device="cuda")
    eager = StaticDecoder(model, max_len=48, batch=2, use_graph=False, attention="masked").generate(embeds, 10)
    graphed = StaticDecoder(model, max_len=48, batch=2, use_graph=True, attention="span").generate(embeds, 10)
    assert torch.equal(eager, graphed)
