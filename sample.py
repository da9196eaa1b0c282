"""
The batched KV-cached sampler: prefill each prompt once (vision tower included), copy its cache
into the n rows of its group, then decode all rows together until each stops.

    from sample import generate
    prompts = [data.encode_prompt(tok, "How many red shapes?", [img]), ...]
    out = generate(model, prompts, n=4, max_new_tokens=256, temperature=1.0, top_p=0.99, seed=0,
                   stop_ids=[im_end, endoftext], tokenizer=tok)
    out.tokens     (R, L) long    completion tokens, row r = prompt r // n, sample r % n; padded
    out.logprobs   (R, L) float   log-prob of each token under the model (untempered, full vocab)
    out.lengths    (R,)   long    tokens in each completion (the stop token counts)
    out.finished   (R,)   bool    stopped on a stop token (False: hit max_new_tokens)
    out.texts      list[str]      decoded completions (special tokens dropped)

Why it is fast: K/V live in buffers allocated once (model.KVCache) and written in place; the
prompt and image are encoded once per prompt, not once per sample; a decode step computes the
LM head for one position per row; under FSDP2 the weights are gathered once per call to
generate (not once per step): see `gathered`.

Sampling: temperature, then top-k, then top-p (the smallest set of most likely tokens whose
probability reaches top_p), then one draw by inverse CDF. The uniform for the draw is a hash of
(seed, key of the prompt, sample index, step), not a stream from a shared generator: a row's
sample depends only on its own logits and key, so batching, the order of prompts and the number
of processes do not change what is drawn. temperature 0 is greedy. Vision tokens (<|image_pad|>,
<|vision_start|>, ...) are never emitted: a sampled <|image_pad|> would break the next forward.

Masks come from lengths, never from token identity (the pad id may equal EOS).

CLI:
    python sample.py --model DIR --image PATH --question "..." [--n 4 --temperature 1.0 --top-p 0.99]
    python sample.py --model DIR --data FILE.jsonl --out FILE.jsonl [--n 4 ...]   # batch, resumable
"""

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass

import torch

import data
import model as M

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
    """One uniform in (0, 1) per row, a pure function of (seed, key, sample index, step)."""
    h = _mix32(torch.full_like(keys, seed & 0xFFFFFFFF) ^ 0x9E3779B9)
    for v in (keys, samples, torch.full_like(keys, step)):
        h = _mix32(h ^ (v & 0xFFFFFFFF))
    return (h.double() + 0.5) / 2.0 ** 32


def filter_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """logits (R, V) -> the probabilities we sample from (R, V), float32, zero outside the kept set.
    top_k 0 and top_p 1.0 mean off."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k <= 0 and top_p >= 1.0:
        return probs
    ps, idx = probs.sort(dim=-1, descending=True)
    keep = torch.ones_like(ps, dtype=torch.bool)
    if top_k > 0:
        keep[:, top_k:] = False
    if top_p < 1.0:  # keep a token if the more likely ones alone do not reach top_p
        keep &= (ps.cumsum(-1) - ps) < top_p
    ps = ps * keep
    return torch.zeros_like(probs).scatter_(-1, idx, ps)


def draw(probs, u):
    """Inverse-CDF sampling: the first token whose cumulative probability exceeds u * total."""
    cdf = probs.double().cumsum(-1)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].to(cdf.dtype), right=True)
    return tok.squeeze(1).clamp_(max=probs.shape[-1] - 1)


def choose(logits, temperature, top_k, top_p, u, ban_ids):
    """logits (R, V) -> (tokens (R,), log-probs of those tokens under the untempered model)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if ban_ids is not None and len(ban_ids):
        logits = logits.clone()
        logits[:, ban_ids] = float("-inf")
    if temperature == 0:
        tok = logits.argmax(-1)
    else:
        tok = draw(filter_probs(logits, temperature, top_k, top_p), u)
    return tok, logp.gather(-1, tok[:, None]).squeeze(1)

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
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)

# -----------------------------------------------------------------------------
# the generation loop


@dataclass
class Samples:
    tokens: torch.Tensor         # (R, L) long, pad after each row's length
    logprobs: torch.Tensor       # (R, L) float32, 0 after each row's length
    lengths: torch.Tensor        # (R,) long
    finished: torch.Tensor       # (R,) bool
    prompt_index: torch.Tensor   # (R,) long, index into the prompts list
    sample_index: torch.Tensor   # (R,) long, 0..n-1
    texts: list


def vision_token_ids(cfg):
    return [i for i in (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                        cfg.vision_end_token_id) if i is not None and i < cfg.vocab_size]


def default_stop_ids(cfg, tokenizer=None):
    ids = set(cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id])
    if tokenizer is not None:
        for t in ("<|im_end|>", "<|endoftext|>"):
            i = tokenizer.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != tokenizer.unk_token_id:
                ids.add(i)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(model, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0, seed=0,
             stop_ids=None, ban_ids=None, keys=None, tokenizer=None, pad_id=0, max_prompt_len=None):
    """Sample n completions for each prompt. prompts: list of dicts with input_ids (T,) and
    optionally pixel_values, image_grid_thw (as data.encode_prompt makes them).
    keys: one int per prompt naming it for the sampler's hash (default: its index in the list);
    give global indices when prompts are split across processes. Returns Samples."""
    cfg = model.config
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not prompts:
        raise ValueError("no prompts")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling parameters: temperature={temperature}, top_p={top_p}, top_k={top_k}")
    lens = [len(p["input_ids"]) for p in prompts]
    budget = max_prompt_len if max_prompt_len is not None else cfg.max_position_embeddings - max_new_tokens
    for i, L in enumerate(lens):
        if L > budget:
            raise ValueError(f"prompt {i} has {L} tokens, more than the budget of {budget} "
                             f"(max_prompt_len, or max_position_embeddings - max_new_tokens)")
    stop_ids = default_stop_ids(cfg, tokenizer) if stop_ids is None else list(stop_ids)
    ban_ids = vision_token_ids(cfg) if ban_ids is None else list(ban_ids)
    dev = model.model.embed_tokens.weight.device
    P, R = len(prompts), len(prompts) * n

    # prefill: prompts left-padded to a common length, so every row decodes into the same slot
    batch = data.collate(prompts, pad_id, padding_side="left") if "pixel_values" in prompts[0] else None
    if batch is None:
        T = max(lens)
        ids = torch.full((P, T), pad_id, dtype=torch.long)
        am = torch.zeros(P, T, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, T - lens[i]:], am[i, T - lens[i]:] = p["input_ids"], 1
        batch = dict(input_ids=ids, attention_mask=am)
    batch = {k: v.to(dev) for k, v in batch.items()}
    ids, am = batch["input_ids"], batch["attention_mask"]
    pv, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
    if pv is not None and pv.shape[0] == 0:
        pv = grid = None
    T = ids.shape[1]
    with gathered(model):
        pos, next_pos = model.rope_index(ids, grid, am)
        cache = model.new_cache(P, T + max_new_tokens, device=dev)
        logits = model(ids, am, pv, grid, position_ids=pos, cache=cache, logits="last")[:, -1]
        # each prompt's cache and last logits copied into its n rows
        rows = torch.arange(P, device=dev).repeat_interleave(n)
        if n > 1:
            cache, logits, next_pos = cache.select_rows(rows), logits[rows], next_pos[rows]
        keys = torch.as_tensor(keys if keys is not None else range(P), dtype=torch.long, device=dev)[rows]
        samples = torch.arange(n, device=dev).repeat(P)

        tokens = torch.full((R, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        logps = torch.zeros(R, max_new_tokens, device=dev)
        lengths = torch.zeros(R, dtype=torch.long, device=dev)
        done = torch.zeros(R, dtype=torch.bool, device=dev)
        stop = torch.tensor(stop_ids, dtype=torch.long, device=dev)
        steps = 0
        for i in range(max_new_tokens):
            u = row_uniform(seed, keys, samples, i) if temperature > 0 else None
            tok, lp = choose(logits, temperature, top_k, top_p, u, ban_ids)
            tok = tok.masked_fill(done, pad_id)          # finished rows stay frozen
            tokens[:, i], logps[:, i] = tok, lp.masked_fill(done, 0.0)
            lengths += (~done).long()
            done |= torch.isin(tok, stop)
            steps = i + 1
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            # feed the new token at each row's own position; finished rows are masked out
            p = (next_pos + i).view(1, R, 1).expand(3, R, 1)
            logits = model(tok[:, None], (~done).long()[:, None], position_ids=p, cache=cache,
                           logits="last")[:, -1]

    tokens, logps = tokens[:, :steps], logps[:, :steps]
    texts = []
    if tokenizer is not None:
        texts = [tokenizer.decode(tokens[r, :lengths[r]].tolist(), skip_special_tokens=True) for r in range(R)]
    finished = torch.isin(tokens.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1), stop) & (lengths > 0)
    return Samples(tokens.cpu(), logps.cpu(), lengths.cpu(), finished.cpu(), rows.cpu(), samples.cpu(), texts)

# -----------------------------------------------------------------------------
# CLI: one image + question, or a JSONL file of records (resumable)


def sampling_args(p):
    p.add_argument("--n", type=int, default=4, help="completions per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.99, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="completion budget, tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--max-pixels", type=int, default=512 * 512, help="image resize cap, pixels")
    p.add_argument("--min-pixels", type=int, default=data.MIN_PIXELS, help="image resize floor, pixels")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (HF layout, with tokenizer)")
    p.add_argument("--image", help="an image file (single-prompt mode)")
    p.add_argument("--question", help="the question (single-prompt mode)")
    p.add_argument("--data", help="JSONL of records (batch mode)")
    p.add_argument("--out", help="output JSONL, one line per completion (batch mode); resumes")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="weights dtype (auto: bf16 on cuda)")
    sampling_args(p)
    a = p.parse_args(argv)
    if a.n < 1:
        p.error(f"--n must be >= 1, got {a.n}")
    if (a.data is None) == (a.question is None):
        p.error("give either --question (with --image) or --data and --out")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(a.dtype) or (
        torch.bfloat16 if a.device.startswith("cuda") else torch.float32)
    model = M.load_model(a.model, dtype=dtype, device=a.device).eval()
    tok = data.load_tokenizer(a.model)
    kw = dict(n=a.n, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
              top_k=a.top_k, seed=a.seed, tokenizer=tok, pad_id=tok.pad_token_id or 0)
    px = dict(min_pixels=a.min_pixels, max_pixels=a.max_pixels)
    if a.question is not None:
        images = [a.image] if a.image else []
        enc = data.encode_prompt(tok, a.question, images, **px)
        out = generate(model, [enc], **kw)
        for j, text in enumerate(out.texts):
            print(f"--- sample {j} ({int(out.lengths[j])} tokens)\n{text}")
        return
    if not a.out:
        p.error("--data needs --out")
    run_batch(model, tok, a.data, a.out, a.batch_size, px, kw)


def run_batch(model, tok, data_path, out_path, batch_size, px, kw):
    """Sample every record of a JSONL file; append one line per completion to out_path. Records
    whose n completions are already in out_path are skipped (a rerun resumes)."""
    from tqdm import tqdm
    records, n_bad = data.load_records(data_path)
    done, lines = {}, []
    if os.path.exists(out_path):
        with open(out_path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
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


if __name__ == "__main__":
    main()
