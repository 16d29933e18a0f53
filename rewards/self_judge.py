"""Self-judge: Lance's own understanding expert asked whether the image (or video) matches the prompt.

Score: P("yes") normalised over the yes/no answers, ``sum P(yes variants) / sum P(all variants)`` with each answer's
probability as a whole teacher-forced continuation (``lance_rl.model.decoding.score_answers``). Range [0, 1]; never None.
Details: ``p_yes_raw``, the unnormalised probability of the yes answers.

Takes a loaded model (``lance_rl.model.checkpoint.load_lance(...)``'s result, or ``model=`` and ``tokenizer=``), or a
``checkpoint`` directory to load. When only the generation expert trains (LoRA on ``*_moe_gen``), the policy's own
model object can judge: the understanding path does not use generation-expert weights.
"""

from __future__ import annotations

import torch

from .base import Reward
from .video import frame_indices

QUESTION = 'Does this {what} match the description "{prompt}"? Answer yes or no.'


class SelfJudge(Reward):
    name = "self_judge"
    modalities = ("image", "video")

    def __init__(self, model=None, tokenizer=None, checkpoint: str | None = None, device="cpu",
                 resolution: str | int | None = None, question: str = QUESTION, yes=("Yes", "yes"), no=("No", "no"),
                 max_frames: int = 8):  # fmt: skip
        if model is None:
            if checkpoint is None:
                raise ValueError("self_judge needs a loaded Lance model (model=, tokenizer=) or a checkpoint directory")
            from lance_rl.model.checkpoint import load_lance

            model = load_lance(checkpoint, device=device)
        if tokenizer is None and hasattr(model, "tokenizer"):  # a LoadedLance
            model, tokenizer = model.model, model.tokenizer
        if tokenizer is None:
            raise ValueError("self_judge needs the model's tokenizer")
        self.model, self.tokenizer = model, tokenizer
        self.resolution, self.question, self.max_frames = resolution, question, max_frames
        self.yes, self.no = tuple(yes), tuple(no)

    def _judge(self, frames, prompt: str, task: str) -> tuple[float, float]:
        from lance_rl.model.media import vit_tensor
        from lance_rl.model.decoding import score_answers
        from lance_rl.model.vision import patchify_video

        resolution = self.resolution
        if resolution is None:  # the release's presets for real Lance (as `lance-rl understand`); small for tiny models
            real = self.model.config.vae == "wan2.2"
            resolution = ("image_768res" if task == "x2t_image" else "video_480p") if real else 56
        patches, grid = patchify_video(vit_tensor(frames, resolution))
        what = "image" if task == "x2t_image" else "video"
        out = score_answers(self.model, self.tokenizer, patches, grid, self.question.format(what=what, prompt=prompt),
                            list(self.yes + self.no), task=task)  # fmt: skip
        # In log space: with a weak model every answer can be vanishingly unlikely as a whole continuation.
        lp = out.log_probs.double()
        log_yes, log_all = torch.logsumexp(lp[: len(self.yes)], 0), torch.logsumexp(lp, 0)
        return float(torch.exp(log_yes - log_all)), float(torch.exp(log_yes))

    @torch.no_grad()
    def score(self, *, prompts, images=None, videos=None, **kwargs):
        scores, raw = [], []
        for i, prompt in enumerate(prompts):
            if images is not None:
                frames, task = images[i][None], "x2t_image"
            else:
                frames, task = videos[i][frame_indices(len(videos[i]), self.max_frames)], "x2t_video"
            s, r = self._judge(frames, prompt, task)
            scores.append(s)
            raw.append(r)
        return scores, {"p_yes_raw": raw}
