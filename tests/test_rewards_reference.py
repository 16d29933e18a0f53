"""Each built-in reward against a reference computation written the way the project its users trust computes it
(torchmetrics' CLIPScore and flow_grpo's CLIP scorer, ``hpsv2.score``, PickScore's model card, flow_grpo's aesthetic and
OCR scorers, DDPO's JPEG reward), preprocessing included, on non-square images, with tiny random models of the real
architecture classes. Nothing reaches the network: open_clip's factory runs for real, with the built-in architecture
names pointed at a tiny config and every pretrained tag "downloading" a tiny checkpoint.

Tolerances: 1e-5 on cosines (float32, same operations), 1e-4 on PickScore's logits (scaled by exp(logit_scale)).
"""

import copy
import io
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lance_rl.rewards import load_reward

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = {  # 2 heads of 16, MLP ratio 4: the CLIP class and layer layout of ViT-B-32 / ViT-L-14 / ViT-H-14
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
OPENAI_NAMES = ("ViT-B-32", "ViT-L-14")  # the architectures the built-ins load with pretrained="openai"
COS_TOL = 1e-5


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Colour waves of random frequency and phase plus noise: content up to the borders (so cropping or padding
    changes the embedding), and images of different seeds far apart."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    colour, freq, phase = rng.uniform(50, 205, 3), rng.uniform(0.5, 4.0, (3, 2)), rng.uniform(0, 2 * np.pi, 3)
    waves = [np.sin(2 * np.pi * (fx * xx + fy * yy) + p) for (fx, fy), p in zip(freq, phase)]
    base = colour + 50 * np.stack(waves, axis=-1)
    return np.clip(base + rng.integers(-25, 26, base.shape), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ offline open_clip
@pytest.fixture(scope="module")
def tiny_clip_checkpoint(tmp_path_factory) -> Path:
    import open_clip

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("open_clip") / "tiny.pt"
    torch.save(open_clip.CLIP(**copy.deepcopy(TINY_VIT)).state_dict(), path)  # activations hold no weights
    return path


@pytest.fixture
def offline_open_clip(monkeypatch, tiny_clip_checkpoint):
    """ViT-B-32, ViT-L-14 and ViT-H-14 build the tiny config (keeping each name's real pretrained tags, with their
    preprocessing and QuickGELU flags), and any tag's download returns the tiny checkpoint."""
    from open_clip import factory

    for name in (*OPENAI_NAMES, "ViT-H-14"):
        monkeypatch.setitem(factory._MODEL_CONFIGS, name, copy.deepcopy(TINY_VIT))
    monkeypatch.setattr(factory, "download_pretrained", lambda *args, **kwargs: str(tiny_clip_checkpoint))
    return tiny_clip_checkpoint


def activations(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__name__ in ("GELU", "QuickGELU")}


def recipe_openai_rewards() -> list:
    """(recipe, reward, kwargs) for every recipe reward that loads open_clip weights tagged "openai"."""
    found = []
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        for name, spec in (yaml.safe_load(path.read_text()).get("rewards") or {}).items():
            kwargs = (spec.get("kwargs") or {}) if isinstance(spec, dict) else {}
            if str(kwargs.get("pretrained", "")).lower() == "openai":
                found.append(pytest.param(name, dict(kwargs, device="cpu"), id=f"{path.relative_to(ROOT)}:{name}"))
    return found


OPENAI_DEFAULTS = [
    pytest.param("clip_score", {}, id="clip_score"),
    pytest.param("image_similarity", {}, id="image_similarity"),
    pytest.param("video_temporal_consistency", {}, id="video_temporal_consistency"),
    *recipe_openai_rewards(),
]


@pytest.mark.parametrize("name, kwargs", OPENAI_DEFAULTS)
def test_openai_weights_are_built_with_quick_gelu(offline_open_clip, name, kwargs, recwarn):
    """OpenAI's CLIP was trained with QuickGELU; open_clip >= 2.29 builds nn.GELU for the "openai" tag unless told."""
    reward = load_reward(name, **kwargs)
    assert activations(reward.clip.model) == {"QuickGELU"}
    assert not [w for w in recwarn if "QuickGELU" in str(w.message)]  # open_clip's mismatch warning


@pytest.mark.parametrize("model_name, tag, activation", [
    ("ViT-L-14", "laion2b_s32b_b82k", "GELU"),  # LAION-2B: trained with nn.GELU
    ("ViT-B-32", "laion400m_e32", "QuickGELU"),  # an early LAION run trained with QuickGELU, marked so by open_clip
])  # fmt: skip
def test_activation_follows_the_weights(offline_open_clip, model_name, tag, activation):
    reward = load_reward("clip_score", model_name=model_name, pretrained=tag)
    assert activations(reward.clip.model) == {activation}


# ------------------------------------------------------------------------------------------------ transformers CLIP
def openai_bpe_tokenizer():
    """transformers' CLIPTokenizer over the real CLIP BPE vocabulary (the one open_clip ships)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    vocab = dict(bpe.encoder)  # open_clip spells the special tokens differently from OpenAI's vocab.json
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def pil_clip_image_processor(size: int):
    """CLIP's image processor on PIL (transformers < 5's default; 5.x defaults to a torchvision backend that rounds
    differently by up to one uint8 level)."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def hf_clip_like(open_clip_model, hidden_act: str):
    """The same weights as a transformers ``CLIPModel`` (what torchmetrics and flow_grpo load), converted by name."""
    from transformers import CLIPConfig, CLIPModel

    sd = open_clip_model.state_dict()
    vision, text = TINY_VIT["vision_cfg"], TINY_VIT["text_cfg"]
    layer = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
             "hidden_act": hidden_act}  # fmt: skip
    # eos_token_id 2 is what OpenAI's config says: transformers then pools at the highest token id, as open_clip does
    text_ids = {"bos_token_id": 49406, "eos_token_id": 2, "pad_token_id": 49407}
    text_size = {"vocab_size": text["vocab_size"], "max_position_embeddings": text["context_length"]}
    config = CLIPConfig(
        vision_config=dict(layer, image_size=vision["image_size"], patch_size=vision["patch_size"]),
        text_config=dict(layer, **text_ids, **text_size),
        projection_dim=TINY_VIT["embed_dim"],
    )
    hf = {
        "logit_scale": sd["logit_scale"],
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "visual_projection.weight": sd["visual.proj"].T,  # open_clip multiplies x @ proj
        "text_projection.weight": sd["text_projection"].T,
    }
    norms = {"visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
             "ln_final": "text_model.final_layer_norm"}  # fmt: skip
    for src, dst in norms.items():
        hf |= {f"{dst}.weight": sd[f"{src}.weight"], f"{dst}.bias": sd[f"{src}.bias"]}
    for src, dst in (("visual.transformer", "vision_model.encoder"), ("transformer", "text_model.encoder")):
        hf |= converted_block(sd, f"{src}.resblocks.0.", f"{dst}.layers.0.")
    model = CLIPModel(config)
    model.load_state_dict(hf, strict=True)
    return model.eval()


def converted_block(sd: dict, src: str, dst: str) -> dict:
    out = {}
    for kind in ("weight", "bias"):  # one packed q/k/v projection in torch's MultiheadAttention, three in transformers
        for name, part in zip(("q_proj", "k_proj", "v_proj"), sd[f"{src}attn.in_proj_{kind}"].chunk(3)):
            out[f"{dst}self_attn.{name}.{kind}"] = part
        renamed = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
        out |= {f"{dst}{new}.{kind}": sd[f"{src}{old}.{kind}"] for old, new in renamed.items()}
    return out


@pytest.fixture(scope="module")
def openai_clip_as_hf(tiny_clip_checkpoint):
    """The tiny "openai" weights in transformers' CLIPModel with OpenAI's config (hidden_act quick_gelu), and the
    CLIPProcessor torchmetrics and flow_grpo use."""
    import open_clip
    from transformers import CLIPProcessor

    source = open_clip.CLIP(**copy.deepcopy(TINY_VIT))
    source.load_state_dict(torch.load(tiny_clip_checkpoint))
    processor = CLIPProcessor(image_processor=pil_clip_image_processor(32), tokenizer=openai_bpe_tokenizer())
    return hf_clip_like(source, "quick_gelu"), processor


def unit(features) -> torch.Tensor:
    """L2-normalised projected features (transformers 5 wraps them in an output's ``pooler_output``)."""
    x = features if isinstance(features, torch.Tensor) else features.pooler_output
    return x / x.norm(p=2, dim=-1, keepdim=True)


@torch.no_grad()
def torchmetrics_clip_scores(model, processor, images, prompts) -> torch.Tensor:
    """torchmetrics' CLIPScore, step by step: uint8 [3, H, W] tensors and the prompts through one processor call,
    projected features normalised, ``100 * cos`` per pair (what torchmetrics averages over the samples and then clamps
    at 0)."""
    chw = [torch.from_numpy(im).permute(2, 0, 1) for im in images]
    inputs = processor(text=prompts, images=chw, return_tensors="pt", padding=True)
    limit = model.config.text_config.max_position_embeddings
    image_features = unit(model.get_image_features(pixel_values=inputs["pixel_values"]))
    text = {key: inputs[key][:, :limit] for key in ("input_ids", "attention_mask")}
    text_features = unit(model.get_text_features(**text))
    return 100 * (image_features * text_features).sum(-1)


@torch.no_grad()
def hf_image_embeddings(model, processor, images) -> torch.Tensor:
    pixels = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
    return unit(model.get_image_features(pixel_values=pixels))


# Non-square, with an even crop margin at the tiny 32 px: 96x144 -> 32x48, 8 px off each side. (With an odd margin
# torchvision's CenterCrop, used by open_clip and OpenAI's CLIP, rounds the offset where transformers floors it: one
# pixel apart. At 224 px the common frame sizes, 240x416 included, have even margins.)
CLIP_IMAGES = [photo(96, 144, seed=1), photo(144, 96, seed=2)]


def test_clip_score_matches_torchmetrics(offline_open_clip, openai_clip_as_hf):
    prompts = ["a red cube on a wooden table", "Two dogs, playing in the snow!"]
    ours = load_reward("clip_score")(prompts=prompts, images=CLIP_IMAGES).scores  # defaults: ViT-L-14, "openai"
    ref = torchmetrics_clip_scores(*openai_clip_as_hf, CLIP_IMAGES, prompts) / 100  # clip_score is the raw cosine
    assert ours == pytest.approx(ref.tolist(), abs=COS_TOL)
    # the same weights built with nn.GELU (open_clip 3.x's default for the "openai" tag) miss by 100 x the tolerance
    gelu = load_reward("clip_score", pretrained=str(offline_open_clip))
    assert activations(gelu.clip.model) == {"GELU"}
    gelu_scores = gelu(prompts=prompts, images=CLIP_IMAGES).scores
    assert max(abs(a - b) for a, b in zip(gelu_scores, ref.tolist())) > 100 * COS_TOL


def test_image_similarity_matches_flow_grpo(offline_open_clip, openai_clip_as_hf):
    """flow_grpo's CLIP image similarity: cosine of the normalised image features of the image and its reference."""
    generated, condition = CLIP_IMAGES[0], photo(96, 144, seed=3)
    ours = load_reward("image_similarity")(prompts=["x"], images=[generated], conditions=[condition]).scores
    emb = hf_image_embeddings(*openai_clip_as_hf, [generated, condition])
    assert ours == pytest.approx([float(emb[0] @ emb[1])], abs=COS_TOL)


def test_video_temporal_consistency_matches_clip_frame_similarity(offline_open_clip, openai_clip_as_hf):
    """Mean (and least) CLIP cosine of neighbouring frames, OpenAI's ViT-B/32 through transformers."""
    video = np.stack([photo(96, 144, seed=s) for s in (4, 4, 5, 6)])
    out = load_reward("video_temporal_consistency")(prompts=["x"], videos=[video])
    emb = hf_image_embeddings(*openai_clip_as_hf, list(video))
    neighbours = (emb[1:] * emb[:-1]).sum(-1)
    assert out.scores == pytest.approx([float(neighbours.mean())], abs=COS_TOL)
    assert out.details["min"] == pytest.approx([float(neighbours.min())], abs=COS_TOL)


# ------------------------------------------------------------------------------------------------ HPS v2
@torch.no_grad()
def hpsv2_score(model, image: np.ndarray, prompt: str) -> float:
    """``hpsv2.score`` step by step: its validation transform (the PIL image to a [0, 1] float tensor; longest side
    scaled to the model's size, bicubic on the tensor; zeros added, half each side with the odd pixel right or at the
    bottom; normalised with the model's mean and std), then the dot product of the model's normalised outputs."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    import open_clip

    size = model.visual.image_size[0]
    pixels = TF.to_tensor(Image.fromarray(image).convert("RGB"))
    height, width = pixels.shape[1:]
    factor = size / float(max(height, width))
    if factor != 1.0:
        new_height, new_width = round(height * factor), round(width * factor)
        pixels = TF.resize(pixels, [new_height, new_width], InterpolationMode.BICUBIC)
        extra_h, extra_w = size - new_height, size - new_width
        left, top = extra_w // 2, extra_h // 2
        pixels = TF.pad(pixels, [left, top, extra_w - left, extra_h - top], fill=0)
    pixels = TF.normalize(pixels, model.visual.image_mean, model.visual.image_std)
    out = model(pixels[None], open_clip.get_tokenizer("ViT-H-14")([prompt]))
    return float(out["image_features"] @ out["text_features"].T)


@pytest.fixture
def hps_checkpoint(offline_open_clip, tmp_path) -> Path:
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": torch.load(offline_open_clip)}, path)  # the released file's layout
    return path


# 240x416: the t2v frame size (longest side 416 -> 32, 18 rows, 7 + 7 of padding); 300x100: odd padding (11 columns,
# 10 left + 11 right); 40x40: square, no padding.
HPS_IMAGES = {"240x416": photo(240, 416, seed=7), "300x100": photo(300, 100, seed=8), "40x40": photo(40, 40, seed=9)}


@pytest.mark.parametrize("size", list(HPS_IMAGES))
def test_hpsv2_matches_hpsv2_score(hps_checkpoint, size):
    import open_clip

    from lance_rl.rewards.hpsv2 import HPSv2

    image, prompt = HPS_IMAGES[size], "a photo of a mountain lake at dawn"
    ours = load_reward("hpsv2", checkpoint=str(hps_checkpoint))(prompts=[prompt], images=[image]).scores[0]
    model, _, standard = open_clip.create_model_and_transforms("ViT-H-14", pretrained=None, output_dict=True)
    model.load_state_dict(torch.load(hps_checkpoint)["state_dict"])  # as hpsv2 does, GELU (LAION weights)
    ref = hpsv2_score(model.eval(), image, prompt)
    assert ours == pytest.approx(ref, abs=COS_TOL)
    injected = HPSv2.from_model(model, standard, open_clip.get_tokenizer("ViT-H-14"))  # standard: replaced
    assert injected(prompts=[prompt], images=[image]).scores[0] == pytest.approx(ref, abs=COS_TOL)


def test_hpsv2_standard_clip_transform_would_not_match(hps_checkpoint):
    """What rewards/hpsv2.py used to do (open_clip's shortest-side resize and centre crop) misses on a non-square
    frame by far more than the tolerance."""
    import open_clip

    from lance_rl.rewards.clip import ClipScore

    image, prompt = HPS_IMAGES["240x416"], "a photo of a mountain lake at dawn"
    model, _, standard = open_clip.create_model_and_transforms("ViT-H-14", pretrained=None, output_dict=True)
    model.load_state_dict(torch.load(hps_checkpoint)["state_dict"])
    ref = hpsv2_score(model.eval(), image, prompt)
    cropped = ClipScore.from_model(model, standard, open_clip.get_tokenizer("ViT-H-14"))
    assert abs(cropped(prompts=[prompt], images=[image]).scores[0] - ref) > 100 * COS_TOL


# ------------------------------------------------------------------------------------------------ PickScore, aesthetic
@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory, tiny_clip_checkpoint):
    """A from_pretrained directory: tiny CLIPModel (LAION's CLIP-H activation, nn.GELU) and a CLIPProcessor with the
    real BPE vocabulary."""
    import open_clip
    from transformers import CLIPProcessor

    source = open_clip.CLIP(**copy.deepcopy(TINY_VIT))
    source.load_state_dict(torch.load(tiny_clip_checkpoint))
    path = tmp_path_factory.mktemp("hf_clip")
    hf_clip_like(source, "gelu").save_pretrained(path)
    CLIPProcessor(image_processor=pil_clip_image_processor(32), tokenizer=openai_bpe_tokenizer()).save_pretrained(path)
    return path


def test_pickscore_matches_model_card(hf_clip_dir):
    """The card: AutoProcessor for images and text (padded, truncated to 77), normalised features, logit_scale.exp()
    times the cosine (flow_grpo then divides by 26)."""
    from transformers import AutoModel, AutoProcessor

    prompts, images = ["a cat on a sofa", "a dog on a sofa"], [photo(96, 160, seed=10), photo(200, 120, seed=11)]
    out = load_reward("pickscore", model=str(hf_clip_dir), processor=str(hf_clip_dir))(prompts=prompts, images=images)
    model, processor = AutoModel.from_pretrained(hf_clip_dir).eval(), AutoProcessor.from_pretrained(hf_clip_dir)
    with torch.no_grad():
        pil = [Image.fromarray(im) for im in images]
        image_inputs = processor(images=pil, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_inputs = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embs = unit(model.get_image_features(**image_inputs))
        text_embs = unit(model.get_text_features(**text_inputs))
        logits = (model.logit_scale.exp() * text_embs @ image_embs.T).diagonal()
    assert out.scores == pytest.approx(logits.tolist(), abs=1e-4)
    assert out.details["cosine"] == pytest.approx((logits / model.logit_scale.exp()).tolist(), abs=COS_TOL)


def test_aesthetic_matches_flow_grpo(hf_clip_dir, tmp_path):
    """flow_grpo's (and DDPO's) aesthetic scorer: CLIPProcessor images, image features divided by their L2 norm, the
    LAION MLP."""
    from transformers import CLIPModel, CLIPProcessor

    from lance_rl.rewards.aesthetic import AestheticMLP

    torch.manual_seed(1)
    head_path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(AestheticMLP(TINY_VIT["embed_dim"]).state_dict(), head_path)
    images = [photo(96, 160, seed=12), photo(200, 120, seed=13)]
    ours = load_reward("aesthetic", head_path=str(head_path), clip=str(hf_clip_dir))(prompts=["", ""], images=images)
    model, processor = CLIPModel.from_pretrained(hf_clip_dir).eval(), CLIPProcessor.from_pretrained(hf_clip_dir)
    head = AestheticMLP(TINY_VIT["embed_dim"])
    head.load_state_dict(torch.load(head_path))
    with torch.no_grad():
        embed = model.get_image_features(**processor(images=images, return_tensors="pt"))
        embed = embed if isinstance(embed, torch.Tensor) else embed.pooler_output
        embed = embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)
        ref = head.eval()(embed).squeeze(1)
    assert ours.scores == pytest.approx(ref.tolist(), abs=COS_TOL)


# ------------------------------------------------------------------------------------------------ OCR, JPEG
@cache
def levenshtein(a: str, b: str) -> int:
    if not a or not b:
        return len(a) + len(b)
    return min(levenshtein(a[1:], b) + 1, levenshtein(a, b[1:]) + 1, levenshtein(a[1:], b[1:]) + (a[0] != b[0]))


def flow_grpo_ocr(boxes: list[tuple[str, float]], prompt: str) -> float:
    """flow_grpo's OcrScorer: text between the first pair of straight quotes; boxes of confidence > 0 joined;
    spaces removed, lower case; distance 0 if the target is contained, else Levenshtein capped at the target length."""
    target = prompt.split('"')[1].replace(" ", "").lower()
    read = "".join(text if conf > 0 else "" for text, conf in boxes).replace(" ", "").lower()
    distance = 0 if target in read else min(levenshtein(read, target), len(target))
    return 1 - distance / len(target)


OCR_CASES = {  # boxes the engine returns, in reading order
    "zero-confidence box": [("Ope", 0.91), ("nLat", 0.0)],  # the case: 0.375, not 0.875
    "contained": [("xx OPEN", 0.8), ("LATE yy", 0.7)],
    "many wrong letters": [("zzzzzzzzzzzz", 0.6)],
    "one typo": [("OPEN LATF", 0.95)],
    "nothing read": [],
}


@pytest.mark.parametrize("case", list(OCR_CASES))
def test_ocr_matches_flow_grpo(case):
    boxes, prompt = OCR_CASES[case], 'a neon sign that says "Open Late" on a brick wall'
    ours = load_reward("ocr", engine=lambda image: boxes)(prompts=[prompt], images=[photo(48, 96)]).scores[0]
    assert ours == pytest.approx(flow_grpo_ocr(boxes, prompt), abs=1e-12)
    if case == "zero-confidence box":
        assert ours == pytest.approx(0.375)


def test_jpeg_matches_ddpo():
    """DDPO: the PIL image saved as JPEG at quality 95, its size in bytes / 1000. (flow_grpo's jpeg_compressibility
    is -kB / 500, i.e. ours with a weight of 1/500.)"""
    images = [photo(240, 416, seed=14), photo(100, 300, seed=15)]
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    assert load_reward("jpeg_incompressibility")(prompts=["", ""], images=images).scores == pytest.approx(sizes)
    compressibility = load_reward("jpeg_compressibility")(prompts=["", ""], images=images).scores
    assert compressibility == pytest.approx([-s for s in sizes])
