"""The shapes checker on rendered images with known answers."""

import random

import numpy as np
import pytest

from lance_rl.data.shapes import MotionPrompt, render, render_clip, split_prompts
from lance_rl.rewards.registry import load_reward
from lance_rl.rewards.shapes import ShapesPrompt, all_prompts, check


@pytest.mark.parametrize("size", [16, 32, 64])
def test_every_rendered_caption_passes_every_attribute(size):
    rng = random.Random(size)
    for prompt in all_prompts():
        for _ in range(2):
            assert check(render(prompt, size, rng), prompt) == dict.fromkeys(["color", "count", "position", "shape", "strict"], True)


def test_each_wrong_attribute_is_caught_alone():
    rng = random.Random(0)
    truth = ShapesPrompt("red", "circle", 2, "left")
    image = render(truth, 32, rng)
    cases = {
        "color": ShapesPrompt("blue", "circle", 2, "left"),
        "count": ShapesPrompt("red", "circle", 1, "left"),
        "position": ShapesPrompt("red", "circle", 2, "right"),
        "shape": ShapesPrompt("red", "triangle", 2, "left"),
    }
    for attribute, claim in cases.items():
        result = check(image, claim)
        wrong = {a for a in ("color", "count", "position", "shape") if not result[a]}
        if attribute == "color":  # a wrong colour finds no component of that colour: nothing can be confirmed
            assert wrong == {"color", "count", "position", "shape"}
        else:
            assert wrong == {attribute}, (attribute, result)


def test_reward_contract_partial_credit_and_non_shapes_prompts():
    reward = load_reward("shapes")
    rng = random.Random(1)
    p = ShapesPrompt("green", "square", 1, "top")
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = reward(prompts=[p.caption, ShapesPrompt("green", "square", 2, "top").caption, p.caption, "a photo of a cat"],
                 images=[render(p, 32, rng), render(p, 32, rng), noise, render(p, 32, rng)])  # fmt: skip
    assert out.scores == [1.0, 0.75, 0.0, None]
    assert out.details["strict"] == [1.0, 0.0, 0.0, None]


def test_captions_parse_back_and_the_split_is_fixed():
    for prompt in all_prompts():
        assert ShapesPrompt.parse(prompt.caption) == prompt
    train, heldout = split_prompts()
    assert len(train) == 72 and len(heldout) == 24 and not set(train) & set(heldout)
    assert ShapesPrompt.parse("three red circles on the left") is None  # the world counts to two
    assert split_prompts() == (train, heldout)
    clip = render_clip(MotionPrompt("blue", "square", 2, "right"), 9, 32)
    assert clip.shape == (9, 32, 32, 3)


def test_background_tint_is_zero_on_the_world_and_measures_a_tinted_canvas():
    rng = random.Random(2)
    prompt = ShapesPrompt("blue", "triangle", 2, "bottom")
    clean = render(prompt, 32, rng)
    scores, details = load_reward("shapes").score(prompts=[prompt.caption] * 3, images=[
        clean,
        np.where(clean == 255, 235, clean).astype(np.uint8),  # a grey canvas (20 of 255 off white), the same shapes
        np.clip(clean.astype(int) + np.random.default_rng(0).integers(-40, 1, clean.shape), 0, 255).astype(np.uint8),
    ])  # fmt: skip
    assert details["background_tint"][0] == 0.0  # every image of the world: a white canvas
    assert details["background_tint"][1] == pytest.approx(20 / 255)  # the shapes' own pixels and rims are not canvas
    assert 0.05 < details["background_tint"][2] < 0.1  # speckle of up to 40 below white: 20 on average
    assert scores[0] == scores[1] == 1.0  # the tint is measured beside the score, not part of it
