"""Lance's processor for transformers and TRL: the release's chat template (spec 4.2) and ViT preprocessing (spec 3.6)
behind `ProcessorMixin`, returning `input_ids`, `pixel_values` and `image_grid_thw` as Qwen2.5-VL's processor does.

    processor = LanceProcessor.from_pretrained("downloads/Lance_3B")
    inputs = processor.apply_chat_template([conversation], add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin

from .config import LanceConfig
from .media import as_frames, vit_tensor
from .tokenizer import (
    IM_END,
    IM_START,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    X2T_DEFAULT_INSTRUCTION,
    LanceTokenizer,
)

MAX_GENERATION_LENGTH = 256  # the release's understanding default (spec 4.3)



def _frames(item) -> np.ndarray:
    """uint8 [T, H, W, 3] from a PIL image, an [H, W, 3] or [T, H, W, 3] array or tensor, or a list of frames."""
    if hasattr(item, "convert"):  # PIL
        return np.asarray(item.convert("RGB"))[None]
    if isinstance(item, (list, tuple)):
        return np.concatenate([_frames(f) for f in item])
    return as_frames(item)


def _is_clip(item) -> bool:
    """A clip is a list of more than one frame or a [T, H, W, 3] array with T > 1 (one frame is an image)."""
    if isinstance(item, (list, tuple)):
        return len(item) > 1
    shape = getattr(item, "shape", None)
    return shape is not None and len(shape) == 4 and shape[0] > 1


class LanceProcessor(ProcessorMixin):
    """The release's chat template and ViT preprocessing (spec 3.6, 4.2) behind transformers' processor interface.

    `apply_chat_template(conversations)` renders `<|im_start|>system\\n{instruction}<|im_end|>\\n` (the x2t default
    instruction when the conversation has no system turn) and every other turn as `<|im_start|>{role}\\n{content}
    <|im_end|>\\n`, images and videos as `<|vision_start|><|video_pad|><|vision_end|>`, and with
    `add_generation_prompt` ends with `<|im_start|>assistant\\n`, where the release starts decoding. `__call__` resizes
    each image (`image_resolution`) or clip (`video_resolution`) the release's way (`media.vit_tensor`: bucket,
    28-crop, CLIP normalisation, even frame count), patchifies it (`vision.patchify_video`) and expands its single pad
    to t*h/2*w/2 pads. A clip can travel where only images are accepted (TRL): as a [T, H, W, 3] array or a list of
    frames.
    """

    def __init__(self, tokenizer, image_resolution: str | int = "image_768res", video_resolution: str | int = "video_480p"):
        super().__init__(tokenizer)
        from tokenizers import Tokenizer

        # The same tokenizer, seen by the model's own helpers (special ids by text; sequence plans).
        self.lance_tokenizer = LanceTokenizer(Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))
        # An area side given as text ("112", from a command line) is a number; anything else names a preset.
        as_side = lambda r: int(r) if isinstance(r, str) and r.isdigit() else r
        self.image_resolution, self.video_resolution = as_side(image_resolution), as_side(video_resolution)
        tokenizer.padding_side = "left"  # prompts are left-padded for generation (TRL asks for it)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, image_resolution: str | int | None = None,
                        video_resolution: str | int | None = None, **kwargs):  # fmt: skip
        """The tokenizer files of an official-layout directory. Resolutions default to the release's presets
        (image_768res, video_480p), or 56 px for tiny PatchVAE checkpoints (as `lance-rl understand`)."""
        from transformers import PreTrainedTokenizerFast

        path = Path(pretrained_model_name_or_path)
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), eos_token=IM_END,
                                            pad_token="<|endoftext|>")  # fmt: skip
        tiny = (path / "llm_config.json").is_file() and LanceConfig.from_llm_config(path).vae == "patch"
        return cls(tokenizer, image_resolution or (56 if tiny else "image_768res"),
                   video_resolution or (56 if tiny else "video_480p"))  # fmt: skip

    @classmethod
    def from_lance_tokenizer(cls, tokenizer: LanceTokenizer, image_resolution: str | int = "image_768res",
                             video_resolution: str | int = "video_480p"):  # fmt: skip
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer.from_str(tokenizer._tok.to_str())  # an independent copy of the same tokenizer
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=IM_END, pad_token="<|endoftext|>")
        return cls(hf, image_resolution, video_resolution)

    def save_pretrained(self, save_directory, **kwargs):
        """The tokenizer files of the official layout (tokenizer.json, vocab.json, merges.txt, tokenizer_config.json);
        resolutions are inference settings, not stored (the release has no processor config)."""
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        self.lance_tokenizer.save(save_directory)
        return [str(Path(save_directory) / "tokenizer.json")]

    def to_dict(self) -> dict:
        return {"processor_class": type(self).__name__, "image_resolution": self.image_resolution,
                "video_resolution": self.video_resolution}  # fmt: skip

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_resolution={self.image_resolution!r}, video_resolution={self.video_resolution!r})"

    # ---------------------------------------------------------------- the template
    def apply_chat_template(self, conversation, chat_template=None, tools=None, add_generation_prompt: bool = False,
                            continue_final_message: bool = False, tokenize: bool = False, return_dict: bool = False,
                            return_tensors=None, padding: bool = False, **kwargs):  # fmt: skip
        """One conversation (a list of messages) or a batch of them. Message content is a string or a list of
        parts {"type": "text", "text"}, {"type": "image", "image"}, {"type": "video", "video"}."""
        if tools:
            raise ValueError("the Lance chat template has no tool calls")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        rendered = [self._render(c, add_generation_prompt, continue_final_message) for c in conversations]
        texts = [text for text, _ in rendered]
        if not tokenize:
            return texts if batched else texts[0]
        media = [m for _, m in rendered]
        out = self._encode(texts, media, padding=padding, return_tensors=return_tensors)
        if return_dict:
            return out
        return out["input_ids"] if batched else out["input_ids"][0]

    def _render(self, messages, add_generation_prompt, continue_final_message):
        media: list[tuple[object, bool]] = []  # (item, is_clip) in text order
        turns = []
        system = None
        for i, message in enumerate(messages):
            role, content = message["role"], message.get("content")
            text = ""
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else (content or []):
                kind = part.get("type")
                if kind == "text":
                    text += part["text"]
                elif kind in ("image", "video"):
                    item = part.get(kind, part.get("image"))
                    if item is None:
                        raise ValueError(f"message {i}: a {kind} part without its {kind}")
                    media.append((item, kind == "video" or _is_clip(item)))
                    text += VISION_START + VIDEO_PAD + VISION_END
                else:
                    raise ValueError(f"message {i}: unsupported content part type {kind!r} (text, image, video)")
            if role == "system" and i == 0:
                system = text
                continue
            turns.append((role, text))
        if system is None:  # the release's x2t instruction (the same text for images and videos)
            system = X2T_DEFAULT_INSTRUCTION
        out = f"{IM_START}system\n{system}{IM_END}\n"
        for k, (role, text) in enumerate(turns):
            last = k == len(turns) - 1
            out += f"{IM_START}{role}\n{text}"
            if not (last and continue_final_message):
                out += f"{IM_END}\n"
        if add_generation_prompt:
            out += f"{IM_START}assistant\n"
        elif not continue_final_message:
            out = out.strip()  # a finished conversation ends at its last <|im_end|> (the release strips the string)
        return out, media

    # ---------------------------------------------------------------- text + media -> model inputs
    def __call__(self, text=None, images=None, videos=None, padding: bool = False, return_tensors=None, **kwargs):
        """`text`: one string or a list (with one `<|vision_start|><|video_pad|><|vision_end|>` per visual block);
        `images` / `videos`: the media in text order, flat or one list per text (a clip given as an image is a
        [T, H, W, 3] array or a list of frames)."""
        if text is None:
            raise ValueError("LanceProcessor needs text (use apply_chat_template to render conversations)")
        texts = [text] if isinstance(text, str) else list(text)
        if images is not None and videos is not None:
            raise ValueError("give a sample's media in one list, in text order (images=; a clip as a [T, H, W, 3] array)")
        items = [(m, videos is not None or _is_clip(m)) for m in _flatten(images if images is not None else videos)]
        media, at = [], 0
        for t in texts:
            count = t.count(VISION_START)
            media.append(items[at : at + count])
            at += count
        if at != len(items):
            raise ValueError(f"the texts hold {at} visual placeholder(s) but {len(items)} media were given")
        return self._encode(texts, media, padding=padding, return_tensors=return_tensors)

    def _encode(self, texts, media, padding=False, return_tensors=None) -> BatchFeature:
        from .vision import patchify_video

        tok = self.lance_tokenizer
        rows, patches, grids = [], [], []
        for text, items in zip(texts, media):
            ids = tok.encode(text)
            expanded, block = [], 0
            for k, token in enumerate(ids):
                if token == tok.video_pad_id and k > 0 and ids[k - 1] == tok.vision_start_id:
                    if block >= len(items):
                        raise ValueError("a text holds more visual placeholders than media were given for it")
                    item, clip = items[block]
                    p, grid = patchify_video(vit_tensor(_frames(item), self.video_resolution if clip else self.image_resolution))
                    patches.append(p)
                    grids.append(grid)
                    expanded += [token] * (grid[0] * (grid[1] // 2) * (grid[2] // 2))
                    block += 1
                else:
                    expanded.append(token)
            if block != len(items):
                raise ValueError(f"a text holds {block} visual placeholder(s) but {len(items)} media were given for it")
            rows.append(expanded)
        data: dict = {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        if padding or return_tensors is not None:
            longest = max(len(r) for r in rows)
            data["input_ids"] = [[tok.pad_id] * (longest - len(r)) + r for r in rows]  # left padding
            data["attention_mask"] = [[0] * (longest - len(r)) + [1] * len(r) for r in rows]
        if return_tensors is not None:
            data = {k: torch.tensor(v, dtype=torch.long) for k, v in data.items()}
        if patches:
            data["pixel_values"] = torch.cat(patches)
            data["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        return BatchFeature(data=data)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]


def _flatten(media) -> list:
    """Media given flat (one item each) or one list per text -> one flat list in text order. A clip is a
    [T, H, W, 3] array, or a list of frames inside its text's list."""
    if media is None:
        return []
    if not isinstance(media, (list, tuple)):
        return [media]
    out = []
    for m in media:
        if isinstance(m, (list, tuple)):
            out.extend(m)  # one text's media
        elif m is not None:
            out.append(m)
    return out
