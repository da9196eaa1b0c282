"""model.py against transformers' Qwen2_5_VLForConditionalGeneration (float32, tiny random model):
logits for text / images / padded batches, tied and untied heads, flat and nested config.json,
checkpoints written by either side (single file and sharded), strict-loading errors, M-RoPE
positions, and the KV cache (prefill + step-by-step decoding, select_rows)."""

import copy
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

TOL = 1e-5
VS, VE, IMG, VID, EOS = 288, 289, 290, 291, 287
MERGE = 2


def tiny_config(tie):
    return M.Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3],
        tie_word_embeddings=tie, image_token_id=IMG, video_token_id=VID,
        vision_start_token_id=VS, vision_end_token_id=VE, bos_token_id=None, eos_token_id=EOS,
        vision=M.VisionConfig(depth=3, hidden_size=32, intermediate_size=48, num_heads=2,
                              out_hidden_size=64, fullatt_block_indexes=[1], window_size=112))


def rel_err(out, ref, mask=None):
    """max |out - ref| / max |ref| over the real (mask == 1) tokens."""
    if mask is not None:
        m = mask.bool()
        out, ref = out[m], ref[m]
    return ((out - ref).abs().max() / ref.abs().max()).item()


# -----------------------------------------------------------------------------
# Inputs. A row is a list of items: an int is a text token, a tuple (h, w) is an image with that
# patch grid (14 px patches), i.e. <|vision_start|> + h*w/4 <|image_pad|> + <|vision_end|>.


def row_ids(row):
    ids, grids = [], []
    for it in row:
        if isinstance(it, tuple):
            h, w = it
            ids += [VS] + [IMG] * (h * w // MERGE ** 2) + [VE]
            grids.append([1, h, w])
        else:
            ids.append(it)
    return ids, grids


def make_batch(rows, side="left", seed=0):
    """-> input_ids, attention_mask (B, T), pixel_values (N, 3*2*14*14) or None, grid_thw or None."""
    enc = [row_ids(r) for r in rows]
    T = max(len(ids) for ids, _ in enc)
    B = len(rows)
    input_ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    grids = []
    for b, (ids, g) in enumerate(enc):
        sl = slice(T - len(ids), T) if side == "left" else slice(0, len(ids))
        input_ids[b, sl] = torch.tensor(ids)
        mask[b, sl] = 1
        grids += g
    if not grids:
        return input_ids, mask, None, None
    grid_thw = torch.tensor(grids)
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 14 * 14, generator=gen)
    return input_ids, mask, pixel_values, grid_thw


def text(n, seed):
    return torch.randint(0, 280, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# name -> (rows, side). 308x196 px = grid (22, 14) = merged 11x7: 3x2 windows of 4x4, the last
# row/column of windows partial (window padding in transformers).
CASES = {
    "text": ([text(13, 1)], "left"),
    "text_batch_right_padded": ([text(13, 2), text(7, 3)], "right"),
    "one_image": ([text(3, 4) + [(8, 8)] + text(4, 5)], "left"),
    "two_images_one_row": ([text(2, 6) + [(8, 12)] + text(3, 7) + [(22, 14)] + text(2, 8)], "left"),
    "batch_left_padded": ([text(2, 9) + [(22, 14)] + text(3, 10), text(1, 11) + [(8, 8)] + text(2, 12)], "left"),
    "batch_right_padded": ([text(2, 9) + [(22, 14)] + text(3, 10), text(1, 11) + [(8, 8)] + text(2, 12)], "right"),
}


def case_inputs(name):
    rows, side = CASES[name]
    return make_batch(rows, side)


# -----------------------------------------------------------------------------
# Reference: a random transformers model (one per tie setting), its nested checkpoint, and ours
# loaded from it and re-saved in the flat layout.


@torch.no_grad()
def randomize(model, seed):
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        scale = 0.5 if p.dim() == 1 else 0.2
        p.copy_(torch.randn_like(p) * scale + (1.0 if ("norm" in name or "ln_q" in name) else 0.0))


def hf_forward(hf, input_ids, mask, pixel_values, grid_thw):
    kw = {}
    if pixel_values is not None:
        kw = dict(pixel_values=pixel_values, image_grid_thw=grid_thw,
                  mm_token_type_ids=(input_ids == IMG).int())
    with torch.no_grad():
        return hf(input_ids=input_ids, attention_mask=mask, use_cache=False, **kw).logits


def ours_forward(model, input_ids, mask, pixel_values, grid_thw, **kw):
    with torch.no_grad():
        return model(input_ids, mask, pixel_values, grid_thw, **kw)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def ref(request, tmp_path_factory):
    tie = request.param
    root = tmp_path_factory.mktemp("tied" if tie else "untied")
    cfg = tiny_config(tie)
    init = root / "init"
    init.mkdir()
    (init / "config.json").write_text(json.dumps(M.config_to_dict(cfg)))
    hf = Qwen2_5_VLForConditionalGeneration._from_config(
        AutoConfig.from_pretrained(init), attn_implementation="sdpa", dtype=torch.float32)
    randomize(hf, seed=0)
    hf.eval()
    head, emb = hf.lm_head.weight, hf.model.language_model.embed_tokens.weight
    assert (head.data_ptr() == emb.data_ptr()) == tie
    hf_dir, flat_dir = str(root / "hf"), str(root / "flat")
    hf.save_pretrained(hf_dir)
    nested = M.load_model(hf_dir)
    M.save_model(nested, flat_dir)
    flat = M.load_model(flat_dir)
    logits = {}

    def hf_logits(name):  # transformers' logits per case, computed once
        if name not in logits:
            logits[name] = hf_forward(hf, *case_inputs(name))
        return logits[name]

    return SimpleNamespace(tie=tie, cfg=cfg, hf=hf, hf_dir=hf_dir, flat_dir=flat_dir, root=root,
                           nested=nested, flat=flat, hf_logits=hf_logits)


# -----------------------------------------------------------------------------
# Logits


@pytest.mark.parametrize("form", ["nested", "flat"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(ref, case, form):
    ids, mask, pv, grid = case_inputs(case)
    out = ours_forward(getattr(ref, form), ids, mask, pv, grid)
    expected = ref.hf_logits(case)
    assert out.shape == expected.shape
    assert rel_err(out, expected, mask) <= TOL


def test_config_forms(ref):
    """The two checkpoints really are in the two layouts (so the form tests are not vacuous)."""
    with open(os.path.join(ref.hf_dir, "config.json")) as f:
        nested = json.load(f)
    assert "text_config" in nested and "hidden_size" not in nested
    assert "rope_parameters" in nested["text_config"] and "rope_scaling" not in nested["text_config"]
    assert nested["text_config"]["rope_parameters"]["mrope_section"] == [2, 3, 3]
    assert "in_channels" in nested["vision_config"]
    with open(os.path.join(ref.flat_dir, "config.json")) as f:
        flat = json.load(f)
    assert "text_config" not in flat and "rope_parameters" not in flat
    assert flat["hidden_size"] == 64 and flat["num_hidden_layers"] == 2 and flat["vocab_size"] == 300
    assert flat["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert flat["vision_config"]["in_chans"] == 3 and "in_channels" not in flat["vision_config"]
    assert flat["tie_word_embeddings"] is ref.tie
    # both parse to the config we started from
    assert M.load_config(ref.hf_dir) == ref.cfg
    assert M.load_config(ref.flat_dir) == ref.cfg
    # tied: the head is the embedding, and not stored twice by save_model
    assert (ref.flat.lm_head.weight is ref.flat.model.embed_tokens.weight) == ref.tie
    assert ("lm_head.weight" in load_file(os.path.join(ref.flat_dir, "model.safetensors"))) != ref.tie


def test_config_in_channels_forms(ref):
    """A transformers-5 config written from scratch has only `in_channels`; the flat one `in_chans`."""
    with open(os.path.join(ref.hf_dir, "config.json")) as f:
        d = json.load(f)
    d["vision_config"].pop("in_chans", None)
    d["vision_config"]["in_channels"] = 1
    assert M.config_from_dict(d).vision.in_channels == 1
    flat = M.config_to_dict(ref.cfg)
    flat["vision_config"]["in_chans"] = 1
    assert M.config_from_dict(flat).vision.in_channels == 1


def test_text_left_padding_matches_unpadded(ref):
    """transformers ignores the mask for text-only positions, so check left padding against
    each row run alone (which test_logits_match_transformers checks against transformers)."""
    rows = [text(13, 2), text(7, 3)]
    ids, mask, _, _ = make_batch(rows, "left")
    out = ours_forward(ref.nested, ids, mask, None, None)
    for b, r in enumerate(rows):
        alone = ours_forward(ref.nested, torch.tensor([r]), None, None, None)[0]
        assert rel_err(out[b, -len(r):], alone) <= TOL


def test_window_attention_matters(ref):
    """308x196 px has several (partial) windows, and treating every block as full attention
    changes the logits, so the agreement above does exercise window attention."""
    window = 112 // 14 // MERGE
    *_, win = M.vision_layout(torch.tensor([[1, 22, 14]]), MERGE, window)
    counts = torch.bincount(win)
    assert len(counts) == 6                      # ceil(11/4) * ceil(7/4) merged-token windows
    assert counts.max() == 64 and counts.min() < 64   # edge windows are partial
    ids, mask, pv, grid = case_inputs("batch_left_padded")
    full = copy.deepcopy(ref.nested)
    full.config.vision.fullatt_block_indexes = [0, 1, 2]
    assert full.visual.config.fullatt_block_indexes == [0, 1, 2]
    assert ref.nested.visual.config.fullatt_block_indexes == [1]
    out = ours_forward(full, ids, mask, pv, grid)
    assert rel_err(out, ref.hf_logits("batch_left_padded"), mask) > 1e-3


# -----------------------------------------------------------------------------
# Checkpoints across implementations


def hf_load(path):
    hf, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return hf.eval()


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_save_model_loads_in_transformers(ref, tmp_path, sharded):
    path = str(tmp_path / "ckpt")
    M.save_model(ref.nested, path, **({"max_shard_bytes": 50_000} if sharded else {}))
    files = sorted(os.listdir(path))
    shards = [f for f in files if f.endswith(".safetensors")]
    if sharded:
        assert M.SAFETENSORS_INDEX in files and len(shards) > 2
        with open(os.path.join(path, M.SAFETENSORS_INDEX)) as f:
            assert set(json.load(f)["weight_map"].values()) == set(shards)
    else:
        assert shards == ["model.safetensors"] and M.SAFETENSORS_INDEX not in files
    case = "batch_left_padded"
    ids, mask, pv, grid = case_inputs(case)
    expected = ref.hf_logits(case)
    assert rel_err(hf_forward(hf_load(path), ids, mask, pv, grid), expected, mask) <= TOL
    assert rel_err(ours_forward(M.load_model(path), ids, mask, pv, grid), expected, mask) <= TOL


def test_transformers_sharded_checkpoint_loads(ref, tmp_path):
    path = str(tmp_path / "hf_sharded")
    ref.hf.save_pretrained(path, max_shard_size="20KB")
    files = os.listdir(path)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert M.SAFETENSORS_INDEX in files and len(shards) > 2 and "model.safetensors" not in files
    case = "two_images_one_row"
    ids, mask, pv, grid = case_inputs(case)
    out = ours_forward(M.load_model(path), ids, mask, pv, grid)
    assert rel_err(out, ref.hf_logits(case), mask) <= TOL


def test_load_bfloat16(ref):
    model = M.load_model(ref.flat_dir, dtype=torch.bfloat16)
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not any(p.is_meta for p in list(model.parameters()) + list(model.buffers()))
    ids, mask, pv, grid = case_inputs("one_image")
    out = ours_forward(model, ids, mask, pv.bfloat16(), grid)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref.hf_logits("one_image"), mask) < 0.1


# -----------------------------------------------------------------------------
# Strict loading: errors name what is wrong


@pytest.fixture
def ckpt(ref, tmp_path):
    """A writable copy of the flat single-file checkpoint."""
    path = tmp_path / "ckpt"
    shutil.copytree(ref.flat_dir, path)
    return path


def edit_weights(path, fn):
    f = str(path / "model.safetensors")
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def edit_config(path, fn):
    f = path / "config.json"
    d = json.loads(f.read_text())
    fn(d)
    f.write_text(json.dumps(d))


def test_missing_key(ckpt):
    key = "model.layers.1.mlp.up_proj.weight"
    edit_weights(ckpt, lambda sd: sd.pop(key))
    with pytest.raises(KeyError, match=key):
        M.load_model(str(ckpt))


def test_missing_key_sharded(ref, tmp_path):
    path = tmp_path / "sharded"
    M.save_model(ref.nested, str(path), max_shard_bytes=50_000)
    key = "visual.merger.mlp.2.bias"
    index = json.loads((path / M.SAFETENSORS_INDEX).read_text())
    f = str(path / index["weight_map"][key])
    sd = load_file(f)
    del sd[key]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(KeyError, match=key):
        M.load_model(str(path))


def test_unexpected_key(ckpt):
    key = "model.layers.7.self_attn.q_proj.weight"
    edit_weights(ckpt, lambda sd: sd.__setitem__(key, torch.zeros(64, 64)))
    with pytest.raises(KeyError, match=key):
        M.load_model(str(ckpt))


def test_wrong_shape(ckpt):
    key = "visual.blocks.0.attn.qkv.bias"
    edit_weights(ckpt, lambda sd: sd.__setitem__(key, torch.zeros(95)))
    with pytest.raises(ValueError, match=key):
        M.load_model(str(ckpt))


def test_unknown_model_type(ckpt):
    edit_config(ckpt, lambda d: d.__setitem__("model_type", "llama_foo"))
    with pytest.raises(ValueError, match="llama_foo"):
        M.load_model(str(ckpt))


@pytest.mark.parametrize("form,field,drop", [
    ("flat", "hidden_size", lambda d: d.pop("hidden_size")),
    ("flat", "num_hidden_layers", lambda d: d.pop("num_hidden_layers")),
    ("flat", "mrope_section", lambda d: d.pop("rope_scaling")),
    ("flat", "vision_config", lambda d: d.pop("vision_config")),
    ("flat", "depth", lambda d: d["vision_config"].pop("depth")),
    ("nested", "vocab_size", lambda d: d["text_config"].pop("vocab_size")),
    ("nested", "out_hidden_size", lambda d: d["vision_config"].pop("out_hidden_size")),
])
def test_missing_config_field(ref, tmp_path, form, field, drop):
    src = ref.flat_dir if form == "flat" else ref.hf_dir
    path = tmp_path / "ckpt"
    path.mkdir()
    shutil.copy(os.path.join(src, "config.json"), path / "config.json")
    edit_config(path, drop)
    with pytest.raises(ValueError, match=field):
        M.load_config(str(path))


def test_no_config_or_weights(tmp_path, ckpt):
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.load_model(str(tmp_path))
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        M.load_model(str(ckpt))


# -----------------------------------------------------------------------------
# M-RoPE positions


@pytest.mark.parametrize("case", ["batch_left_padded", "batch_right_padded", "two_images_one_row"])
def test_rope_index_matches_transformers(ref, case):
    ids, mask, pv, grid = case_inputs(case)
    pos, next_pos = ref.nested.rope_index(ids, grid, mask)
    exp, deltas = ref.hf.model.get_rope_index(ids, (ids == IMG).int(), image_grid_thw=grid,
                                              attention_mask=mask)
    m = mask.bool()
    assert pos.shape == exp.shape == (3,) + ids.shape
    assert torch.equal(pos[:, m], exp[:, m])
    for b in range(ids.shape[0]):
        assert next_pos[b] == pos[:, b, m[b]].max() + 1
        assert next_pos[b] == deltas[b, 0] + m[b].sum()   # transformers: delta = next - length
    # image tokens really do run off the sequence index (else the test would be weak)
    assert (pos[1] != pos[2])[m].any()


# -----------------------------------------------------------------------------
# KV cache


def decode_inputs():
    """Left-padded batch of 2 rows with images; the last `n_tail` columns are text in both rows."""
    rows = [text(2, 20) + [(22, 14)] + text(6, 21), text(1, 22) + [(8, 8)] + text(3, 23) + [(4, 6)] + text(5, 24)]
    ids, mask, pv, grid = make_batch(rows, "left")
    return ids, mask, pv, grid, 5


def prefill(model, ids, mask, pv, grid, extra):
    cache = model.new_cache(ids.shape[0], ids.shape[1] + extra)
    pos, next_pos = model.rope_index(ids, grid, mask)
    logits = ours_forward(model, ids, mask, pv, grid, position_ids=pos, cache=cache)
    assert cache.len == ids.shape[1]
    return cache, logits, next_pos


def step_positions(next_pos, offset, T=1):
    p = next_pos[:, None] + offset + torch.arange(T)[None, :]  # (B, T)
    return p[None].expand(3, -1, -1)


@pytest.mark.parametrize("chunk", [1, 2])
def test_kv_cache_decoding_matches_full_forward(ref, chunk):
    model = ref.nested
    ids, mask, pv, grid, n_tail = decode_inputs()
    B, T = ids.shape
    full = ours_forward(model, ids, mask, pv, grid)
    assert rel_err(full, hf_forward(ref.hf, ids, mask, pv, grid), mask) <= TOL
    P = T - n_tail
    assert (ids[:, P:] < 280).all() and mask[:, P:].all()
    cache, logits, next_pos = prefill(model, ids[:, :P], mask[:, :P], pv, grid, extra=n_tail)
    assert rel_err(logits, full[:, :P], mask[:, :P]) <= TOL
    for s in range(0, n_tail, chunk):
        tok = ids[:, P + s:P + s + chunk]
        n = tok.shape[1]
        out = ours_forward(model, tok, torch.ones(B, n, dtype=torch.long), None, None,
                           position_ids=step_positions(next_pos, s, n), cache=cache)
        assert cache.len == P + s + n
        assert rel_err(out, full[:, P + s:P + s + n]) <= TOL, f"step {s}"
    assert cache.len == T


def test_kv_cache_overflow_and_positions_required(ref):
    model = ref.nested
    ids, mask, pv, grid, n_tail = decode_inputs()
    cache, _, next_pos = prefill(model, ids, mask, pv, grid, extra=1)
    with pytest.raises(ValueError, match="position_ids"):
        ours_forward(model, ids[:, -1:], torch.ones(2, 1, dtype=torch.long), None, None, cache=cache)
    with pytest.raises(ValueError, match="overflow"):
        ours_forward(model, ids[:, -2:], torch.ones(2, 2, dtype=torch.long), None, None,
                     position_ids=step_positions(next_pos, 0, 2), cache=cache)


def test_kv_cache_select_rows(ref):
    model = ref.nested
    ids, mask, pv, grid, _ = decode_inputs()
    B, T = ids.shape
    tokens = torch.tensor([[7], [123]])
    # reference: the full forward with the new token appended
    full = ours_forward(model, torch.cat([ids, tokens], 1), torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1),
                        pv, grid)[:, -1]
    cache, _, next_pos = prefill(model, ids, mask, pv, grid, extra=3)
    index = torch.tensor([0, 0, 1, 1])
    big = cache.select_rows(index)
    assert big.len == cache.len and big.max_len == cache.max_len
    assert big.valid.shape == (4, cache.max_len) and torch.equal(big.valid, cache.valid[index])
    one = torch.ones(4, 1, dtype=torch.long)
    out = ours_forward(model, tokens[index], one, None, None,
                       position_ids=step_positions(next_pos[index], 0), cache=big)[:, -1]
    assert rel_err(out[0], out[1]) <= TOL and rel_err(out[2], out[3]) <= TOL
    assert rel_err(out, full[index]) <= TOL
    assert big.len == T + 1 and cache.len == T
    # rows diverge: different tokens in copies of the same prompt, next step still consistent
    tok2 = torch.tensor([[5], [6], [5], [9]])
    out2 = ours_forward(model, tok2, one, None, None, position_ids=step_positions(next_pos[index], 1), cache=big)[:, -1]
    assert rel_err(out2[0], out2[2]) > 1e-3      # different prompts
    assert not torch.allclose(out2[0], out2[1])  # different tokens
    # the original cache is untouched by decoding in the copy
    out_orig = ours_forward(model, tokens, torch.ones(B, 1, dtype=torch.long), None, None,
                            position_ids=step_positions(next_pos, 0), cache=cache)[:, -1]
    assert rel_err(out_orig, full) <= TOL
    # keep_rows: the same rows as select_rows, in place (rows 3 and 0 of the copy: prompts 1 and 0)
    kept = big.select_rows(torch.tensor([3, 0]))
    assert big.keep_rows(torch.tensor([3, 0])) is big and big.valid.shape == (2, cache.max_len)
    assert all(torch.equal(a, b) for a, b in zip(big.k + big.v + [big.valid], kept.k + kept.v + [kept.valid]))
    assert big.shape[0] == 2 and big.len == T + 2


# -----------------------------------------------------------------------------
# Text-only qwen2 checkpoints (e.g. DeepSeek-R1-Distill-Qwen) load into the same model


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_qwen2_text_only_matches_transformers(tmp_path, tie):
    from transformers import Qwen2ForCausalLM
    cfg = tiny_config(tie)
    cfg.vision, cfg.mrope_section, cfg.model_type = None, None, "qwen2"
    init = tmp_path / "init"
    init.mkdir()
    d = M.config_to_dict(cfg)
    assert d["model_type"] == "qwen2" and "vision_config" not in d and "rope_scaling" not in d
    (init / "config.json").write_text(json.dumps(d))
    hf = Qwen2ForCausalLM._from_config(AutoConfig.from_pretrained(init), attn_implementation="sdpa",
                                       dtype=torch.float32)
    randomize(hf, seed=1)
    hf.eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = M.load_model(str(tmp_path / "hf"))
    assert not hasattr(ours, "visual") and ours.config.model_type == "qwen2"
    ids, mask, _, _ = make_batch([text(13, 2), text(7, 3)], "right")
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert rel_err(ours_forward(ours, ids, mask, None, None), expected, mask) <= TOL
    M.save_model(ours, str(tmp_path / "ours"))
    hf2, info = Qwen2ForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32,
                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        out = hf2.eval()(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert rel_err(out, expected, mask) <= TOL


# -----------------------------------------------------------------------------
# Other paths of the same forward


def test_window_order_groups(ref):
    """attention_groups: a permutation in which every window (and every frame) is one contiguous
    group of its size, each 2x2 merge unit stays 4 consecutive rows, and runs of equal-size
    groups are batched into one segment."""
    grid = torch.tensor([[1, 22, 14], [2, 8, 12], [1, 8, 8], [1, 6, 10]])
    hpos, wpos, frame, win = M.vision_layout(grid, MERGE, 112 // 14 // MERGE)
    order, win_segs, full_segs = M.attention_groups(frame, win)
    N = len(frame)
    assert sorted(order.tolist()) == list(range(N))
    assert (order.view(-1, 4) == order.view(-1, 4)[:, :1] + torch.arange(4)).all()  # merge units
    for segs, key in ((win_segs, win), (full_segs, frame)):
        assert segs[0][0] == 0 and segs[-1][1] == N
        assert all(a[1] == b[0] and a[2] != b[2] for a, b in zip(segs, segs[1:]))  # merged runs
        for s, e, n in segs:
            g = key[order[s:e]].view(-1, n)
            assert (g == g[:, :1]).all()                      # one window / frame per group
            assert len(set(g[:, 0].tolist())) == g.shape[0]   # and a whole one
            assert (torch.bincount(key)[g[:, 0]] == n).all()
    assert [n for *_, n in full_segs] == [308, 96, 64, 60]    # frames of equal size batched
    # the (22, 14) image = 11x7 merged: windows of 4x4 (2 of them), 4x3, 4x3 and 3x4, 3x3, largest first
    assert [((e - s) // n, n) for s, e, n in win_segs][:3] == [(2, 64), (3, 48), (1, 36)]


def test_vision_tower_matches_transformers_on_mixed_sizes(ref):
    """The vision tower alone, several sizes batched (full and partial windows, a 2-frame
    video grid), against transformers' visual, and each image alone against its batched rows."""
    grid = torch.tensor([[1, 22, 14], [2, 8, 12], [1, 8, 8], [1, 6, 10]])
    pv = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = ref.nested.visual(pv, grid)
        hf = ref.hf.model.visual(pv, grid_thw=grid)
        hf = getattr(hf, "pooler_output", hf)
        assert ours.shape == hf.shape
        assert rel_err(ours, hf) <= TOL
        s = t = 0
        for g in grid:
            n = int(g.prod())
            alone = ref.nested.visual(pv[s:s + n], g[None])
            assert rel_err(alone, ours[t:t + n // 4]) <= TOL
            s, t = s + n, t + n // 4


def test_gradient_checkpointing_same_grads(ref):
    ids, mask, pv, grid = case_inputs("batch_left_padded")
    grads = []
    for ckpt in (False, True):
        model = copy.deepcopy(ref.nested).train()
        model.model.gradient_checkpointing = ckpt
        out = model(ids, mask, pv, grid)
        (out.float().pow(2) * mask[..., None]).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        if not ckpt:
            assert rel_err(out.detach(), ref.hf_logits("batch_left_padded"), mask) <= TOL
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert grads[0][n] is not None, n
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6), n


def test_cache_is_used_under_gradient_checkpointing(ref):
    """A model in training mode with checkpointing on still writes and reads its KV cache (GRPO
    samples from the policy between updates, and its update pass runs through a cache): prefill +
    one cached step equals the full forward."""
    model = copy.deepcopy(ref.nested).train()
    model.model.gradient_checkpointing = True
    ids, mask, pv, grid, _ = decode_inputs()
    tokens = torch.tensor([[7], [123]])
    one = torch.ones(2, 1, dtype=torch.long)
    with torch.no_grad():
        full = ours_forward(model, torch.cat([ids, tokens], 1), torch.cat([mask, one], 1), pv, grid)[:, -1]
        cache, _, next_pos = prefill(model, ids, mask, pv, grid, extra=1)
        out = ours_forward(model, tokens, one, None, None, position_ids=step_positions(next_pos, 0), cache=cache)[:, -1]
    assert rel_err(out, full) <= TOL


def test_image_token_mismatch_errors(ref):
    ids, mask, pv, grid = case_inputs("one_image")
    bad = ids.clone()
    bad[0, bad[0].tolist().index(IMG)] = 5       # one <|image_pad|> too few
    with pytest.raises(ValueError, match="image"):
        ours_forward(ref.nested, bad, mask, pv, grid)
    with pytest.raises(ValueError, match="image_grid_thw"):   # two images' tokens, one grid
        ref.nested.rope_index(torch.cat([ids, ids], 1), grid, None)
