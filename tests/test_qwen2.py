"""Text-only Qwen2 checkpoints (model_type qwen2, as DeepSeek-R1-Distill-Qwen ships) written by
transformers' Qwen2ForCausalLM.save_pretrained: model.load_model gives the same logits, and
sample.generate the same greedy tokens as transformers' generate, tied and untied heads; configs
we cannot run right (YaRN rope scaling, sliding-window attention) are refused by name."""

import json

import pytest
import torch

import data
import model as M
import sample

transformers = pytest.importorskip("transformers")
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

TOL = 1e-5
QUESTIONS = ["Hi", "What is 2 + 4?", "Image description: two red circles. How many red shapes?"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return data.save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def hf_checkpoint(path, tok, tie, seed=0):
    """A random tiny Qwen2ForCausalLM, saved by transformers (with the tiny tokenizer) to path."""
    ids = data.special_ids(tok)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=ids["endoftext"],
                      eos_token_id=ids["im_end"], pad_token_id=ids["endoftext"])
    torch.manual_seed(seed)
    hf = Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():  # larger weights than the init, so greedy outputs vary from step to step
        for name, p in hf.named_parameters():
            scale = 0.5 if p.dim() == 1 else 0.3
            p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in name else 0.0))
    hf.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return hf


def rel_err(out, ref, mask):
    m = mask.bool()
    return ((out[m] - ref[m]).abs().max() / ref[m].abs().max()).item()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_logits_and_greedy_match_transformers(tmp_path, tok, tie):
    hf = hf_checkpoint(tmp_path, tok, tie)
    keys = json.loads((tmp_path / "config.json").read_text())
    assert keys["model_type"] == "qwen2" and keys["architectures"] == ["Qwen2ForCausalLM"]
    ours = M.load_model(str(tmp_path)).eval()
    assert not hasattr(ours, "visual") and ours.config.mrope_section is None
    assert ours.config.tie_word_embeddings == tie
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie

    # logits: a right-padded and a left-padded batch of prompts of different lengths
    prompts = [data.encode_prompt(tok, q, []) for q in QUESTIONS]
    assert len({len(p["input_ids"]) for p in prompts}) == len(prompts)
    pad = tok.pad_token_id
    for side in ("right", "left"):
        b = data.collate(prompts, pad, side)
        with torch.no_grad():
            ref = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            out = ours(b["input_ids"], b["attention_mask"])
        assert rel_err(out, ref, b["attention_mask"]) <= TOL, side

    # greedy decoding, KV cache and per-row positions included, no images
    N = 40
    stops = sample.default_stop_ids(ours.config, tok)
    assert sample.vision_token_ids(ours.config) == []  # Qwen's vision ids lie outside this vocab
    text_only = [{"input_ids": p["input_ids"]} for p in prompts]
    got = sample.generate(ours, text_only, n=1, max_new_tokens=N, temperature=0, stop_ids=stops,
                          tokenizer=tok, pad_id=pad)
    b = data.collate(prompts, pad, "left")
    with torch.no_grad():
        g = hf.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], do_sample=False,
                        max_new_tokens=N, eos_token_id=stops, pad_token_id=pad)
    g = g[:, b["input_ids"].shape[1]:]
    for r in range(len(prompts)):
        ref = g[r].tolist()
        cut = next((i + 1 for i, t in enumerate(ref) if t in stops), len(ref))
        assert got.tokens[r, :int(got.lengths[r])].tolist() == ref[:cut], f"row {r}"
    assert got.tokens.shape[1] >= 32
    assert len({tuple(got.tokens[r].tolist()) for r in range(len(prompts))}) == len(prompts)  # not degenerate
    # the same prompts through data.encode_prompt (with its empty image tensors) sample the same
    same = sample.generate(ours, prompts, n=1, max_new_tokens=N, temperature=0, stop_ids=stops, pad_id=pad)
    assert torch.equal(same.tokens, got.tokens)


def test_unsupported_qwen2_configs_are_refused(tmp_path, tok):
    hf_checkpoint(tmp_path, tok, tie=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert M.config_from_dict(cfg).model_type == "qwen2"
    # the official DeepSeek-R1-Distill-Qwen form: flat rope_theta, rope_scaling null
    flat = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "layer_types")}
    flat.update(rope_theta=10000.0, rope_scaling=None, use_sliding_window=False, sliding_window=4096)
    assert M.config_from_dict(flat).rope_theta == 10000.0
    yarn = dict(flat, rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="rope type 'yarn' not supported"):
        M.config_from_dict(yarn, source="x/config.json")
    with pytest.raises(ValueError, match="use_sliding_window"):
        M.config_from_dict(dict(flat, use_sliding_window=True))
    # transformers 5 names each layer's attention; all full means no window, whatever the flag
    full = dict(flat, use_sliding_window=True, layer_types=["full_attention"] * 2)
    assert M.config_from_dict(full).num_hidden_layers == 2
    with pytest.raises(ValueError, match="use_sliding_window"):
        M.config_from_dict(dict(full, layer_types=["full_attention", "sliding_attention"]))
