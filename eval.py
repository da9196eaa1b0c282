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
(id, completion, extracted answer, correct) with --out, batch by batch: a rerun with the same
--out skips the items already there (a crash loses one batch). Its last line is `accuracy X`.
"""

import json
import math
import os
import time

import torch
import torch.distributed as dist

import data
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
             progress=True, sink=None, compile=False):
    """Greedy completions for every record, scored. Under torchrun each rank takes every
    world_size-th record; every rank runs the same number of generate calls (an FSDP model
    gathers its weights collectively in each), and each call's results are gathered on every
    rank, then passed to sink(rows in record order) if given (eval.py appends them to --out).
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
                            keys=todo, tokenizer=tokenizer, pad_id=pad_id, compile=compile)
        new = [(i, score(records[i], s.texts[j])) for j, i in enumerate(idx)]
        if world_size > 1:
            parts = [None] * world_size
            torch.distributed.all_gather_object(parts, new)
            new = [x for p in parts for x in p]
        new.sort(key=lambda x: x[0])  # call c covers records [c, c + 1) * batch_size * world_size
        if sink is not None:
            sink([r for _, r in new])
        out += new
        bar.update(len(idx) * world_size)
    bar.close()
    results = [r for _, r in sorted(out, key=lambda x: x[0])]
    model.train(was_training)
    return results, summarize(results)


def rescore(records, predictions_path):
    """Score saved completions (JSON lines with id and text or completion) without a model.
    Several lines per id (n samples each) are all scored."""
    by_id = {r["id"]: r for r in records}
    results = []
    with open(predictions_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                p = json.loads(line)
            except json.JSONDecodeError as e:
                raise data.BadInput(f"{predictions_path}:{lineno}: malformed JSON ({e})") from None
            if not isinstance(p, dict) or p.get("id") not in by_id:
                raise data.BadInput(f"{predictions_path}:{lineno}: id {p.get('id') if isinstance(p, dict) else p!r} "
                                    "is not in the data file")
            text = p.get("text", p.get("completion"))
            if not isinstance(text, str):
                raise data.BadInput(f"{predictions_path}:{lineno}: no 'text' or 'completion' string")
            results.append(score(by_id[p["id"]], text))
    if not results:
        raise data.BadInput(f"{predictions_path}: no predictions")
    return results, summarize(results)


def parser():
    p = data.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (HF layout, with tokenizer)")
    p.add_argument("--data", help="benchmark file (JSONL: ours, MathVista, MathVerse, MathVision; "
                                  "or MathVista's annotation JSON); default: the synthetic test split")
    p.add_argument("--n-test", type=data.at_least(1), default=2000, help="held-out synthetic problems when "
                   "--data is not given (the staircase's 2000; the first N of them)")
    p.add_argument("--limit", type=data.at_least(0), default=0, help="evaluate the first N items only (0 = all)")
    p.add_argument("--batch-size", type=data.at_least(1), default=32, help="prompts per generation call, per process")
    p.add_argument("--max-new-tokens", type=data.at_least(1), default=256, help="completion budget, tokens")
    p.add_argument("--temperature", type=data.at_least(0.0, float), default=0.0, help="0 = greedy")
    p.add_argument("--compile", action="store_true", help=sample.COMPILE_HELP)
    p.add_argument("--suffix", default="", help="text after each question: '' (default, the synthetic "
                                                 "world), 'r1' (the paper's prompt) or a literal string")
    p.add_argument("--max-pixels", type=data.at_least(data.MIN_PIXELS), default=512 * 512, help="image resize cap, pixels")
    p.add_argument("--out", help="write per-item results (JSONL) here, batch by batch; a rerun skips the ids already there")
    p.add_argument("--predictions", help="rescore this JSONL of completions (id, text) instead of generating")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad rows (malformed, unreadable image, "
                   "prompt over the context) instead of stopping at the first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    return p


def main(argv=None):
    """The command line; a bad file, row, checkpoint or flag value exits with status 2."""
    return data.cli("eval.py", eval_main, argv)


def eval_main(argv=None):
    p = parser()
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
        if a.out:
            data.write_jsonl(a.out, results)
    else:
        if not a.model:
            p.error("--model is required unless --predictions is given")
        results, summary = generate_and_score(a, records)
        if results is None:
            return  # not rank 0
    print(format_summary(summary))


def generate_and_score(a, records):
    """eval.py with a model: the prompts over the context are bad rows; the ids already in --out
    are skipped; each batch's results are appended to --out. -> (results, summary) on rank 0,
    (None, None) on the others."""
    rank, world, device = dist_init() if a.device != "cpu" or "RANK" in os.environ else (0, 1, a.device)
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    t0 = time.time()
    model = data.open_model(a.model, dtype=dtype, device=device)  # replicated: data-parallel eval
    tok = data.load_tokenizer(a.model)
    suffix = data.SUFFIXES.get(a.suffix, a.suffix)
    length = lambda r: data.prompt_length(tok, data.format_question(r, suffix), r["images"], max_pixels=a.max_pixels)
    records, n_long = data.within_budget(records, length, model.config.max_position_embeddings - a.max_new_tokens,
                                         a.skip_bad, "the context left for --max-new-tokens,")
    if n_long:
        print0(f"skipped {n_long} prompts over the context")
    done = load_done(a.out) if a.out else {}
    todo = [r for r in records if r["id"] not in done]
    if done:
        print0(f"{len(records) - len(todo)} of {len(records)} items already in {a.out}, {len(todo)} to evaluate")
    f = open(a.out, "a", encoding="utf-8") if a.out and rank == 0 else None

    def append(rows):
        if f is not None:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
    new, _ = evaluate(model, tok, todo, a.batch_size, a.max_new_tokens, a.temperature, a.suffix, a.max_pixels,
                      rank=rank, world_size=world, sink=append, compile=a.compile) if todo else ([], None)
    if f is not None:
        f.close()
    print0(f"evaluated {len(todo)} items in {time.time() - t0:.1f}s")
    dist_cleanup()
    if rank != 0:
        return None, None
    by_id = {**done, **{r["id"]: r for r in new}}
    results = [by_id[r["id"]] for r in records]
    if a.out:
        data.write_jsonl(a.out, results)  # in record order, without rows of other ids
    return results, summarize(results)


def load_done(out_path):
    """{id: result row} already in --out (sample.load_done: a last line cut short is dropped).
    Under torchrun rank 0 reads it and the others receive it, so no rank reads a file being
    rewritten."""
    rows = [None]
    if is_main():
        rows = [{r["id"]: r for r in sample.load_done(out_path)
                 if isinstance(r, dict) and "id" in r and isinstance(r.get("correct"), bool)}]
    if dist.is_initialized():
        dist.broadcast_object_list(rows, src=0)
    return rows[0]


if __name__ == "__main__":
    main()
