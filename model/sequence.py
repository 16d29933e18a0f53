"""Sequence plans: how one task request becomes the token stream, splits and modality codes of the official model.

A sample is the chat-templated text with every visual block written as `<|vision_start|>` + K x `<|video_pad|>` +
`<|vision_end|>`. The stream is cut into contiguous *splits*, each with an attention mode (spec 1.4):

    causal      text runs (system prompt, caption, template glue, answer)
    full        a ViT block, markers included (bidirectional inside, visible to everything after it)
    full_noise  a clean VAE condition block (edit source); treated as `full` by the mask
    noise       the noisy target VAE block (bidirectional inside, invisible to every other token)

The text before a visual block is split into [before caption, caption, after caption] so classifier-free guidance can
drop the caption. Per-token modality codes: -1 text, 0 caption, 1 noisy target, 2 clean VAE source, 3 clean VAE
reference, 4 ViT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .tasks import TASKS, is_edit, is_generation, is_understanding
from .tokenizer import LanceTokenizer, chat_prefix, render_chat, system_prompt, visual_placeholder

TEXT, CAPTION, NOISE, SOURCE, REFERENCE, VIT = -1, 0, 1, 2, 3, 4
ATTN_MODES = ("causal", "full", "full_noise", "noise")


@dataclass(frozen=True)
class Block:
    """A visual block before tokenisation. `grid` is the block's (t, h, w) grid as the LLM sees it (tokens = t*h*w).

    For a VAE block that is the latent grid (t_lat, H/16, W/16); for a ViT block the merged grid (T/2, H/28, W/28).
    """

    kind: str  # "vit", "vae" (clean condition) or "noise" (noisy target)
    grid: tuple[int, int, int]
    modality: int

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def attn_mode(self) -> str:
        return {"vit": "full", "vae": "full_noise", "noise": "noise"}[self.kind]


def vit_block(grid: tuple[int, int, int]) -> Block:
    return Block("vit", tuple(grid), VIT)


def source_block(grid: tuple[int, int, int]) -> Block:
    return Block("vae", tuple(grid), SOURCE)


def noise_block(grid: tuple[int, int, int]) -> Block:
    return Block("noise", tuple(grid), NOISE)


@dataclass
class PlacedBlock:
    """A visual block in the token stream: its pads occupy `start : start + block.num_tokens` (markers excluded)."""

    block: Block
    start: int

    @property
    def stop(self) -> int:
        return self.start + self.block.num_tokens


@dataclass
class SequencePlan:
    """One sample laid out exactly as the official data code lays it out."""

    task: str
    token_ids: list[int]  # the whole stream, visual tokens as <|video_pad|> placeholders
    split_lens: list[int]
    attn_modes: list[str]
    modality: list[int]  # one code per token
    blocks: list[PlacedBlock]
    answer_start: int | None = None  # first token of the assistant's text answer (x2t); CE covers it to the end
    text: str = field(default="", repr=False)  # the rendered template, for debugging

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def noise_blocks(self) -> list[PlacedBlock]:
        return [b for b in self.blocks if b.block.kind == "noise"]

    def ce_targets(self) -> tuple[list[int], list[int]]:
        """(input positions, labels): position i predicts token i + 1 for every answer token (and its <|im_end|>)."""
        if self.answer_start is None:
            return [], []
        idx = list(range(self.answer_start - 1, len(self.token_ids) - 1))
        return idx, [self.token_ids[i + 1] for i in idx]


def build_plan(
    tokenizer: LanceTokenizer,
    task: str,
    system: str,
    user: list[str | Block],
    assistant: str | Block | None,
    caption: str | None = None,
) -> SequencePlan:
    """Render the chat template, tokenise it once, expand the visual placeholders and cut it into splits.

    `user` is the user turn in order (text and visual blocks); `caption`, if given, must be one of its text parts and is
    marked modality 0 (dropped for text CFG). `assistant` is the target block (generation), the answer text (x2t
    training), or None (x2t inference: the stream ends with the open assistant header).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if caption is not None and caption not in user:
        raise ValueError("caption must be one of the user's text parts")
    blocks: list[Block] = []
    spans: list[tuple[int, int]] = []  # character ranges of the caption in the rendered text
    user_text = ""
    prefix = chat_prefix(system)
    for part in user:
        if isinstance(part, Block):
            blocks.append(part)
            user_text += visual_placeholder()
        else:
            if part is caption:
                start = len(prefix) + len(user_text)
                spans.append((start, start + len(part)))
            user_text += part
    answer_text: str | None
    if isinstance(assistant, Block):
        blocks.append(assistant)
        answer_text = visual_placeholder()
    else:
        answer_text = assistant
    text = render_chat(system, user_text, answer_text)

    ids, offsets = tokenizer.encode_with_offsets(text)
    answer_char = len(render_chat(system, user_text)) if isinstance(assistant, str) else None

    # Expand each single pad to the block's token count; carry the caption flag and block index per token.
    token_ids: list[int] = []
    modality: list[int] = []
    placed: list[PlacedBlock] = []
    block_of_token: list[int] = []  # -1 for plain text
    answer_start = None
    pending_block = -1
    for tok, (c0, c1) in zip(ids, offsets):
        if answer_char is not None and answer_start is None and c0 >= answer_char:
            answer_start = len(token_ids)
        if tok == tokenizer.vision_start_id:
            pending_block = len(placed)
            if pending_block >= len(blocks):
                raise ValueError("the text contains more <|vision_start|> markers than visual blocks were given")
            block = blocks[pending_block]
            token_ids.append(tok)
            modality.append(block.modality)
            block_of_token.append(pending_block)
            continue
        if tok == tokenizer.video_pad_id and pending_block >= 0:
            block = blocks[pending_block]
            placed.append(PlacedBlock(block, len(token_ids)))
            token_ids += [tok] * block.num_tokens
            modality += [block.modality] * block.num_tokens
            block_of_token += [pending_block] * block.num_tokens
            continue
        if tok == tokenizer.vision_end_id and pending_block >= 0:
            token_ids.append(tok)
            modality.append(blocks[pending_block].modality)
            block_of_token.append(pending_block)
            pending_block = -1
            continue
        in_caption = any(c0 < s1 and c1 > s0 for s0, s1 in spans)
        token_ids.append(tok)
        modality.append(CAPTION if in_caption else TEXT)
        block_of_token.append(-1)
    if len(placed) != len(blocks):
        raise ValueError(f"expected {len(blocks)} visual blocks in the rendered text, found {len(placed)}")

    split_lens, attn_modes = _splits(modality, block_of_token, blocks)
    return SequencePlan(task, token_ids, split_lens, attn_modes, modality, placed, answer_start, text)


def _splits(modality: list[int], block_of_token: list[int], blocks: list[Block]) -> tuple[list[int], list[str]]:
    """Cut the stream where the block or the caption flag changes: each visual block is one split; text runs are
    causal splits separated at the caption's edges."""
    split_lens: list[int] = []
    attn_modes: list[str] = []
    key_prev = None
    for i, b in enumerate(block_of_token):
        key = ("block", b) if b >= 0 else ("text", modality[i] == CAPTION)
        if key != key_prev:
            split_lens.append(0)
            attn_modes.append(blocks[b].attn_mode if b >= 0 else "causal")
            key_prev = key
        split_lens[-1] += 1
    return split_lens, attn_modes


# ------------------------------------------------------------------------------------------------ task builders
def latent_grid(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Wan2.2 latent grid of a clip: 4x temporal (first frame alone), 16x spatial."""
    if height % 16 or width % 16:
        raise ValueError(f"height and width must be multiples of 16 for the VAE, got {height}x{width}")
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k+1 (1, 5, 9, ...), got {num_frames}")
    return ((num_frames - 1) // 4 + 1, height // 16, width // 16)


def vit_grid(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """LLM grid of a ViT block: temporal patch 2, 14 px patches merged 2x2 (a single image is duplicated to 2 frames)."""
    if height % 28 or width % 28:
        raise ValueError(f"height and width must be multiples of 28 for the ViT, got {height}x{width}")
    frames = max(num_frames, 2)
    return ((frames + 1) // 2, height // 28, width // 28)


def generation_plan(
    tokenizer: LanceTokenizer,
    task: str,
    caption: str,
    target_grid: tuple[int, int, int],
    source_vit_grid: tuple[int, int, int] | None = None,
    training: bool = False,
) -> SequencePlan:
    """t2i, t2v, i2v, image_edit or video_edit.

    Editing puts the source as a ViT block and a clean VAE block before the instruction; the target block has the
    source's latent grid. i2v has no condition block: its first target latent frame is the clean image latent.
    """
    if not is_generation(task):
        raise ValueError(f"{task!r} is not a generation task")
    user: list[str | Block] = [caption]
    if is_edit(task):
        if source_vit_grid is None:
            raise ValueError(f"{task} needs source_vit_grid (the ViT grid of the source media)")
        user = [vit_block(source_vit_grid), source_block(target_grid), caption]
    return build_plan(
        tokenizer, task, system_prompt(task, training=training), user, noise_block(target_grid), caption=caption
    )


def understanding_plan(
    tokenizer: LanceTokenizer,
    task: str,
    media_vit_grid: tuple[int, int, int],
    question: str,
    answer: str | None = None,
    instruction: str | None = None,
) -> SequencePlan:
    """x2t_image / x2t_video: system = instruction, user = [ViT block, question], assistant = answer (training) or
    nothing (inference: the stream ends with `<|im_start|>assistant\\n`)."""
    if not is_understanding(task):
        raise ValueError(f"{task!r} is not an understanding task")
    return build_plan(
        tokenizer, task, instruction or system_prompt(task), [vit_block(media_vit_grid), question], answer
    )


def drop_caption(plan: SequencePlan) -> SequencePlan:
    """The text-unconditional stream for CFG: the same sample with every caption token (modality 0) removed, as the
    release builds it (system prompt, template glue and visual blocks stay)."""
    keep = [i for i, m in enumerate(plan.modality) if m != CAPTION]
    if len(keep) == len(plan.modality):
        return plan
    new_index = {old: new for new, old in enumerate(keep)}
    split_lens, attn_modes, start = [], [], 0
    for length, mode in zip(plan.split_lens, plan.attn_modes):
        kept = sum(1 for i in range(start, start + length) if plan.modality[i] != CAPTION)
        if kept:
            split_lens.append(kept)
            attn_modes.append(mode)
        start += length
    blocks = [PlacedBlock(b.block, new_index[b.start]) for b in plan.blocks]
    answer = new_index.get(plan.answer_start) if plan.answer_start is not None else None
    return SequencePlan(
        plan.task,
        [plan.token_ids[i] for i in keep],
        split_lens,
        attn_modes,
        [plan.modality[i] for i in keep],
        blocks,
        answer,
        plan.text,
    )
