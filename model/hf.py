"""Lance understanding as a transformers model: images and videos + text -> text, for `generate` and for TRL.

    model = LanceForUnderstanding.from_pretrained("downloads/Lance_3B")     # the official layout, via load_lance
    processor = LanceProcessor.from_pretrained("downloads/Lance_3B")
    inputs = processor.apply_chat_template([conversation], add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=64)                       # greedy by default, as the release
    model.save_pretrained("out")                                            # the official layout again

`LanceForUnderstanding` is a `PreTrainedModel` + `GenerationMixin` whose module tree *is* the Lance model's
(`language_model.*`, `vit_model.*`, the generation heads): the state dict keys are the checkpoint keys, PEFT adapters
name the same modules as on `LanceModel` (so `lance-rl export` merges them into the official layout), and
`model.lance` is the very same `LanceModel` (shared modules), for everything else Lance does. Only the understanding
expert and the ViT run here: every token is text or ViT, so the generation expert never sees one.

How a row becomes the release's sequence. The processor renders the release's chat template (spec 4.2: system =
instruction, each visual block `<|vision_start|>` + K x `<|video_pad|>` + `<|vision_end|>`, images and videos alike),
so a row of token ids carries its own layout. The model finds each block (a `<|vision_start|>` followed by pads, one
`image_grid_thw` row each, in order), puts the ViT outputs at the pads, and computes per row exactly what the
model's own path computes: 3-D mRoPE positions (`positions.sample_positions`; MaPE off by default, as the release's
understanding inference, spec 9.1: `config.mape`) and the attention rule (`TokenLayout`: text causal, the ViT block
bidirectional). Padding (left for prompts, right for completions) is masked and takes no position.

`generate`: the first call runs the whole prompt once and fills a `LanceTextCache` (the model's per-layer
`KVCache` plus, per row, which keys are padding and the next text position); each later call feeds only the new
tokens at positions `next_position + i` against the cache, as the release's KV decoding does. Logits cover the
usable vocabulary only (`len(tokenizer)`; embedding rows beyond it can never be produced), like `LanceModel.logits`.

TRL's `GRPOTrainer` drives it as it drives Qwen2.5-VL: the processor's `apply_chat_template` and `__call__` return
`input_ids`, `pixel_values` (flattened patches, `image_grid_thw.prod(-1)` rows per block) and `image_grid_thw`; its
fused log-probability head calls `model.backbone(...)` for final hidden states and `get_output_embeddings()` for the
usable rows of `lm_head`; `config.image_token_id` is the visual placeholder, which TRL keeps out of sampled answers.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput

from .attention import TokenLayout, cached_attention
from .backbone import KVCache
from .config import LanceConfig
from .lance import LanceModel
from .positions import sample_positions
from .processor import LanceProcessor
from .sequence import TEXT, VIT, PlacedBlock, SequencePlan, vit_block
from .tokenizer import (
    LanceTokenizer,
)

MAX_GENERATION_LENGTH = 256  # the release's understanding default (spec 4.3)


# ------------------------------------------------------------------------------------------------ config
class LanceUnderstandingConfig(PreTrainedConfig):
    """What transformers needs besides the Lance config itself (kept verbatim as `lance`, the llm_config.json
    content, so the wrapper can be rebuilt from it)."""

    model_type = "lance_understanding"

    lance: dict | None = None  # LanceConfig.to_llm_config_dict()
    num_text_tokens: int | None = None  # len(tokenizer): the logits' width
    mape: bool = False  # False: the release's understanding inference (spec 9.1); True: positions as in training
    image_token_id: int | None = None  # the visual placeholder, <|video_pad|> for images and videos alike
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @property
    def vocab_size(self) -> int | None:
        return self.num_text_tokens

    def lance_config(self) -> LanceConfig:
        if self.lance is None:
            raise ValueError("LanceUnderstandingConfig.lance is empty: build the model with from_pretrained or from_lance")
        return LanceConfig.from_dict(self.lance)


# ------------------------------------------------------------------------------------------------ cache
@dataclass
class LanceTextCache:
    """The KV cache of a batch being decoded: the layers' keys and values, which cached keys are padding, and the
    position the next text token of each row takes."""

    kv: KVCache
    valid: torch.Tensor  # [B, cached] False at padding
    next_position: torch.Tensor  # [B]

    def __len__(self) -> int:
        return len(self.kv)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return len(self.kv)

    is_compileable = False
    is_croppable = False


@dataclass
class LanceUnderstandingOutput(ModelOutput):
    logits: torch.Tensor | None = None  # [B, L, len(tokenizer)]
    cache: LanceTextCache | None = None
    last_hidden_state: torch.Tensor | None = None  # [B, L, D] final-normed


class UsableVocabHead(nn.Module):
    """`lm_head` restricted to the usable vocabulary: what TRL's fused log-probability head reads (`weight`, `bias`),
    so training and sampling normalise over the same tokens. Built on each call, never registered: no state."""

    def __init__(self, head: nn.Linear, rows: int):
        super().__init__()
        self.head, self.rows = head, rows

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight[: self.rows]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.head.bias is None else self.head.bias[: self.rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)[..., : self.rows]


# ------------------------------------------------------------------------------------------------ the model
class LanceForUnderstanding(PreTrainedModel, GenerationMixin):
    config_class = LanceUnderstandingConfig
    base_model_prefix = "backbone"  # TRL's fused head asks `model.base_model` for hidden states: `backbone` below
    supports_gradient_checkpointing = True  # the decoder's own per-layer recomputation (Qwen2MoTModel)
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: LanceUnderstandingConfig, lance: LanceModel | None = None,
                 tokenizer: LanceTokenizer | None = None):  # fmt: skip
        super().__init__(config)
        if lance is None:  # from a config alone: a randomly initialised Lance of that shape
            lance = LanceModel(config.lance_config())
            lance.num_text_tokens = config.num_text_tokens or lance.config.vocab_size
        # The Lance model's children become ours (same objects): one module tree, the checkpoint's key names. The
        # LanceModel itself is kept unregistered, so nothing is counted twice.
        object.__setattr__(self, "lance", lance)
        for name, child in lance.named_children():
            self.add_module(name, child)
        self.lance_tokenizer = tokenizer
        self.post_init()
        self.generation_config.max_new_tokens = MAX_GENERATION_LENGTH
        self.generation_config.do_sample = False

    def init_weights(self):
        # The weights are the Lance model's (loaded, or initialised by LanceModel): transformers must not initialise
        # them again, nor the ViT, which is a transformers model of its own. Nothing is tied.
        pass

    # ---------------------------------------------------------------- building, saving
    @classmethod
    def from_lance(cls, model: LanceModel, tokenizer: LanceTokenizer, mape: bool = False, name_or_path: str = ""):
        """Wrap a loaded `LanceModel` (no copy: the wrapper and `model` share every weight)."""
        config = LanceUnderstandingConfig(
            lance=model.config.to_llm_config_dict(),
            num_text_tokens=model.num_text_tokens,
            mape=mape,
            image_token_id=tokenizer.video_pad_id,
            vision_start_token_id=tokenizer.vision_start_id,
            vision_end_token_id=tokenizer.vision_end_id,
            pad_token_id=tokenizer.pad_id,
            eos_token_id=tokenizer.im_end_id,
        )
        config._name_or_path = name_or_path
        dtype = next(model.parameters()).dtype
        config.dtype = dtype
        wrapper = cls(config, lance=model, tokenizer=tokenizer)
        wrapper.train(model.training)
        return wrapper

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, vit_dir=None, weights: str = "auto",
                        device="cpu", dtype=torch.float32, mape: bool = False, **kwargs):  # fmt: skip
        """Load an official-layout directory (`load_lance`: key accounting, the ViT inside or beside it). transformers'
        keywords `torch_dtype` / `device_map` ("cpu", "cuda", or None) are understood; no second format exists."""
        from .checkpoint import load_lance

        dtype = kwargs.pop("torch_dtype", dtype)
        if isinstance(dtype, str):
            dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
        device_map = kwargs.pop("device_map", None)
        if isinstance(device_map, str) and device_map != "auto":
            device = device_map
        loaded = load_lance(pretrained_model_name_or_path, vit_dir=vit_dir, weights=weights, device=device, dtype=dtype)
        return cls.from_lance(loaded.model, loaded.tokenizer, mape=mape, name_or_path=str(pretrained_model_name_or_path))

    def save_pretrained(self, save_directory, state_dict: dict | None = None, **kwargs):
        """Write the official layout (`save_lance`: model.safetensors, llm_config.json, tokenizer files, the ViT
        folder), never a transformers-format copy. `state_dict` (a trainer's gathered weights) replaces the module's
        own tensors; other transformers keywords (safe_serialization, push_to_hub, ...) do not apply."""
        from .checkpoint import save_lance

        if self.lance_tokenizer is None:
            raise ValueError("this model has no tokenizer to save (build it with from_pretrained or from_lance)")
        source = self.lance
        if state_dict is not None:
            expected = set(self.lance.state_dict())
            if set(state_dict) != expected:
                raise ValueError(f"state_dict keys differ from the model's ({len(set(state_dict) ^ expected)} differ)")
            source = types.SimpleNamespace(state_dict=lambda: state_dict, config=self.lance.config,
                                           vit_model=self.lance.vit_model)  # fmt: skip
        return save_lance(source, self.lance_tokenizer, save_directory)

    # ---------------------------------------------------------------- transformers plumbing
    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.model.embed_tokens

    def get_output_embeddings(self) -> UsableVocabHead:
        return UsableVocabHead(self.language_model.lm_head, self.lance.num_text_tokens)

    @property
    def backbone(self):
        """Final hidden states without the head, called as the model is (`input_ids`, `attention_mask`,
        `pixel_values`, `image_grid_thw`): TRL's fused log-probability head uses it."""

        def run(input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None, **kwargs):
            hidden, _ = self._hidden(input_ids, attention_mask, pixel_values, image_grid_thw, None, use_cache=False)
            return BaseModelOutput(last_hidden_state=hidden)

        return run

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Our own cache (LanceTextCache) is made by the first forward; transformers must not make a DynamicCache.
        return False

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, pixel_values=None,
                                      image_grid_thw=None, **kwargs):  # fmt: skip
        """The whole prompt (and its media) on the first call; afterwards only the tokens the cache has not seen."""
        if cache is not None and len(cache):
            input_ids, pixel_values, image_grid_thw = input_ids[:, len(cache) :], None, None
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                "image_grid_thw": image_grid_thw, "cache": cache, "use_cache": kwargs.get("use_cache", True),
                "logits_to_keep": kwargs.get("logits_to_keep")}  # fmt: skip

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None, cache=None,
                use_cache: bool | None = None, logits_to_keep: int | None = None, **kwargs) -> LanceUnderstandingOutput:
        """input_ids [B, L] (placeholders expanded by the processor), attention_mask [B, L] (0 at padding),
        pixel_values [N, C*2*14*14] and image_grid_thw [blocks, 3] for every visual block of the batch in order.
        With `cache` (a LanceTextCache) only the new tokens are run; `use_cache` returns the cache."""
        use_cache = bool(use_cache) or cache is not None
        hidden, cache = self._hidden(input_ids, attention_mask, pixel_values, image_grid_thw, cache, use_cache)
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        return LanceUnderstandingOutput(logits=self.lance.logits(kept), cache=cache if use_cache else None,
                                        last_hidden_state=hidden)  # fmt: skip

    def _hidden(self, input_ids, attention_mask, pixel_values, image_grid_thw, cache, use_cache):
        if input_ids is None:
            raise ValueError("LanceForUnderstanding needs input_ids (inputs_embeds are not supported)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if cache is not None and len(cache):
            return self._new_tokens(input_ids, attention_mask, cache), cache
        return self._full_pass(input_ids, attention_mask.bool(), pixel_values, image_grid_thw, use_cache)

    def _full_pass(self, input_ids, valid, pixel_values, image_grid_thw, use_cache):
        """Every token of every row in one pass, under the release's mask and positions; fills a cache if asked."""
        b, n = input_ids.shape
        device = input_ids.device
        grids = [] if image_grid_thw is None else [tuple(int(x) for x in g) for g in image_grid_thw.reshape(-1, 3)]
        plans, vit_rows = self._row_plans(input_ids, valid, grids)
        h = self.lance.embed_text(input_ids)
        if grids:
            vit = self.lance.encode_vit(pixel_values.to(device), torch.tensor(grids, device=device)).to(h.dtype)
            rows, cols = vit_rows
            h = h.index_put((rows, cols), vit)
        position_ids = torch.zeros(3, b, n, dtype=torch.long, device=device)
        mask = torch.eye(n, dtype=torch.bool, device=device).expand(b, 1, n, n).clone()  # padding sees itself
        for row, plan in enumerate(plans):
            index = valid[row].nonzero().squeeze(1)
            position_ids[:, row, index] = sample_positions(plan, self.lance.config.tokens_per_second,
                                                           mape=self.config.mape).to(device)  # fmt: skip
            rule = TokenLayout.from_splits([len(plan)], plan.split_lens, plan.attn_modes, device=device).dense_mask()
            mask[row, 0, index[:, None], index[None, :]] = rule
        kv = self.lance.new_cache() if use_cache else None
        attend = lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1]
        )
        hidden = self.language_model.model(h, position_ids, None, attend, kv)
        if not use_cache:
            return hidden, None
        last = n - 1 - valid.flip(1).int().argmax(1)  # each row's last real token (prompts are left-padded)
        next_position = position_ids[0, torch.arange(b, device=device), last] + 1
        return hidden, LanceTextCache(kv, valid.clone(), next_position)

    def _new_tokens(self, input_ids, attention_mask, cache: LanceTextCache):
        """New text tokens against the cache: causal among themselves, every real cached key visible."""
        b, q = input_ids.shape
        if attention_mask.shape[1] == len(cache) + q:  # generate's mask is authoritative (it grows by one per step)
            cache.valid = attention_mask[:, : len(cache)].bool()
        steps = torch.arange(q, device=input_ids.device)
        positions = (cache.next_position[:, None] + steps[None]).expand(3, b, q)
        attend = cached_attention(q, True, cache.valid, self.lance.attn_backend)
        hidden = self.language_model.model(self.lance.embed_text(input_ids), positions, None, attend, cache.kv)
        cache.valid = torch.cat([cache.valid, cache.valid.new_ones(b, q)], dim=1)
        cache.next_position = cache.next_position + q
        return hidden

    def _row_plans(self, input_ids, valid, grids):
        """Each row's sequence plan (its real tokens, split as the release splits them) and the (row, column) of
        every ViT token, in the order of `grids`."""
        c = self.lance.config
        plans, rows, cols, used = [], [], [], 0
        for row in range(input_ids.shape[0]):
            index = valid[row].nonzero().squeeze(1)
            ids = input_ids[row, index].tolist()
            plan, used = _plan_from_ids(ids, grids, used, c)
            plans.append(plan)
            for placed in plan.blocks:
                rows.append(torch.full((placed.block.num_tokens,), row))
                cols.append(index[placed.start : placed.stop].cpu())
        if used != len(grids):
            raise ValueError(f"image_grid_thw has {len(grids)} rows but the input_ids hold {used} visual blocks")
        if not rows:
            return plans, None
        return plans, (torch.cat(rows).to(input_ids.device), torch.cat(cols).to(input_ids.device))


def _plan_from_ids(ids: list[int], grids: list[tuple[int, int, int]], used: int, c: LanceConfig):
    """A SequencePlan from token ids: each `<|vision_start|>` followed by pads is a ViT block taking the next grid;
    it must hold exactly t * h/2 * w/2 pads (the processor expands them so)."""
    blocks, split_lens, attn_modes, modality = [], [], [], []
    i, text_start = 0, 0

    def close_text(stop):
        if stop > text_start:
            split_lens.append(stop - text_start)
            attn_modes.append("causal")
            modality.extend([TEXT] * (stop - text_start))

    while i < len(ids):
        if ids[i] == c.vision_start_token_id and i + 1 < len(ids) and ids[i + 1] == c.video_token_id:
            if used >= len(grids):
                raise ValueError("the input_ids hold more visual blocks than image_grid_thw has rows")
            t, h, w = grids[used]
            grid = (t, h // c.spatial_merge_size, w // c.spatial_merge_size)
            count = grid[0] * grid[1] * grid[2]
            pads = ids[i + 1 : i + 1 + count]
            if len(pads) != count or any(x != c.video_token_id for x in pads):
                raise ValueError(f"visual block {used} needs {count} placeholder tokens for grid {grids[used]}")
            close_text(i)
            stop = i + 1 + count + (1 if i + 1 + count < len(ids) and ids[i + 1 + count] == c.vision_end_token_id else 0)
            blocks.append(PlacedBlock(vit_block(grid), i + 1))
            split_lens.append(stop - i)
            attn_modes.append("full")
            modality.extend([VIT] * (stop - i))
            used += 1
            i = text_start = stop
            continue
        i += 1
    close_text(len(ids))
    plan = SequencePlan("x2t_image", list(ids), split_lens, attn_modes, modality, blocks)
    return plan, used


def register_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know the wrapper (for code that goes through the auto classes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(LanceUnderstandingConfig.model_type, LanceUnderstandingConfig)
        AutoModelForCausalLM.register(LanceUnderstandingConfig, LanceForUnderstanding)
    except ValueError:  # already registered
        pass


__all__ = [
    "LanceForUnderstanding",
    "LanceProcessor",
    "LanceTextCache",
    "LanceUnderstandingConfig",
    "UsableVocabHead",
    "register_auto_classes",
]  # fmt: skip
