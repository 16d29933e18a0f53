"""The shapes world: procedurally drawn images (and short clips) that a tiny Lance can learn on a CPU in minutes.

A white canvas holds one or two flat shapes of one colour and one kind, about a third of the canvas side, in one half of
the image, captioned "two red circles on the left"; clips move a group of smaller shapes across the frame ("one blue
square moving right"). The vocabulary and the checker live in `rewards/shapes.py`, so what is drawn here is exactly
what the `shapes` reward checks. A fixed set of captions is held out of training, so evaluation measures composition
on unseen combinations.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lance_rl.rewards.shapes import COLORS, COUNTS, ShapesPrompt, all_prompts

NUM_HELDOUT = 24  # of 96 captions; never seen in training
DIRECTIONS = ("left", "right", "up", "down")


def split_prompts(seed: int = 0) -> tuple[list[ShapesPrompt], list[ShapesPrompt]]:
    """(train, held-out) captions: a fixed shuffle, so every run and every tool sees the same split."""
    prompts = all_prompts()
    random.Random(seed).shuffle(prompts)
    return sorted(prompts[NUM_HELDOUT:], key=str), sorted(prompts[:NUM_HELDOUT], key=str)


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=color)
    elif shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=color)
    else:  # an upright triangle filling half its box
        draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=color)


def _region(position: str, size: int) -> tuple[int, int, int, int]:
    """The half of the canvas a position names (x0, y0, x1, y1), with a one-pixel margin at the centre line."""
    half = size // 2
    return {
        "left": (0, 0, half - 1, size),
        "right": (half + 1, 0, size, size),
        "top": (0, 0, size, half - 1),
        "bottom": (0, half + 1, size, size),
    }[position]


def _place(count: int, side: int, region, rng: random.Random) -> list[tuple[int, int, int, int]]:
    """Non-touching boxes of `side` px inside `region` (rejection sampling; a 1 px gap keeps components apart)."""
    x0, y0, x1, y1 = region
    for _ in range(1000):
        boxes = []
        for _ in range(count):
            x, y = rng.randint(x0, x1 - side), rng.randint(y0, y1 - side)
            box = (x, y, x + side, y + side)
            if all(box[2] + 1 <= b[0] or b[2] + 1 <= box[0] or box[3] + 1 <= b[1] or b[3] + 1 <= box[1] for b in boxes):
                boxes.append(box)
        if len(boxes) == count:
            return boxes
    raise RuntimeError(f"could not place {count} shapes of {side} px in {region}")


def _layout(count: int, side: int, region, rng: random.Random, jitter: int = 2) -> list[tuple[int, int, int, int]]:
    """Boxes of `side` px for a group of `count` shapes in `region`: evenly spaced along the half's long side, centred
    across it, each moved by up to `jitter` px either way (less where neighbours could touch). Fixed slots make the
    layout learnable in the quickstart's minutes (random placement left the SFT model painting the mean of all
    layouts: one bar across the half); the jitter keeps the samples of one caption different."""
    x0, y0, x1, y1 = region
    vertical = y1 - y0 >= x1 - x0
    (a0, a1), (c0, c1) = ((y0, y1), (x0, x1)) if vertical else ((x0, x1), (y0, y1))
    pitch = (a1 - a0) / count
    along_jitter = jitter if count == 1 else max(0, min(jitter, int(pitch - side - 1) // 2))  # keeps a 1 px gap
    boxes = []
    for k in range(count):
        along = round(a0 + pitch * (k + 0.5) - side / 2) + rng.randint(-along_jitter, along_jitter)
        across = round((c0 + c1) / 2 - side / 2) + rng.randint(-jitter, jitter)
        along, across = min(max(along, a0), a1 - side), min(max(across, c0), c1 - side)
        x, y = (across, along) if vertical else (along, across)
        boxes.append((x, y, x + side, y + side))
    return boxes


def render(prompt: ShapesPrompt, size: int = 32, rng: random.Random | None = None) -> np.ndarray:
    """uint8 [size, size, 3] image of the prompt; shapes are about a third of the canvas side (10-11 px at 32)."""
    rng = rng or random.Random(0)
    side = max(4, size // 3 + rng.randint(0, 1))
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for box in _layout(prompt.count, side, _region(prompt.position, size), rng):
        _draw(draw, prompt.shape, box, COLORS[prompt.color])
    return np.asarray(image)


@dataclass(frozen=True)
class MotionPrompt:
    """A clip caption: "two red circles moving right"."""

    color: str
    shape: str
    count: int
    direction: str

    @property
    def caption(self) -> str:
        still = ShapesPrompt(self.color, self.shape, self.count, "left").caption.rsplit(" on the ", 1)[0]
        return f"{still} moving {self.direction}"


def render_clip(prompt: MotionPrompt, num_frames: int = 9, size: int = 32, rng: random.Random | None = None) -> np.ndarray:
    """uint8 [T, size, size, 3]: the group starts on one side and moves steadily to the other."""
    rng = rng or random.Random(0)
    side = max(4, size // 5 + 1)
    start_region = _region({"right": "left", "left": "right", "down": "top", "up": "bottom"}[prompt.direction], size)
    boxes = _place(prompt.count, side, start_region, rng)
    travel = size // 2
    dx, dy = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}[prompt.direction]
    frames = []
    for f in range(num_frames):
        shift = round(travel * f / max(1, num_frames - 1))
        image = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        for x0, y0, x1, y1 in boxes:
            _draw(draw, prompt.shape, (x0 + dx * shift, y0 + dy * shift, x1 + dx * shift, y1 + dy * shift), COLORS[prompt.color])
        frames.append(np.asarray(image))
    return np.stack(frames)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(
    path: str | Path, num_images: int, split: str = "train", seed: int = 0, size: int = 32, prompt_seed: int = 0
) -> Path:
    """`num_images` rows of the official `text2image_general` schema (caption, image_bytes) from one prompt split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    train, heldout = split_prompts(prompt_seed)
    prompts = {"train": train, "heldout": heldout}[split]
    rng = random.Random(seed)
    captions, images = [], []
    for i in range(num_images):
        prompt = prompts[rng.randrange(len(prompts))]
        captions.append(prompt.caption)
        images.append(png_bytes(render(prompt, size, rng)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"caption": captions, "image_bytes": images}), path, row_group_size=256)
    return path


def write_video_parquet(path: str | Path, num_clips: int, num_frames: int = 9, size: int = 32, seed: int = 0) -> Path:
    """`num_clips` rows of the official `text2video_general` schema (caption, video_bytes as MP4)."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lance_rl.model.media import write_mp4

    rng = random.Random(seed)
    captions, videos = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(num_clips):
            prompt = MotionPrompt(rng.choice(list(COLORS)), rng.choice(("circle", "square")), rng.randint(1, 2), rng.choice(DIRECTIONS))
            clip = render_clip(prompt, num_frames, size, rng)
            mp4 = Path(tmp) / f"{i}.mp4"
            write_mp4(clip, mp4, fps=12)
            captions.append(prompt.caption)
            videos.append(mp4.read_bytes())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"caption": captions, "video_bytes": videos}), path)
    return path


# ------------------------------------------------------------------------------------------------ question answering
# The same world asked about instead of drawn: four questions, one per attribute the `shapes` checker knows, plus a
# captioning question whose answer is the caption itself. Answers are single words; `rewards/answers.py: ShapesVQA`
# accepts the forms a person would ("2" for "two", "circles" for "circle", "on the left" for "left").
VQA_QUESTIONS = {
    "count": "how many shapes are there?",
    "color": "what colour are they?",
    "position": "which side are they on?",
    "shape": "what shape are they?",
}
CAPTION_QUESTION = "describe the image."


def vqa_answer(prompt: ShapesPrompt, question_type: str) -> str:
    """The canonical answer to a question about an image of `prompt` ("caption": the caption itself)."""
    if question_type == "caption":
        return prompt.caption
    number = {v: k for k, v in COUNTS.items()}
    return {"count": number[prompt.count], "color": prompt.color, "position": prompt.position,
            "shape": prompt.shape}[question_type]  # fmt: skip


@dataclass(eq=False)  # eq=False: an ndarray field has no truth value
class VQAExample:
    image: np.ndarray  # uint8 [size, size, 3]
    question: str
    answer: str
    question_type: str  # count | color | position | shape | caption
    caption: str  # what the image shows: the truth every answer is checked against


def vqa_examples(
    num_images: int, split: str = "train", seed: int = 0, size: int = 32, caption_share: float = 0.0,
    all_questions: bool = False, prompt_seed: int = 0,
) -> list[VQAExample]:
    """Question-answer pairs about fresh images of one caption split. Each image gets one question (captioning with
    probability `caption_share`, else one of the four attributes at random), or with `all_questions` all four."""
    train, heldout = split_prompts(prompt_seed)
    prompts = {"train": train, "heldout": heldout}[split]
    rng = random.Random(seed)
    out = []
    for _ in range(num_images):
        prompt = prompts[rng.randrange(len(prompts))]
        image = render(prompt, size, rng)
        if all_questions:
            kinds = list(VQA_QUESTIONS)
        else:
            kinds = ["caption" if rng.random() < caption_share else rng.choice(list(VQA_QUESTIONS))]
        for kind in kinds:
            question = CAPTION_QUESTION if kind == "caption" else VQA_QUESTIONS[kind]
            out.append(VQAExample(image, question, vqa_answer(prompt, kind), kind, prompt.caption))
    return out


def write_vqa_parquet(
    path: str | Path, num_images: int, split: str = "train", seed: int = 0, size: int = 32,
    caption_share: float = 0.25, prompt_seed: int = 0,
) -> Path:
    """`num_images` rows of the official `x2t_general` schema (image_bytes, caption_q, caption_a; no caption_i, so
    the release's default instruction is the system prompt): a captioning / VQA mix for understanding SFT."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = vqa_examples(num_images, split, seed, size, caption_share, prompt_seed=prompt_seed)
    table = pa.table({
        "image_bytes": [png_bytes(r.image) for r in rows],
        "caption_q": [r.question for r in rows],
        "caption_a": [r.answer for r in rows],
    })  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=256)
    return path
