"""Benchmark: sample.generate (greedy), uncompiled and compiled, against transformers' generate()
with the same weights.

    python tests/bench/bench_sampler.py --config demo              # CPU: the demo's model, GRPO's 16 x 8 rows
    python tests/bench/bench_sampler.py --config demo --model runs/sft1 --stop --new-tokens 192  # GRPO's lengths
    python tests/bench/bench_sampler.py                            # CPU, small model, batch 16
    python tests/bench/bench_sampler.py --device cuda --config 3b  # Qwen2.5-VL-3B shape, batch 1 and 64

A random-weight model is saved to a temp dir (or --model is used) and loaded by both sides: ours
with model.load_model, transformers' with Qwen2_5_VLForConditionalGeneration.from_pretrained.
demo: the demo's sizes (sft.DEMO_TINY, the tiny tokenizer) and prompts as GRPO encodes them
(synthetic problems, one 112x112 scene each), P prompts x G samples (default 16 x 8, 64 new
tokens: a GRPO rollout); HF gets each prompt G times in its batch. small, 3b: each prompt is
text + one 224x224 random-noise image (64 image tokens) + text, of different lengths (left
padding is exercised), G = 1. Both sides decode exactly --new-tokens tokens per row: ours with
stop_ids=[] and the EOS banned, transformers with min_new_tokens = max_new_tokens (which bans the
EOS the same way), the vision tokens banned on both sides; with --stop both stop each row at its
stop token instead (and ours halves its decode batch as rows stop). Runs alternate (HF, ours, ours
compiled, ...) after one warm-up each; the medians are reported. The compiled side's first call
compiles the decode step (once per process): its wall time is printed, compile included.

Printed per batch: tokens/s of each (the tokens made, rows * new tokens without --stop, / wall
time of the whole call, vision and prefill included), the ratio, ms per decode step, one decode step's forward timed alone, the
step's matrix products alone (every linear layer of the LM and the LM head applied once to the
batch: on a CPU the floor of a step whatever the code does), and the share of the memory-
bandwidth roofline (LM weight bytes * decode steps/s / the bandwidth of a large copy: at batch 1
on a GPU the floor that counts).

The last lines are `speedup_vs_hf_generate X` and `compiled_speedup_vs_hf_generate X`: ours /
HF tokens/s (with several batch sizes, the smallest of them).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import model as M  # noqa: E402
import sample  # noqa: E402
import sft  # noqa: E402

# special ids of the small config (vocab 32768): <|endoftext|> <|im_start|> <|im_end|> ...
SMALL_IDS = dict(bos_token_id=32000, eos_token_id=32002, vision_start_token_id=32003,
                 vision_end_token_id=32004, image_token_id=32005, video_token_id=32006)


def make_config(name):
    if name == "small":
        return M.Config(
            vocab_size=32768, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, mrope_section=[8, 12, 12],
            rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=8192,
            vision=M.VisionConfig(depth=4, hidden_size=128, intermediate_size=256, num_heads=4,
                                  out_hidden_size=256, fullatt_block_indexes=[3]),
            **SMALL_IDS)
    if name == "3b":  # Qwen2.5-VL-3B-Instruct's shapes and special ids (Config defaults)
        return M.Config(
            vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, mrope_section=[16, 24, 24],
            rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=128000,
            vision=M.VisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                  out_hidden_size=2048, fullatt_block_indexes=[7, 15, 23, 31]))
    raise ValueError(name)


def write_checkpoint(cfg, path, dtype, std):
    m = M.Qwen2_5_VL(cfg).init_weights(std=std, seed=0)
    M.save_model(m.to(dtype), path)
    del m


def demo_prompts(tok, P, seed=0):
    """P of the demo's GRPO prompts: synthetic problems (a 112x112 scene, 16 image tokens) as
    grpo.py encodes them."""
    return [data.encode_prompt(tok, data.format_question(r), r["images"])
            for r in data.synth_records(P, "mix", seed)]


def make_prompts(cfg, batch, seed=0):
    """batch prompts: <|im_start|> + text + <|vision_start|> + 64 <|image_pad|> + <|vision_end|>
    + text + <|im_end|> <|im_start|> + text, the texts random ids of varying lengths."""
    rng = np.random.default_rng(seed)
    im_start, im_end = cfg.bos_token_id + 1, cfg.bos_token_id + 2  # Qwen's order after <|endoftext|>
    text_vocab = min(cfg.bos_token_id, 32000)
    prompts = []
    for i in range(batch):
        img = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
        pv, grid = data.process_image(img)
        n_img = int(grid.prod()) // 4
        words = lambda n: rng.integers(0, text_vocab, n).tolist()  # noqa: E731
        ids = ([im_start] + words(8 + i % 5) + [cfg.vision_start_token_id]
               + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id] + words(10 + 3 * (i % 7))
               + [im_end, im_start] + words(2))
        prompts.append(dict(input_ids=torch.tensor(ids), pixel_values=pv, image_grid_thw=grid[None]))
    return prompts


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(dev, fn):
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t, out


def copy_bandwidth(dev, nbytes=2 * 2**30, reps=10):
    """Bytes moved per second (read + write) by a large device-to-device copy (on the CPU: with
    the torch threads this run uses, a buffer far larger than the caches)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    y.copy_(x)
    t, _ = timed(dev, lambda: [y.copy_(x) for _ in range(reps)])
    del x, y
    return 2 * nbytes * reps / t


def lm_weight_bytes(model):
    """Bytes of weights a decode step reads: the decoder layers, the final norm and the LM head
    (tied: the embedding matrix, counted once); not the vision tower, not embedding lookups."""
    seen, total = set(), 0
    for mod in (model.model.layers, model.model.norm, model.lm_head):
        for p in mod.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def decode_step_ms(model, batch, dev, G=1, steps=16, skip=0):
    """ms of one decode step's forward (model.decode: 1 token in each of P * G rows) and of the
    prefill (P prompts), timed directly: prefill the batch into a cache of T + skip + steps + 1
    slots, copy each prompt's row G times, then time single-token steps (each attends over
    every slot, under the mask)."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    P, T = ids.shape
    with torch.no_grad():
        pos, next_pos = model.rope_index(ids, batch["image_grid_thw"], am)
        cache = model.new_cache(P, T + skip + steps + 1, device=dev)
        t_prefill, _ = timed(dev, lambda: model(ids, am, batch["pixel_values"], batch["image_grid_thw"],
                                                position_ids=pos, cache=cache, logits="last"))
        rows = torch.arange(P, device=dev).repeat_interleave(G)
        cache, next_pos = cache.select_rows(rows), next_pos[rows]
        tok = torch.randint(0, min(1000, model.config.vocab_size), (P * G,), device=dev)
        times = []
        for k in range(steps):
            slot = torch.tensor([T + skip + k], device=dev)
            t, _ = timed(dev, lambda: model.decode(tok, next_pos + skip + k, slot, cache))
            times.append(t)
    return 1e3 * statistics.median(times[2:]), 1e3 * t_prefill


def full_forward_ms(model, batch, dev, reps=3):
    with torch.no_grad():
        times = [timed(dev, lambda: model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                          batch["image_grid_thw"], logits="last"))[0] for _ in range(reps)]
    return 1e3 * statistics.median(times)


def matmul_floor_ms(model, B, dev, reps=20):
    """ms of the decode step's matrix products alone: every linear layer of the language model
    (and the LM head) applied once to B rows, timed back to back with the same BLAS both sides
    use. Any implementation in this dtype pays at least this per step (on a CPU, where a batch-16
    step is compute-bound rather than bandwidth-bound, it is the floor that counts)."""
    mods = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)] + [model.lm_head]
    xs = [torch.randn(B, m.in_features, device=dev, dtype=m.weight.dtype) for m in mods]
    with torch.no_grad():
        run = lambda: [torch.nn.functional.linear(x, m.weight, m.bias) for x, m in zip(xs, mods)]  # noqa: E731
        run()
        t, _ = timed(dev, lambda: [run() for _ in range(reps)])
    return 1e3 * t / reps


def bench_batch(ours, hf, cfg, prompts, args, dev):
    """Time ours (uncompiled, and compiled unless --no-compile) and HF's generate on P prompts x
    G samples, greedy, every row exactly N new tokens (with --stop: up to its stop token, at most
    N). HF gets each prompt G times in its batch (greedy generate() takes no
    num_return_sequences): the rows ours returns, in the same order."""
    from transformers import GenerationConfig
    N, G, P = args.new_tokens, args.group, len(prompts)
    R, pad = P * G, 0
    vision = sample.vision_token_ids(cfg)
    eos = cfg.eos_token_id
    stops = sample.default_stop_ids(cfg, args.tokenizer) if args.stop else []
    batch = {k: v.to(dev) for k, v in data.collate(prompts, pad, "left").items()}
    rep = {k: v.repeat_interleave(G, 0) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    rep["pixel_values"] = torch.cat([p["pixel_values"] for p in prompts for _ in range(G)]).to(dev)
    rep["image_grid_thw"] = batch["image_grid_thw"].repeat_interleave(G, 0)
    mm = (rep["input_ids"] == cfg.image_token_id).int()
    T = batch["input_ids"].shape[1]

    def run_ours(n=N, compile=False):
        return sample.generate(ours, prompts, n=G, max_new_tokens=n, temperature=0, stop_ids=stops,
                               ban_ids=vision + ([] if stops else [eos]), pad_id=pad, compile=compile)

    def run_hf(n=N):
        gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=0 if stops else n,
                              eos_token_id=stops or eos, pad_token_id=pad, suppress_tokens=vision,
                              bos_token_id=cfg.bos_token_id)
        with torch.no_grad():
            return hf.generate(**rep, mm_token_type_ids=mm, generation_config=gc)

    r = dict(batch=R, prompt_len=T)
    run_hf(4), run_ours(4)  # warm-up
    if args.compile:  # the first call compiles the decode step (once per process): its whole wall time
        r["compile_s"], _ = timed(dev, lambda: run_ours(N, compile=True))
    sides = dict(hf=run_hf, ours=run_ours) | (dict(comp=lambda: run_ours(compile=True)) if args.compile else {})
    times = {k: [] for k in sides}
    n_tok, steps = R * N, N  # tokens made, decode steps (with --stop: each row's up to its stop)
    for _ in range(args.repeats):  # alternated, so a slow spell of the machine hits every side
        for k, fn in sides.items():
            t, out = timed(dev, fn)
            times[k].append(t)
            got = out[:, T:] if k == "hf" else out.tokens
            if k != "hf":
                n_tok, steps = int(out.lengths.sum()), int(out.lengths.max())
                assert stops or (got.shape == (R, N) and (out.lengths == N).all()), (got.shape, out.lengths)
            r[f"{k}_tokens"] = torch.nn.functional.pad(got.cpu(), (0, N - got.shape[1]), value=pad)
    r.update(tokens=n_tok, steps=steps)
    for k in sides:
        r[f"{k}_s"] = statistics.median(times[k])
        r[f"{k}_tok_s"] = n_tok / r[f"{k}_s"]
        if k != "hf":
            r[f"{k}_speedup"] = r["hf_s"] / r[f"{k}_s"]
            r[f"{k}_agree"] = (r[f"{k}_tokens"] == r["hf_tokens"]).float().mean().item()
    step_ms, prefill_ms = decode_step_ms(ours, batch, dev, G, skip=N // 2)
    r.update(step_ms=step_ms, prefill_ms=prefill_ms, hf_step_ms=1e3 * r["hf_s"] / steps,
             ours_step_ms=1e3 * (r["ours_s"] - prefill_ms / 1e3) / max(steps - 1, 1))
    if args.compile:
        r["comp_step_ms"] = 1e3 * (r["comp_s"] - prefill_ms / 1e3) / max(steps - 1, 1)
    r["full_ms"] = full_forward_ms(ours, batch, dev)
    decode_steps_per_s = (steps - 1) / max(r["ours_s"] - prefill_ms / 1e3, 1e-9)
    r["roofline"] = args.weight_bytes * decode_steps_per_s / args.bandwidth
    r["hf_roofline"] = args.weight_bytes * (steps / r["hf_s"]) / args.bandwidth
    r["mm_ms"] = matmul_floor_ms(ours, R, dev)  # a step that only multiplies
    return r


def profile_decode(model, cfg, prompts, G, dev, steps=8):
    """Where a decode step's time goes (ours): torch.profiler over a few generate steps."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sample.generate(model, prompts, n=G, max_new_tokens=4, temperature=0, stop_ids=[])
    with profile(activities=acts) as prof:
        sample.generate(model, prompts, n=G, max_new_tokens=steps, temperature=0, stop_ids=[])
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25))


def build(args, dtype, dev, d):
    """Write the benchmark's random checkpoint into d (or use --model), load it on both sides ->
    (ours, hf, the prompts of each batch size)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    path = args.model or d
    if args.config == "demo":
        if not args.model:
            m, tok = data.make_tiny_checkpoint(d, seed=0, **sft.DEMO_TINY)
            M.save_model(m.init_weights(std=args.std, seed=1).to(dtype), d)  # varied greedy tokens
        tok = args.tokenizer = data.load_tokenizer(path)
        prompts = {P: demo_prompts(tok, P) for P in args.batches}
    else:
        cfg = make_config(args.config)
        if not args.model:
            write_checkpoint(cfg, d, dtype, args.std)
        prompts = {P: make_prompts(cfg, P) for P in args.batches}
    ours = M.load_model(path, dtype=dtype, device=dev).eval()
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(dev).eval()
    return ours, hf, prompts


def report(rows, args):
    hdr = (f"{'rows':>5} {'HF tok/s':>10} {'ours tok/s':>10} {'speedup':>8} {'HF ms/step':>10} "
           f"{'ours ms/step':>12} {'fwd 1 step':>10} {'matmuls':>8} {'prefill':>9} {'full fwd':>9} {'agree':>6}"
           f" {'roofline':>8} {'HF roof':>8}")
    print(hdr)
    for r in rows:
        print(f"{r['batch']:>5} {r['hf_tok_s']:>10.1f} {r['ours_tok_s']:>10.1f} {r['ours_speedup']:>8.2f} "
              f"{r['hf_step_ms']:>10.2f} {r['ours_step_ms']:>12.2f} {r['step_ms']:>10.2f} {r['mm_ms']:>8.2f} "
              f"{r['prefill_ms']:>9.1f} {r['full_ms']:>9.1f} {r['ours_agree']:>6.3f}"
              f" {100 * r['roofline']:>7.1f}% {100 * r['hf_roofline']:>7.1f}%")
    print("columns: rows = prompts * group; tok/s = new tokens made / wall time of the whole generate "
          "call; ms/step: HF = its time / decode steps, ours = (time - prefill) / (decode steps - 1); fwd 1 "
          "step = one decode-step forward of ours timed alone; matmuls = the step's matrix products "
          "alone (the floor of a step on a CPU); prefill = our prefill forward (vision included); full "
          "fwd = one uncached forward of the prompts (ms); agree = share of greedy tokens equal to HF's; "
          "roofline = LM weight bytes * decode steps/s / copy bandwidth (HF roof: over HF's whole call)")
    for r in rows:
        print(f"rows {r['batch']}: HF's step / the step's matrix products alone {r['mm_ms']:.2f} ms = "
              f"{r['hf_step_ms'] / r['mm_ms']:.2f} (the speedup of a step that did nothing but its matmuls); "
              f"HF's step / the weight-read floor {args.bound_ms:.2f} ms = {r['hf_step_ms'] / args.bound_ms:.2f}")
        if "comp_s" in r:
            print(f"rows {r['batch']}: compiled: {r['comp_tok_s']:.1f} tok/s, {r['comp_step_ms']:.2f} ms/step, "
                  f"speedup {r['comp_speedup']:.2f}, agree {r['comp_agree']:.3f}; the first call (compile "
                  f"included) took {r['compile_s']:.1f} s")
    for k in ("ours", "comp"):
        if all(f"{k}_speedup" in r for r in rows):
            print(f"{'speedup_vs_hf_generate' if k == 'ours' else 'compiled_speedup_vs_hf_generate'} "
                  f"{min(r[k + '_speedup'] for r in rows):.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--config", default="small", choices=["small", "3b", "demo"])
    p.add_argument("--model", default=None, help="a checkpoint of that config's shape to load instead of random weights")
    p.add_argument("--batch", default=None, help="prompts per call, comma-separated (default: 16 for small and demo, 1,64 for 3b)")
    p.add_argument("--group", type=int, default=None, help="G: samples per prompt (default: 8 for demo, as GRPO; else 1)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (default: 64 for demo, else 256)")
    p.add_argument("--repeats", type=int, default=9, help="timed runs of each side (median reported; a shared "
                   "VM's speed drifts by 20%% within minutes, so more than a few)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2),
                   help="torch CPU threads (default: $OMP_NUM_THREADS, else 2; on a machine shared with other busy processes, 1: with 2 threads every op waits for a descheduled peer thread)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--std", type=float, default=None, help="init std (default 0.05 small, 0.02 3b, 0.3 demo)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled sampler")
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler table of our decode")
    p.add_argument("--stop", action="store_true", help="rows stop at their stop token, as in GRPO (with a trained "
                   "--model: the lengths GRPO sees; ours halves its decode batch as rows stop), instead of N tokens each")
    args = p.parse_args(argv)
    args.tokenizer = None
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    dev = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype) or (
        torch.bfloat16 if dev.type == "cuda" else torch.float32)
    args.batches = [int(b) for b in (args.batch or ("1,64" if args.config == "3b" else "16")).split(",")]
    args.group = args.group or (8 if args.config == "demo" else 1)
    args.new_tokens = args.new_tokens or (64 if args.config == "demo" else 256)
    args.std = args.std if args.std is not None else dict(small=0.05, demo=0.3).get(args.config, 0.02)

    import transformers
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="bench_sampler_") as d:
        t0 = time.perf_counter()
        ours, hf, prompts = build(args, dtype, dev, d)
        print(f"built, saved and loaded the {args.config} model in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    cfg = ours.config
    nparams = sum(p.numel() for p in ours.parameters())
    args.weight_bytes = lm_weight_bytes(ours)
    args.bandwidth = copy_bandwidth(dev, nbytes=2 * 2**30 if dev.type == "cuda" else 2**28)
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else f'{args.threads} threads'}), "
          f"dtype {str(dtype).replace('torch.', '')}, config {args.config}: hidden {cfg.hidden_size}, "
          f"layers {cfg.num_hidden_layers}, vocab {cfg.vocab_size}, {nparams / 1e6:.1f}M params, "
          f"LM weights {args.weight_bytes / 2**20:.1f} MiB; {args.group} samples per prompt, new tokens "
          f"{args.new_tokens}, greedy, median of {args.repeats}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    args.bound_ms = 1e3 * args.weight_bytes / args.bandwidth  # a step that only reads the weights once
    print(f"copy bandwidth {args.bandwidth / 1e9:.1f} GB/s: reading the LM weights once takes "
          f"{args.bound_ms:.2f} ms (the floor of a decode step)")
    rows = []
    for P in args.batches:
        r = bench_batch(ours, hf, cfg, prompts[P], args, dev)
        rows.append(r)
        print(f"{P} prompts x {args.group}: prompt {r['prompt_len']} tokens, {r['tokens']} new tokens in "
              f"{r['steps']} steps, HF {r['hf_s']:.2f}s, ours {r['ours_s']:.2f}s, greedy token agreement "
              f"{r['ours_agree']:.3f}", file=sys.stderr)
    report(rows, args)
    if args.profile:
        profile_decode(ours, cfg, prompts[args.batches[-1]], args.group, dev)


if __name__ == "__main__":
    main()
