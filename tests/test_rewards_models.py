"""Built-in reward models: tiny random instances of the real classes, loaded through the real loading paths
(open_clip model configs and checkpoint files, transformers ``from_pretrained`` directories), the real OCR engine
(its weights ship in the wheel), and a tiny Lance for the self-judge. Nothing reaches the network."""

import json

import numpy as np
import pytest
import torch

from lance_rl.rewards import load_reward
from lance_rl.rewards.base import ModalityError

TINY_CLIP = "lance-rl-tiny-clip"
TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def rand_images(n, seed=0, size=40):
    return list(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def open_clip_weights(tmp_path_factory):
    """A tiny open_clip architecture registered by name, and a random checkpoint file for it."""
    import open_clip

    cfg_dir = tmp_path_factory.mktemp("open_clip_cfg")
    (cfg_dir / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    path = tmp_path_factory.mktemp("open_clip_w") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def clip_score(open_clip_weights):
    return load_reward("clip_score", model_name=TINY_CLIP, pretrained=str(open_clip_weights))


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    """A tiny transformers CLIPModel and CLIPProcessor saved as a from_pretrained directory."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(small, vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf_clip")
    CLIPModel(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------ open_clip rewards
def test_clip_score_matches_open_clip(clip_score, open_clip_weights):
    import open_clip
    from PIL import Image

    prompts, ims = ["a red cube", "a blue ball"], rand_images(2)
    out = clip_score(prompts=prompts, images=ims)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=str(open_clip_weights))
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.fromarray(i)) for i in ims]))
        txt = model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(prompts))
    ref = torch.nn.functional.cosine_similarity(img, txt)
    assert out.scores == pytest.approx(ref.tolist(), abs=1e-5)
    assert all(-1 <= s <= 1 for s in out.scores)
    from lance_rl.rewards.clip import ClipScore

    injected = ClipScore.from_model(model, preprocess, open_clip.get_tokenizer(TINY_CLIP))
    assert injected(prompts=prompts, images=ims).scores == pytest.approx(out.scores, abs=1e-5)


def test_image_similarity_for_editing(clip_score):
    from lance_rl.rewards.clip import ImageSimilarity

    sim = ImageSimilarity(clip=clip_score.clip)
    a, b = rand_images(2, seed=1)
    out = sim(prompts=["x"] * 3, images=[a, a, a], conditions=[a, b, None])
    assert out.scores[0] == pytest.approx(1.0, abs=1e-5) and out.scores[1] < out.scores[0] and out.scores[2] is None
    video_condition = np.stack([a, a])  # a [T, H, W, 3] condition is embedded as the mean of its frames
    assert sim(prompts=["x"], images=[a], conditions=[video_condition]).scores[0] == pytest.approx(1.0, abs=1e-5)
    assert sim(prompts=["x"], images=[a]).scores == [None]


def test_hpsv2_loads_an_hps_checkpoint(open_clip_weights, tmp_path):
    state = torch.load(open_clip_weights)
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": state}, ckpt)  # the released file's layout
    hps = load_reward("hpsv2", checkpoint=str(ckpt), model_name=TINY_CLIP)
    loaded = hps.clip.model.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    scores = hps(prompts=["a cat", "a dog"], images=rand_images(2, seed=2)).scores  # values: test_rewards_reference
    assert all(-1 <= s <= 1 for s in scores)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_reward("hpsv2", checkpoint=str(tmp_path / "missing.pt"), model_name=TINY_CLIP)


# ------------------------------------------------------------------------------------------------ transformers rewards
def test_pickscore_from_pretrained_dirs(hf_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    ps = load_reward("pickscore", model=str(hf_clip_dir), processor=str(hf_clip_dir))
    prompts, ims = ["a cat", "a dog", "a dog"], rand_images(3, seed=3)
    out = ps(prompts=prompts, images=ims)
    model, proc = CLIPModel.from_pretrained(hf_clip_dir), CLIPProcessor.from_pretrained(hf_clip_dir)
    with torch.no_grad():  # the model card's recipe
        img = model.get_image_features(**proc(images=ims, return_tensors="pt")).pooler_output
        txt = model.get_text_features(**proc(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")).pooler_output
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        ref = model.logit_scale.exp() * (img * txt).sum(-1)
    assert out.scores == pytest.approx(ref.tolist(), abs=1e-4)
    assert out.details["cosine"] == pytest.approx((ref / model.logit_scale.exp()).tolist(), abs=1e-5)


def test_aesthetic_head_layout_and_score(hf_clip_dir, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from lance_rl.rewards.aesthetic import AestheticMLP

    head = AestheticMLP(16)  # sized to the tiny CLIP's projection
    expected = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    assert set(head.state_dict()) == expected  # the released sac+logos+ava1-l14-linearMSE.pth keys
    assert AestheticMLP().layers[0].in_features == 768  # CLIP ViT-L/14
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head.state_dict(), path)
    aes = load_reward("aesthetic", head_path=str(path), clip=str(hf_clip_dir))
    ims = rand_images(2, seed=4)
    out = aes(prompts=["", ""], images=ims)
    model, proc = CLIPModel.from_pretrained(hf_clip_dir), CLIPProcessor.from_pretrained(hf_clip_dir)
    with torch.no_grad():
        emb = model.get_image_features(**proc(images=ims, return_tensors="pt")).pooler_output
        ref = head.eval()(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert out.scores == pytest.approx(ref.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="head_path"):
        load_reward("aesthetic", clip=str(hf_clip_dir))


# ------------------------------------------------------------------------------------------------ video
def test_video_temporal_consistency(clip_score):
    from lance_rl.rewards.video import TemporalConsistency

    tc = TemporalConsistency(clip=clip_score.clip, max_frames=4)
    frame = rand_images(1)[0]
    still, noise, single = np.stack([frame] * 5), np.stack(rand_images(5, seed=5)), frame[None]
    out = tc(prompts=["x"] * 3, videos=[still, noise, single])
    assert out.scores[0] == pytest.approx(1.0, abs=1e-5) and out.scores[1] < 1.0 and out.scores[2] is None
    assert out.details["min"][1] <= out.scores[1]
    with pytest.raises(ModalityError, match="video only"):
        tc(prompts=["x"], images=[frame])


def test_frame_reward_applies_an_image_reward_to_sampled_frames(clip_score):
    video = np.stack(rand_images(7, seed=6))
    fr = load_reward("frames", reward="jpeg_incompressibility", num_frames=3)
    assert fr.name == "frames(jpeg_incompressibility)"
    out = fr(prompts=["x"], videos=[video])
    inner = load_reward("jpeg_incompressibility")(prompts=["x"] * 3, images=[video[0], video[3], video[6]]).scores
    assert out.scores == pytest.approx([np.mean(inner)]) and out.details["frames"] == [inner]
    worst = load_reward("frames", reward=clip_score, num_frames=2, reduce="min")(prompts=["a"], videos=[video])
    per_frame = clip_score(prompts=["a", "a"], images=[video[0], video[6]]).scores
    assert worst.scores == pytest.approx([min(per_frame)], abs=1e-6)


# ------------------------------------------------------------------------------------------------ OCR (real engine)
def render_text(text: str, size=(320, 96)) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size, "white")
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 36)
    except OSError:
        font = ImageFont.load_default(size=36)  # Pillow >= 10.1 scales its built-in font
    ImageDraw.Draw(img).text((20, 25), text, fill="black", font=font)
    return np.asarray(img)


def test_ocr_text_accuracy_rule():
    from lance_rl.rewards.ocr import edit_distance, quoted_text, text_accuracy

    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3
    assert quoted_text('a sign that says "Open Late"') == "Open Late" and quoted_text("\u201cHi\u201d there") == "Hi"
    assert quoted_text("no quotes here") is None
    assert text_accuracy("xx OPENLATE yy", "open late") == 1.0  # contained: full marks
    assert text_accuracy("OPEM", "open") == 0.75 and text_accuracy("zzzzzzzz", "open") == 0.0


def test_ocr_reward_reads_rendered_text_offline():
    pytest.importorskip("rapidocr_onnxruntime", reason="rapidocr-onnxruntime is not installed")
    ocr = load_reward("ocr")
    image = render_text("HELLO WORLD")
    prompts = ['a poster reading "HELLO WORLD"', 'a poster reading "GOODBYE MOON"', "a poster with no quoted text"]
    out = ocr(prompts=prompts, images=[image] * 3)
    assert out.scores[0] >= 0.9, out.details["ocr_text"]
    assert out.scores[1] < out.scores[0] - 0.3
    assert out.scores[2] is None and out.details["target"] == ["HELLO WORLD", "GOODBYE MOON", None]
    override = ocr(prompts=["no quotes"], images=[image], metadata=[{"ocr_text": "hello world"}])
    assert override.scores[0] >= 0.9


# ------------------------------------------------------------------------------------------------ self-judge
def test_self_judge_is_a_deterministic_probability(tiny_ckpt):
    from lance_rl.model.checkpoint import load_lance

    loaded = load_lance(tiny_ckpt)
    judge = load_reward("self_judge", model=loaded)
    ims = rand_images(2, seed=7, size=64)
    out = judge(prompts=["a red circle", "two blue squares"], images=ims)
    assert all(0.0 <= s <= 1.0 for s in out.scores) and all(0.0 <= p <= 1.0 for p in out.details["p_yes_raw"])
    assert judge(prompts=["a red circle", "two blue squares"], images=ims).scores == out.scores
    single = judge(prompts=["two blue squares"], images=ims[1:])
    assert single.scores[0] == pytest.approx(out.scores[1], abs=1e-6)  # batch == one at a time
    video = judge(prompts=["a moving dot"], videos=[np.stack(rand_images(3, seed=8, size=64))])
    assert 0.0 <= video.scores[0] <= 1.0
    with pytest.raises(ValueError, match="needs a loaded Lance model"):
        load_reward("self_judge")
