"""Checkpoint I/O in the official layout: round trips, key accounting, clear failures, the 3B shape on meta."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lance_rl.model.checkpoint import CheckpointError, inspect_checkpoint, load_lance, save_lance
from lance_rl.model.config import LanceConfig, lance_3b
from lance_rl.model.lance import LanceModel


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_init_tiny_layout_and_round_trip(tiny_ckpt, tmp_path):
    names = {p.name for p in tiny_ckpt.iterdir()}
    assert {"model.safetensors", "llm_config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "vocab.json", "merges.txt", "Qwen2.5-VL-ViT"} <= names  # fmt: skip
    first = load_lance(tiny_ckpt)
    assert first.report.ok and first.report.dropped == [] and first.report.copied_from_und == []
    out = save_lance(first.model, first.tokenizer, tmp_path / "again")
    second = load_lance(out)
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "Qwen2.5-VL-ViT" / "vit.safetensors").is_file()
    assert not list(tmp_path.glob(".again*"))  # no temporary directory left behind


def test_save_replaces_an_existing_checkpoint_atomically(tiny_ckpt, tmp_path):
    loaded = load_lance(tiny_ckpt)
    out = save_lance(loaded.model, loaded.tokenizer, tmp_path / "ckpt")
    with torch.no_grad():
        loaded.model.llm2vae.bias.add_(1.0)
    save_lance(loaded.model, loaded.tokenizer, out)
    assert torch.equal(load_lance(out).model.llm2vae.bias, loaded.model.llm2vae.bias)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_tiny_experts_differ_and_tokenizer_ids_come_from_the_tokenizer(tiny_ckpt):
    loaded = load_lance(tiny_ckpt)
    layer = loaded.model.language_model.model.layers[0]
    assert not torch.equal(layer.self_attn.q_proj.weight, layer.self_attn.q_proj_moe_gen.weight)
    tok, cfg = loaded.tokenizer, loaded.model.config
    assert tok.video_pad_id == cfg.video_token_id < 1000  # a compact tokenizer, not the 151k Qwen id space
    assert len(tok) <= cfg.vocab_size


def test_truncated_weights_fail_with_the_file_named(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "broken")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_lance(ckpt)


def test_missing_unexpected_and_mismatched_keys_are_named(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "edited")
    state = load_file(ckpt / "model.safetensors")
    del state["llm2vae.bias"]
    state["language_model.model.norm.weight"] = torch.ones(7)
    state["some.extra.weight"] = torch.zeros(2)
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_lance(ckpt)
    message = str(err.value)
    assert "missing 1 key(s): llm2vae.bias" in message
    assert "unexpected 1 key(s): some.extra.weight" in message
    assert "shape mismatch for language_model.model.norm.weight: model expects [64], checkpoint has [7]" in message


def test_config_that_does_not_fit_the_weights_fails(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "wrong_config")
    cfg = json.loads((ckpt / "llm_config.json").read_text())
    cfg["intermediate_size"] = 96
    (ckpt / "llm_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight: model expects \[96, 64\], checkpoint has \[128, 64\]"):
        load_lance(ckpt)


def test_token_ids_that_disagree_with_the_tokenizer_fail(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "wrong_ids")
    cfg = json.loads((ckpt / "llm_config.json").read_text())
    cfg["video_token_id"] += 1
    (ckpt / "llm_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="video_token_id"):
        load_lance(ckpt)


def test_generation_expert_absent_from_file_is_copied_from_understanding(tiny_ckpt, tmp_path):
    """A Qwen-only checkpoint (no *_moe_gen tensors) loads the way the release's init_moe makes it load."""
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "und_only")
    state = {k: v for k, v in load_file(ckpt / "model.safetensors").items() if "_moe_gen" not in k}
    save_file(state, ckpt / "model.safetensors")
    loaded = load_lance(ckpt)
    assert len(loaded.report.copied_from_und) == 2 * 14 + 1  # 14 per layer, 2 layers, plus norm_moe_gen
    layer = loaded.model.language_model.model.layers[1]
    assert torch.equal(layer.mlp_moe_gen.up_proj.weight, layer.mlp.up_proj.weight)


def test_bad_llm_config_is_named(tmp_path):
    (tmp_path / "llm_config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ValueError, match="lacks required field"):
        LanceConfig.from_llm_config(tmp_path)
    (tmp_path / "llm_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LanceConfig.from_llm_config(tmp_path)
    with pytest.raises(ValueError, match="mrope_section"):
        LanceConfig(hidden_size=64, num_attention_heads=4, mrope_section=(4, 4, 4))


# ------------------------------------------------------------------------------------------------ the released shape
def official_3b_keys() -> dict[str, list[int]]:
    """Spec 2.3, written out: every key and shape of the released Lance_3B state dict (pos_embed excluded)."""
    d, kv, ff, v = 2048, 256, 11008, 151936
    keys = {"language_model.model.embed_tokens.weight": [v, d], "language_model.lm_head.weight": [v, d],
            "language_model.model.norm.weight": [d], "language_model.model.norm_moe_gen.weight": [d],
            "time_embedder.mlp.0.weight": [d, 256], "time_embedder.mlp.0.bias": [d],
            "time_embedder.mlp.2.weight": [d, d], "time_embedder.mlp.2.bias": [d],
            "vae2llm.weight": [d, 48], "vae2llm.bias": [d], "llm2vae.weight": [48, d], "llm2vae.bias": [48]}  # fmt: skip
    for i in range(36):
        p = f"language_model.model.layers.{i}."
        for s in ("", "_moe_gen"):
            keys |= {
                f"{p}input_layernorm{s}.weight": [d], f"{p}post_attention_layernorm{s}.weight": [d],
                f"{p}self_attn.q_proj{s}.weight": [d, d], f"{p}self_attn.q_proj{s}.bias": [d],
                f"{p}self_attn.k_proj{s}.weight": [kv, d], f"{p}self_attn.k_proj{s}.bias": [kv],
                f"{p}self_attn.v_proj{s}.weight": [kv, d], f"{p}self_attn.v_proj{s}.bias": [kv],
                f"{p}self_attn.o_proj{s}.weight": [d, d],
                f"{p}self_attn.q_norm{s}.weight": [128], f"{p}self_attn.k_norm{s}.weight": [128],
            }  # fmt: skip
            mlp = f"{p}mlp{s}."
            keys |= {f"{mlp}gate_proj.weight": [ff, d], f"{mlp}up_proj.weight": [ff, d], f"{mlp}down_proj.weight": [d, ff]}
    keys["vit_model.patch_embed.proj.weight"] = [1280, 3, 2, 14, 14]
    for i in range(32):
        p = f"vit_model.blocks.{i}."
        keys |= {
            f"{p}norm1.weight": [1280], f"{p}norm2.weight": [1280],
            f"{p}attn.qkv.weight": [3840, 1280], f"{p}attn.qkv.bias": [3840],
            f"{p}attn.proj.weight": [1280, 1280], f"{p}attn.proj.bias": [1280],
            f"{p}mlp.gate_proj.weight": [3420, 1280], f"{p}mlp.gate_proj.bias": [3420],
            f"{p}mlp.up_proj.weight": [3420, 1280], f"{p}mlp.up_proj.bias": [3420],
            f"{p}mlp.down_proj.weight": [1280, 3420], f"{p}mlp.down_proj.bias": [1280],
        }  # fmt: skip
    keys |= {"vit_model.merger.ln_q.weight": [1280], "vit_model.merger.mlp.0.weight": [5120, 5120],
             "vit_model.merger.mlp.0.bias": [5120], "vit_model.merger.mlp.2.weight": [2048, 5120],
             "vit_model.merger.mlp.2.bias": [2048]}  # fmt: skip
    return keys


@pytest.fixture(scope="module")
def meta_3b():
    with torch.device("meta"):
        return LanceModel(lance_3b())


def test_3b_keys_and_shapes_equal_the_official_ones(meta_3b):
    ours = {k: list(v.shape) for k, v in meta_3b.state_dict().items()}
    assert ours == official_3b_keys()
    assert sum(v.numel() for v in meta_3b.parameters()) == 6_845_501_488
    counts = meta_3b.parameter_counts()
    assert counts["vit"] == 668_684_288
    assert counts["active_per_token"] == pytest.approx(3.40e9, rel=0.01)


def test_3b_keys_match_the_official_key_dump(meta_3b, parity_dir):
    dump = json.loads((parity_dir / "keys.json").read_text())["real_3b"]["state_dict"]
    dump = dict(dump) if isinstance(dump, dict) else {k: s for k, s in dump}
    assert dump.pop("latent_pos_embed.pos_embed") == [126976, 2048]  # recomputed here, never stored
    assert {k: list(v.shape) for k, v in meta_3b.state_dict().items()} == dump


def write_sparse_safetensors(path, shapes: dict[str, list[int]], dtype="BF16", itemsize=2):
    """A valid safetensors file whose data region is a hole: the 3B layout costs no disk or memory."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = itemsize
        for s in shape:
            size *= s
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        f.truncate(8 + len(blob) + offset)


def test_inspect_works_on_the_released_3b_layout_without_allocating(tmp_path, tiny_ckpt):
    ckpt = tmp_path / "Lance_3B"
    ckpt.mkdir()
    lance_3b().save(ckpt)
    shapes = official_3b_keys() | {"latent_pos_embed.pos_embed": [4096, 2048]}
    write_sparse_safetensors(ckpt / "model.safetensors", shapes)
    info = inspect_checkpoint(ckpt)
    assert info["keys"]["ok"] and info["keys"]["dropped"] == ["latent_pos_embed.pos_embed"]
    assert info["parameters"]["total"] == 6_845_501_488
    assert info["stored"]["dtypes"] == {"BF16": len(shapes)}
    assert info["tokenizer"] is None  # no tokenizer files in this fake directory
