"""The task vocabulary, defined once: which tasks exist and what each one takes and makes.

    generation     t2i, t2v, i2v, image_edit, video_edit   (the generation expert denoises a VAE latent)
    understanding  x2t_image, x2t_video                    (the understanding expert answers in text)

Predicates instead of tuples of names at every call site: `is_edit` (a source enters as a ViT block and a clean VAE
block), `has_source` (the request needs source media), `makes_video` (the output has frames), `reads_video` (the
source is a video).
"""

from __future__ import annotations

GENERATION_TASKS = ("t2i", "t2v", "i2v", "image_edit", "video_edit")
UNDERSTANDING_TASKS = ("x2t_image", "x2t_video")
TASKS = GENERATION_TASKS + UNDERSTANDING_TASKS


def check_task(task: str, allowed: tuple[str, ...] = TASKS) -> str:
    if task not in allowed:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(allowed)}")
    return task


def is_generation(task: str) -> bool:
    return task in GENERATION_TASKS


def is_understanding(task: str) -> bool:
    return task in UNDERSTANDING_TASKS


def is_edit(task: str) -> bool:
    """The source enters the prefix as a ViT block and a clean VAE block (seen by the generation expert)."""
    return task in ("image_edit", "video_edit")


def has_source(task: str) -> bool:
    """The request needs source media: an edit source, the i2v first frame, or the media an x2t question is about."""
    return task in ("i2v", "image_edit", "video_edit", "x2t_image", "x2t_video")


def makes_video(task: str) -> bool:
    """The generated output has several frames."""
    return task in ("t2v", "i2v", "video_edit")


def reads_video(task: str) -> bool:
    """The source media is a video."""
    return task in ("video_edit", "x2t_video")
