"""3-D mRoPE positions and the modality-aware shift (MaPE), spec 1.6."""

import json

import torch

from lance_rl.model.positions import apply_mape, latent_position_ids, rope_index, sample_positions
from lance_rl.model.sequence import NOISE, REFERENCE, SOURCE, TEXT, VIT, Block, PlacedBlock, SequencePlan

VS, VE, PAD = 900, 901, 902  # marker ids are irrelevant to positions; only the layout matters


def make_plan(parts, modes):
    """parts: ints (that many text tokens) or Blocks; returns a SequencePlan with one split per part."""
    ids, modality, blocks, split_lens = [], [], [], []
    for part in parts:
        if isinstance(part, Block):
            ids.append(VS)
            blocks.append(PlacedBlock(part, len(ids)))
            ids += [PAD] * part.num_tokens + [VE]
            modality += [part.modality] * (part.num_tokens + 2)
            split_lens.append(part.num_tokens + 2)
        else:
            ids += list(range(part))
            modality += [TEXT] * part
            split_lens.append(part)
    return SequencePlan("t2i", ids, split_lens, modes, modality, blocks)


def test_t2i_noise_block_positions_by_hand():
    # 5 text tokens, then a 1x2x3 latent target, then 1 trailing token; MaPE does nothing (no full split).
    plan = make_plan([5, Block("noise", (1, 2, 3), NOISE), 1], ["causal", "noise", "causal"])
    pos = sample_positions(plan)
    assert pos[:, :6].tolist() == [[0, 1, 2, 3, 4, 5]] * 3  # text and the <|vision_start|> marker
    s = 6  # the block starts right after its marker
    assert pos[0, 6:12].tolist() == [s] * 6
    assert pos[1, 6:12].tolist() == [s, s, s, s + 1, s + 1, s + 1]
    assert pos[2, 6:12].tolist() == [s, s + 1, s + 2] * 2
    assert pos[:, 12].tolist() == [s + 3] * 3  # <|vision_end|> = block max + 1
    assert pos[:, 13].tolist() == [s + 4] * 3


def test_video_blocks_advance_two_per_latent_frame():
    plan = make_plan([2, Block("noise", (3, 1, 1), NOISE), 1], ["causal", "noise", "causal"])
    pos = rope_index(plan)
    assert pos[0, 3:6].tolist() == [3, 5, 7]  # tokens_per_second = 2
    assert pos[:, 6].tolist() == [8, 8, 8]


def test_image_edit_mape_by_hand():
    # system(4) | ViT block 1x2x2 | clean source 1x2x2 | instruction(3) | noise target 1x2x2 | trailing(1)
    plan = make_plan(
        [4, Block("vit", (1, 2, 2), VIT), Block("vae", (1, 2, 2), SOURCE), 3, Block("noise", (1, 2, 2), NOISE), 1],
        ["causal", "full", "full_noise", "causal", "noise", "causal"],
    )
    before = rope_index(plan)
    pos = sample_positions(plan)
    vit = slice(4, 10)
    # ViT: the marker sits at t = 1000 on the temporal axis only; h and w keep their step-1 ids.
    assert pos[0, vit].tolist() == [1000, 1001, 1001, 1001, 1001, 1003]
    assert torch.equal(pos[1:, vit], before[1:, vit])
    # Source and the following text keep their ids (text continues from the unshifted maximum).
    assert torch.equal(pos[:, 10:19], before[:, 10:19])
    assert pos[:, 16].tolist() == [before[0, 15].item() + 1] * 3
    # The target copies the source's 3-D ids exactly, markers included.
    assert torch.equal(pos[:, 19:25], pos[:, 10:16])
    assert torch.equal(pos[:, 25], before[:, 25])


def test_x2t_mape_shifts_only_the_vit_block():
    plan = make_plan([3, Block("vit", (1, 1, 2), VIT), 4], ["causal", "full", "causal"])
    pos = sample_positions(plan)
    # marker at 3, tokens at 4 (w 4, 5), end marker at 6 -> shifted by 997 on the temporal axis
    assert pos[0, 3:7].tolist() == [1000, 1001, 1001, 1003]
    assert pos[:, 7:].tolist() == [[7, 8, 9, 10]] * 3
    assert torch.equal(sample_positions(plan, mape=False), rope_index(plan))  # official x2t inference (quirk 9.1)


def test_reference_block_and_unequal_source_are_handled():
    ref = make_plan([2, Block("vae", (1, 1, 2), REFERENCE), Block("noise", (1, 1, 1), NOISE)], ["causal", "full_noise", "noise"])
    pos = sample_positions(ref)
    assert pos[0, 2] == 2000
    unequal = make_plan([2, Block("vae", (1, 1, 2), SOURCE), Block("noise", (1, 1, 1), NOISE)], ["causal", "full_noise", "noise"])
    assert torch.equal(sample_positions(unequal), rope_index(unequal))  # no copy when the token counts differ


def test_latent_position_ids():
    assert latent_position_ids((2, 2, 3), max_latent_size=64).tolist() == [0, 1, 2, 64, 65, 66, 4096, 4097, 4098, 4160, 4161, 4162]


def test_official_rope_and_mape_cases(parity_dir):
    cases = json.loads((parity_dir / "extra_rope_mape_cases.json").read_text())["cases"]
    kinds = {VIT: "vit", SOURCE: "vae", REFERENCE: "vae", NOISE: "noise"}
    for case in cases:
        ids, modality = case["input_ids"], case["sample_modality"]
        grids = iter(case["grid_thw_per_block"])
        blocks = []
        for i, tok in enumerate(ids):
            if tok == 151652:  # <|vision_start|>
                t, h, w = next(grids)  # supplied grids: the LLM sees (t, h/2, w/2) after the 2x2 merge
                blocks.append(PlacedBlock(Block(kinds[modality[i]], (t, h // 2, w // 2), modality[i]), i + 1))
        plan = SequencePlan("case", ids, case["split_lens"], case["attn_modes"], modality, blocks)
        # compare flat: the official lists may carry a singleton batch axis
        assert rope_index(plan).flatten().tolist() == torch.tensor(case["rope_index"]).flatten().tolist(), case["name"]
        shifted = apply_mape(rope_index(plan), torch.tensor(modality), case["attn_modes"])
        assert shifted.flatten().tolist() == torch.tensor(case["after_mape_shift"]).flatten().tolist(), case["name"]
