"""Lance understanding as a transformers model: parity of `generate` with the official greedy fixture, the same
answers as the model's own path (batched, padded, images and clips, MaPE or not), TRL's fused log-probabilities, and
saving and loading through the official layout."""

import json

import numpy as np
import pytest
import torch
from lance_rl.model.checkpoint import load_lance
from lance_rl.model.decoding import generate_text
from lance_rl.model.hf import LanceForUnderstanding, LanceProcessor
from lance_rl.model.media import vit_tensor
from lance_rl.model.sequence import understanding_plan
from lance_rl.model.vision import patchify_video
from safetensors.torch import load_file

QUESTION = "What color is the cube on the table?"


def conversation(media, question, kind="image", system=None):
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": [{"type": kind, kind: media}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def official(parity_dir):
    model = LanceForUnderstanding.from_pretrained(parity_dir / "tiny_lance", vit_dir=parity_dir / "tiny_qwen2_5_vl_vit")
    processor = LanceProcessor.from_pretrained(parity_dir / "tiny_lance", image_resolution=56)  # the fixture: 56 px
    return model, processor


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return LanceForUnderstanding.from_pretrained(tiny_ckpt), LanceProcessor.from_pretrained(tiny_ckpt)


def test_greedy_generate_reproduces_the_official_fixture(official, parity_dir):
    """The release's `validation_und_KVcache` on its tiny checkpoint: the 8 greedy ids exactly, the first-step
    logits to 1e-4; the processor renders the release's context ids (template, system prompt, expanded pads)."""
    model, processor = official
    ref = load_file(parity_dir / "und_kvcache_greedy.safetensors")
    meta = json.loads((parity_dir / "und_kvcache_greedy.json").read_text())
    image = np.zeros((56, 56, 3), np.uint8)  # any 56 px image is a ViT grid (1, 4, 4): the fixture's
    inputs = processor.apply_chat_template([conversation(image, meta["question"])], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")  # fmt: skip
    assert inputs["input_ids"][0].tolist() == ref["context_ids_incl_first_decode_token"].tolist()
    assert inputs["image_grid_thw"].tolist() == ref["vit_video_grid_thw"].tolist()
    inputs["pixel_values"] = ref["vit_packed_patches"]  # the release's own normalised pixels
    out = model.generate(**inputs, max_new_tokens=meta["max_length"], do_sample=False, return_dict_in_generate=True,
                         output_logits=True)  # fmt: skip
    assert out.sequences[0, inputs["input_ids"].shape[1] :].tolist() == ref["generated_ids"].tolist()
    torch.testing.assert_close(out.logits[0][0], ref["first_step_logits_raw"][:151665], atol=1e-4, rtol=1e-4)
    assert out.logits[0].shape[-1] == 151665  # only the usable vocabulary can be produced


def test_batched_padded_generation_matches_the_models_own_path(tiny):
    """Left-padded rows of different lengths, an image, a non-square image with its own system prompt and a clip:
    each row's greedy answer is the one `generate_text` (the reference path) gives alone; with MaPE as well."""
    model, processor = tiny
    rng = np.random.default_rng(0)
    cases = [
        (rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "how many shapes are there?", "image", None),
        (rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), "what colour?", "image", "Answer in one word."),
        (rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), "which way do they move?", "video", None),
    ]
    convs = [conversation(m, q, kind, system) for m, q, kind, system in cases]
    inputs = processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    assert (inputs["attention_mask"] == 0).any()  # the rows really are padded
    tok = model.lance_tokenizer
    for mape in (False, True):
        model.config.mape = mape
        ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        for row, (media, question, kind, system) in enumerate(cases):
            frames = media[None] if media.ndim == 3 else media
            patches, grid = patchify_video(vit_tensor(frames, 56))
            ref = generate_text(model.lance, tok, patches, grid, question, task=f"x2t_{kind}", instruction=system,
                                max_new_tokens=5, mape=mape)  # fmt: skip
            assert ids[row].tolist()[: len(ref.ids)] == ref.ids, (mape, row)
    model.config.mape = False


def test_processor_tokens_and_patches_are_the_releases(tiny):
    model, processor = tiny
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    text = processor.apply_chat_template(conversation(image, "what shape are they?"), add_generation_prompt=True)
    assert text == ("<|im_start|>system\nLook at the image carefully and answer the question.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what shape are they?<|im_end|>\n"
                    "<|im_start|>assistant\n")  # fmt: skip
    out = processor(text=[text], images=[[image]])
    patches, grid = patchify_video(vit_tensor(image[None], 56))
    plan = understanding_plan(model.lance_tokenizer, "x2t_image", (grid[0], grid[1] // 2, grid[2] // 2), "what shape are they?")
    assert out["input_ids"][0] == plan.token_ids
    torch.testing.assert_close(out["pixel_values"], patches, atol=0, rtol=0)
    assert out["image_grid_thw"].tolist() == [list(grid)]
    with pytest.raises(ValueError, match="1 visual placeholder.*but 2 media"):
        processor(text=[text], images=[[image, image]])
    with pytest.raises(ValueError, match="no tool calls"):
        processor.apply_chat_template(conversation(image, "?"), tools=[{"name": "f"}])


def test_trl_fused_log_probs_are_the_sampling_distribution(tiny):
    """TRL scores completions with its fused head over `backbone` hidden states and `get_output_embeddings()`; those
    log-probabilities are the log-softmax of the logits `generate` samples from (usable vocabulary only)."""
    from trl.trainer.utils import add_fused_lm_head

    model, processor = tiny
    image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    inputs = processor.apply_chat_template([conversation(image, "what colour are they?")], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")  # fmt: skip
    full = model.generate(**inputs, max_new_tokens=4, do_sample=True, generator=None)
    mask = torch.ones_like(full)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=mask, pixel_values=inputs["pixel_values"],
                       image_grid_thw=inputs["image_grid_thw"]).logits  # fmt: skip
        expected = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, full[:, 1:, None])[..., 0]
        add_fused_lm_head(model)
        labels = full.clone()
        labels[:, : inputs["input_ids"].shape[1]] = -100
        fused = model(input_ids=full, attention_mask=mask, pixel_values=inputs["pixel_values"],
                      image_grid_thw=inputs["image_grid_thw"], labels=labels, fused_lm_head=True).log_probs  # fmt: skip
    del model.forward  # back to the class's forward for the other tests
    answer = slice(inputs["input_ids"].shape[1] - 1, None)
    torch.testing.assert_close(fused[:, answer], expected[:, answer], atol=1e-5, rtol=1e-5)


def test_saves_and_loads_through_the_official_layout(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    files = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert "model.safetensors" in files and "llm_config.json" in files and "Qwen2.5-VL-ViT" in files
    assert "config.json" not in files  # no transformers-format second copy
    loaded = load_lance(tmp_path / "saved")  # the model's own loader reads it, every key accounted for
    assert loaded.report.ok and not loaded.report.copied_from_und
    assert set(loaded.model.state_dict()) == set(model.state_dict())  # the wrapper's keys are the checkpoint's
    again = LanceForUnderstanding.from_pretrained(tmp_path / "saved")
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    image = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    inputs = LanceProcessor.from_pretrained(tmp_path / "saved").apply_chat_template(
        [conversation(image, "how many?")], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt")  # fmt: skip
    torch.testing.assert_close(again.generate(**inputs, max_new_tokens=4, do_sample=False),
                               model.generate(**inputs, max_new_tokens=4, do_sample=False))  # fmt: skip


def test_a_wrong_grid_is_named(tiny):
    model, processor = tiny
    image = np.zeros((32, 32, 3), np.uint8)
    inputs = processor.apply_chat_template([conversation(image, "?")], add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")  # fmt: skip
    with pytest.raises(ValueError, match="needs 16 placeholder tokens for grid"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.zeros(64, 1176), image_grid_thw=torch.tensor([[1, 8, 8]]))
    with pytest.raises(ValueError, match="image_grid_thw has 2 rows but the input_ids hold 1"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.zeros(32, 1176),
              image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]))  # fmt: skip
