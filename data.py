"""
Data for the whole pipeline, in two parts.

From records to tensors: everything between a (question, images, answer) record and the batch the
model eats. Images are smart-resized to multiples of 28, bicubic, rescaled, CLIP-normalized and
patchified in Qwen2-VL's order, written by hand: pixel_values equal (to 1e-5) those of
transformers' Qwen2VLImageProcessorPil. Prompts follow the Qwen2.5-VL chat format, each
<|image_pad|> expanded to one token per merged 28x28 patch; SFT labels are -100 except the reply
and its <|im_end|>; batches are right or left padded, attention masks from lengths. Readers turn
our JSONL, MathVista, MathVerse, MathVision and ShareGPT files into one record form. The first SFT
set's filters turn R1 traces (sample.py --task reason) into the shortest correct trace per record,
over-long ones dropped, rambling reflections cut:

    python data.py traces --data reason.jsonl --out sft1.jsonl

The synthetic world: the embedded default dataset, four families of small visual problems drawn
with PIL, each with a short reasoning trace in the paper's shape, a caption, and the data of the
demo's actors (the base's captions and direct answers, the text reasoner's R1-style traces); the
tiny byte-level BPE tokenizer and the tiny Qwen2.5-VL-shaped model, saved in the layout of a real
checkpoint so one loading path serves both. sft.py, grpo.py and eval.py draw it in memory:

    python data.py synth --out data/train --n 1000 --level easy
    python data.py synth --out data/test --test
"""

import argparse
import collections
import contextlib
import functools
import json
import math
import os
import random
import re
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

# -----------------------------------------------------------------------------
# constants

PATCH_SIZE = 14  # vision patch side, pixels
TEMPORAL_PATCH_SIZE = 2  # a still image is repeated twice along time
MERGE_SIZE = 2  # 2x2 patches -> one LM token
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: image sides are multiples of this
# defaults of transformers' Qwen2VLImageProcessor(Pil) class: size={"shortest_edge": 56*56,
# "longest_edge": 28*28*1280}. Note: the official Qwen2.5-VL checkpoints' preprocessor_config.json
# override max_pixels with 12845056 (= 28*28*16384), and OpenVLThinker trains at 512*512 = 262144.
MIN_PIXELS = 56 * 56  # 3136
MAX_PIXELS = 28 * 28 * 1280  # 1003520
CKPT_MAX_PIXELS = 12845056  # what a Qwen2.5-VL checkpoint directory asks for
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176
IGNORE_INDEX = -100  # label of untrained positions

DEFAULT_SYSTEM = "You are a helpful assistant."
# the paper's RL / eval prompt: appended after the question (no system prompt beyond the template's)
R1_SUFFIX = ("You FIRST think about the reasoning process as an internal monologue and then provide "
             "the final answer.")
SUFFIXES = {"": "", "r1": R1_SUFFIX}  # --suffix names; any other value is used literally
# Qwen's special tokens, in Qwen's order (ids 151643.. in the real vocab, 256.. in the tiny one)
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
REASONING_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]  # normal added tokens
IMAGE_PAD = "<|image_pad|>"


# -----------------------------------------------------------------------------
# command-line errors: every script (data, sample, eval, sft, grpo) reports them the same way


class BadInput(ValueError):
    """A command-line error: a bad file, row, checkpoint or flag value. The scripts print it as
    one line and exit with status 2 (see `cli`); called from Python it is a ValueError."""


def cli(prog, main, argv=None):
    """Run a script's main(argv). A BadInput or a file system error (missing file, no permission)
    becomes one line on stderr, "prog: error: ...", and exit status 2, with no traceback: what
    went wrong is the user's input, not the code. Anything else propagates with its traceback."""
    try:
        return main(argv)
    except (BadInput, OSError) as e:
        print(f"{prog}: error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line ("prog: error: ...", exit status 2) like `cli`'s."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def at_least(low, kind=int, below=None):
    """An argparse type: a finite number >= low (and < below, if given). A nonsensical value
    (--steps -5, --batch-size 0, --lr nan) is refused before anything is loaded."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not math.isfinite(value) or value < low or (below is not None and value >= below):
            bound = f">= {low}" + (f" and < {below}" if below is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def positive(kind=int):
    """An argparse type: a finite number > 0 (ints: >= 1)."""
    if kind is int:
        return at_least(1)

    def parse(text):
        value = at_least(0.0, float)(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = "float"
    return parse


# -----------------------------------------------------------------------------
# images

MAX_ASPECT = 200  # Qwen's processor refuses images longer than 200:1 on a side


def load_image(path):
    """Open an image file, decode it fully and convert it to RGB. Missing file ->
    FileNotFoundError; unreadable, truncated, a decompression bomb (more pixels than PIL's
    Image.MAX_IMAGE_PIXELS) or longer than MAX_ASPECT:1 -> BadInput (a ValueError)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it; both are refused here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decode now, so a truncated file fails here and not later
                rgb = to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise BadInput(f"cannot read image {path}: {e}") from e
    w, h = rgb.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise BadInput(f"image {path} is {w}x{h}: an aspect ratio over {MAX_ASPECT}:1 (Qwen's processor refuses it)")
    return rgb


@functools.lru_cache(maxsize=65536)
def _checked_image(path, mtime_ns, size):
    """load_image once per version of a file (rows that share an image check it once)."""
    load_image(path)


def check_image(path):
    """Raise BadInput unless the image file can be used for training (see load_image)."""
    st = os.stat(path)
    _checked_image(path, st.st_mtime_ns, st.st_size)


def to_rgb(image):
    """RGB copy of a PIL image; transparency is composited onto white (as transformers does). A
    16-bit greyscale image is scaled to 8 bits (PIL's convert would clip it to black and white)."""
    if image.mode == "I" or image.mode.startswith("I;16"):  # "I": how some readers open 16-bit PNGs
        a = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.round(a / 257), 0, 255).astype(np.uint8), "L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def preprocessor_config(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """preprocessor_config.json of Qwen2.5-VL's image processor with this file's constants: what
    transformers' AutoImageProcessor reads from a checkpoint directory (process_image's numbers)."""
    return dict(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor",
                patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE,
                min_pixels=min_pixels, max_pixels=max_pixels,
                size={"shortest_edge": min_pixels, "longest_edge": max_pixels},  # transformers 5's form
                image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), do_resize=True,
                do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True)


def smart_resize(height, width, factor=FACTOR, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """(h, w) as multiples of `factor`, h*w within [min_pixels, max_pixels], aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {height}x{width}")
    h, w = round(height / factor) * factor, round(width / factor) * factor  # banker's round
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def process_image(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """PIL image (or path) -> pixel_values (grid_h*grid_w, 1176) float32, grid_thw (3,) long.

    Rows come in merge order: for each 2x2 block of patches (row-major over blocks), its four
    patches row-major; each row is (channel, time, 14, 14) flattened, matching a Conv3d weight.
    """
    if not isinstance(image, Image.Image):
        image = load_image(image)
    image = to_rgb(image)
    h, w = smart_resize(image.height, image.width, FACTOR, min_pixels, max_pixels)
    # resize on uint8 in PIL (always, even to the same size), like the PIL backend
    image = image.resize((w, h), resample=Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, h, w) uint8
    x = (x.double() * (1 / 255)).float()  # rescale in float64, then float32, like transformers
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(OPENAI_CLIP_STD, dtype=torch.float32)[:, None, None]
    x = (x - mean) / std
    gh, gw, m, p = h // PATCH_SIZE, w // PATCH_SIZE, MERGE_SIZE, PATCH_SIZE
    x = x.reshape(3, gh // m, m, p, gw // m, m, p)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    x = x.unsqueeze(5).expand(*x.shape[:5], TEMPORAL_PATCH_SIZE, p, p)  # (..., C, T, p, p)
    pixel_values = x.reshape(gh * gw, PATCH_DIM).contiguous()
    return pixel_values, torch.tensor([1, gh, gw], dtype=torch.long)


def process_images(images, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """List of images -> (pixel_values cat over images, image_grid_thw (N, 3))."""
    outs = [process_image(im, min_pixels, max_pixels) for im in images]
    if not outs:
        return torch.zeros(0, PATCH_DIM), torch.zeros(0, 3, dtype=torch.long)
    return torch.cat([pv for pv, _ in outs]), torch.stack([g for _, g in outs])

# -----------------------------------------------------------------------------
# tokenizer: a checkpoint directory's (tiny or real) and the ids a model config needs


def load_tokenizer(path):
    """Tokenizer (with chat template) from a checkpoint directory, tiny or real. Local only."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json")):
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json / vocab.json) in {path}")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except OSError:
        raise
    except Exception as e:  # the tokenizers library raises bare Exceptions on a malformed file
        raise BadInput(f"cannot load the tokenizer of {path}: {e}") from e


@contextlib.contextmanager
def checkpoint_errors(path):
    """Loading the checkpoint at `path`: a mismatch with its config, a malformed config.json or a
    corrupt safetensors file becomes a BadInput naming it (a missing file stays an OSError)."""
    from safetensors import SafetensorError
    try:
        yield
    except (KeyError, ValueError, SafetensorError) as e:
        if isinstance(e, BadInput):
            raise
        why = e.args[0] if isinstance(e, KeyError) and e.args else e  # a KeyError's str() is quoted
        raise BadInput(f"bad checkpoint {path}: {why}") from e


def open_model(path, dtype=torch.float32, device="cpu"):
    """model.load_model for the scripts, with checkpoint_errors."""
    import model as M
    with checkpoint_errors(path):
        return M.load_model(path, dtype=dtype, device=device)


def special_ids(tokenizer):
    """Ids of the tokens a model config needs, by short name; a missing token is an error."""
    names = dict(image_pad="<|image_pad|>", video_pad="<|video_pad|>",
                 vision_start="<|vision_start|>", vision_end="<|vision_end|>",
                 im_start="<|im_start|>", im_end="<|im_end|>", endoftext="<|endoftext|>")
    out = {}
    for k, t in names.items():
        i = tokenizer.convert_tokens_to_ids(t)
        if i is None or i == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(i) != t:
            raise KeyError(f"tokenizer has no token {t}")
        out[k] = i
    return out

# -----------------------------------------------------------------------------
# prompts and encodings


def build_messages(question, n_images=1, system=None):
    """One user turn: n_images image parts, then the question text (Qwen's usual order)."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def prompt_text(tokenizer, question, n_images=1, system=None):
    """The templated prompt, ending in '<|im_start|>assistant\\n'; one <|image_pad|> per image."""
    return tokenizer.apply_chat_template(build_messages(question, n_images, system),
                                         tokenize=False, add_generation_prompt=True)


def expand_image_tokens(text, grid_thws, merge_size=MERGE_SIZE):
    """Replace the k-th <|image_pad|> by t*h*w/merge_size^2 copies (one per LM image token)."""
    parts = text.split(IMAGE_PAD)
    if len(parts) - 1 != len(grid_thws):
        raise ValueError(f"{len(parts) - 1} {IMAGE_PAD} placeholders but {len(grid_thws)} images")
    out = [parts[0]]
    for g, part in zip(grid_thws, parts[1:]):
        t, h, w = (int(v) for v in g)
        out += [IMAGE_PAD * (t * h * w // merge_size ** 2), part]
    return "".join(out)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, question, images, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                  system=None):
    """Question + images (PIL or paths) -> dict(input_ids (T,), pixel_values, image_grid_thw)."""
    pixel_values, grid_thw = process_images(images, min_pixels, max_pixels)
    text = expand_image_tokens(prompt_text(tokenizer, question, len(images), system), grid_thw)
    return dict(input_ids=torch.tensor(_ids(tokenizer, text), dtype=torch.long),
                pixel_values=pixel_values, image_grid_thw=grid_thw)


def encode_sft(tokenizer, question, answer, images, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
               system=None):
    """Prompt + reply -> dict(input_ids, labels, pixel_values, image_grid_thw).

    input_ids = prompt ids + reply ids + <|im_end|> (the template's trailing "\\n" is dropped:
    nothing is learned from it); labels are IGNORE_INDEX on the prompt, the ids on the rest.
    The reply is tokenized on its own: exact for a byte-level vocab; with a merging BPE it equals
    the joint tokenization as long as the reply does not start with whitespace.
    """
    enc = encode_prompt(tokenizer, question, images, min_pixels, max_pixels, system)
    prompt = enc["input_ids"]
    reply = torch.tensor(_ids(tokenizer, answer) + [tokenizer.convert_tokens_to_ids("<|im_end|>")],
                         dtype=torch.long)
    enc["input_ids"] = torch.cat([prompt, reply])
    enc["labels"] = torch.cat([torch.full_like(prompt, IGNORE_INDEX), reply])
    return enc


def collate(items, pad_id, padding_side="right"):
    """Pad encodings into a batch. attention_mask comes from lengths, never from token ids.

    Returns input_ids, attention_mask (B, T) long, labels (B, T) padded with IGNORE_INDEX (when
    the items have labels), pixel_values (all rows' patches, row after row), image_grid_thw (cat).
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    B, T = len(items), max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    has_labels = "labels" in items[0]
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long) if has_labels else None
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        input_ids[b, sl] = it["input_ids"]
        attention_mask[b, sl] = 1
        if has_labels:
            labels[b, sl] = it["labels"]
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    if has_labels:
        batch["labels"] = labels
    pv = [it["pixel_values"] for it in items if it.get("pixel_values") is not None and len(it["pixel_values"])]
    batch["pixel_values"] = torch.cat(pv) if pv else None  # None: a text-only batch
    batch["image_grid_thw"] = torch.cat([it["image_grid_thw"].reshape(-1, 3) for it in items]) if pv else None
    return batch

# -----------------------------------------------------------------------------
# dataset readers: every source becomes one record form (a plain dict)
#
#   id        str
#   images    [absolute image paths], [] for text-only rows
#   question  str, the text shown to the model
#   choices_in_question  True when `question` already shows the options (MathVista's `query`;
#             MathVerse, whose questions embed them): format_question then adds none
#   answer    str (MathVista multiple choice: the option text; elsewhere: a letter "A".. or a value)
#   choices   [option texts for A, B, ...] or None
#   solution  a reasoning trace / worked solution, or None
#   meta      everything else the source has (question_type, answer_type, precision, unit,
#             family, level, subject, problem_version, the raw question, ...), for breakdowns
#   source    "file:line" (JSON files: "file:[key]" or "file:[index]")
#
# Image paths are taken relative to the data file's directory; every image is opened, decoded and
# converted when its row is read (once per file), so an image that would stop a run hours in stops
# it before it starts. A bad row (malformed JSON, missing key, wrong type, a missing or unreadable
# image, a Qwen special token typed in the text) raises BadInput("file:line: problem"), or is
# skipped and counted with skip_bad=True. A file with no usable row is an error either way.

READER_FORMATS = ("ours", "mathvista", "mathverse", "mathvision", "sharegpt")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
IMAGE_TAG = "<image>"  # LLaMA-Factory's image marker in ShareGPT text
# an option line: "A:x", "A. x", "(A) x"; and the same, several on one line
CHOICE_LINE = re.compile(r"\s*(?:\(([A-Z])\)|([A-Z])\s*[:：.．)])\s*(.*?)\s*$")
CHOICE_INLINE = re.compile(r"(?:\(([A-Z])\)|\b([A-Z])\s*[:：.．)])\s*")
CHOICES_MARK = re.compile(r"choices\s*:", re.IGNORECASE)


def _need(row, key, types, optional=False):
    """row[key] checked against types; a missing/null optional key gives None."""
    value = row.get(key)
    if value is None:
        if optional:
            return None
        raise ValueError(f"missing key {key!r}" if key not in row else f"key {key!r} is null")
    if not isinstance(value, types) or isinstance(value, bool):
        raise ValueError(f"key {key!r} has type {type(value).__name__}")
    return value


def _text(row, key, optional=False):
    """A string field; numbers (answers like 42 or 1.5) are turned into strings."""
    value = _need(row, key, (str, int, float), optional)
    return value if value is None or isinstance(value, str) else str(value)


def _str_list(row, key, optional=False):
    value = _need(row, key, list, optional)
    if value is not None and not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                     for v in value):
        raise ValueError(f"key {key!r} must be a list of strings")
    return value if value is None else [str(v) for v in value]


def _image_paths(paths, base_dir):
    """Absolute paths of the images, relative ones taken from base_dir; each must exist and
    decode (check_image)."""
    out = []
    for p in paths:
        full = os.path.normpath(os.path.join(base_dir, p))  # an absolute p is kept as is
        if not os.path.isfile(full):
            raise ValueError(f"image not found: {full}")
        check_image(full)
        out.append(full)
    return out


def _record(id, images, question, answer, choices=None, solution=None, meta=None,
            choices_in_question=False):
    return {"id": None if id is None else str(id), "images": images, "question": question,
            "choices_in_question": choices_in_question, "answer": answer,
            "choices": choices or None, "solution": solution, "meta": meta or {}, "source": None}


def _with_metadata(meta, metadata):
    """meta plus the source's nested `metadata` dict, flattened (the top-level keys win)."""
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"key 'metadata' has type {type(metadata).__name__}")
    return {**(metadata or {}), **meta}


def parse_choices(text):
    """Option texts from a question that lists them ("Choices:\\nA:x\\nB:y", "A. x", "(A) x"),
    or None. Looks after the last "Choices:" if there is one, else at the trailing lines."""
    marks = list(CHOICES_MARK.finditer(text))
    if marks:
        block = text[marks[-1].end():].strip()
        lines = [l for l in block.split("\n") if l.strip()]
        if len(lines) == 1:  # all on one line: "A:1 B:2 C:3"
            parts = CHOICE_INLINE.split(lines[0])
            if parts[0].strip() == "":
                letters = [a or b for a, b in zip(parts[1::3], parts[2::3])]
                texts = [t.strip() for t in parts[3::3]]
                return _in_order(letters, texts)
    else:
        lines = [l for l in text.split("\n") if l.strip()]
        n = 0
        while n < len(lines) and CHOICE_LINE.fullmatch(lines[-1 - n]):
            n += 1
        lines = lines[len(lines) - n:]
    letters, texts = [], []
    for line in lines:
        m = CHOICE_LINE.fullmatch(line)
        if m is None:
            break
        letters.append(m.group(1) or m.group(2))
        texts.append(m.group(3))
    return _in_order(letters, texts)


def _in_order(letters, texts):
    """The texts if the letters run A, B, C, ... (at least two), else None."""
    if len(letters) < 2 or "".join(letters) != LETTERS[:len(letters)]:
        return None
    return texts


# -----------------------------------------------------------------------------
# one reader per schema: row (a parsed JSON object) and the data file's directory -> record


def read_ours(row, base_dir):
    """Our JSONL (`python data.py synth` writes it): id, image or images, question, answer, choices?,
    solution?; any other key goes to meta (a `meta` dict is merged in, so records round-trip
    through write_jsonl; an old `source` is kept as meta["origin"])."""
    images = _str_list(row, "images", optional=True)
    if images is None:
        image = _text(row, "image", optional=True)
        images = [image] if image else []
    known = {"id", "image", "images", "question", "answer", "choices", "solution", "meta",
             "choices_in_question", "source"}
    meta = {k: v for k, v in row.items() if k not in known}
    meta.update(_need(row, "meta", dict, optional=True) or {})
    if row.get("source") is not None:
        meta.setdefault("origin", row["source"])
    return _record(_text(row, "id"), _image_paths(images, base_dir), _text(row, "question"),
                   _text(row, "answer"), _str_list(row, "choices", optional=True),
                   _text(row, "solution", optional=True), meta,
                   bool(row.get("choices_in_question", False)))


def read_mathvista(row, base_dir):
    """MathVista (testmini): the model sees `query` (hint + question + choices); multiple-choice
    answers are option texts; question_type, answer_type, precision, unit and the flattened
    `metadata` (category, context, grade, skills, source, task, ...) go to meta."""
    question = _text(row, "question")
    query = _text(row, "query", optional=True)
    meta = {"question": question, "question_type": _text(row, "question_type"),
            "answer_type": _text(row, "answer_type"),
            "precision": _need(row, "precision", (int, float), optional=True),
            "unit": _text(row, "unit", optional=True)}
    return _record(_text(row, "pid"), _image_paths([_text(row, "image")], base_dir),
                   query if query is not None else question, _text(row, "answer"),
                   _str_list(row, "choices", optional=True), None,
                   _with_metadata(meta, row.get("metadata")), query is not None)


def read_mathverse(row, base_dir):
    """MathVerse: the model sees `query_cot` (else `query_wo`, else `question`); multiple-choice
    answers are letters and the options, always written inside the question (or, for "Vision
    Only" rows, in the image), are parsed into choices when possible; image "" means text-only."""
    question = _text(row, "question")
    query = _text(row, "query_cot", optional=True) or _text(row, "query_wo", optional=True)
    question_type = _text(row, "question_type")
    choices = parse_choices(question) if question_type == "multi-choice" else None
    image = _text(row, "image", optional=True)
    meta = {"question": question, "question_type": question_type,
            "problem_index": _text(row, "problem_index", optional=True),
            "problem_version": _text(row, "problem_version", optional=True)}
    for k in ("question_for_eval", "query_wo"):
        if row.get(k) is not None:
            meta[k] = row[k]
    return _record(_text(row, "sample_index"), _image_paths([image] if image else [], base_dir),
                   query or question, _text(row, "answer"), choices, None,
                   _with_metadata(meta, row.get("metadata")), True)


def strip_image_tags(text, pattern=r"<image\d*>"):
    """The text without image placeholders, and without the blank space they leave."""
    text = re.sub(r"[ \t]*" + pattern + r"[ \t]*", " ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def read_mathvision(row, base_dir):
    """MathVision: `<image1>` placeholders are removed from the question, `options` (empty for
    free-form) become choices, multiple-choice answers are letters; level and subject go to meta
    with question_type "multi_choice" / "free_form" (MathVista's spelling)."""
    choices = _str_list(row, "options", optional=True) or None
    images = _str_list(row, "images", optional=True)
    if images is None:
        image = _text(row, "image", optional=True)
        images = [image] if image else []
    meta = {"question_type": "multi_choice" if choices else "free_form",
            "level": row.get("level"), "subject": _text(row, "subject", optional=True)}
    return _record(_text(row, "id"), _image_paths(images, base_dir),
                   strip_image_tags(_text(row, "question"), r"<image\d+>"), _text(row, "answer"),
                   choices, _text(row, "solution", optional=True), meta)


def last_answer_tag(text):
    """The text inside the last complete <answer>...</answer>, or ""."""
    start = text.rfind("<answer>")
    end = text.find("</answer>", start) if start >= 0 else -1
    return text[start + len("<answer>"):end].strip() if end >= 0 else ""


def read_sharegpt(row, base_dir):
    """LLaMA-Factory / ShareGPT SFT rows: {"messages": [{role, content}], "images": [...]} or
    {"conversations": [{from, value}]} with human/gpt. Turns: an optional system, one user, an
    optional assistant (a prompt-only row has solution None, answer ""). The `<image>` markers
    (as many as images) are removed from the question; the assistant text is the solution and
    the answer is its last <answer>...</answer>. Other keys go to meta; no id -> "file:line"."""
    key, role_key, text_key = (("messages", "role", "content") if "messages" in row
                               else ("conversations", "from", "value"))
    turns = _need(row, key, list)
    roles = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
             "gpt": "assistant"}
    texts = {}
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise ValueError(f"{key}[{i}] needs a string {text_key!r}")
        role = roles.get(turn.get(role_key))
        if role is None or role in texts:
            raise ValueError(f"{key}[{i}]: unexpected or repeated {role_key} "
                             f"{turn.get(role_key)!r}")
        texts[role] = turn[text_key]
    order = [r for r in ("system", "user", "assistant") if r in texts]
    if "user" not in texts or [roles[t[role_key]] for t in turns] != order:
        raise ValueError(f"{key} must be [system], user, [assistant]; got "
                         f"{[t[role_key] for t in turns]}")
    images = _str_list(row, "images", optional=True) or []
    n_tags = sum(t.count(IMAGE_TAG) for t in texts.values())
    if n_tags != len(images):
        raise ValueError(f"{n_tags} {IMAGE_TAG} markers but {len(images)} images")
    meta = {k: v for k, v in row.items() if k not in (key, "images", "id")}
    if "system" in texts:
        meta["system"] = texts["system"]
    solution = texts.get("assistant")
    return _record(_text(row, "id", optional=True), _image_paths(images, base_dir),
                   strip_image_tags(texts["user"], re.escape(IMAGE_TAG)),
                   last_answer_tag(solution) if solution is not None else "", None, solution, meta)


READERS = {"ours": read_ours, "mathvista": read_mathvista, "mathverse": read_mathverse,
           "mathvision": read_mathvision, "sharegpt": read_sharegpt}


def detect_format(row):
    """The schema of a row, from its keys."""
    if "messages" in row or "conversations" in row:
        return "sharegpt"
    if "pid" in row:
        return "mathvista"
    if "sample_index" in row or "problem_version" in row or "query_cot" in row:
        return "mathverse"
    if "options" in row and "subject" in row:
        return "mathvision"
    return "ours"


# -----------------------------------------------------------------------------
# files


def _rows(path):
    """Yield (where, row-or-error): JSONL line by line; a .json file whose top level is a dict
    of objects (MathVista's annotation, keyed by pid: most values are objects; one that is not
    is a bad row) or a list, entry by entry. A .json file that does not parse as one JSON
    value is read as JSONL."""
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError:
                data = None  # maybe JSONL named .json
        if isinstance(data, dict) and sum(isinstance(v, dict) for v in data.values()) * 2 > len(data):
            yield from ((f"{path}:[{k}]", v) for k, v in data.items())
            return
        if isinstance(data, list):
            yield from ((f"{path}:[{i}]", v) for i, v in enumerate(data))
            return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", ValueError(f"malformed JSON: {e}")


def check_text(record):
    """A Qwen special token typed in a question, option or solution would be read as the real
    token (an <|image_pad|> with no image behind it breaks the forward): a bad row."""
    texts = [record["question"], record["solution"] or "", *(record["choices"] or [])]
    for t in SPECIAL_TOKENS:
        if any(t in x for x in texts):
            raise ValueError(f"the text contains the special token {t}")


def load_records(path, fmt="auto", skip_bad=False):
    """Read a data file into records -> (records, n_bad). fmt: "auto" (from the first good row's
    keys) or one of READER_FORMATS. A bad row raises BadInput("file:line: problem") unless
    skip_bad, which skips and counts it. No usable row at all is a BadInput either way."""
    path = os.fspath(path)
    if fmt != "auto" and fmt not in READERS:
        raise BadInput(f"unknown format {fmt!r}; expected auto or one of {READER_FORMATS}")
    base_dir = os.path.dirname(os.path.abspath(path))
    records, n_bad = [], 0
    try:
        for where, row in _rows(path):
            try:
                if isinstance(row, ValueError):
                    raise row
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                if fmt == "auto":
                    fmt = detect_format(row)
                rec = READERS[fmt](row, base_dir)
                check_text(rec)
            except ValueError as e:
                if not skip_bad:
                    raise BadInput(f"{where}: {e}") from None
                n_bad += 1
                continue
            if rec["id"] is None:  # ShareGPT rows may have no id: name them by file and line
                rec["id"] = os.path.basename(where)
            rec["source"] = where
            records.append(rec)
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not UTF-8 text ({e})") from None
    if not records:
        raise BadInput(f"{path}: no usable rows" + (f" ({n_bad} bad rows skipped)" if n_bad else ""))
    return records, n_bad


def write_jsonl(path, rows):
    """Write rows (JSON-able dicts) one per line, atomically: a temp file, then os.replace."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def record_row(record, **fields):
    """A record as a JSONL row of our form, which read_ours reads back to the same record, with
    `fields` added (a read puts them in meta; they replace meta keys of the same name). Images
    must be paths (load_records gives absolute ones); the old source becomes meta["origin"]."""
    row = {k: record.get(k) for k in ("id", "images", "question", "choices_in_question", "answer",
                                      "choices", "solution")}
    row["meta"] = {k: v for k, v in (record.get("meta") or {}).items() if k not in fields}
    row["source"] = record.get("source")
    row.update(fields)
    return row


def format_question(record, suffix=None):
    """The prompt text: the question, then "Choices:\\nA. x\\nB. y" unless the question already
    shows them, then the optional suffix (e.g. the RL instruction) on a new line."""
    text = record["question"]
    if record.get("choices") and not record.get("choices_in_question"):
        text += "\nChoices:\n" + "\n".join(f"{LETTERS[i]}. {c}"
                                           for i, c in enumerate(record["choices"]))
    return text + "\n" + suffix if suffix else text


def prompt_length(tokenizer, question, images, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """len(encode_prompt(...)["input_ids"]) without processing any pixels: the text is tokenized
    and each image counts its merged tokens from its size (a file is opened for its header only)."""
    n = len(_ids(tokenizer, prompt_text(tokenizer, question, len(images))))
    n -= len(images)  # each <|image_pad|> placeholder is one token before expansion
    for im in images:
        if isinstance(im, Image.Image):
            w, h = im.size
        else:
            with Image.open(im) as f:
                w, h = f.size
        rh, rw = smart_resize(h, w, FACTOR, min_pixels, max_pixels)
        n += (rh // FACTOR) * (rw // FACTOR)
    return n


def within_budget(records, length, budget, skip_bad, flag):
    """-> (the records with length(record) <= budget tokens, how many were not). A record over
    the budget is a bad row: BadInput naming its file:line (and `flag`, the budget's option),
    or, with skip_bad, skipped and counted. None left is a BadInput either way."""
    kept = []
    for r in records:
        n = length(r)
        if n <= budget:
            kept.append(r)
        elif not skip_bad:
            raise BadInput(f"{r.get('source') or r.get('id')}: {n} tokens, over {flag} {budget} "
                           "(--skip-bad skips such rows)")
    if not kept:
        raise BadInput(f"no row fits in {flag} {budget} ({len(records)} rows over it)")
    return kept, len(records) - len(kept)

# -----------------------------------------------------------------------------
# R1 traces -> SFT records: the paper's filters for the first SFT set (`python data.py traces`)
#
# sample.py --task reason writes each record back with `traces`: k completions of a text-only
# R1 model, shaped like
#     <think> reasoning ... so the answer is 42. Wait, let me check ... </think> summary \boxed{42}
# A trace is dropped, in this order, when it ran out of budget (unfinished); has no </think>
# (no_think) or no final answer (no_answer: reward.extract_answer finds <answer>, else \boxed,
# else "the answer is"); has more than max_words words (too_long, counted on the raw completion:
# the paper drops long traces, then cuts); or its answer is wrong (wrong: reward.accuracy_reward
# on the rewritten trace). Rambling self-reflections are cut: the reasoning ends at the first
# marker ("Wait,", "But wait,", "But the question") that comes after the final answer first shows
# up in it, so what is kept reached the answer, and the answer itself (after </think>) stays.
# A marker before the answer is kept: that reflection may be what found it. Of a record's correct
# traces the shortest (in words) is kept (the rest: not_shortest), rewritten in our form
#     <think>reasoning</think> summary <answer>42</answer>
# with the summary the text after </think>, \boxed{} unwrapped.

MAX_TRACE_WORDS = 500
REFLECTION_MARKERS = ("Wait,", "But wait,", "But the question")
DROP_REASONS = ("unfinished", "no_think", "no_answer", "too_long", "wrong", "not_shortest")


def n_words(text):
    """Words in a trace, its tags not counted."""
    return len(re.sub(r"</?(?:think|answer)>", " ", text).split())


def split_think(text):
    """An R1 completion -> (reasoning, the text after the last </think>), both stripped, or None
    when there is no </think>. The opening <think> is optional (R1-Distill's prompt opens it)."""
    end = text.rfind("</think>")
    if end < 0:
        return None
    think = text[:end]
    start = think.find("<think>")
    if start >= 0:
        think = think[start + len("<think>"):]
    return think.strip(), text[end + len("</think>"):].strip()


def unbox(text, keep=True):
    """'so \\boxed{\\frac{1}{2}}.' -> 'so \\frac{1}{2}.' (nested braces kept; keep=False drops the
    content too); an unclosed \\boxed{ is left as it is."""
    out, i = [], 0
    while (j := text.find("\\boxed{", i)) >= 0:
        k, depth = j + len("\\boxed{"), 1
        while k < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            k += 1
        if depth:
            break
        out += [text[i:j], text[j + len("\\boxed{"):k - 1] if keep else ""]
        i = k
    return "".join(out) + text[i:]


def summary_text(rest):
    """The text after </think> as a summary: a line that is only a boxed answer ('$\\boxed{6}$',
    with the display-math lines around it) or a '**Final Answer**' heading is dropped (the answer
    goes in <answer>), other \\boxed{} unwrapped, blank runs squeezed."""
    lines, close = [], None  # close: the delimiter line to drop after a dropped boxed line
    rest = re.sub(r"</?answer>", "", re.sub(r"<answer>.*?</answer>", "", rest, flags=re.S))
    for line in rest.split("\n"):
        d = line.strip()
        if close is not None:
            close, skip = None, d == close
            if skip:
                continue
        if "\\boxed{" in line and not re.sub(r"[\s$.\\()\[\]]", "", unbox(line, keep=False)):
            last = lines[-1].strip() if lines else ""
            if last == "\\[" or last == "$$" and sum(l.strip() == "$$" for l in lines) % 2:  # an opener
                close = {"$$": "$$", "\\[": "\\]"}[lines.pop().strip()]
            continue
        if re.fullmatch(r"\W*final answer\W*", line, re.IGNORECASE):
            continue
        lines.append(unbox(line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def answer_forms(pred, record):
    """The strings that name the final answer in a trace: the prediction, the ground truth and,
    for multiple choice, the truth's letter and option text."""
    forms = {pred, record["answer"]}
    choices = record.get("choices") or []
    a = record["answer"].strip()
    if len(a) == 1 and a in LETTERS[:len(choices)]:
        forms.add(choices[LETTERS.index(a)])
    elif a in choices:
        forms.add(LETTERS[choices.index(a)])
    return {f.strip() for f in forms if f and f.strip()}


def answer_mention(text, forms):
    """End of the first whole-word mention of any form in text (case-insensitive), or None. A
    one-letter option counts only as '(B)' or after option/choice/answer, not as any capital B."""
    ends = []
    for f in forms:
        if len(f) == 1 and f.isalpha():
            pat = rf"\({f}\)|\b(?:option|choice|answer(?:\s+is)?)\s*:?\s*\(?{f}\b"
        else:  # not inside a longer number or word: 12 is not in 120 or 1.25
            pat = rf"(?<![\w.]){re.escape(f)}(?!\w|\.\d)"
        m = re.search(pat, text, re.IGNORECASE)
        if m:
            ends.append(m.end())
    return min(ends) if ends else None


def cut_reflections(think, forms, markers=REFLECTION_MARKERS):
    """-> (reasoning cut at the first marker after the answer's first mention, cut or not)."""
    at = answer_mention(think, forms)
    hits = [i for i in (think.find(m, at) for m in markers if m) if i >= 0] if at is not None else []
    if not hits:
        return think, False
    return think[:min(hits)].rstrip(), True


def filter_traces(record, traces, max_words=MAX_TRACE_WORDS, markers=REFLECTION_MARKERS):
    """One record's R1 traces -> (the SFT solution or None, whether its reflections were cut,
    {reason: count} over the traces: the DROP_REASONS and "kept")."""
    import reward  # below this file in reading order, but pure standard library
    counts, good = dict.fromkeys(DROP_REASONS + ("kept",), 0), []
    for j, t in enumerate(traces):
        parts = split_think(t["text"])
        pred = reward.extract_answer(parts[1]) if parts else None
        if not t.get("finished", True):
            why = "unfinished"
        elif parts is None:
            why = "no_think"
        elif not pred:
            why = "no_answer"
        elif n_words(t["text"]) > max_words:
            why = "too_long"
        else:
            think, cut = cut_reflections(parts[0], answer_forms(pred, record), markers)
            summary = summary_text(parts[1])
            solution = f"<think>{think}</think> " + (summary + " " if summary else "") + f"<answer>{pred}</answer>"
            if reward.accuracy_reward(solution, record["answer"], record.get("choices")) == 1.0:
                good.append((n_words(solution), j, solution, cut))
                continue
            why = "wrong"
        counts[why] += 1
    if not good:
        return None, False, counts
    _, _, solution, cut = min(good)  # fewest words; the earlier sample on a tie
    counts["kept"], counts["not_shortest"] = 1, len(good) - 1
    return solution, cut, counts


def traces_to_sft(records, max_words=MAX_TRACE_WORDS, markers=REFLECTION_MARKERS):
    """Records carrying meta["traces"] (load_records of the reason step's output) -> (SFT rows of
    our form, solution = the kept trace, images as they were; {reason: count} over all traces,
    plus "records", "records_kept", "cut")."""
    rows, counts = [], dict.fromkeys(DROP_REASONS + ("kept", "records", "records_kept", "cut"), 0)
    for rec in records:
        traces = rec["meta"].get("traces")
        if not isinstance(traces, list) or not all(isinstance(t, dict) and isinstance(t.get("text"), str)
                                                   for t in traces):
            raise BadInput(f"{rec['source']}: key 'traces' must be a list of {{text, ...}} "
                           f"(the output of sample.py --task reason)")
        solution, cut, c = filter_traces(rec, traces, max_words, markers)
        for k, v in c.items():
            counts[k] += v
        counts["records"] += 1
        if solution is None:
            continue
        counts["records_kept"] += 1
        counts["cut"] += cut
        meta = {k: v for k, v in rec["meta"].items() if k != "traces"}
        rows.append(record_row({**rec, "meta": meta}, solution=solution, reflection_cut=cut))
    return rows, counts


def traces_main(argv=None):
    """`python data.py traces ...` -> the filters' counts; a bad input exits with status 2."""
    return cli("data.py traces", traces_command, argv)


def traces_command(argv=None):
    ap = ArgumentParser(prog="data.py traces", description="filter R1 traces (sample.py --task "
                        "reason) into SFT records: shortest correct trace per record")
    ap.add_argument("--data", required=True, help="the reason step's JSONL (records with `traces`)")
    ap.add_argument("--out", required=True, help="SFT JSONL to write (our record form; solution = "
                    "<think>...</think> summary <answer>X</answer>; images as in --data)")
    ap.add_argument("--max-words", type=at_least(1), default=MAX_TRACE_WORDS,
                    help="drop traces with more words than this (the raw completion)")
    ap.add_argument("--markers", default="|".join(REFLECTION_MARKERS), help="'|'-separated "
                    "reflection markers: the reasoning is cut at the first one after the answer "
                    "appears ('' = no cutting)")
    ap.add_argument("--skip-bad", action="store_true", help="skip and count bad rows (default: stop at the first)")
    args = ap.parse_args(argv)
    records, n_bad = load_records(args.data, skip_bad=args.skip_bad)
    if n_bad:
        print(f"skipped {n_bad} bad rows of {args.data}")
    rows, c = traces_to_sft(records, args.max_words, tuple(m for m in args.markers.split("|") if m))
    write_jsonl(args.out, rows)
    n = sum(c[k] for k in DROP_REASONS + ("kept",))
    print(f"traces: {n} read, {c['kept']} kept; dropped: "
          + ", ".join(f"{k} {c[k]}" for k in DROP_REASONS))
    print(f"records: {c['records']} read, {c['records_kept']} with a kept trace -> {args.out} "
          f"({c['records'] - c['records_kept']} without); reflections cut in {c['cut']}")
    return c


# =============================================================================
# The synthetic world: the embedded default dataset, drawn with PIL, no downloads
#
# Four families mimic the paper's sources at toy scale: count (shapes by colour or kind, like
# CLEVR), bars (bar charts, like FigureQA), table (columns of tallies summed or compared, like
# TabMWP), geometry (labelled rectangles and right triangles, like Geometry3K). A problem is a
# JSON-able scene, an image drawn from it, a question, the answer answer_from_scene recomputes from
# the scene alone, and a reasoning trace in the paper's shape:
#
#     <think>red 2 green 1 blue 3. red is 2.</think> The red count is 2. <answer>2</answer>
#
# Why traces: a tiny model cannot map pixels to "2" in one jump, but it can read off what it sees
# (one easy step per object or cell), then compute (one easy step per operation). The grammar:
# - things are found by how they look, never by position (bars by colour, a column by its colour);
# - each step is local: tallest/shortest keep a running best, options are checked one by one;
# - table cells are tallies (1-4 squares, one per 14x14 patch), not digits;
# - a word the trace looks up is the same token as in the question ("the blue column", " blue").
# Layout: every scene lies on the 4x4 grid of 28x28-pixel merged tokens, one thing per token.
# Levels: easy (few objects, short listings) for SFT; hard (more of them, same grammar) for GRPO.
# The demo's actors learn from the same problems: the base from each one's caption (the trace's
# reading, for every question the image could answer) and its direct answer (the trace's summary
# and answer, no work); the text reasoner from caption + question -> the trace, with R1's faults.
# Determinism: problem i of a split uses random.Random(f"{split}:{seed}:{i}") (a string seed is
# hashed with SHA-512, whatever PYTHONHASHSEED), so no two splits share a generator and record i
# does not depend on n.


FAMILIES = ("count", "bars", "table", "geometry")
TEST_SEED = 1234           # the fixed held-out test split every demo reports on
IMAGE_SIZE = 112           # 4x4 merged tokens of 28x28 pixels; scenes are laid out on that grid
BASE = 112                 # scenes are drawn at BASE and resized (NEAREST) to image_size
COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 220), "yellow": (230, 190, 0)}
COUNT_COLORS = ("red", "green", "blue")  # counting uses three colours
KINDS = ("circle", "square", "triangle")
WHITE, BLACK, GRID, FILL = (255, 255, 255), (0, 0, 0), (190, 190, 190), (170, 210, 240)
LEVELS = {  # what makes a level hard: more objects and longer listings, in the same trace grammar
    # Hard stays within reach of the easy-trained model's own samples: the same listing steps,
    # only more of them, and the same numbers (bars 1-6, table tallies 1-4). Easy already mixes
    # listing lengths (2-3 bars; 2x2, 2x3 and 3x2 tables), so the model learns
    # "list what is there" rather than "list three"; hard asks for one more: 4 bars, columns of 4
    # tallies (the fourth bar and the fourth row are what GRPO learns from the model's own samples).
    "easy": dict(count_n=(2, 5), bars_n=(2, 3), bars_max=6, table_shapes=((2, 2), (2, 3), (3, 2)), side=(1, 5)),
    "hard": dict(count_n=(6, 10), bars_n=(4, 4), bars_max=6, table_shapes=((4, 2), (4, 3)), side=(2, 6)),
}
GEO_MC = 0.5               # probability that a geometry problem is multiple choice
DIGITS = {  # a hand-made 3x5 pixel font (no font file needed), rows top to bottom
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
}

# -----------------------------------------------------------------------------
# drawing helpers


def text_size(text, scale):
    return (4 * len(text) - 1) * scale, 5 * scale


def draw_number(draw, cx, cy, value, scale=3, fill=BLACK):
    """Draw the digits of `value` centred on (cx, cy), each font pixel a scale x scale square."""
    text = str(value)
    w, h = text_size(text, scale)
    x0, y0 = cx - w // 2, cy - h // 2
    for k, ch in enumerate(text):
        for r, row in enumerate(DIGITS[ch]):
            for c, bit in enumerate(row):
                if bit == "1":
                    x, y = x0 + (4 * k + c) * scale, y0 + r * scale
                    draw.rectangle([x, y, x + scale - 1, y + scale - 1], fill=fill)


def draw_shape(draw, kind, cx, cy, size, fill):
    r = size // 2
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)


def canvas():
    img = Image.new("RGB", (BASE, BASE), WHITE)
    return img, ImageDraw.Draw(img)


def plus_steps(xs):
    """[3, 5, 2] -> '3+5=8 8+2=10.' (one addition per step)."""
    steps, total = [], xs[0]
    for x in xs[1:]:
        steps.append(f"{total}+{x}={total + x}")
        total += x
    return " ".join(steps) + "."


def trace(think, summary, answer):
    return f"<think>{think}</think> {summary} <answer>{answer}</answer>"

# -----------------------------------------------------------------------------
# count: shapes on a 4x4 grid of 28-pixel cells (one shape per merged token), like CLEVR


def make_count(p, rng):
    n = rng.randint(*p["count_n"])
    cells = rng.sample(range(16), n)
    shapes = [dict(color=rng.choice(COUNT_COLORS), kind=rng.choice(KINDS),
                   x=28 * (c % 4) + 14 + rng.randint(-2, 2), y=28 * (c // 4) + 14 + rng.randint(-2, 2),
                   size=rng.randint(18, 22)) for c in cells]
    scene = {"shapes": shapes}
    attr = rng.choice(["color", "kind"])
    # mostly ask about something present; sometimes about anything (the answer may be 0)
    names = COUNT_COLORS if attr == "color" else KINDS
    value = rng.choice(shapes)[attr] if rng.random() < 0.8 else rng.choice(names)
    return scene, f"{attr}={value}"


def draw_count(scene):
    img, d = canvas()
    for s in scene["shapes"]:
        draw_shape(d, s["kind"], s["x"], s["y"], s["size"], COLORS[s["color"]])
    return img


def text_count(scene, kind, ans, choices=None):
    attr, value = kind.split("=")
    names = COUNT_COLORS if attr == "color" else KINDS
    seen = " ".join(f"{v} {sum(s[attr] == v for s in scene['shapes'])}" for v in names)
    question = f"How many {value} shapes?" if attr == "color" else f"How many {value}s?"
    return question, trace(f"{seen}. {value} is {ans}.", f"The {value} count is {ans}.", ans)

# -----------------------------------------------------------------------------
# bars: a bar chart with a gridline per unit, values read off the height, like FigureQA


def make_bars(p, rng):
    n = rng.randint(*p["bars_n"])
    colors = rng.sample(list(COLORS), n)
    while True:  # unique tallest and shortest, so those answers are well defined
        values = [rng.randint(1, p["bars_max"]) for _ in colors]
        if values.count(max(values)) == 1 and values.count(min(values)) == 1:
            break
    cols = sorted(rng.sample(range(4), n))  # which 28-pixel columns hold a bar, left to right
    scene = {"bars": [dict(color=c, value=v, col=k) for c, v, k in zip(colors, values, cols)],
             "max": p["bars_max"]}
    kind = rng.choice(["tallest", "shortest", "value=" + rng.choice(colors)])
    return scene, kind


def draw_bars(scene):
    """Each bar fills the middle of one 28-pixel column (one merged token wide), so a token sees
    one bar; a grey gridline per unit makes heights readable."""
    img, d = canvas()
    base, unit = BASE - 6, (BASE - 12) // scene["max"]
    for v in range(1, scene["max"] + 1):
        d.line([0, base - v * unit, BASE, base - v * unit], fill=GRID, width=1)
    for b in scene["bars"]:
        x0 = 28 * b["col"] + 5
        d.rectangle([x0, base - b["value"] * unit, x0 + 17, base], fill=COLORS[b["color"]])
    d.line([0, base, BASE, base], fill=BLACK, width=2)
    return img


def text_bars(scene, kind, ans, choices=None):
    """Read the bars by colour in a fixed order (red green blue yellow), as counting does, not left
    to right: a tiny model finds "the red bar" by content far more easily than "the third bar".
    Tallest/shortest then keeps a running best, one local comparison per bar."""
    bars = sorted(scene["bars"], key=lambda b: list(COLORS).index(b["color"]))
    seen = " ".join(f"{b['color']} {b['value']}" for b in bars)
    if kind.startswith("value="):
        color = kind.split("=")[1]
        return (f"What is the value of the {color} bar?",
                trace(f"{seen}. {color} is {ans}.", f"The {color} bar is {ans}.", ans))
    best = bars[0]
    steps = [f"{best['color']} {best['value']}"]
    for b in bars[1:]:
        v, bv = b["value"], best["value"]
        if (v > bv) if kind == "tallest" else (v < bv):
            best = b
        steps.append(f"{b['color']} {v} vs {bv} {best['color']} {best['value']}")
    think = f"{seen}. {'max' if kind == 'tallest' else 'min'} " + ", ".join(steps) + "."
    return f"Which colour is the {kind} bar?", trace(think, f"The {kind} is {ans}.", ans)

# -----------------------------------------------------------------------------
# table: a grid of tallies, the sum or the largest of a column named by its colour, like TabMWP


TABLE_COLORS = ("red", "green", "blue")  # each column's tallies are drawn in its own colour
TALLY_MAX = 4  # a cell holds 1-4: one square per 14x14 patch of its token


def make_table(p, rng):
    rows, cols = rng.choice(p["table_shapes"])
    scene = {"cells": [[rng.randint(1, TALLY_MAX) for _ in range(cols)] for _ in range(rows)],
             "colors": rng.sample(TABLE_COLORS, cols),  # column c's colour, shuffled per table
             "r0": rng.randint(0, 4 - rows), "c0": rng.randint(0, 4 - cols)}  # where on the 4x4 grid
    kind = f"{rng.choice(['col_sum', 'col_max'])}={rng.randint(1, cols)}"
    return scene, kind


def draw_table(scene):
    """Every table cell is exactly one 28x28 merged token holding a tally in its column's colour:
    the question names the column by colour, so the model finds its cells by what they look
    like, not by counting columns from the table's edge."""
    img, d = canvas()
    cells = scene["cells"]
    rows, cols = len(cells), len(cells[0])
    x0, y0 = 28 * scene.get("c0", 0), 28 * scene.get("r0", 0)
    for r in range(rows + 1):
        d.line([x0, y0 + 28 * r, x0 + 28 * cols, y0 + 28 * r], fill=BLACK, width=2)
    for c in range(cols + 1):
        d.line([x0 + 28 * c, y0, x0 + 28 * c, y0 + 28 * rows], fill=BLACK, width=2)
    for r, row in enumerate(cells):
        for c, v in enumerate(row):
            for q in range(v):  # a tally: v of the cell's four 14x14 patches hold a square
                x, y = x0 + 28 * c + 14 * (q % 2) + 3, y0 + 28 * r + 14 * (q // 2) + 3
                d.rectangle([x, y, x + 8, y + 8], fill=COLORS[scene["colors"][c]])
    return img


def table_line(cells, kind):
    """'col_sum=2' -> ('sum', 1, [column 2's numbers, top to bottom]): the column index is 0-based."""
    op, k = kind.split("=")
    c = int(k) - 1
    return op.split("_")[1], c, [row[c] for row in cells]


def text_table(scene, kind, ans, choices=None):
    agg, c, xs = table_line(scene["cells"], kind)
    color = scene["colors"][c]
    seen = f"the {color} column: {' '.join(map(str, xs))}."  # "the": so the colour is " blue", as asked
    if agg == "max":
        return (f"What is the largest in the {color} column?",
                trace(f"{seen} max is {ans}.", f"The largest is {ans}.", ans))
    return f"What is the sum of the {color} column?", trace(f"{seen} {plus_steps(xs)}", f"The sum is {ans}.", ans)

# -----------------------------------------------------------------------------
# geometry: a labelled rectangle or right triangle, area / perimeter, like Geometry3K


def make_geometry(p, rng):
    shape = rng.choice(["rect", "tri"])
    while True:
        a, b = rng.randint(*p["side"]), rng.randint(*p["side"])
        if shape == "rect" or a * b % 2 == 0:  # triangle areas stay whole numbers
            break
    scene = {"shape": shape, "a": a, "b": b, "dx": rng.randint(-3, 3), "dy": rng.randint(-3, 3)}
    kind = rng.choice(["area", "perimeter"]) if shape == "rect" else "area"
    return scene, kind


def draw_geometry(scene):
    """The shape lies in the top-right 3x3 merged tokens, drawn roughly to scale; each side's label
    is a large digit alone in one token of the bottom row (width) or the left column (height),
    the token next to the middle of its side."""
    img, d = canvas()
    w, h = 22 + 9 * scene["a"], 22 + 9 * scene["b"]  # side <= 6 fits in 84 pixels
    x0, y1 = 28 + (84 - w) // 2 + scene["dx"], 84 - (84 - h) // 2 + scene["dy"]
    x1, y0 = x0 + w, y1 - h
    if scene["shape"] == "rect":
        d.rectangle([x0, y0, x1, y1], fill=FILL, outline=BLACK, width=3)
    else:
        d.polygon([(x0, y0), (x0, y1), (x1, y1)], fill=FILL, outline=BLACK, width=3)
        d.rectangle([x0, y1 - 8, x0 + 8, y1], outline=BLACK, width=2)  # right-angle mark
    col = min(3, max(1, ((x0 + x1) // 2) // 28))
    row = min(2, max(0, ((y0 + y1) // 2) // 28))
    draw_number(d, 28 * col + 14, 98, scene["a"], scale=4)
    draw_number(d, 14, 28 * row + 14, scene["b"], scale=4)
    return img


def geo_choices(ans, scene, rng):
    """Four numeric options: the answer and three plausible mistakes, shuffled."""
    a, b, v = scene["a"], scene["b"], int(ans)
    pool = [a * b, 2 * (a + b), a + b, a * b // 2, v + 1, v - 1, v + 2, v + 3]
    wrong = sorted({x for x in pool if x > 0 and x != v})
    opts = [str(x) for x in rng.sample(wrong, 3) + [v]]
    rng.shuffle(opts)
    return opts


def text_geometry(scene, kind, ans, choices=None):
    a, b = scene["a"], scene["b"]
    name = "rectangle" if scene["shape"] == "rect" else "triangle"
    if scene["shape"] == "tri":
        think = f"legs {a} {b}. {a}*{b}={a * b} {a * b}/2={ans}."
    elif kind == "area":
        think = f"w {a} h {b}. {a}*{b}={ans}."
    else:
        think = f"w {a} h {b}. {a}+{b}={a + b} 2*{a + b}={ans}."
    final = ans
    if choices:  # check the options in order, each against the value, until one matches
        i = choices.index(ans)
        final = LETTERS[i]
        think += " " + " ".join(f"{L} {c} vs {ans} {'yes' if c == ans else 'no'}."
                                for L, c in zip(LETTERS, choices[:i + 1]))
    return f"What is the {kind} of the {name}?", trace(think, f"The {kind} is {ans}.", final)

# -----------------------------------------------------------------------------
# answers from the scene alone, and the problem maker


def answer_from_scene(family, scene, question_kind):
    """The answer as a value (a number, or a colour for tallest/shortest), from the scene alone.
    For multiple choice the record's `answer` is the letter of this value in `choices`."""
    k = question_kind
    if family == "count":
        attr, value = k.split("=")
        return str(sum(s[attr] == value for s in scene["shapes"]))
    if family == "bars":
        bars = scene["bars"]
        if k.startswith("value="):
            return str(next(b["value"] for b in bars if b["color"] == k.split("=")[1]))
        pick = max if k == "tallest" else min
        return pick(bars, key=lambda b: b["value"])["color"]
    if family == "table":
        agg, _, xs = table_line(scene["cells"], k)
        return str(sum(xs) if agg == "sum" else max(xs))
    if family == "geometry":
        a, b = scene["a"], scene["b"]
        if scene["shape"] == "tri":
            return str(a * b // 2)
        return str(a * b if k == "area" else 2 * (a + b))
    raise ValueError(f"unknown family {family!r}")


MAKERS = {"count": (make_count, draw_count, text_count), "bars": (make_bars, draw_bars, text_bars),
          "table": (make_table, draw_table, text_table),
          "geometry": (make_geometry, draw_geometry, text_geometry)}


def make_problem(family, level, rng, image_size=IMAGE_SIZE):
    """One problem: dict with family, level, kind, scene, question, answer, [choices], solution,
    and image (a PIL RGB image of image_size x image_size)."""
    make, draw, text = MAKERS[family]
    scene, kind = make(LEVELS[level], rng)
    value = answer_from_scene(family, scene, kind)
    choices = None
    if family == "geometry" and rng.random() < GEO_MC:
        choices = geo_choices(value, scene, rng)
    question, solution = text(scene, kind, value, choices)
    img = draw(scene)
    if image_size != BASE:
        img = img.resize((image_size, image_size), Image.NEAREST)
    prob = dict(family=family, level=level, kind=kind, scene=scene, question=question,
                answer=LETTERS[choices.index(value)] if choices else value, solution=solution, image=img)
    if choices:
        prob["choices"] = choices
    return prob


def make_split(n, level, seed, families=None, split="train", image_size=IMAGE_SIZE):
    """n problems in memory. Families go round-robin; level 'mix' alternates easy/hard per round,
    so every family gets both levels. Problem i uses random.Random(f'{split}:{seed}:{i}')."""
    families = list(families or FAMILIES)
    probs = []
    for i in range(n):
        fam = families[i % len(families)]
        lvl = level if level != "mix" else ("easy", "hard")[(i // len(families)) % 2]
        p = make_problem(fam, lvl, random.Random(f"{split}:{seed}:{i}"), image_size)
        p["id"] = f"{split}{seed}_{i:05d}"
        probs.append(p)
    return probs

# -----------------------------------------------------------------------------
# the paper's actors at toy scale: the base's captions and direct answers (it perceives and
# answers, but does not reason step by step), and the text reasoner's R1-style traces with R1's
# faults, so that the first SFT set is distilled through captions as the paper's is

CAPTION_PROMPT = "Describe the image."    # the demo captioner's instruction (sample.py --caption-prompt)
REASON_TEMPLATE = "{caption} {question}"  # the demo reasoner's prompt (sample.py --reason-prompt)
MAX_WORDS = 50  # the demo's limit on a reasoner trace (the paper: 500 words); clean ones have 6-35
# R1's habits in the reasoner's training traces: three faults, and `option`: a multiple-choice
# question answered with the option's value, not its letter, and no option checked (the scorer
# takes either, as MathVista's does; what the option check costs a tiny model is GRPO's to find)
FAULTS = dict(reflect=0.25, ramble=0.1, wrong=0.1, option=0.2)


def caption_text(family, scene):
    """What a reader of the image needs, in the traces' reading grammar: counts by colour and by
    kind, each bar's value, each column's tallies (colours in a fixed order), the labelled sides."""
    if family == "count":
        by = lambda attr, names: " ".join(f"{v} {sum(s[attr] == v for s in scene['shapes'])}" for v in names)
        return f"{by('color', COUNT_COLORS)}. {by('kind', KINDS)}."
    if family == "bars":
        bars = sorted(scene["bars"], key=lambda b: list(COLORS).index(b["color"]))
        return " ".join(f"{b['color']} {b['value']}" for b in bars) + "."
    if family == "table":
        cols = sorted(range(len(scene["colors"])), key=lambda c: TABLE_COLORS.index(scene["colors"][c]))
        return " ".join(f"the {scene['colors'][c]} column: {' '.join(str(r[c]) for r in scene['cells'])}."
                        for c in cols)
    name = "rectangle w" if scene["shape"] == "rect" else "triangle legs"
    return f"{name} {scene['a']} {'h ' if scene['shape'] == 'rect' else ''}{scene['b']}."


def split_trace(solution):
    """'<think>T</think> S <answer>A</answer>' -> (T, S, A)."""
    think, rest = solution[len("<think>"):].split("</think> ", 1)
    summary, answer = rest.split(" <answer>")
    return think, summary, answer[:-len("</answer>")]


def base_records(n, level, seed, image_size=IMAGE_SIZE):
    """The base's training rows: for each of n problems, its caption (asked with CAPTION_PROMPT)
    and its direct answer (the trace's summary and answer, no <think> work), image shared."""
    rows = []
    for r in synth_records(n, level, seed, image_size=image_size):
        m = r["meta"]
        caption = caption_text(m["family"], m["scene"])
        rows.append(dict(r, id=r["id"] + "c", question=CAPTION_PROMPT, answer=caption, choices=None,
                         solution=caption))
        rows.append(dict(r, solution=r["solution"].split("</think> ", 1)[1]))
    return rows


def r1_trace(solution, value, wrong_value, rng, faults=FAULTS):
    """The reasoner's training target: the problem's trace with R1's faults, drawn with rng.
    reflect: after the answer, 'Wait, let me check. <the work again>' (data.py traces cuts it);
    ramble: the check over and over, past MAX_WORDS (dropped); wrong: the reading, then
    a wrong value with no work ('so 7.'; dropped as wrong). value / wrong_value: the right answer
    as the summary states it and a wrong one; the final answer (a letter for multiple choice)
    follows the summary's value."""
    think, summary, answer = split_trace(solution)
    if answer != value and rng.random() < faults.get("option", 0):  # multiple choice: the work, then the value
        think, answer = think.split(" A ", 1)[0], value
    u = rng.random()
    if u < faults["wrong"]:
        reading = think.split(". ", 1)[0].rstrip(".") + "."
        answer = wrong_value[1] if answer != value else wrong_value[0]
        return trace(f"{reading} so {wrong_value[0]}.", summary.replace(value, wrong_value[0]), answer)
    work = think.split(". ", 1)[1] if ". " in think else think
    if u < faults["wrong"] + faults["ramble"]:
        limit = MAX_WORDS + rng.randint(1, 20)
        while n_words(think) <= limit:
            think += f" Wait, let me check again. {work}"
    elif u < faults["wrong"] + faults["ramble"] + faults["reflect"]:
        think += f" Wait, let me check. {work}"
    return trace(think, summary, answer)


def wrong_answer(prob, rng):
    """(a wrong value, its final answer): another option for multiple choice, another colour
    of the chart for tallest / shortest, the value +-1 otherwise."""
    value = answer_from_scene(prob["family"], prob["scene"], prob["kind"])
    if prob.get("choices"):
        i = rng.choice([i for i, c in enumerate(prob["choices"]) if c != value])
        return prob["choices"][i], LETTERS[i]
    if not value.isdigit():
        w = rng.choice([b["color"] for b in prob["scene"]["bars"] if b["color"] != value])
        return w, w
    w = str(int(value) + rng.choice([-1, 1]) if value != "0" else 1)
    return w, w


def reasoner_records(n, level, seed, faults=FAULTS):
    """The text reasoner's training rows: text only, the prompt REASON_TEMPLATE with the gold
    caption and the question (its options included), the target an R1-style trace (r1_trace)."""
    rows = []
    for p in make_split(n, level, seed, split="reason", image_size=28):
        rng = random.Random(f"faults:{seed}:{p['id']}")
        value = answer_from_scene(p["family"], p["scene"], p["kind"])
        question = REASON_TEMPLATE.replace("{caption}", caption_text(p["family"], p["scene"]))
        question = question.replace("{question}", format_question(p))
        solution = r1_trace(p["solution"], value, wrong_answer(p, rng), rng, faults)
        rows.append(dict(id=p["id"], images=[], question=question, answer=p["answer"], choices=p.get("choices"),
                         choices_in_question=True, solution=solution, meta=dict(family=p["family"], level=p["level"]),
                         source=f"synth:reason:{seed}"))
    return rows


# -----------------------------------------------------------------------------
# the writer


def write_split(out_dir, n, level, seed, families=None, image_size=IMAGE_SIZE, split="train"):
    """Write out_dir/images/{id}.png and out_dir/data.jsonl; return the records. A record (one
    line): id, image (path relative to the JSONL), question, answer, choices (multiple-choice
    geometry only: `answer` is then a letter A-D and the options are not in `question`), solution
    (the trace), family, level, kind (what answer_from_scene takes: "color=red", "tallest",
    "col_sum=2", "area") and scene. PNGs carry no metadata: the same seed gives byte-identical
    files with the same Pillow build (the pixels are identical anywhere)."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for p in make_split(n, level, seed, families, split, image_size):
        rel = f"images/{p['id']}.png"
        p.pop("image").save(os.path.join(out_dir, rel), format="PNG", compress_level=6)
        rec = {"id": p["id"], "image": rel, "question": p["question"], "answer": p["answer"]}
        if "choices" in p:
            rec["choices"] = p["choices"]
        rec.update({k: p[k] for k in ("solution", "family", "level", "kind", "scene")})
        records.append(rec)
    with open(os.path.join(out_dir, "data.jsonl"), "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=False) + "\n")
    return records


def write_test_split(out_dir, n=400, image_size=IMAGE_SIZE):
    """The fixed held-out test split: seed TEST_SEED in the 'test' stream, easy and hard mixed."""
    return write_split(out_dir, n, "mix", TEST_SEED, None, image_size, split="test")


def synth_main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "synth":
        argv = argv[1:]
    ap = argparse.ArgumentParser(prog="synth", description="write a synthetic visual-reasoning split")
    ap.add_argument("--out", required=True, help="output directory (gets images/ and data.jsonl)")
    ap.add_argument("--n", type=int, default=1000, help="number of problems")
    ap.add_argument("--level", default="easy", choices=["easy", "hard", "mix"], help="difficulty level")
    ap.add_argument("--seed", type=int, default=0, help="seed of the train stream")
    ap.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="image side in pixels")
    ap.add_argument("--test", action="store_true", help="write the fixed held-out test split instead "
                    f"(seed {TEST_SEED}, level mix; ignores --level and --seed)")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.test:
        recs = write_split(args.out, args.n, "mix", TEST_SEED, None, args.image_size, split="test")
    else:
        recs = write_split(args.out, args.n, args.level, args.seed, None, args.image_size)
    print(f"wrote {len(recs)} problems to {args.out}/data.jsonl in {time.time() - t0:.1f}s")


def synth_records(n, level, seed, split="train", families=None, image_size=IMAGE_SIZE):
    """The same problems as write_split, in memory, in the record form the readers return (the
    images are PIL images instead of paths). What sft.py, grpo.py and eval.py use by default."""
    recs = []
    for p in make_split(n, level, seed, families, split, image_size):
        meta = {k: p[k] for k in ("family", "level", "kind", "scene")}
        recs.append(dict(id=p["id"], images=[p["image"]], question=p["question"], answer=p["answer"],
                         choices=p.get("choices"), solution=p["solution"], meta=meta,
                         source=f"synth:{split}:{seed}"))
    return recs


def synth_test_records(n=2000):
    """The fixed held-out test split every demo reports on (easy and hard mixed; its first n
    problems: the staircase and eval.py take 2000, sft.py and grpo.py's checks 400)."""
    return synth_records(n, "mix", TEST_SEED, split="test")


# -----------------------------------------------------------------------------
# the tiny tokenizer: byte-level BPE with one token per word of the world

# the tiny tokenizer's words: the chat template's and the synthetic world's (a word outside the
# list still encodes, byte by byte); build_tiny_tokenizer makes each of them one token
TINY_WORDS = (
    "You are helpful assistant system user "  # the default system prompt and the roles
    "How many What Which is the of in The shapes colour value bar column area perimeter Choices "
    "red green blue yellow circle circles square squares triangle triangles rectangle legs "
    "count sum max min largest tallest shortest vs yes no so "
    "Describe image w h Wait let me check again"
).split()

# Qwen2.5-VL's chat template (as in its chat_template.json): default system prompt, image and
# video parts as <|vision_start|><|X_pad|><|vision_end|>, optional "Picture k: " ids.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n" + DEFAULT_SYSTEM
    + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def learn_merges(words):
    """BPE training on a word list, each word counted once: merge the most frequent adjacent pair
    (ties: the first in sorted order) until every word is one token. -> merges in rank order.
    Encoding then replays them, so each listed word (and only such chains) becomes one token."""
    seqs = [list(w) for w in words]
    merges = []
    while True:
        pairs = collections.Counter(p for s in seqs for p in zip(s, s[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i:i + 2] = [s[i] + s[i + 1]]
                i += 1


def build_tiny_tokenizer():
    """Byte-level BPE: 256 byte tokens (id == byte value), Qwen's 14 special tokens (ids
    256..269), <think> </think> <answer> </answer> (270..273) as normal added tokens, then the
    merged tokens (274..) that make each of TINY_WORDS one token, bare and after a space; Qwen's
    chat template. Digits are never merged: numbers are read and written digit by digit, as
    Qwen's tokenizer does. One token per word halves the demo's sequences (~180 -> ~85 tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}  # token id == byte value
    vocab.update({t: 256 + i for i, t in enumerate(SPECIAL_TOKENS + REASONING_TOKENS)})
    space = _bytes_to_unicode()[ord(" ")]  # "Ġ": how byte-level BPE spells a leading space
    merges = learn_merges(sorted({w for word in TINY_WORDS for w in (word, space + word)}))
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False, model_max_length=32768,
    )


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def save_tiny_tokenizer(path):
    """Write the tiny tokenizer to a directory, in the layout of a real checkpoint."""
    tok = build_tiny_tokenizer()
    tok.save_pretrained(path)
    return tok


# -----------------------------------------------------------------------------
# the tiny model: a random Qwen2.5-VL-shaped checkpoint directory, written exactly like a real one
# (config.json + model.safetensors + tokenizer files), so every script loads every model the same way

TINY = dict(  # ~1.4M parameters; the embedded demo trains it from scratch on a CPU
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, mrope_section=[4, 6, 6],  # head_dim 32 -> 16 rotary freqs
    vision_depth=3, vision_hidden_size=96, vision_intermediate_size=256, vision_heads=3,
    fullatt_block_indexes=[2],
)


def tiny_config(tokenizer, **overrides):
    """A model.Config sized by TINY (or overrides), with the tokenizer's special token ids."""
    import model as M
    s = {**TINY, **overrides}
    ids = special_ids(tokenizer)
    vision = M.VisionConfig(
        depth=s["vision_depth"], hidden_size=s["vision_hidden_size"],
        intermediate_size=s["vision_intermediate_size"], num_heads=s["vision_heads"],
        out_hidden_size=s["hidden_size"], fullatt_block_indexes=list(s["fullatt_block_indexes"]))
    return M.Config(
        vocab_size=len(tokenizer), hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
        rope_theta=10000.0, mrope_section=list(s["mrope_section"]), tie_word_embeddings=True,
        max_position_embeddings=4096, bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"],
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        vision=vision)


def make_tiny_checkpoint(path, seed=0, **overrides):
    """Write a random tiny model + the tiny tokenizer to `path`; returns (model, tokenizer)."""
    import model as M
    tok = save_tiny_tokenizer(path)
    torch.manual_seed(seed)
    m = M.Qwen2_5_VL(tiny_config(tok, **overrides)).init_weights(seed=seed)
    M.save_model(m, path)
    return m, tok


def make_tiny_text_checkpoint(path, seed=0, **overrides):
    """The same, text-only (model_type qwen2, no vision tower): a stand-in for the R1 reasoner."""
    import model as M
    tok = save_tiny_tokenizer(path)
    cfg = tiny_config(tok, **overrides)
    cfg.model_type, cfg.vision, cfg.mrope_section = "qwen2", None, None  # plain 1D RoPE
    torch.manual_seed(seed)
    m = M.Qwen2_5_VL(cfg).init_weights(seed=seed)
    M.save_model(m, path)
    return m, tok


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"synth": synth_main, "traces": traces_main}
    if not argv or argv[0] not in commands:
        sys.exit(f"usage: python data.py {{{','.join(commands)}}} ... (python data.py synth --help)")
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
