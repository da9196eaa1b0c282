"""
The batched KV-cached sampler: prefill each prompt once (vision tower included), copy its cache
into the n rows of its group, then decode all rows together until each stops; as rows stop, the
decode batch halves (a step's cost grows with its rows, and GRPO's completions stop far apart).

    out = generate(model, [data.encode_prompt(tok, "How many red shapes?", [img])], n=4,
                   max_new_tokens=256, temperature=1.0, top_p=0.99, seed=0, tokenizer=tok)
    out.tokens (R, L), out.logprobs (R, L), out.lengths (R,), out.finished (R,), out.texts
    (row r = prompt r // n, sample r % n; padded after each row's length)

K/V live in buffers allocated once and written in place; under FSDP2 the weights are gathered
once per call (`gathered`). Sampling: temperature, top-k, top-p, then one draw whose uniform is a
hash of (seed, prompt key, sample index, step), so a row's draws do not depend on its batch or
on the number of processes; temperature 0 is greedy. Vision tokens are never emitted (a sampled
<|image_pad|> breaks the next forward). Masks come from lengths, never from token ids. A decode
step has fixed shapes (model.decode: each row writes one slot, attention reads whole blocks of
slots under a mask; the batch takes a few sizes, R, R/2, ...), so `--compile` compiles its
forward once per process, as gpt-fast does (on CUDA as CUDA graphs); the next token is chosen
outside the graph, so greedy and sampled calls share it. Off by default here (a run of a few
hundred rows spends more on the ~4 s compile than it saves); grpo.py compiles on a CPU.

    python sample.py --model DIR --image PATH --question "..." [--n 4 --temperature 1.0]
    python sample.py --model DIR --data FILE.jsonl --out FILE.jsonl       # batch, resumable
    python sample.py --task caption --model VLM --data data.jsonl --out captions.jsonl
    python sample.py --task reason --model R1 --data captions.jsonl --out traces.jsonl --n 4
    python sample.py --task distill --model runs/grpo1 --data train.jsonl --out samples.jsonl --n 4

caption, reason and distill build SFT sets as the paper does (`python data.py traces` filters
them): a VLM captions, a text-only R1 model (a qwen2 checkpoint) reasons from caption +
question, or, in later iterations, the current VLM answers k times. Each writes its input records
back with a field added (caption, traces), appended per batch; a rerun skips what is done.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass

import torch

import data

# -----------------------------------------------------------------------------
# sampling on logits


def _mix32(x):
    """lowbias32 integer hash on int64 tensors holding 32-bit values (the low 32 bits are exact
    even where the int64 product wraps)."""
    m = 0xFFFFFFFF
    x = x & m
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & m
    x = ((x ^ (x >> 15)) * 0x846CA68B) & m
    return x ^ (x >> 16)


def row_uniform(seed, keys, samples, step):
    """One uniform in (0, 1) per row, a pure function of (seed, key, sample index, step). The
    arguments broadcast: keys, samples (R, 1) and steps (N,) give every step's at once, (R, N)."""
    h = _mix32(torch.full_like(keys, seed & 0xFFFFFFFF) ^ 0x9E3779B9)
    for v in (keys, samples, torch.as_tensor(step, device=keys.device)):
        h = _mix32(h ^ (v & 0xFFFFFFFF))
    return (h.double() + 0.5) / 2.0 ** 32


def filter_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """logits (R, V) -> the probabilities we sample from (R, V), float32, zero outside the kept set.
    top_k 0 and top_p 1.0 mean off. A token exactly as likely as the least likely kept one is kept
    too (an exact tie at the edge may keep more than top_k)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k <= 0 and top_p >= 1.0:
        return probs
    V = probs.shape[-1]
    # Only the k most likely tokens of a row need sorting, and sorting a 32k vocabulary is slow on
    # a CPU (~2 ms a row). top-p never keeps a token with p <= (1 - top_p) / V (the tokens from
    # the last kept one down hold more than 1 - top_p of the mass, at most V of them, none more
    # likely than it), and a trained model puts most of its vocabulary below that. On a GPU the
    # full sort is cheap and the count would cost a host sync: sort everything there.
    k = min(top_k, V) if top_k > 0 else V
    if top_p < 1.0 and probs.device.type == "cpu":
        k = min(k, max(1, int((probs > 0.5 * (1 - top_p) / V).sum(-1).max())))
    ps = probs.topk(k, dim=-1).values if k < V // 2 else probs.sort(dim=-1, descending=True).values[:, :k]
    keep = torch.ones_like(ps, dtype=torch.bool)
    if top_p < 1.0:  # keep a token if the more likely ones alone do not reach top_p
        keep &= (ps.cumsum(-1) - ps) < top_p
    # the least likely kept probability; tokens tied with it are kept too, so the set depends on
    # the row's probabilities only, not on how a sort orders equal values or on the batch's k
    least = ps.masked_fill(~keep, float("inf")).amin(-1, keepdim=True)
    return probs * (probs >= least)


def draw(probs, u):
    """Inverse-CDF sampling: the first token whose cumulative probability exceeds u * total."""
    cdf = probs.double().cumsum(-1)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].to(cdf.dtype), right=True)
    return tok.squeeze(1).clamp_(max=probs.shape[-1] - 1)


def ban_bias(ban_ids, vocab_size, device=None):
    """(V,) float32: 0, or -inf at the ids that must never be chosen. Made once per generate and
    added to the logits, instead of cloning them and writing -inf at every step."""
    bias = torch.zeros(vocab_size, device=device)
    if ban_ids is not None and len(ban_ids):
        bias[torch.as_tensor(list(ban_ids), dtype=torch.long, device=device)] = float("-inf")
    return bias


def choose(logits, temperature, top_k, top_p, u, ban=None):
    """logits (R, V) -> (tokens (R,), log-probs of those tokens under the untempered model).
    ban: the ids never chosen, as a list or as ban_bias(...) (the sampler passes the bias)."""
    logits = logits.float()
    if ban is not None and not torch.is_tensor(ban):
        ban = ban_bias(ban, logits.shape[-1], logits.device)
    allowed = logits + ban if ban is not None else logits
    if temperature == 0:
        tok = allowed.max(-1).indices  # max(-1), not argmax: same first-index ties, 3x faster on CPU
    else:
        tok = draw(filter_probs(allowed, temperature, top_k, top_p), u)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tok[:, None]).squeeze(1)
    return tok, logp

# -----------------------------------------------------------------------------
# FSDP2: gather the weights once for a whole generation


@contextlib.contextmanager
def gathered(model):
    """Under FSDP2 (fully_shard), all-gather every sharded module's weights once and keep them
    until the block ends; the forward hooks then find them gathered and do no communication.
    A no-op for a plain model."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # each module's own reshard-after-forward setting, restored as it was (a root module's is
    # "auto", a ZeRO-2 style module's False); FSDP2 has no public getter, so read its state
    saved = [_reshard_setting(m) for m in mods]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m, s in zip(mods, saved):
            m.reshard()
            _reshard_setting(m, s)


def _reshard_setting(m, value=None):
    """Get (value None) or set an FSDP2 module's reshard-after-forward state: its "auto" flag and
    each parameter group's post-forward mesh (None = keep the weights gathered after forward)."""
    st = m._get_fsdp_state()
    if value is None:
        return st._auto_reshard_after_forward, [g.post_forward_mesh_info for g in st._fsdp_param_groups]
    st._auto_reshard_after_forward = value[0]
    for g, info in zip(st._fsdp_param_groups, value[1]):
        g.post_forward_mesh_info = info

# -----------------------------------------------------------------------------
# the generation loop


def left_padded(prompts, pad_id, device):
    """Prompt encodings -> input_ids, attention_mask (P, T) left-padded to a common length, so
    every row's next token goes to the same cache slot; and pixel_values, image_grid_thw of the
    prompts that have images, in order (text-only prompts may be anywhere), or None, None."""
    lens = [len(p["input_ids"]) for p in prompts]
    T = max(lens)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    am = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - lens[i]:], am[i, T - lens[i]:] = p["input_ids"], 1
    imgs = [p for p in prompts if p.get("pixel_values") is not None and p["pixel_values"].shape[0] > 0]
    pv = grid = None
    if imgs:
        pv = torch.cat([p["pixel_values"] for p in imgs]).to(device)
        grid = torch.cat([p["image_grid_thw"].reshape(-1, 3) for p in imgs]).to(device)
    return ids.to(device), am.to(device), pv, grid


@dataclass
class Samples:
    tokens: torch.Tensor         # (R, L) long, pad after each row's length
    logprobs: torch.Tensor       # (R, L) float32, 0 after each row's length
    lengths: torch.Tensor        # (R,) long
    finished: torch.Tensor       # (R,) bool
    prompt_index: torch.Tensor   # (R,) long, index into the prompts list
    sample_index: torch.Tensor   # (R,) long, 0..n-1
    texts: list


VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def vision_token_ids(cfg, tokenizer=None):
    """The ids a row must never emit. The config names four; <|vision_pad|> is not in it: take it
    from the tokenizer, else from Qwen's layout (vision_end, vision_pad, image_pad in a row).
    A text-only model (qwen2) has no vision tower to break: nothing is banned."""
    if cfg.vision is None:
        return []
    ids = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    if cfg.vision_end_token_id is not None and cfg.image_token_id == cfg.vision_end_token_id + 2:
        ids.add(cfg.vision_end_token_id + 1)
    if tokenizer is not None:
        for t in VISION_TOKENS:
            i = tokenizer.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != tokenizer.unk_token_id:
                ids.add(i)
    return sorted(i for i in ids if i is not None and 0 <= i < cfg.vocab_size)


def default_stop_ids(cfg, tokenizer=None):
    ids = set(cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id])
    if tokenizer is not None:
        for t in ("<|im_end|>", "<|endoftext|>"):
            i = tokenizer.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != tokenizer.unk_token_id:
                ids.add(i)
    return sorted(i for i in ids if i is not None)


def check_request(prompts, n, temperature, top_p, top_k, keys, budget):
    """A clear error for a request generate cannot serve (before any work is done)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not prompts:
        raise ValueError("no prompts")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling parameters: temperature={temperature}, top_p={top_p}, top_k={top_k}")
    for i, p in enumerate(prompts):
        if len(p["input_ids"]) > budget:
            raise ValueError(f"prompt {i} has {len(p['input_ids'])} tokens, more than the budget of {budget} "
                             f"(max_prompt_len, or max_position_embeddings - max_new_tokens)")
    if keys is not None and len(keys) != len(prompts):
        raise ValueError(f"keys has {len(keys)} entries for {len(prompts)} prompts (one key per prompt)")


def decode_forward(model, tok, pos, slot, n_slots, cache):
    """One decode step's forward (model.decode: a token per row, at shapes that change only with
    n_slots) -> logits (R, V). The part --compile compiles; choosing the next token stays outside
    it, so greedy and sampled calls, at any temperature, top-k or top-p, share one compiled graph."""
    return model.decode(tok, pos, slot, cache, n_slots)


# a decode step attends over the cache's slots up to the next multiple of a block past the last
# one written, not over the whole budget: a call whose rows stop early (GRPO: ~40 of 192 tokens)
# does not pay for the slots never written (the demo's GRPO step on a CPU: 17 ms over all 73 +
# 192 slots, 12.5 ms over 128). Its shapes change once a block: on a CPU a new shape costs
# nothing (the compiled step's sizes are symbolic), so small blocks; a CUDA graph is recorded
# once per shape, so large ones there
SLOT_BLOCK = {"cpu": 16, "cuda": 64}
_compiled = {}  # decode_forward compiled, once per process and device


def decode_step(compile, device):
    """decode_forward, or that forward compiled: torch.compile fuses its dozens of small kernels
    per layer, and on CUDA replays it as one CUDA graph ("reduce-overhead"). The model is an
    argument, so a later model (GRPO's policy, another checkpoint) reuses the compiled code; the
    sizes are symbolic (dynamic), so a new batch or cache size does not compile again."""
    if not compile:
        return decode_forward
    if device.type not in _compiled:
        # on a CPU: the wrapper that calls the step's kernels in C++ rather than Python (a step is
        # ~40 kernel calls of a few microseconds each), and the vector ISA the CPU reports taken
        # as it is (no test programs compiled to check it: 1.5-2 s of every process's compile)
        how = dict(mode="reduce-overhead") if device.type == "cuda" else dict(
            options={"cpp_wrapper": True, "cpp.vec_isa_ok": True})
        _compiled[device.type] = torch.compile(decode_forward, dynamic=True, **how)
    return _compiled[device.type]


def compile_by_default(device):
    """grpo.py's --compile when not given: on a CPU that has the C++ compiler inductor calls
    (measured there: the demo's GRPO samples a rollout ~1.5x faster, its whole staircase takes
    23 min instead of 27); off on CUDA, where it has not been measured yet."""
    return device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is not None


# when at most half the rows of the decode batch are still going, the batch drops to half its
# size, keeping every row that goes on: a step's cost grows with its rows, and GRPO's completions
# stop far apart (the demo's: 40 tokens on average, the longest of 128 rows ~70). Halving rather
# than cutting to the exact count keeps to a few batch sizes (R, R/2, R/4, ...: a few shapes for
# torch.compile and CUDA graphs). Below MIN_ROWS a step costs about the same whatever its rows.
MIN_ROWS = 16


def halve(cache, done, rows, *per_row):
    """The decode batch cut to half its rows, the rows still going first -> the cache, done, the
    full batch's index of each row, and each (B, ...) tensor of per_row (None stays None)."""
    keep = torch.argsort(done.to(torch.uint8), stable=True)[:done.shape[0] // 2]
    return (cache.keep_rows(keep), done[keep], rows[keep],
            *(t[keep] if t is not None else None for t in per_row))


def decode_loop(model, cache, tok, lp, next_pos, us, N, stop, sampling, compile):
    """Decode until every row has stopped or N tokens are chosen. tok, lp (R,): each row's first
    token and its log-prob (from the prefill's logits); us (R, N) or None: every step's uniforms;
    sampling = (ban, temperature, top_k, top_p). -> tokens (R, N), logps (R, N) as chosen, a
    row's steps after its stop token included (the caller masks them; columns never reached: 0).
    The decode batch starts as all R rows and halves as rows stop (halve): a dropped row is
    done, and its columns so far go to the output as it leaves."""
    R, dev, T = tok.shape[0], tok.device, cache.len  # step i writes slot T + i of every row
    tok = tok.clone()  # not a view (choose's squeeze): a view's input would compile the step again
    block = SLOT_BLOCK.get(dev.type, 64)
    tokens = torch.zeros(R, N, dtype=torch.long, device=dev)
    logps = torch.zeros(R, N, device=dev)
    toks, lps = tokens, logps  # the decode batch's columns: the output itself until a halving
    slots = T + torch.arange(N, device=dev)
    rows = torch.arange(R, device=dev)  # the decode batch's rows, as rows of the output
    done = torch.zeros(R, dtype=torch.bool, device=dev)
    forward = decode_step(compile, dev)
    ban, sampling = sampling[0], sampling[1:]  # (temperature, top_k, top_p)
    static = compile and dev.type == "cuda"  # a CUDA graph writes in place only at fixed addresses
    pin = lambda c: [torch._dynamo.mark_static_address(t) for t in c.k + c.v + [c.valid]] if static else None  # noqa: E731
    pin(cache)
    # "how many rows go on?" makes the host wait for the device: on an accelerator ask only every
    # 8 steps (a few wasted steps at the end cost less than draining the queue at every step)
    check_every = 1 if dev.type == "cpu" else 8
    with contextlib.ExitStack() as compiling:
        if compile:  # the model's floats (eps, rope_theta) are constants of the graph (symbolic
            # floats make dynamo trace it twice: 9 s instead of 5 on the 2-core CPU); each size
            # its own symbol (duck shaping would tie the batch to an equal size, e.g. head_dim 32
            # at 32 rows, and the first halving would compile the step again)
            compiling.enter_context(torch._dynamo.config.patch(specialize_float=True))
            compiling.enter_context(torch.fx.experimental._config.patch(use_duck_shape=False))
        for i in range(N):
            if i > 0:  # feed the last token at each row's own position (finished rows too: their
                # output is masked, and a row attends to its own cache only), choose the next
                n_slots = -(-(T + i) // block) * block
                logits = forward(model, tok, next_pos + i - 1, slots[i - 1:i], n_slots, cache)
                if compile and not static and i == 1:  # guards passed once: later steps differ in sizes only
                    compiling.enter_context(torch.compiler.set_stance(skip_guard_eval_unsafe=True))
                tok, lp = choose(logits, *sampling, us[:, i] if us is not None else None, ban)
            toks[:, i], lps[:, i] = tok, lp
            done |= torch.isin(tok, stop)
            if i % check_every == check_every - 1:
                going, B = int((~done).sum()), done.shape[0]
                if going == 0:
                    break
                if going <= B // 2 and B // 2 >= MIN_ROWS:
                    if toks is not tokens:
                        tokens[rows], logps[rows] = toks, lps
                    cache, done, rows, tok, next_pos, us, toks, lps = halve(cache, done, rows, tok, next_pos, us, toks, lps)
                    pin(cache)
    if toks is not tokens:
        tokens[rows], logps[rows] = toks, lps
    return tokens, logps


@torch.no_grad()  # a sampler never backpropagates: no graph over the decode steps (GRPO's policy has grads on)
def generate(model, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0, seed=0,
             stop_ids=None, ban_ids=None, keys=None, tokenizer=None, pad_id=0, max_prompt_len=None,
             compile=False):
    """Sample n completions for each prompt. prompts: list of dicts with input_ids (T,) and
    optionally pixel_values, image_grid_thw (as data.encode_prompt makes them).
    keys: one int per prompt naming it for the sampler's hash (default: its index in the list);
    give global indices when prompts are split across processes. Returns Samples."""
    cfg = model.config
    budget = max_prompt_len if max_prompt_len is not None else cfg.max_position_embeddings - max_new_tokens
    check_request(prompts, n, temperature, top_p, top_k, keys, budget)
    stop_ids = default_stop_ids(cfg, tokenizer) if stop_ids is None else list(stop_ids)
    ban_ids = vision_token_ids(cfg, tokenizer) if ban_ids is None else list(ban_ids)
    dev = model.model.embed_tokens.weight.device
    P, R = len(prompts), len(prompts) * n

    ids, am, pv, grid = left_padded(prompts, pad_id, dev)
    T = ids.shape[1]
    with gathered(model):
        pos, next_pos = model.rope_index(ids, grid, am)
        # the cache: whole blocks, and one slot more, so that a step never reads it all (a slice to
        # the full length is another graph to torch.compile: a second compile mid-run)
        block = SLOT_BLOCK.get(dev.type, 64)
        cache = model.new_cache(P, -(-(T + max_new_tokens) // block) * block + 1, device=dev)
        logits = model(ids, am, pv, grid, position_ids=pos, cache=cache, logits="last")[:, -1]
        # each prompt's cache and last logits copied into its n rows
        rows = torch.arange(P, device=dev).repeat_interleave(n)
        if n > 1:
            cache, logits, next_pos = cache.select_rows(rows), logits[rows], next_pos[rows]
        keys = torch.as_tensor(keys if keys is not None else range(P), dtype=torch.long, device=dev)[rows]
        samples = torch.arange(n, device=dev).repeat(P)

        stop = torch.tensor(stop_ids, dtype=torch.long, device=dev)
        ban = ban_bias(ban_ids, logits.shape[-1], dev)
        # every step's uniforms made up front, (R, N): step i writes slot T + i of each row
        idx = torch.arange(max_new_tokens, device=dev)
        us = row_uniform(seed, keys[:, None], samples[:, None], idx) if temperature > 0 else None
        tok, lp = choose(logits, temperature, top_k, top_p, us[:, 0] if us is not None else None, ban)
        tokens, logps = decode_loop(model, cache, tok, lp, next_pos, us, max_new_tokens, stop,
                                    (ban, temperature, top_k, top_p), compile)

    # a row ends at its first stop token (kept), or at the budget; pad and log-prob 0 after it
    is_stop = torch.isin(tokens, stop)
    after = (is_stop.cumsum(1) - is_stop.long()) > 0
    tokens, logps = tokens.masked_fill(after, pad_id), logps.masked_fill(after, 0.0)
    lengths = max_new_tokens - after.sum(1)
    steps = int(lengths.max())
    tokens, logps = tokens[:, :steps], logps[:, :steps]
    texts = []
    if tokenizer is not None:
        texts = [tokenizer.decode(tokens[r, :lengths[r]].tolist(), skip_special_tokens=True) for r in range(R)]
    finished = is_stop.any(1)
    return Samples(tokens.cpu(), logps.cpu(), lengths.cpu(), finished.cpu(), rows.cpu(), samples.cpu(), texts)

# -----------------------------------------------------------------------------
# CLI: one image + question, a JSONL file of records, or the two steps that build the first SFT
# set (caption, reason); batch modes append per batch and resume

# the paper's captioning instruction (OpenVLThinker, iteration 1), written out in full
CAPTION_PROMPT = (
    "Please provide a detailed description of this image that could help another AI model "
    "understand it completely, as if that model could not see the image. Describe every object "
    "with its colour, shape, size and position, and say how many there are of each kind. Read out "
    "all text, numbers, labels and symbols exactly as written. For a chart or plot give the title, "
    "the axes with their ranges and units, the legend, and the value of every bar, point or "
    "segment; for a table give every row and column; for a geometric figure give every labelled "
    "point, line, length and angle and how the parts are connected. Do not solve any problem "
    "shown; only describe what is there.")
# to the text-only reasoner: the caption stands in for the image. {caption} and {question} are
# replaced (no str.format, so braces like \boxed{} need no escaping). DeepSeek-R1's own advice
# for math: no system prompt, "reason step by step ... within \boxed{}".
REASON_PROMPT = (
    "You are given a detailed description of an image, and a question about that image.\n\n"
    "Image description:\n{caption}\n\n"
    "Question:\n{question}\n\n"
    "Answer the question using the description as if you could see the image. Please reason step "
    "by step, and put your final answer within \\boxed{}.")
TASK_DEFAULTS = {  # sampling settings of each --task, where a flag is not given
    "sample": dict(n=4, temperature=1.0, top_p=0.99, max_new_tokens=512),    # the GRPO rollout's
    "caption": dict(n=1, temperature=0.0, top_p=1.0, max_new_tokens=512),   # one greedy caption
    # DeepSeek-R1-Distill's recommended temperature 0.6, top-p 0.95; traces over 500 words (~700
    # tokens) are dropped by the filter anyway, so a longer budget only costs time
    "reason": dict(n=4, temperature=0.6, top_p=0.95, max_new_tokens=1024),
    # the iterative loop: the current VLM answers each training record k times (the paper: 4)
    "distill": dict(n=4, temperature=1.0, top_p=1.0, max_new_tokens=512),
}


def top_p(text):
    """An argparse type: a nucleus mass in (0, 1]."""
    value = data.positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


COMPILE_HELP = ("compile the decode step's forward once per process (torch.compile; on CUDA with CUDA graphs): "
                "on a 2-core CPU a step 1.7-2x faster for a compile of ~4 s (~20 s the first time on a machine)")


def sampling_args(p):
    d = "default per --task: " + "; ".join(f"{t} {{}}" for t in TASK_DEFAULTS)
    per_task = lambda k: d.format(*(TASK_DEFAULTS[t][k] for t in TASK_DEFAULTS))
    p.add_argument("--n", type=int, default=None, help="completions per prompt (" + per_task("n") + ")")
    p.add_argument("--temperature", type=data.at_least(0.0, float), default=None,
                   help="0 = greedy (" + per_task("temperature") + ")")
    p.add_argument("--top-p", type=top_p, default=None, help="nucleus sampling mass, 1.0 = off (" + per_task("top_p") + ")")
    p.add_argument("--top-k", type=data.at_least(0), default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--max-new-tokens", type=data.at_least(1), default=None,
                   help="completion budget, tokens (" + per_task("max_new_tokens") + ")")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--max-pixels", type=data.at_least(data.MIN_PIXELS), default=512 * 512, help="image resize cap, pixels")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)


def main(argv=None):
    """The command line; a bad file, row, checkpoint or flag value exits with status 2."""
    return data.cli("sample.py", sample_main, argv)


def sample_main(argv=None):
    p = data.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (HF layout, with tokenizer); "
                   "--task reason takes a text-only qwen2 one (DeepSeek-R1-Distill-Qwen)")
    p.add_argument("--task", default="sample", choices=list(TASK_DEFAULTS),
                   help="sample: answer questions (one image + --question, or --data); caption: "
                   "describe each record's images; reason: solve each record from its caption; "
                   "distill: answer each record n times with the VLM itself, written like reason's "
                   "output (the iterative loop's next SFT set, after data.py traces)")
    p.add_argument("--image", help="an image file (single-prompt mode)")
    p.add_argument("--question", help="the question (single-prompt mode)")
    p.add_argument("--data", help="JSONL of records (batch mode; --task reason: the caption step's output)")
    p.add_argument("--out", help="output JSONL (batch mode); appended per batch, a rerun resumes")
    p.add_argument("--batch-size", type=data.at_least(1), default=16, help="prompts per generation call")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad rows of --data (unreadable "
                   "image, prompt over the context, ...); default: stop at the first, naming it")
    p.add_argument("--caption-prompt", default=CAPTION_PROMPT, help="--task caption: the instruction "
                   "shown with the images (default: the paper's, in full)")
    p.add_argument("--reason-prompt", default=REASON_PROMPT, help="--task reason: the text model's "
                   "prompt; {caption} and {question} are replaced")
    p.add_argument("--suffix", default="", help="--task distill: text after each question, '' or 'r1' "
                   "(the same as the model was trained with)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="weights dtype (auto: bf16 on cuda)")
    sampling_args(p)
    a = p.parse_args(argv)
    for k, v in TASK_DEFAULTS[a.task].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.n < 1:
        p.error(f"--n must be >= 1, got {a.n}")
    if a.task != "sample" and not (a.data and a.out):
        p.error(f"--task {a.task} needs --data and --out")
    if a.task == "sample" and (a.data is None) == (a.question is None):
        p.error("give either --question (with --image) or --data and --out")
    if a.data and not a.out:
        p.error("--data needs --out")
    if a.task == "reason" and not all(f in a.reason_prompt for f in ("{caption}", "{question}")):
        p.error("--reason-prompt must contain {caption} and {question}")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(a.dtype) or (
        torch.bfloat16 if a.device.startswith("cuda") else torch.float32)
    model = data.open_model(a.model, dtype=dtype, device=a.device).eval()
    tok = data.load_tokenizer(a.model)
    kw = dict(n=a.n, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
              top_k=a.top_k, seed=a.seed, tokenizer=tok, pad_id=tok.pad_token_id or 0, compile=a.compile)
    px = dict(max_pixels=a.max_pixels)
    budget = model.config.max_position_embeddings - a.max_new_tokens  # generate's default
    rows = lambda length: load_rows(a.data, a.skip_bad, length, budget)
    if a.task == "caption":
        return run_captions(model, tok, rows, a.out, a.batch_size, a.caption_prompt, px, kw)
    if a.task == "reason":
        return run_reasoning(model, tok, rows, a.out, a.batch_size, a.reason_prompt, kw)
    if a.task == "distill":
        return run_distill(model, tok, rows, a.out, a.batch_size, a.suffix, px, kw)
    if a.question is not None:
        return run_one(model, tok, a.question, [a.image] if a.image else [], px, kw)
    run_batch(model, tok, rows, a.out, a.batch_size, px, kw)


def run_one(model, tok, question, images, px, kw):
    """One prompt (--question, --image): print its n completions."""
    try:
        data.check_text(dict(question=question, solution=None, choices=None))
    except ValueError as e:
        raise data.BadInput(f"--question: {e}") from None
    out = generate(model, [data.encode_prompt(tok, question, images, **px)], **kw)
    for j, text in enumerate(out.texts):
        print(f"--- sample {j} ({int(out.lengths[j])} tokens)\n{text}")


def load_rows(data_path, skip_bad, length, budget):
    """The records of data_path whose prompt (length(record) tokens) fits in the context left
    for the completion; a bad row (see data.load_records) or one over the budget is an error
    naming its file:line, or with skip_bad skipped and counted."""
    records, n_bad = data.load_records(data_path, skip_bad=skip_bad)
    records, n_long = data.within_budget(records, length, budget, skip_bad,
                                         "the context left for --max-new-tokens,")
    if n_bad + n_long:
        print(f"skipped {n_bad + n_long} bad rows of {data_path}", file=sys.stderr)
    return records


def run_batch(model, tok, rows, out_path, batch_size, px, kw):
    """Sample every record of a JSONL file; append one line per completion to out_path. Records
    whose n completions are already in out_path are skipped (a rerun resumes). rows(length) ->
    the usable records (load_rows)."""
    from tqdm import tqdm
    records = rows(lambda r: data.prompt_length(tok, data.format_question(r), r["images"], **px))
    done, lines = {}, load_done(out_path)
    for r in lines:
        done[r["id"]] = done.get(r["id"], 0) + 1
    if any(c < kw["n"] for c in done.values()):  # a batch cut short: drop its partial records
        data.write_jsonl(out_path, [r for r in lines if done[r["id"]] >= kw["n"]])
    todo = [(i, r) for i, r in enumerate(records) if done.get(r["id"], 0) < kw["n"]]
    print(f"{len(records)} records, {len(records) - len(todo)} already done, {len(todo)} to sample", file=sys.stderr)
    with open(out_path, "a") as f, tqdm(total=len(todo), desc="sample") as bar:
        for s in range(0, len(todo), batch_size):
            keys, chunk = zip(*todo[s:s + batch_size])
            encs = [data.encode_prompt(tok, data.format_question(r), r["images"], **px) for r in chunk]
            out = generate(model, encs, keys=list(keys), **kw)
            for r in range(len(out.texts)):
                rec = chunk[int(out.prompt_index[r])]
                f.write(json.dumps(dict(id=rec["id"], sample=int(out.sample_index[r]), text=out.texts[r],
                                        length=int(out.lengths[r]), finished=bool(out.finished[r]))) + "\n")
            f.flush()
            bar.update(len(chunk))

# the first SFT set (the paper's iteration 1): a VLM captions each image, a text-only R1 model
# solves the question from caption + question; data.py's `traces` command then filters. Each step
# reads records and writes them back (our JSONL form, data.record_row) with one field added,
# `caption` or `traces`, so every intermediate file is a data file that data.load_records reads.


def load_done(out_path):
    """The rows already in a one-line-per-record output file, so a rerun can skip their ids. A
    last line cut short by a crash is dropped (the file is rewritten atomically) and appending
    goes on; a bad line anywhere else is an error naming it."""
    if not os.path.exists(out_path):
        return []
    with open(out_path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows, torn = [], False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i != len(lines) - 1:  # only the unterminated last line can be a torn write
                raise data.BadInput(f"{out_path}:{i + 1}: malformed JSON ({e}); fix or remove the line") from None
            torn = True
    if torn:
        print(f"{out_path}: dropping a last line cut short", file=sys.stderr)
        data.write_jsonl(out_path, rows)
    return rows


def run_records(records, out_path, batch_size, task, step):
    """The loop of the caption and reason steps: skip the records whose id is in out_path already,
    call step(list of (index, record)) -> one row per record, append each batch's rows at once."""
    from tqdm import tqdm
    done = {r.get("id") for r in load_done(out_path)}
    todo = [(i, r) for i, r in enumerate(records) if r["id"] not in done]
    print(f"{task}: {len(records)} records, {len(records) - len(todo)} already done, {len(todo)} to go",
          file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "a", encoding="utf-8", newline="\n") as f, tqdm(total=len(todo), desc=task) as bar:
        for s in range(0, len(todo), batch_size):
            batch = todo[s:s + batch_size]
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in step(batch)))
            f.flush()
            bar.update(len(batch))
    return len(todo)


def run_captions(model, tok, rows, out_path, batch_size, prompt, px, kw):
    """--task caption: one caption per record, of all its images at once (n is 1: a caption is a
    description, not a sample). A record without images gets caption "" and no model call."""
    records = rows(lambda r: data.prompt_length(tok, prompt, r["images"], **px))

    def step(batch):
        seen = [(i, r) for i, r in batch if r["images"]]
        caps = {}
        if seen:
            encs = [data.encode_prompt(tok, prompt, r["images"], **px) for _, r in seen]
            out = generate(model, encs, keys=[i for i, _ in seen], **{**kw, "n": 1})
            caps = {i: out.texts[j].strip() for j, (i, _) in enumerate(seen)}
        return [data.record_row(r, caption=caps.get(i, "")) for i, r in batch]
    return run_records(records, out_path, batch_size, "caption", step)


def traces_by_prompt(out, heads):
    """generate()'s completions grouped by prompt: for prompt b, a list of {text, length,
    finished}, each text prefixed with heads[b] (what the prompt already opened, e.g. "<think>\n")."""
    traces = [[] for _ in heads]
    for j, text in enumerate(out.texts):
        b = int(out.prompt_index[j])
        traces[b].append(dict(text=heads[b] + text, length=int(out.lengths[j]),
                              finished=bool(out.finished[j])))
    return traces


def reason_prompt(tok, template, record):
    """The text model's prompt for one record: the caption and the question (with its options)
    put into the template, as one user turn of the model's own chat template."""
    caption = record["meta"].get("caption")
    if not isinstance(caption, str):
        raise data.BadInput(f"{record['source']}: record {record['id']!r} has no caption "
                         f"(run sample.py --task caption first)")
    fields = {"caption": caption, "question": data.format_question(record)}
    text = re.sub(r"\{(caption|question)\}", lambda m: fields[m.group(1)], template)
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                   add_generation_prompt=True)


def run_reasoning(model, tok, rows, out_path, batch_size, template, kw):
    """--task reason: n traces per record from a text-only model, written as the record plus
    `traces`: [{text, length, finished}]. R1-Distill's chat template opens <think> in the
    prompt; then "<think>\\n" is put back in front of each text, so a trace reads whole."""
    records = rows(lambda r: len(tok(reason_prompt(tok, template, r), add_special_tokens=False)["input_ids"]))

    def step(batch):
        prompts = [reason_prompt(tok, template, r) for _, r in batch]
        encs = [{"input_ids": torch.tensor(tok(p, add_special_tokens=False)["input_ids"], dtype=torch.long)}
                for p in prompts]
        out = generate(model, encs, keys=[i for i, _ in batch], **kw)
        heads = ["<think>\n" if p.rstrip().endswith("<think>") else "" for p in prompts]
        traces = traces_by_prompt(out, heads)
        return [data.record_row(r, traces=t) for (_, r), t in zip(batch, traces)]
    return run_records(records, out_path, batch_size, "reason", step)


def run_distill(model, tok, rows, out_path, batch_size, suffix, px, kw):
    """--task distill (the iterative loop, paper section 3): the current VLM answers each record
    n times; written as the record plus `traces`, like --task reason, so that `python data.py
    traces` keeps the shortest correct answer of each record as the next SFT set."""
    suffix = data.SUFFIXES.get(suffix, suffix)
    records = rows(lambda r: data.prompt_length(tok, data.format_question(r, suffix), r["images"], **px))

    def step(batch):
        encs = [data.encode_prompt(tok, data.format_question(r, suffix), r["images"], **px) for _, r in batch]
        out = generate(model, encs, keys=[i for i, _ in batch], **kw)
        traces = traces_by_prompt(out, [""] * len(batch))
        return [data.record_row(r, traces=t) for (_, r), t in zip(batch, traces)]
    return run_records(records, out_path, batch_size, "distill", step)


if __name__ == "__main__":
    main()
