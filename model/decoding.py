"""Understanding: answer a question about an image or video with the KV cache, or score given answers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .positions import sample_positions
from .prefix import model_device
from .sequence import understanding_plan
from .tokenizer import LanceTokenizer


@dataclass
class TextOutput:
    ids: list[int]
    text: str
    first_logits: torch.Tensor  # [V_usable] logits of the first decoding step


def _prefill_understanding(model, tokenizer, task, vit_patches, vit_grid, question, instruction, mape):
    """Encode the x2t context up to (not including) its last token, the "\\n" after "assistant", as the release does;
    returns the cache, that last token id and its position."""
    device = model_device(model)
    t, h, w = vit_grid
    plan = understanding_plan(tokenizer, task, (t, h // 2, w // 2), question, None, instruction)
    pos = sample_positions(plan, model.config.tokens_per_second, mape=mape).to(device)
    ids = torch.tensor(plan.token_ids, device=device)
    vit = model.encode_vit(vit_patches.to(device), torch.tensor([vit_grid], device=device))
    cache, start, context = model.new_cache(), 0, len(plan) - 1
    for length, mode in zip(plan.split_lens, plan.attn_modes):
        length = min(length, context - start)
        if length <= 0:
            break
        x = model.embed_text(ids[start : start + length])
        if mode == "full":
            x[1:-1] = vit.to(x.dtype)
        model.forward_cached(x[None], pos[:, None, start : start + length], None, cache, causal=mode == "causal")
        start += length
    return cache, int(ids[-1]), pos[:, -1]


@torch.no_grad()
def generate_text(
    model,
    tokenizer: LanceTokenizer,
    vit_patches: torch.Tensor,
    vit_grid: tuple[int, int, int],
    question: str,
    task: str = "x2t_image",
    instruction: str | None = None,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    mape: bool = False,
) -> TextOutput:
    """Answer a question about an image or video with the KV cache: greedy (the release's default) or sampled
    decoding, stopping at <|im_end|>. `mape=False` reproduces the release's understanding inference (spec 9.1)."""
    cache, token, pos = _prefill_understanding(model, tokenizer, task, vit_patches, vit_grid, question, instruction, mape)
    device = pos.device
    out_ids: list[int] = []
    first_logits = None
    for _ in range(max_new_tokens):
        h = model.embed_text(torch.tensor([token], device=device))[None]
        hidden = model.forward_cached(h, pos.view(3, 1, 1), None, cache, causal=True)
        logits = model.logits(hidden[0, -1]).float()
        if first_logits is None:
            first_logits = logits
        token = _pick(logits, do_sample, temperature, top_p, generator)
        if token == tokenizer.im_end_id:
            break
        out_ids.append(token)
        pos = pos + 1
    return TextOutput(out_ids, tokenizer.decode(out_ids), first_logits)


def _pick(logits, do_sample, temperature, top_p, generator) -> int:
    if not do_sample:
        return int(logits.argmax())
    probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cut = sorted_p.cumsum(0) - sorted_p > top_p
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@dataclass
class AnswerScores:
    answers: list[str]
    log_probs: torch.Tensor  # [A] total log-probability of each answer's tokens
    probs: torch.Tensor  # [A] exp(log_probs): the model's probability of each answer as a full continuation
    normalized: torch.Tensor  # [A] softmax over the given answers (e.g. P(yes) among {yes, no})


@torch.no_grad()
def score_answers(
    model,
    tokenizer: LanceTokenizer,
    vit_patches: torch.Tensor,
    vit_grid: tuple[int, int, int],
    question: str,
    answers: list[str],
    task: str = "x2t_image",
    instruction: str | None = None,
    mape: bool = False,
) -> AnswerScores:
    """The probability of each given answer (teacher-forced) after the question: what a self-judge reward needs."""
    if not answers:
        raise ValueError("score_answers needs at least one answer")
    cache, token, pos = _prefill_understanding(model, tokenizer, task, vit_patches, vit_grid, question, instruction, mape)
    device = pos.device
    totals = []
    for answer in answers:
        ans = tokenizer.encode(answer)
        if not ans:
            raise ValueError(f"answer {answer!r} tokenises to nothing")
        ids = torch.tensor([token] + ans[:-1], device=device)
        block_pos = pos.view(3, 1, 1) + torch.arange(len(ans), device=device).view(1, 1, -1)
        hidden = model.forward_cached(model.embed_text(ids)[None], block_pos, None, cache.frozen(), causal=True)
        logp = torch.log_softmax(model.logits(hidden[0]).float(), dim=-1)
        totals.append(logp.gather(1, torch.tensor(ans, device=device)[:, None]).sum())
    log_probs = torch.stack(totals)
    return AnswerScores(list(answers), log_probs, log_probs.exp(), torch.softmax(log_probs, dim=0))
