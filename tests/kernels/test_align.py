"""Token grouping (moe_align_block_size-like) on device vs its PyTorch twin, plus its invariants."""

import pytest
import torch

align = pytest.importorskip("napari_medplib.kernels.align", reason="triton is not installed")


def _random_ids(num_tokens, num_experts, top_k, seed, device):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    return ids.reshape(num_tokens, top_k).to(device)


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m", [(50, 2, 1, 16), (33, 4, 2, 16), (64, 4, 2, 32), (1, 2, 1, 16), (3, 4, 2, 16)])
def test_alignment_matches_twin_and_invariants(device, num_tokens, num_experts, top_k, block_m):
    ids = _random_ids(num_tokens, num_experts, top_k, num_tokens + block_m, device)
    got = align.align_block_size(ids, num_experts, block_m)
    ref = align.align_block_size_reference(ids, num_experts, block_m)
    for field in ("sorted_ids", "block_expert", "counts", "num_padded"):
        assert torch.equal(getattr(got, field), getattr(ref, field)), field

    num_pairs = num_tokens * top_k
    flat = ids.reshape(-1).cpu()
    sorted_ids, block_expert = got.sorted_ids.cpu(), got.block_expert.cpu()
    used = int(got.num_padded)
    assert used % block_m == 0 and used <= sorted_ids.numel()
    assert torch.equal(got.counts.cpu(), torch.bincount(flat, minlength=num_experts).int())
    valid = sorted_ids[sorted_ids < num_pairs]
    assert torch.equal(valid.sort().values, torch.arange(num_pairs, dtype=torch.int32))  # every pair once
    assert (sorted_ids[used:] == num_pairs).all()  # only sentinels past the used length
    for b in range(block_expert.numel()):
        rows = sorted_ids[b * block_m : (b + 1) * block_m]
        if b * block_m >= used:
            assert block_expert[b] == -1
            continue
        real = rows[rows < num_pairs].long()
        assert real.numel() > 0 and (flat[real] == block_expert[b]).all()  # one expert per block
        assert torch.equal(real, real.sort().values)  # stable: token order kept within an expert


@pytest.mark.parametrize("top_k", [1, 2])
def test_chunked_loop_carries_counts_across_steps(device, top_k):
    """Small chunks: the histogram, block map and stable scatter run over several loop steps."""
    ids = _random_ids(45, 4, top_k, 11, device)
    got = align.align_block_size(ids, 4, 16, chunk=16)
    ref = align.align_block_size_reference(ids, 4, 16)
    for field in ("sorted_ids", "block_expert", "counts", "num_padded"):
        assert torch.equal(getattr(got, field), getattr(ref, field)), field


def test_decode_alignment_is_one_block_per_pair(device):
    ids = torch.tensor([[1, 3]], device=device)
    got = align.align_block_size(ids, 4, 16)
    assert got.sorted_ids.numel() == 32 and got.block_expert.tolist() == [1, 3]  # bound from shapes


def test_block_m_must_be_power_of_two(device):
    with pytest.raises(ValueError, match="power of two"):
        align.align_block_size(torch.zeros(4, 1, dtype=torch.long, device=device), 2, 24)
