"""Tokenizer helpers: the Qwen2.5 special tokens, the chat template, the per-task system prompts, a tiny offline tokenizer.

Lance uses the stock Qwen2.5-VL tokenizer. Every visual block (ViT or VAE, image or video) is written as
`<|vision_start|>` + K x `<|video_pad|>` + `<|vision_end|>`. Special-token ids are looked up by their text in the
tokenizer, never assumed, so a compact tokenizer (the tiny checkpoints) works as well as the released one.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VIDEO_PAD = "<|video_pad|>"
IMAGE_PAD = "<|image_pad|>"
END_OF_TEXT = "<|endoftext|>"

# The 22 added tokens of Qwen2.5, in their official order (ids 151643..151664 in the released tokenizer).
# The first 14 are special; the last 8 are plain added tokens.
QWEN_ADDED_TOKENS = [
    END_OF_TEXT, IM_START, IM_END,
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    VISION_START, VISION_END, "<|vision_pad|>", IMAGE_PAD, VIDEO_PAD,
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
_NUM_SPECIAL = 14

# Qwen2's pre-tokenisation pattern (the regex in the released tokenizer.json).
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ------------------------------------------------------------------------------------------------ system prompts
# The official system prompts (data/common.py: generate_system_prompt, "SP0": used verbatim as the system text).
T2I_SYSTEM_PROMPT = (
    "Describe the image by detailing the color, quantity, text, shape, size, texture, spatial relationships of the "
    "objects and background:"
)
_T2V_SYSTEM_PROMPT = (
    "Describe the {v} by detailing the color, quantity, visible text, shape, size, texture, spatial relationships and "
    "motion/camera movements of the objects and background:"
)
_EDIT_SYSTEM_PROMPT = (
    "Describe the key features of the input {v} (color, shape, size, texture, objects, background), then explain how "
    "the user\u2019s text instruction should alter or modify the {v}. Generate a new {v} that meets the user\u2019s "
    "requirements while maintaining consistency with the original input where appropriate."
)
X2T_DEFAULT_INSTRUCTION = "Look at the image carefully and answer the question."


def system_prompt(task: str, *, training: bool = False) -> str:
    """The system prompt the release uses for `task`.

    With `training=True`, t2i returns the t2v-style prompt the official trainer uses for image data (spec 9.4: it
    trains t2i with "...visible text ... motion/camera movements..." but infers with the t2i prompt).
    """
    if task == "t2i":
        return _T2V_SYSTEM_PROMPT.format(v="image") if training else T2I_SYSTEM_PROMPT
    if task in ("t2v", "i2v"):
        return _T2V_SYSTEM_PROMPT.format(v="video")
    if task == "image_edit":
        return _EDIT_SYSTEM_PROMPT.format(v="image")
    if task == "video_edit":
        return _EDIT_SYSTEM_PROMPT.format(v="video")
    if task in ("x2t_image", "x2t_video"):
        return X2T_DEFAULT_INSTRUCTION
    raise ValueError(f"unknown task {task!r}; expected one of t2i, t2v, i2v, image_edit, video_edit, x2t_image, x2t_video")


def visual_placeholder() -> str:
    """One visual block before expansion: the pad is repeated to the block's token count after tokenisation."""
    return VISION_START + VIDEO_PAD + VISION_END


def chat_prefix(system: str) -> str:
    """Everything before the user's content: the system turn and the open user header."""
    return f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n"


def render_chat(system: str, user: str, assistant: str | None = None) -> str:
    """The official template: system turn, user turn, and the assistant turn (closed with <|im_end|>) when given.

    Without `assistant` the string ends with the open assistant header `<|im_start|>assistant\\n`, where decoding starts.
    """
    text = chat_prefix(system) + f"{user}{IM_END}\n{IM_START}assistant\n"
    if assistant is not None:
        text += f"{assistant}{IM_END}"
    return text


# ------------------------------------------------------------------------------------------------ the tokenizer
class LanceTokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer` with the ids Lance needs, looked up by token text."""

    def __init__(self, tokenizer: Tokenizer, source: str = "tokenizer"):
        self._tok = tokenizer
        missing = [t for t in (IM_START, IM_END, VISION_START, VISION_END, VIDEO_PAD, END_OF_TEXT) if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"{source} lacks the Qwen special token(s) {missing} that Lance needs")
        self.im_start_id = tokenizer.token_to_id(IM_START)
        self.im_end_id = tokenizer.token_to_id(IM_END)
        self.vision_start_id = tokenizer.token_to_id(VISION_START)
        self.vision_end_id = tokenizer.token_to_id(VISION_END)
        self.video_pad_id = tokenizer.token_to_id(VIDEO_PAD)
        self.image_pad_id = tokenizer.token_to_id(IMAGE_PAD)
        self.pad_id = tokenizer.token_to_id(END_OF_TEXT)

    @classmethod
    def from_dir(cls, directory: str | Path) -> "LanceTokenizer":
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory} (the released checkpoints ship one)")
        return cls(Tokenizer.from_file(str(path)), source=str(path))

    def __len__(self) -> int:
        # The usable vocabulary (151665 for Qwen2.5): logits beyond it are cut for CE and masked when decoding.
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def check_config(self, config) -> None:
        """Fail when the token ids in llm_config.json disagree with the tokenizer."""
        pairs = {
            "video_token_id": self.video_pad_id,
            "vision_start_token_id": self.vision_start_id,
            "vision_end_token_id": self.vision_end_id,
            "image_token_id": self.image_pad_id,
        }
        bad = {k: (getattr(config, k), v) for k, v in pairs.items() if v is not None and getattr(config, k) != v}
        if bad:
            detail = ", ".join(f"{k}: config {c} vs tokenizer {t}" for k, (c, t) in bad.items())
            raise ValueError(f"llm_config.json and the tokenizer disagree on special token ids ({detail})")
        if len(self) > config.vocab_size:
            raise ValueError(f"tokenizer has {len(self)} tokens but the model has only vocab_size={config.vocab_size} rows")

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json plus the slow-tokenizer files (vocab.json, merges.txt) the official loader reads."""
        directory = Path(directory)
        self._tok.save(str(directory / "tokenizer.json"))
        spec = json.loads(self._tok.to_str())
        model = spec["model"]
        (directory / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        added = {
            str(self._tok.token_to_id(t)): {
                "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": i < _NUM_SPECIAL,
            }
            for i, t in enumerate(QWEN_ADDED_TOKENS)
            if self._tok.token_to_id(t) is not None
        }  # fmt: skip
        config = {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": [IM_START, IM_END, VISION_START, VISION_END],
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": IM_END,
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": END_OF_TEXT,
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def build_tiny_tokenizer(corpus: list[str] | None = None, num_merges: int = 512) -> LanceTokenizer:
    """Train a small byte-level BPE in the Qwen2 format offline, with the 22 Qwen added tokens after its vocabulary.

    The ids are compact (256 bytes + merges, then the added tokens), unlike the released tokenizer where the added
    tokens sit at 151643+; everything downstream reads the ids from the tokenizer, so both work.
    """
    corpus = list(corpus or []) + _default_corpus()
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=256 + num_merges,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(QWEN_ADDED_TOKENS[:_NUM_SPECIAL])
    tok.add_tokens(QWEN_ADDED_TOKENS[_NUM_SPECIAL:])
    return LanceTokenizer(tok, source="tiny tokenizer")


def _default_corpus() -> list[str]:
    """System prompts, chat glue and the shapes-world vocabulary, repeated so their merges are learned first."""
    words = (
        "a an one two three four red green blue yellow purple orange white black circle circles square squares "
        "triangle triangles on the left right top bottom of and in image video moving make it change color shape "
        "what how many is are there yes no does this match caption answer question"
    )
    texts = [
        T2I_SYSTEM_PROMPT,
        system_prompt("t2v"),
        system_prompt("t2i", training=True),
        system_prompt("image_edit"),
        system_prompt("video_edit"),
        X2T_DEFAULT_INSTRUCTION,
        "system\nuser\nassistant\n",
        words,
    ]
    return texts * 4
