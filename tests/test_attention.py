"""The attention rule of spec 1.5 and its backends."""

import random

import pytest
import torch

from lance_rl.model.attention import TokenLayout, cached_attention, packed_attention


def brute_force_mask(sample_lens, split_lens, attn_modes):
    """The rule evaluated literally, pair by pair, from the split structure."""
    owner = []  # (sample, split index, mode) per token
    sample_of = []
    for s, n in enumerate(sample_lens):
        sample_of += [s] * n
    for i, (n, mode) in enumerate(zip(split_lens, attn_modes)):
        owner += [(i, "full" if mode == "full_noise" else mode)] * n
    total = len(owner)
    mask = torch.zeros(total, total, dtype=torch.bool)
    for q in range(total):
        for k in range(total):
            if sample_of[q] != sample_of[k]:
                continue
            (sq, mq), (sk, mk) = owner[q], owner[k]
            same_block = sq == sk and mq in ("full", "noise")
            if not (k <= q or same_block):
                continue
            if mk == "noise" and sq != sk:
                continue
            mask[q, k] = True
    return mask


def random_layout(rng):
    sample_lens, split_lens, modes = [], [], []
    for _ in range(rng.randint(1, 3)):
        n = 0
        for _ in range(rng.randint(1, 6)):
            length = rng.randint(1, 5)
            split_lens.append(length)
            modes.append(rng.choice(["causal", "full", "full_noise", "noise"]))
            n += length
        sample_lens.append(n)
    return sample_lens, split_lens, modes


def test_dense_mask_matches_brute_force_rule():
    rng = random.Random(0)
    for _ in range(40):
        layout = random_layout(rng)
        got = TokenLayout.from_splits(*layout).dense_mask()
        assert torch.equal(got, brute_force_mask(*layout)), layout


def test_mask_properties_of_a_generation_sample():
    # system | caption | glue | noise block | trailing text
    layout = TokenLayout.from_splits([12], [3, 2, 2, 4, 1], ["causal", "causal", "causal", "noise", "causal"])
    mask = layout.dense_mask()
    noise = slice(7, 11)
    assert mask[noise, noise].all()  # bidirectional inside the target
    assert mask[noise, :7].all()  # the target sees the whole prefix
    assert not mask[11, noise].any()  # later text never sees the target
    assert not mask[:7, 7:].any()  # the prefix is causal


def test_official_mask_example(parity_dir):
    from safetensors.torch import load_file

    ref = load_file(parity_dir / "extra_time_embedder_and_mask.safetensors")
    layout = TokenLayout.from_splits([10, 8], [3, 4, 3, 2, 4, 2], ["causal", "full", "noise", "causal", "noise", "causal"])
    assert torch.equal(layout.dense_mask(), ref["mask_example_dense_bool"].bool())


def test_bad_layout_is_named():
    with pytest.raises(ValueError, match="sample_lens sum to 5 but split_lens sum to 4"):
        TokenLayout.from_splits([5], [4], ["causal"])
    with pytest.raises(ValueError, match="unknown attention mode"):
        TokenLayout.from_splits([4], [4], ["bidirectional"])


def qkv(length, heads=4, kv_heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, length, dim, generator=g)
    k = torch.randn(1, kv_heads, length, dim, generator=g)
    v = torch.randn(1, kv_heads, length, dim, generator=g)
    return q, k, v


def test_flex_backend_equals_sdpa():
    pytest.importorskip("torch.nn.attention.flex_attention")
    layout = TokenLayout.from_splits([13, 9], [5, 4, 4, 3, 5, 1], ["causal", "full", "noise", "causal", "noise", "causal"])
    q, k, v = qkv(22)
    ref = packed_attention(layout, "sdpa")(q, k, v)
    got = packed_attention(layout, "flex")(q, k, v)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn needs a CUDA GPU")
def test_flash_backend_equals_sdpa_on_gpu():  # pragma: no cover - GPU machines only
    pytest.importorskip("flash_attn")
    q, k, v = (t.cuda().bfloat16() for t in qkv(12))
    for causal in (True, False):
        ref = cached_attention(4, causal, backend="sdpa")(q[:, :, 8:], k, v)
        got = cached_attention(4, causal, backend="flash")(q[:, :, 8:], k, v)
        torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("mode", ["causal", "full", "noise"])
def test_cached_block_equals_packed_rows(mode):
    """A block run against a cached prefix attends exactly as the packed mask allows."""
    split_lens, modes = [6, 5], ["causal", mode]
    layout = TokenLayout.from_splits([11], split_lens, modes)
    q, k, v = qkv(11)
    full = packed_attention(layout, "sdpa")(q, k, v)
    block = cached_attention(5, causal=mode == "causal")(q[:, :, 6:], k, v)
    torch.testing.assert_close(block, full[:, :, 6:])
