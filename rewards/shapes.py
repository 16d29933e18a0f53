"""`shapes`: an exact, GenEval-like checker for the shapes world (colour, shape, count and position).

The world: a white canvas with one or two flat shapes of one colour and one kind, placed in one half of the image,
captioned "two red circles on the left". The checker segments the image by the palette, finds connected components,
and checks each attribute of the caption:

    canvas    (a gate) at least half the image is near-white background, else every attribute fails
    color     the caption's colour covers at least half of the non-background pixels
    count     the number of components of that colour equals the caption's count
    position  every such component's centroid lies in the caption's half
    shape     every such component has the caption's shape (judged by how much of its bounding box it fills:
              square ~1, circle ~pi/4, triangle ~1/2, with tolerant bands so ragged edges do not decide)

Score: the mean of the four attributes (partial credit, so groups vary early in training); `strict` (all four) is
reported in the details, like GenEval's accuracy, and so is `background_tint`, how far the canvas around the shapes
is from white (0 in every image of the world). Prompts that are not shapes captions score None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = {"one": 1, "two": 2}
POSITIONS = ("left", "right", "top", "bottom")
ATTRIBUTES = ("color", "count", "position", "shape")

_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
_CAPTION = re.compile(
    rf"^\s*(?P<count>{'|'.join(COUNTS)})\s+(?P<color>\w+)\s+(?P<shape>circle|circles|square|squares|triangle|triangles)"
    r"\s+(?:on|at)\s+the\s+(?P<position>left|right|top|bottom)\b"
)


@dataclass(frozen=True)
class ShapesPrompt:
    color: str
    shape: str
    count: int
    position: str

    @property
    def caption(self) -> str:
        number = {v: k for k, v in COUNTS.items()}[self.count]
        noun = self.shape if self.count == 1 else _PLURAL[self.shape]
        where = "on the" if self.position in ("left", "right") else "at the"
        return f"{number} {self.color} {noun} {where} {self.position}"

    @classmethod
    def parse(cls, text: str) -> "ShapesPrompt | None":
        """The prompt a caption describes, or None if the text is not a shapes caption."""
        m = _CAPTION.match(text.lower())
        if m is None or m["color"] not in COLORS:
            return None
        return cls(m["color"], m["shape"].rstrip("s"), COUNTS[m["count"]], m["position"])


def all_prompts() -> list[ShapesPrompt]:
    """Every caption of the world: 4 colours x 3 shapes x 2 counts x 4 positions = 96."""
    return [ShapesPrompt(c, s, n, p) for c in COLORS for s in SHAPES for n in COUNTS.values() for p in POSITIONS]


# ------------------------------------------------------------------------------------------------ image analysis
@dataclass
class Component:
    color: str
    area: int
    centroid: tuple[float, float]  # (y, x) in pixels
    fill: float  # area / bounding-box area

    @property
    def shape(self) -> str:
        if self.fill >= 0.86:
            return "square"
        if self.fill >= 0.63:
            return "circle"
        return "triangle"


def segment(image: np.ndarray, max_distance: float = 90.0, min_area: int = 4) -> list[Component]:
    """Connected components of each palette colour in a uint8 [H, W, 3] image (4-connectivity).

    A pixel belongs to the palette colour it is nearest to, if within `max_distance` (RGB, Euclidean) and nearer to it
    than to white; components smaller than `min_area` pixels are noise.
    """
    labels = palette_labels(image, max_distance)
    components = []
    for index, name in enumerate(COLORS):
        for pixels in _components(labels == index):
            if len(pixels) < min_area:
                continue
            ys, xs = np.array(pixels).T
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            components.append(Component(name, len(pixels), (float(ys.mean()), float(xs.mean())), len(pixels) / box))
    return components


def palette_labels(image: np.ndarray, max_distance: float = 90.0) -> np.ndarray:
    """int [H, W]: the index (in COLORS) of the palette colour each pixel belongs to, -1 for none (see `segment`)."""
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names] + [(255, 255, 255)], dtype=np.float32)
    dist = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - palette[None, None], axis=-1)  # [H, W, colours + 1]
    nearest = dist.argmin(-1)
    return np.where((nearest < len(names)) & (dist.min(-1) <= max_distance), nearest, -1)


def background_tint(image: np.ndarray) -> float:
    """How far the canvas is from white: the mean of |255 - value| / 255 over the channels of every pixel that is
    neither a palette colour nor next to one (the shapes' own edges are not canvas). 0 for a clean white canvas, as
    every image of the world has; a model's grey or tinted canvas, blotches and checkerboard patch seams raise it."""
    shape = palette_labels(image) >= 0
    near = shape.copy()  # dilate by one pixel (8-neighbourhood): blurred edges belong to the shape
    near[1:] |= shape[:-1]
    near[:-1] |= shape[1:]
    near[:, 1:] |= near[:, :-1].copy()
    near[:, :-1] |= near[:, 1:].copy()
    canvas = ~near
    if not canvas.any():
        return 1.0
    return float(np.abs(255.0 - image.astype(np.float32)[canvas]).mean() / 255.0)


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Flood fill over a small boolean mask (the shapes world is 32-64 px a side, so a plain BFS is fast enough)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pixels = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(pixels)
    return out


def background_fraction(image: np.ndarray, max_distance: float = 60.0) -> float:
    """Share of near-white pixels. Shapes images are mostly canvas (>80%); noise and smears are not."""
    return float((np.linalg.norm(image.astype(np.float32) - 255.0, axis=-1) <= max_distance).mean())


def check(image: np.ndarray, prompt: ShapesPrompt) -> dict[str, bool]:
    """Which attributes of `prompt` the image shows; also 'strict' (all of them). An image that is not mostly white
    canvas shows nothing: without this gate, noise scatters pixels of every colour and passes colour checks by luck."""
    h, w = image.shape[:2]
    if background_fraction(image) < 0.5:
        return dict.fromkeys((*ATTRIBUTES, "strict"), False)
    comps = segment(image)
    target = [c for c in comps if c.color == prompt.color]
    colored = sum(c.area for c in comps)
    result = {
        "color": bool(target) and sum(c.area for c in target) >= 0.5 * colored,
        "count": len(target) == prompt.count,
        "position": bool(target) and all(_in_half(c.centroid, prompt.position, h, w) for c in target),
        "shape": bool(target) and all(c.shape == prompt.shape for c in target),
    }
    result["strict"] = all(result[a] for a in ATTRIBUTES)
    return result


def _in_half(centroid: tuple[float, float], position: str, h: int, w: int) -> bool:
    y, x = centroid
    return {"left": x < w / 2, "right": x >= w / 2, "top": y < h / 2, "bottom": y >= h / 2}[position]


def score_images(images, prompts) -> tuple[list[float | None], dict[str, list]]:
    """Partial-credit scores (mean of the four attributes) and per-attribute details; None for non-shapes prompts."""
    scores: list[float | None] = []
    details: dict[str, list] = {a: [] for a in (*ATTRIBUTES, "strict", "background_tint")}
    for image, text in zip(images, prompts):
        prompt = ShapesPrompt.parse(text)
        if prompt is None:
            scores.append(None)
            for k in details:
                details[k].append(None)
            continue
        result = check(np.asarray(image), prompt)
        scores.append(sum(result[a] for a in ATTRIBUTES) / len(ATTRIBUTES))
        for k in (*ATTRIBUTES, "strict"):
            details[k].append(float(result[k]))
        details["background_tint"].append(background_tint(np.asarray(image)))
    return scores, details


from .base import Reward  # noqa: E402  (the checker above needs nothing from the contract)


class ShapesReward(Reward):
    """The `shapes` reward: partial credit in [0, 1] (mean of colour, count, position, shape); details per attribute
    and `strict` (all four, GenEval-style accuracy). None for prompts that are not shapes captions."""

    name = "shapes"
    modalities = ("image",)

    def score(self, *, prompts, images, **kwargs):
        return score_images(images, prompts)
