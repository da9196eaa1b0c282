"""data.py: image preprocessing against transformers' PIL Qwen2-VL processor, the chat prompt,
token ids, SFT labels, collation, file errors, tokenizer save/load."""

import numpy as np
import pytest
import torch
from PIL import Image

import data

QUESTION = "How many red shapes are there?"
ANSWER = "<think> red 2 green 1 </think> two <answer>2</answer>"


@pytest.fixture(scope="module")
def tok():
    return data.build_tiny_tokenizer()


def rand_image(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)


def hf_processor(**kw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(**kw)


# -----------------------------------------------------------------------------
# images


@pytest.mark.parametrize("h,w,max_pixels,mode", [
    (20, 30, None, "RGB"),  # tiny: scaled up to min_pixels
    (123, 457, None, "RGB"),  # odd sides
    (30, 800, None, "RGB"),  # wide
    (2000, 1500, None, "RGB"),  # large: clamped to the default max_pixels
    (2000, 1500, 512 * 512, "RGB"),  # custom max_pixels (OpenVLThinker's)
    (50, 70, None, "RGBA"),  # alpha composited onto white
    (50, 70, None, "L"),  # grayscale
])
def test_process_image_matches_hf(h, w, max_pixels, mode):
    image = rand_image(h, w, mode)
    kw = {} if max_pixels is None else dict(max_pixels=max_pixels)
    ref = hf_processor(**kw)(images=[image], return_tensors="pt")
    pv, grid = data.process_image(image, **kw)
    assert pv.dtype == torch.float32 and grid.dtype == torch.long
    assert grid.tolist() == ref["image_grid_thw"][0].tolist()
    assert pv.shape == ref["pixel_values"].shape == (int(grid.prod()), 1176)
    assert (pv - ref["pixel_values"]).abs().max().item() <= 1e-5


def test_process_images_matches_hf():
    images = [rand_image(40, 90, seed=1), rand_image(300, 200, seed=2)]
    ref = hf_processor()(images=images, return_tensors="pt")
    pv, grids = data.process_images(images)
    assert grids.shape == (2, 3) and torch.equal(grids, ref["image_grid_thw"])
    assert (pv - ref["pixel_values"]).abs().max().item() <= 1e-5


def test_smart_resize():
    ref = hf_processor()
    assert (data.MIN_PIXELS, data.MAX_PIXELS) == (ref.size.shortest_edge, ref.size.longest_edge)
    for h, w in [(20, 30), (123, 457), (2000, 1500), (28, 5000), (10000, 10000)]:
        rh, rw = data.smart_resize(h, w)
        assert rh % 28 == 0 and rw % 28 == 0 and data.MIN_PIXELS <= rh * rw <= data.MAX_PIXELS
    assert data.smart_resize(2000, 1500, max_pixels=512 * 512) == (588, 420)
    with pytest.raises(ValueError, match="aspect ratio"):
        data.smart_resize(10, 2100)


def test_image_file_errors(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        data.load_image(missing)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="garbage.png"):
        data.load_image(garbage)
    good = tmp_path / "good.png"
    rand_image(64, 64, "RGBA").save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        data.load_image(truncated)
    image = data.load_image(good)
    assert image.mode == "RGB" and image.size == (64, 64)
    pv, grid = data.process_image(str(good))  # paths are accepted too
    assert grid.tolist() == [1, 4, 4] and pv.shape == (16, 1176)

# -----------------------------------------------------------------------------
# tokenizer and prompts


def test_special_ids(tok):
    ids = {t: tok.convert_tokens_to_ids(t) for t in data.SPECIAL_TOKENS + data.REASONING_TOKENS}
    assert list(ids.values()) == list(range(256, 256 + 18))
    assert data.special_ids(tok) == dict(image_pad=268, video_pad=269, vision_start=265,
                                         vision_end=266, im_start=257, im_end=258, endoftext=256)
    assert tok.eos_token_id == 258 and tok.pad_token_id == 256
    assert tok("<think>x</think>", add_special_tokens=False)["input_ids"] == [270, 120, 271]
    # the merged tokens follow, one id each, up to the vocabulary's end
    assert sorted(tok.get_vocab().values()) == list(range(len(tok)))


def test_learn_merges_by_hand():
    # pairs in "ab abc bc": ab 2, bc 2 -> "ab" (tie, first in order); then "ab abc bc" has
    # (ab, c) 1, (b, c) 1 -> (ab, c) first in order; "bc" still needs (b, c)
    assert data.learn_merges(["ab", "abc", "bc"]) == [("a", "b"), ("ab", "c"), ("b", "c")]
    assert data.learn_merges(["a", ""]) == []


def test_tiny_words_are_one_token(tok):
    for word in data.TINY_WORDS:
        for text in (word, " " + word):
            assert len(tok(text, add_special_tokens=False)["input_ids"]) == 1, text
    # digits stay single characters, so numbers are read digit by digit; words outside the list
    # (and a listed word's prefix) still encode; everything decodes back to the text
    text = "<think>red 12 blue 3. 12+3=15 reddish zebra</think> The red count is 15."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[:6] == ["<think>", "red", "Ġ", "1", "2", "Ġblue"]
    assert tok.decode(ids) == text


def test_prompt_text_and_ids(tok):
    text = data.prompt_text(tok, QUESTION)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>" + QUESTION + "<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [
        "<|im_start|>", "system", "Ċ", "You", "Ġare", "Ġ", "a", "Ġhelpful", "Ġassistant", ".",
        "<|im_end|>", "Ċ", "<|im_start|>", "user", "Ċ", "<|vision_start|>", "<|image_pad|>",
        "<|vision_end|>", "How", "Ġmany", "Ġred", "Ġshapes", "Ġare",
        "Ġthe", "re", "?", "<|im_end|>",  # "there" is not a listed word: BPE pieces
        "Ċ", "<|im_start|>", "assistant", "Ċ"]
    # a system message replaces the default one; no image -> no vision tokens
    text = data.prompt_text(tok, "hi", n_images=0, system="Be brief.")
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                   "<|im_start|>assistant\n"


def test_expand_image_tokens():
    text = "a<|image_pad|>b<|image_pad|>c"
    out = data.expand_image_tokens(text, torch.tensor([[1, 4, 6], [1, 2, 2]]))
    assert out == "a" + "<|image_pad|>" * 6 + "b<|image_pad|>c"
    with pytest.raises(ValueError, match="placeholders"):
        data.expand_image_tokens(text, [[1, 4, 4]])


def test_encode_prompt(tok):
    enc = data.encode_prompt(tok, QUESTION, [rand_image(20, 30), rand_image(60, 60, seed=3)])
    ids = enc["input_ids"]
    assert ids.dtype == torch.long and ids.dim() == 1
    assert enc["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 4]]
    assert (ids == 268).sum().item() == (24 + 16) // 4 and (ids == 265).sum().item() == 2
    assert enc["pixel_values"].shape == (24 + 16, 1176)
    assert tok.decode(ids[-3:]) == "<|im_start|>assistant\n"


def test_encode_sft_labels(tok):
    image = rand_image(56, 84)
    enc = data.encode_sft(tok, QUESTION, ANSWER, [image])
    ids, labels = enc["input_ids"], enc["labels"]
    prompt = data.encode_prompt(tok, QUESTION, [image])["input_ids"]
    reply = tok(ANSWER, add_special_tokens=False)["input_ids"] + [258]
    assert ids.tolist() == prompt.tolist() + reply
    assert (labels[: len(prompt)] == -100).all() and labels[len(prompt):].tolist() == reply
    # the same ids as tokenizing the whole templated conversation (less its final "\n")
    messages = data.build_messages(QUESTION) + [{"role": "assistant", "content": ANSWER}]
    full = tok.apply_chat_template(messages, tokenize=False)
    full_ids = tok(data.expand_image_tokens(full, enc["image_grid_thw"]),
                   add_special_tokens=False)["input_ids"]
    assert full.endswith(ANSWER + "<|im_end|>\n") and full_ids == ids.tolist() + [ord("\n")]


def test_collate(tok):
    a = data.encode_sft(tok, "q", "a b c d", [rand_image(28, 28, seed=1)])
    b = data.encode_sft(tok, "a longer question", "x", [rand_image(60, 90, seed=2)])
    la, lb = len(a["input_ids"]), len(b["input_ids"])
    pad = tok.eos_token_id  # pad == EOS: masks must still come from lengths
    for side in ("right", "left"):
        batch = data.collate([a, b], pad_id=pad, padding_side=side)
        T = max(la, lb)
        assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape
        assert batch["input_ids"].shape == (2, T)
        assert batch["attention_mask"].sum(1).tolist() == [la, lb]
        for row, item, n in ((0, a, la), (1, b, lb)):
            sl = slice(0, n) if side == "right" else slice(T - n, T)
            pad_sl = slice(n, T) if side == "right" else slice(0, T - n)
            assert (batch["attention_mask"][row, sl] == 1).all()
            assert torch.equal(batch["input_ids"][row, sl], item["input_ids"])
            assert torch.equal(batch["labels"][row, sl], item["labels"])
            assert (batch["attention_mask"][row, pad_sl] == 0).all()
            assert (batch["labels"][row, pad_sl] == -100).all()
            assert (batch["input_ids"][row, pad_sl] == pad).all()
        assert torch.equal(batch["pixel_values"], torch.cat([a["pixel_values"], b["pixel_values"]]))
        assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6]]  # 28x28 -> 56x56
    prompts = data.collate([data.encode_prompt(tok, "q", [])], pad_id=pad, padding_side="left")
    assert "labels" not in prompts and prompts["pixel_values"] is None and prompts["image_grid_thw"] is None  # text only


def test_tokenizer_save_load_roundtrip(tok, tmp_path):
    data.save_tiny_tokenizer(tmp_path / "tok")
    loaded = data.load_tokenizer(tmp_path / "tok")  # AutoTokenizer.from_pretrained, offline
    text = data.prompt_text(loaded, QUESTION, n_images=2)
    assert text == data.prompt_text(tok, QUESTION, n_images=2)
    s = text + ANSWER + " é 数 \t<|im_end|>"
    ids = loaded(s, add_special_tokens=False)["input_ids"]
    assert ids == tok(s, add_special_tokens=False)["input_ids"]
    assert data.special_ids(loaded) == data.special_ids(tok)
    assert (loaded.eos_token, loaded.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert loaded.decode(ids) == s
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        data.load_tokenizer(tmp_path / "empty")
