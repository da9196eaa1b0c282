"""
Accuracy of a checkpoint on a benchmark file, broken down by type.

    python eval.py --model runs/grpo1                   # the held-out synthetic test split (2000)
    python eval.py --model DIR --data testmini.jsonl --suffix r1 --max-new-tokens 2048
    torchrun --nproc_per_node=8 eval.py --model DIR --data FILE   # data-parallel, rank 0 gathers
    python eval.py --data FILE --predictions preds.jsonl          # rescore saved completions

Completions are greedy (temperature 0) through sample.py and scored by reward.py: the last
<answer>...</answer> (else \\boxed{}, else "the answer is X") matched against the ground truth
by rules (numbers, fractions, LaTeX, multiple choice by letter or option text). How this departs
from the benchmarks' official scripts: MathVista and MathVerse ask GPT-4 to extract and judge
the answer; we use no LLM, so scores are deterministic and free, and a model that does not
write a parseable answer scores 0 on that item. Prints accuracy overall and by question_type,
answer_type, family, level, subject (where the data has them); writes one JSON line per item
(id, completion, extracted answer, correct) with --out; its last line is `accuracy X`.
"""

import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist

import data
import model as M
import reward
import sample

BREAKDOWN = ("question_type", "answer_type", "family", "level", "subject", "problem_version", "category")

# -----------------------------------------------------------------------------
# the distributed kit: one plain process, or one of torchrun's (sft.py and grpo.py import it)


def dist_init(device=None):
    """-> (rank, world_size, device). Under torchrun (RANK/WORLD_SIZE set): join the process
    group, gloo on CPU, nccl on CUDA (one GPU per local rank). Otherwise one plain process on
    `device` (default: cuda if available, else cpu), no process group. Idempotent."""
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def dist_cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main():
    return rank_world()[0] == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x):
    """Sum a tensor over ranks (in place, returns it); a no-op in one process."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


# -----------------------------------------------------------------------------
# scoring


def score(record, completion):
    """One item's result row: id, completion, extracted answer, correct, and its breakdown keys."""
    ok = reward.accuracy_reward(completion, record["answer"], record.get("choices")) == 1.0
    row = dict(id=record["id"], completion=completion, extracted=reward.extract_answer(completion),
               answer=record["answer"], correct=ok)
    meta = record.get("meta") or {}
    row.update({k: meta[k] for k in BREAKDOWN if isinstance(meta.get(k), (str, int))})
    return row


def summarize(results):
    """{"accuracy", "n", "by": {key: {value: (accuracy, n)}}} over result rows."""
    n = len(results)
    summary = dict(accuracy=sum(r["correct"] for r in results) / max(n, 1), n=n, by={})
    for key in BREAKDOWN:
        groups = {}
        for r in results:
            if key in r:
                groups.setdefault(str(r[key]), []).append(r["correct"])
        if len(groups) > 1 or (groups and key in ("family", "subject")):
            summary["by"][key] = {v: (sum(c) / len(c), len(c)) for v, c in sorted(groups.items())}
    return summary


def format_summary(summary):
    lines = [f"{summary['n']} items"]
    for key, groups in summary["by"].items():
        lines.append(f"by {key}:")
        lines += [f"  {v:<24} {acc:6.1%}  (n={n})" for v, (acc, n) in groups.items()]
    lines.append(f"accuracy {summary['accuracy']:.4f}")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# generation


@torch.no_grad()
def evaluate(model, tokenizer, records, batch_size=32, max_new_tokens=256, temperature=0.0,
             suffix="", max_pixels=512 * 512, min_pixels=data.MIN_PIXELS, rank=0, world_size=1,
             progress=True):
    """Greedy completions for every record, scored. Under torchrun each rank takes every
    world_size-th record; every rank runs the same number of generate calls (an FSDP model
    gathers its weights collectively in each), and the results are gathered on every rank.
    Returns (results in record order, summary)."""
    from tqdm import tqdm
    was_training = model.training
    model.eval()
    mine = list(range(rank, len(records), world_size))
    per_rank = math.ceil(len(records) / world_size)
    n_calls = math.ceil(per_rank / batch_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    bar = tqdm(total=len(records), desc="eval", disable=not (progress and rank == 0))
    for c in range(n_calls):
        idx = mine[c * batch_size:(c + 1) * batch_size]
        todo = idx or [0]  # a rank out of records still joins the call, and drops the result
        encs = [data.encode_prompt(tokenizer, data.format_question(records[i], data.SUFFIXES.get(suffix, suffix)),
                                   records[i]["images"], min_pixels=min_pixels, max_pixels=max_pixels)
                for i in todo]
        s = sample.generate(model, encs, n=1, max_new_tokens=max_new_tokens, temperature=temperature,
                            keys=todo, tokenizer=tokenizer, pad_id=pad_id)
        out += [(i, score(records[i], s.texts[j])) for j, i in enumerate(idx)]
        bar.update(len(idx) * world_size)
    bar.close()
    if world_size > 1:
        parts = [None] * world_size
        torch.distributed.all_gather_object(parts, out)
        out = [x for p in parts for x in p]
    results = [r for _, r in sorted(out, key=lambda x: x[0])]
    model.train(was_training)
    return results, summarize(results)


def rescore(records, predictions_path):
    """Score saved completions (JSON lines with id and text or completion) without a model.
    Several lines per id (n samples each) are all scored."""
    by_id = {r["id"]: r for r in records}
    results = []
    with open(predictions_path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            p = json.loads(line)
            if p.get("id") not in by_id:
                raise KeyError(f"{predictions_path}:{lineno}: id {p.get('id')!r} is not in the data file")
            text = p.get("text", p.get("completion"))
            if not isinstance(text, str):
                raise ValueError(f"{predictions_path}:{lineno}: no 'text' or 'completion' string")
            results.append(score(by_id[p["id"]], text))
    return results, summarize(results)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (HF layout, with tokenizer)")
    p.add_argument("--data", help="benchmark file (JSONL: ours, MathVista, MathVerse, MathVision; "
                                  "or MathVista's annotation JSON); default: the synthetic test split")
    p.add_argument("--n-test", type=int, default=2000, help="held-out synthetic problems when --data is not "
                   "given (the staircase's 2000; the first N of them)")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N items only (0 = all)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generation call, per process")
    p.add_argument("--max-new-tokens", type=int, default=256, help="completion budget, tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--suffix", default="", help="text after each question: '' (default, the synthetic "
                                                 "world), 'r1' (the paper's prompt) or a literal string")
    p.add_argument("--max-pixels", type=int, default=512 * 512, help="image resize cap, pixels")
    p.add_argument("--out", help="write per-item results (JSONL) here")
    p.add_argument("--predictions", help="rescore this JSONL of completions (id, text) instead of generating")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed rows instead of failing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    a = p.parse_args(argv)
    if a.data:
        records, n_bad = data.load_records(a.data, skip_bad=a.skip_bad)
        if n_bad:
            print0(f"skipped {n_bad} bad rows of {a.data}")
    else:
        records = data.synth_test_records(a.n_test)
    if a.limit:
        records = records[:a.limit]
    if a.predictions:
        results, summary = rescore(records, a.predictions)
    else:
        if not a.model:
            p.error("--model is required unless --predictions is given")
        rank, world, device = dist_init() if a.device != "cpu" or "RANK" in os.environ else (0, 1, a.device)
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        t0 = time.time()
        model = M.load_model(a.model, dtype=dtype, device=device)  # replicated: data-parallel eval
        tok = data.load_tokenizer(a.model)
        results, summary = evaluate(model, tok, records, a.batch_size, a.max_new_tokens, a.temperature,
                                    a.suffix, a.max_pixels, rank=rank, world_size=world)
        print0(f"evaluated {len(records)} items in {time.time() - t0:.1f}s")
        if rank != 0:
            dist_cleanup()
            return
    if a.out:
        data.write_jsonl(a.out, results)
    print(format_summary(summary))
    if not a.predictions:
        dist_cleanup()


if __name__ == "__main__":
    main()
