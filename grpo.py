"""
GRPO, by hand: sample G completions per prompt, score them, push up the better ones.

    python grpo.py                                   # the embedded demo: runs/sft1 -> runs/grpo1
    python grpo.py --staircase                       # base -> SFT1 -> GRPO1 -> SFT2 -> GRPO2 (see staircase())
    torchrun --nproc_per_node=8 grpo.py --model DIR --data train.jsonl ...   # FSDP2, see README

One step (a "rollout"), for P prompts:
  1. sample G completions per prompt with sample.py (weights gathered once for the whole rollout)
  2. score each with reward.py: r = accuracy (+ format_weight * format; 0 by default, as the paper)
  3. group advantages, the same for every token of a completion:
         A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-6)       (--no-std: r_i - mean, Dr.GRPO)
     a group whose rewards are all equal has A = 0: no signal; we count it ("signal" metric)
  4. log-probs of the sampled tokens under the sampling policy (logp_old) and under the frozen
     start model (ref) - both sharded, no grad
  5. mu passes over minibatches of the rollout, one optimizer step per minibatch, minimizing
         rho_t = exp(logp_t - logp_old_t)
         pg_t  = max(-A rho_t, -A clip(rho_t, 1 - eps_low, 1 + eps_high))
         pg_t  = min(pg_t, -A dual_clip)          if A < 0  (dual clip: a far-off-policy negative
                                                             sample cannot blow up the loss)
         kl_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 (k3 estimator, >= 0, 0 iff equal)
         loss  = sum_t (pg_t + beta kl_t) / (completion tokens in the minibatch, all ranks)
     (--seq-mean: mean over each completion's tokens, then over completions.)

Each rollout appends a line to --out/metrics.jsonl: reward, accuracy (and accuracy_<family> on
the synthetic world), format, kl, clip_frac, entropy, response_length, signal_frac (groups whose
rewards differ), loss, grad_norm, time_sample/score/reference/update, tokens_per_s, sft_loss
(with --sft-coef; its passes count in time_update), and the held-out test_accuracy every
--eval-every rollouts.

Knobs: eps_low/eps_high (--clip-low/--clip-high) bound how far one update moves a token's
probability; --dual-clip bounds negative-advantage terms; --beta weighs the KL to the start
model; --mu and --prompts-per-step set how off-policy the later steps of a rollout get.
--prompts-per-step also sets the noise of each step: on the embedded demo, 16 prompts x 8 at lr
1e-4 is barely above the noise floor for slow skills (README: a random reward moves the test by
-0.5 points, the real one by +0 to +3.5 from SFT models with no habit to turn round; from the
demo's SFT1, which jumps to the value without the work, +22.75 in 100 rollouts), and at lr 3e-4
noise costs 5-10 points unless the step holds 4x the prompts or --sft-coef 1 pulls it back (it
holds the model steady; it does not add a gain).
--sft-coef adds coef x an SFT loss on the start model's data to every optimizer step (InstructGPT's
PPO-ptx; off by default, the paper has none): a pull back toward what SFT taught.
How this departs from the paper's EasyR1 setup: no vLLM (our own sampler), no padding-free
packing (padded batches); the log-prob passes (4, 5) run each prompt and its image once per
micro-batch and the G completions on copies of its K/V (completion_logps), where verl runs prompt
+ completion for every row: the same numbers, 1.6-1.9x faster on the demo
(tests/bench/bench_grpo_rows.py); and logp_old is not recomputed when the rollout is used once in one
step (mu=1 and prompts_per_step = prompts_per_rollout): then logp_old = logp.detach() and
rho = 1 exactly. Otherwise it is recomputed with a forward pass, as verl does.

The paper's recipe on a real checkpoint (see README):
    torchrun --nproc_per_node=8 grpo.py --model SFT_DIR --data grpo_train.jsonl --suffix r1 \\
      --group-size 5 --temperature 1.0 --top-p 0.99 --beta 0.01 --clip-low 0.2 --clip-high 0.3 \\
      --dual-clip 3 --lr 1e-6 --weight-decay 0.01 --prompts-per-rollout 512 --prompts-per-step 128 \\
      --max-new-tokens 2048 --max-prompt-len 6144 --max-pixels 262144 --micro-batch 4
"""

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

import data
import model as M
import reward
import sample
import sft

# -----------------------------------------------------------------------------
# the objective


def group_advantages(rewards, group_size, scale_std=True, eps=1e-6):
    """rewards (N,) ordered group after group -> (advantages (N,), groups with signal (int))."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps) if group_size > 1 else adv
    signal = int((r.max(dim=1).values > r.min(dim=1).values).sum())
    return adv.flatten(), signal


def grpo_loss(logp, old_logp, ref_logp, adv, n_norm, clip_low=0.2, clip_high=0.3,
              dual_clip=3.0, beta=0.01, seq_mean=False, seq_len=None):
    """Per-token inputs, flat over the completion tokens of a micro-batch (N,):
    logp (with grad), old_logp, ref_logp (or None when beta == 0), adv (the advantage of the
    token's completion). n_norm: the divisor, computed over
    the whole minibatch on all ranks: completion tokens (token-mean) or completions (seq-mean,
    then seq_len (N,) is each token's completion length). Returns (loss, stats dict)."""
    ratio = torch.exp(logp - old_logp)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    per_tok = pg
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + beta * kl
    w = 1.0 / seq_len if seq_mean else torch.ones_like(logp)
    loss = (per_tok * w).sum() / n_norm
    with torch.no_grad():
        clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
        stats = dict(kl=kl.detach().sum().item(), clipped=clipped.sum().item(), tokens=logp.numel())
    return loss, stats


# -----------------------------------------------------------------------------
# the rows of a rollout and their log-probs


def build_sequences(encs, s):
    """Prompt encodings (P) + Samples (P*n rows) -> one item per row: its prompt (id and
    encoding, shared by the rows of a group) and its completion tokens."""
    items = []
    for r in range(len(s.lengths)):
        i = int(s.prompt_index[r])
        comp = s.tokens[r, :int(s.lengths[r])]
        items.append(dict(prompt_id=i, prompt=encs[i], completion=comp, n_comp=len(comp)))
    return items


def pick(logits, targets, with_entropy=False):
    """logits (N, vocab), targets (N,) -> log-prob of each target (N,), and the entropy (N,)."""
    logp_all = F.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(1)
    ent = None
    if with_entropy:
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def completion_logps(model, items, pad_id, with_entropy=False):
    """Log-prob of each completion token of `items` (rows from build_sequences), flat (N,), row
    after row; with the entropy there (N,) if asked.

    The G rows of a group share their prompt and image (on the demo 2/3 of a row's tokens), so
    they are not run G times: each distinct prompt runs once, filling a KV cache (with grad);
    each row gets a copy of its prompt's K/V (select_rows: in backward the copies' gradients add
    up); then only the completions run, on top of the copies. That is (Tp + Tc) / (Tp / G + Tc)
    times fewer token passes than a forward over prompt + completion per row, with the same
    numbers (tests/test_grpo.py). Completion token 0 is predicted at the prompt's last position,
    token t > 0 at completion position t - 1; logits are computed at those N positions only."""
    dev = model.model.embed_tokens.weight.device
    prompts = {}  # prompt id -> its encoding, in order of first use
    for it in items:
        prompts.setdefault(it["prompt_id"], it["prompt"])
    slot = {pid: i for i, pid in enumerate(prompts)}
    index = torch.tensor([slot[it["prompt_id"]] for it in items], device=dev)   # (R,) row -> prompt
    ids, am, pv, grid = sample.left_padded(list(prompts.values()), pad_id, dev)  # (P, Tp)
    pos, next_pos = model.rope_index(ids, grid, am)
    lens = torch.tensor([it["n_comp"] for it in items], device=dev)            # (R,)
    R, Tc = len(items), int(lens.max())
    comp = torch.full((R, Tc), pad_id, dtype=torch.long, device=dev)
    for r, it in enumerate(items):
        comp[r, :it["n_comp"]] = it["completion"].to(dev)
    cache = model.new_cache(len(prompts), ids.shape[1] + Tc - 1, device=dev)
    first = model(ids, am, pv, grid, position_ids=pos, cache=cache, logits="last")[:, -1]  # (P, vocab)
    logp, ent = pick(first[index], comp[:, 0], with_entropy)                             # (R,)
    if Tc == 1:
        return logp, ent
    # the completions, token t fed at position next_pos + t (as the sampler fed it); `feed` marks the
    # positions whose next token is a real one, (R, Tc - 1); the rest is padding, never attended to
    feed = torch.arange(Tc - 1, device=dev) < (lens - 1)[:, None]
    p = (next_pos[index][:, None] + torch.arange(Tc - 1, device=dev)).expand(3, R, Tc - 1)
    rest = model(comp[:, :-1], feed.long(), position_ids=p, cache=cache.select_rows(index), logits=feed)
    logp_rest, ent_rest = pick(rest, comp[:, 1:][feed], with_entropy)                    # (N - R,)
    # back into row order: row r's token 0, then its tokens 1.. (N,)
    t = torch.arange(Tc, device=dev).expand(R, Tc)[torch.arange(Tc, device=dev) < lens[:, None]]
    first_tok = t == 0
    logp = torch.zeros(len(t), device=dev).masked_scatter(first_tok, logp).masked_scatter(~first_tok, logp_rest)
    if with_entropy:
        ent = torch.zeros(len(t), device=dev).masked_scatter(first_tok, ent).masked_scatter(~first_tok, ent_rest)
    return logp, ent

# -----------------------------------------------------------------------------
# the loop


def sft_term(policy, rows, tok, pad_id, coef, suffix, max_pixels, micro, world, device, autocast):
    """coef x the SFT loss (sft.py's token-mean cross-entropy) on `rows` (this rank's share of the
    step's SFT rows: records with a solution), backpropagated into the step's gradient. With
    --sft-coef > 0 each optimizer step minimizes GRPO's loss + coef * SFT loss on the data the
    start model learned from (InstructGPT's "PPO-ptx"): GRPO's noisy updates, and what it
    over-learns on hard prompts, are pulled back where they break what SFT taught. Returns this
    rank's part of the SFT loss (the parts of all ranks sum to it), for the metrics."""
    batches = [sft.encode_batch(tok, rows[i:i + micro], pad_id, suffix, device, max_pixels=max_pixels)
               for i in range(0, len(rows), micro)]
    n = sft.all_reduce_sum(torch.tensor(float(sum(sft.trained_tokens(b["labels"]) for b in batches)),
                                        device=device))  # trained tokens of the step's SFT rows, all ranks
    return sft.backward_sft(policy, batches, n, world, autocast, coef).item()


def family_sums(acc, families):
    """acc (N,) and each row's synthetic family (None for other data) -> (len(data.FAMILIES), 2):
    [correct, rows] per family, a fixed shape that sums over ranks. Logged as accuracy_<family>:
    where the reward rises, and where the policy drifts (a skill learned on hard prompts can
    overwrite the easy one)."""
    pairs = list(zip(acc.tolist(), families))
    return torch.tensor([[float(sum(a for a, f in pairs if f == name)), float(families.count(name))]
                         for name in data.FAMILIES])


def get_args(argv=None):
    p = argparse.ArgumentParser(description="GRPO on a vision-language model (see the module docstring)")
    # model and data
    p.add_argument("--model", default="runs/sft1", help="policy to start from (checkpoint dir); also the KL reference")
    p.add_argument("--data", default=None, help="training prompts (JSONL, any reader format); default: hard synthetic problems")
    p.add_argument("--n-train", type=int, default=4000, help="synthetic training problems when --data is not given")
    p.add_argument("--level", default="hard", choices=["easy", "hard", "mix"], help="their level")
    p.add_argument("--families", default=",".join(data.FAMILIES),
                   help="their families, comma-separated (the paper's GRPO set is a chosen subset of its SFT sources)")
    p.add_argument("--out", default="runs/grpo1", help="output directory (checkpoints, metrics.jsonl)")
    p.add_argument("--suffix", default="", help="text after each question: '' or 'r1' (the paper's prompt)")
    p.add_argument("--max-pixels", type=int, default=512 * 512, help="image resize cap, pixels")
    p.add_argument("--max-prompt-len", type=int, default=6144, help="prompts longer than this are skipped, tokens")
    # sampling
    p.add_argument("--group-size", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus mass")
    p.add_argument("--max-new-tokens", type=int, default=192, help="completion budget, tokens")
    # objective
    p.add_argument("--beta", type=float, default=0.1, help="KL coefficient (k3 estimator to the start model); "
                   "the paper's 0.01 goes with its lr 1e-6, the demo's lr 1e-4 needs a firmer anchor")
    p.add_argument("--clip-low", type=float, default=0.2, help="eps_low: ratio floor 1 - eps_low")
    p.add_argument("--clip-high", type=float, default=0.3, help="eps_high: ratio ceiling 1 + eps_high")
    p.add_argument("--dual-clip", type=float, default=3.0, help="cap on the loss of negative-advantage tokens, x|A|")
    p.add_argument("--no-std", action="store_true", help="advantage r - mean(r), without dividing by std (Dr.GRPO)")
    p.add_argument("--seq-mean", action="store_true", help="mean per completion, then over completions (default: token-mean)")
    p.add_argument("--format-weight", type=float, default=0.0, help="weight of the format reward (paper: 0)")
    # optimization
    p.add_argument("--steps", type=int, default=100, help="rollouts")
    p.add_argument("--prompts-per-rollout", type=int, default=16, help="prompts sampled per rollout (all ranks)")
    p.add_argument("--prompts-per-step", type=int, default=16, help="prompts per optimizer step (all ranks)")
    p.add_argument("--mu", type=int, default=1, help="passes over each rollout")
    p.add_argument("--micro-batch", type=int, default=64, help="sequences per forward/backward, per rank")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (constant, no warmup)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower and merger")
    p.add_argument("--sft-coef", type=float, default=0.0, help="weight of an SFT loss added to each optimizer "
                   "step (PPO-ptx; 0: off, as the paper)")
    p.add_argument("--sft-data", default=None, help="its data (JSONL with solutions); default: easy synthetic "
                   "problems with their traces (what the demo's SFT1 learned from)")
    p.add_argument("--sft-rows", type=int, default=32, help="SFT rows per optimizer step (all ranks)")
    # bookkeeping
    p.add_argument("--eval-every", type=int, default=50, help="evaluate on the held-out synthetic test every N rollouts (0: off)")
    p.add_argument("--eval-n", type=int, default=400, help="held-out items per evaluation")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N rollouts")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--seed", type=int, default=0, help="seed for prompt order and sampling")
    p.add_argument("--staircase", action="store_true", help="the whole embedded demo: SFT1 -> GRPO1 -> "
                   "SFT2 -> GRPO2 into runs/ (see staircase()); other flags are ignored")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 compute (default: on CUDA)")
    return p.parse_args(argv)


def main(argv=None):
    a = get_args(argv)
    if a.staircase:
        return staircase(seed=a.seed)
    if a.model == "runs/sft1" and not os.path.exists(a.model):
        raise SystemExit("grpo.py: no runs/sft1; the demo starts from the SFT1 model: run `python sft.py` "
                         f"and then `python sft.py {' '.join(SFT_FROM_BASE)} --jump 0.7 --out runs/sft1` "
                         "first (or `python grpo.py --staircase` for the whole loop)")
    rank, world, device = sft.dist_init(a.device)
    bf16 = a.bf16 if a.bf16 is not None else str(device).startswith("cuda")
    if a.prompts_per_rollout % a.prompts_per_step or a.prompts_per_step % world or a.sft_rows % world:
        raise SystemExit("--prompts-per-rollout must be a multiple of --prompts-per-step, and that and "
                         "--sft-rows multiples of the number of processes")
    torch.manual_seed(a.seed)
    tok = data.load_tokenizer(a.model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    policy = M.load_model(a.model, dtype=torch.float32, device=device)
    ref = M.load_model(a.model, dtype=torch.bfloat16 if bf16 else torch.float32, device=device).eval()
    for prm in ref.parameters():
        prm.requires_grad_(False)
    if a.freeze_vision and hasattr(policy, "visual"):
        policy.visual.requires_grad_(False)
    policy = sft.shard_model(policy, device, bf16)
    ref = sft.shard_model(ref, device, bf16)
    # bf16 in one process: autocast around the policy's passes (FSDP's MixedPrecisionPolicy does it
    # on several); the weights, the loss and the optimizer stay fp32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and world == 1)
    opt = torch.optim.AdamW([q for q in policy.parameters() if q.requires_grad], lr=a.lr,
                            weight_decay=a.weight_decay, betas=(0.9, 0.999))
    start, ck = 0, sft.latest_checkpoint(a.out) if a.resume else None
    if ck:
        start = sft.load_checkpoint(ck, policy, opt)["step"]
        sft.print0(f"resumed from {ck} at step {start}")
    if a.data:
        records, n_bad = data.load_records(a.data)
    else:
        families = [f for f in a.families.split(",") if f]
        unknown = sorted(set(families) - set(data.FAMILIES))
        if unknown or not families:
            raise SystemExit(f"grpo.py: --families {a.families!r}: unknown {unknown}; choose from {', '.join(data.FAMILIES)}")
        records = data.synth_records(a.n_train, a.level, seed=1, families=families)
    sft_rows = []
    if a.sft_coef > 0:
        if a.sft_data:
            sft_rows, _ = data.load_records(a.sft_data)
            missing = [r["source"] for r in sft_rows if not r.get("solution")]
            if missing:
                raise SystemExit(f"grpo.py: --sft-data rows need a solution to train on; none at {missing[0]}"
                                 f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
        else:  # SFT1's own data: sft.py's defaults (easy level, data seed 0), the first 4000 problems
            sft_rows = data.synth_records(4000, "easy", seed=0)
    test = data.synth_test_records(a.eval_n) if a.eval_every else None
    log = sft.MetricsLogger(os.path.join(a.out, "metrics.jsonl"), resume_step=start if ck else None)
    suffix = data.SUFFIXES.get(a.suffix, a.suffix)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(a.seed)).tolist()
    P_local, pps_local = a.prompts_per_rollout // world, a.prompts_per_step // world
    G = a.group_size
    n_done = start * (a.mu * a.prompts_per_rollout // a.prompts_per_step)  # optimizer steps so far
    t_start = time.time()
    from tqdm import tqdm
    for step in tqdm(range(start, a.steps), initial=start, total=a.steps, desc="grpo", disable=rank != 0):
        times = {}
        # 1. prompts of this rollout (this rank's share), encoded once
        t0 = time.time()
        # minibatch j of the rollout is global prompts [j * pps, (j + 1) * pps); each rank holds
        # its slice of every minibatch, so N ranks take the same optimizer steps as 1 process
        gidx = [step * a.prompts_per_rollout + j * a.prompts_per_step + rank * pps_local + i
                for j in range(a.prompts_per_rollout // a.prompts_per_step) for i in range(pps_local)]
        recs = [records[order[g % len(order)]] for g in gidx]
        encs = [data.encode_prompt(tok, data.format_question(r, suffix), r["images"], max_pixels=a.max_pixels) for r in recs]
        # 2. sample
        with autocast:
            s = sample.generate(policy, encs, n=G, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                top_p=a.top_p, seed=a.seed, keys=gidx,
                                tokenizer=tok, pad_id=pad_id, max_prompt_len=a.max_prompt_len)
        times["sample"] = time.time() - t0
        # 3. score
        t0 = time.time()
        acc = torch.tensor([reward.accuracy_reward(s.texts[r], recs[r // G]["answer"], recs[r // G].get("choices"))
                            for r in range(len(s.texts))])
        fmt = torch.tensor([reward.format_reward(t) for t in s.texts])
        rewards = acc + a.format_weight * fmt
        adv, signal = group_advantages(rewards, G, scale_std=not a.no_std)
        times["score"] = time.time() - t0
        # 4. training rows, reference (and old) log-probs, no grad
        t0 = time.time()
        items = build_sequences(encs, s)
        for r, it in enumerate(items):
            it["adv"] = float(adv[r])
        mbs = [items[i:i + a.micro_batch] for i in range(0, len(items), a.micro_batch)]
        on_policy = a.mu == 1 and a.prompts_per_step == a.prompts_per_rollout
        with torch.no_grad(), autocast:
            for mb in mbs:
                ref_lp = completion_logps(ref, mb, pad_id)[0] if a.beta > 0 else None
                old_lp = None if on_policy else completion_logps(policy, mb, pad_id)[0]
                off = 0
                for it in mb:
                    n = it["n_comp"]
                    it["ref"] = ref_lp[off:off + n].float() if ref_lp is not None else None
                    it["old"] = old_lp[off:off + n] if old_lp is not None else None
                    off += n
        times["reference"] = time.time() - t0
        # 5. mu passes of minibatch updates
        t0 = time.time()
        policy.train()
        stats = dict(loss=0.0, kl=0.0, clipped=0, tokens=0, entropy=0.0, grad_norm=0.0, sft_loss=0.0)
        rows_per_step = pps_local * G
        for _ in range(a.mu):
            for s0 in range(0, len(items), rows_per_step):
                step_items = items[s0:s0 + rows_per_step]
                n_tok = torch.tensor(float(sum(it["n_comp"] for it in step_items)), device=device)
                n_seq = torch.tensor(float(len(step_items)), device=device)
                if world > 1:
                    torch.distributed.all_reduce(n_tok)
                    torch.distributed.all_reduce(n_seq)
                n_norm = (n_seq if a.seq_mean else n_tok).clamp(min=1)
                opt.zero_grad(set_to_none=True)
                for m0 in range(0, len(step_items), a.micro_batch):
                    mb = step_items[m0:m0 + a.micro_batch]
                    with autocast:
                        logp, ent = completion_logps(policy, mb, pad_id, with_entropy=True)
                    cat = lambda key: torch.cat([it[key] if it[key] is not None else torch.zeros(0) for it in mb]).to(device)
                    old = logp.detach() if mb[0]["old"] is None else cat("old")
                    ref_lp = cat("ref") if mb[0]["ref"] is not None else None
                    adv_t = torch.cat([torch.full((it["n_comp"],), it["adv"]) for it in mb]).to(device)
                    seq_len = torch.cat([torch.full((it["n_comp"],), float(max(it["n_comp"], 1))) for it in mb]).to(device)
                    loss, st = grpo_loss(logp, old, ref_lp, adv_t, n_norm, a.clip_low, a.clip_high,
                                         a.dual_clip, a.beta, a.seq_mean, seq_len)
                    # FSDP averages gradients over ranks; the loss is already a global mean
                    (loss * world).backward()
                    stats["loss"] += loss.item()
                    stats["kl"] += st["kl"]
                    stats["clipped"] += st["clipped"]
                    stats["tokens"] += st["tokens"]
                    stats["entropy"] += ent.sum().item()
                if sft_rows:  # this rank's share of the step's SFT rows, in a fixed cycle over the data
                    k0 = (n_done * a.sft_rows + rank * (a.sft_rows // world)) % len(sft_rows)
                    mine = [sft_rows[(k0 + i) % len(sft_rows)] for i in range(a.sft_rows // world)]
                    stats["sft_loss"] += sft_term(policy, mine, tok, pad_id, a.sft_coef, suffix, a.max_pixels,
                                                  a.micro_batch, world, device, autocast)
                    n_done += 1
                gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), a.grad_clip)
                stats["grad_norm"] = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
                opt.step()
        times["update"] = time.time() - t0
        # metrics (this rank's rollout, reduced over ranks)
        n_tok_gen = float(s.lengths.sum())
        vals = torch.tensor([float(rewards.sum()), float(acc.sum()), float(fmt.sum()), float(len(rewards)),
                             stats["kl"], stats["clipped"], stats["tokens"], stats["entropy"], float(signal),
                             float(P_local), n_tok_gen, stats["loss"], stats["sft_loss"]], device=device)
        fams = [(recs[r // G].get("meta") or {}).get("family") for r in range(len(acc))]
        n_base = vals.numel()  # then [correct, rows] per family
        vals = torch.cat([vals, family_sums(acc, fams).flatten().to(device)])
        if world > 1:
            torch.distributed.all_reduce(vals)
        R, n_opt = vals[3].item(), a.mu * a.prompts_per_rollout // a.prompts_per_step
        row = dict(step=step + 1, reward=vals[0].item() / R, accuracy=vals[1].item() / R, format=vals[2].item() / R,
                   kl=vals[4].item() / max(vals[6].item(), 1), clip_frac=vals[5].item() / max(vals[6].item(), 1),
                   entropy=vals[7].item() / max(vals[6].item(), 1), response_length=vals[10].item() / R,
                   signal_frac=vals[8].item() / vals[9].item(), loss=vals[11].item() / n_opt,
                   grad_norm=stats["grad_norm"], lr=a.lr,
                   **{f"time_{k}": v for k, v in times.items()},
                   tokens_per_s=vals[10].item() / max(sum(times.values()), 1e-9), elapsed=time.time() - t_start)
        if sft_rows:
            row["sft_loss"] = vals[12].item() / n_opt
        fam_sums = vals[n_base:].view(-1, 2)
        row.update({f"accuracy_{name}": float(fam_sums[i, 0] / fam_sums[i, 1])
                    for i, name in enumerate(data.FAMILIES) if fam_sums[i, 1] > 0})
        if test is not None and ((step + 1) % a.eval_every == 0 or step + 1 == a.steps):
            import eval as E  # (below us in the reading order: imported only when used)
            _, summary = E.evaluate(policy, tok, test, rank=rank, world_size=world, progress=False)
            row["test_accuracy"] = summary["accuracy"]
            row.update({f"test_{k}": v[0] for k, v in summary["by"].get("family", {}).items()})
            sft.print0(f"step {step + 1}: test accuracy {summary['accuracy']:.3f}")
        log.log(**row)
        if (step + 1) % a.save_every == 0 or step + 1 == a.steps:
            sft.save_checkpoint(policy, tok, sft.checkpoint_dir(a.out, step + 1), optimizer=opt, step=step + 1)
    sft.export_model(policy, tok, a.out)  # the final policy, HF layout, at the top of --out
    log.close()
    sft.dist_cleanup()


# -----------------------------------------------------------------------------
# the paper's staircase on the embedded world: base -> SFT1 -> GRPO1 -> SFT2 -> GRPO2


SFT_FROM_BASE = ["--model", "runs/base", "--steps", "300", "--lr", "3e-4", "--warmup", "0", "--data-seed", "1"]


def staircase(root="runs", n_distill=12000, k=2, seed=0, test_n=2000):
    """The paper's loop on the embedded world, each stage evaluated greedily on the held-out test
    (its first test_n problems: 2000, as eval.py's default, so one standard error is ~1 point;
    sft.py's and grpo.py's own checks take the first 400). Base: the tiny VLM learns the world
    from scratch on full traces of easy problems (sft.py with no flags; it stands in for
    Qwen2.5-VL-Instruct, which the real recipe downloads). SFT1 fine-tunes the base on the first SFT set, whose traces jump to the value
    without the work 70% of the time (--jump 0.7; the paper's first set is distilled from a text
    model's traces). GRPO1 on problems of the SFT level (easy), GRPO2 on easy and hard ones
    (--level mix): the paper's GRPO sets get harder from one iteration to the next (its released
    sets: medium, then hard); the easy half keeps GRPO2 from listing four rows everywhere.
    Iteration 2, as the paper builds it: the GRPO1 model answers n_distill training problems (easy
    and hard) k times each (sample.py --task distill), data.py traces keeps the shortest correct
    answer of each, sft.py fine-tunes the base on that (SFT2), and GRPO runs again from there.
    seed (--seed) sets the base's initialization and GRPO's and the distillation's sampling, for
    a second run. The table goes to runs/staircase.md. Stages already done (in
    runs/staircase.json, with their model on disk) are skipped, so a rerun continues. One process
    (run the stages by hand for torchrun)."""
    import eval as E  # (below us in the reading order: imported only when used)
    d = lambda *p: os.path.join(root, *p)
    max_new = 192  # completion budget of the distill samples and the evaluations (gold traces <= 81 tokens)
    from_base = [d("base") if x == "runs/base" else x for x in SFT_FROM_BASE]
    sft_run = lambda args: sft.train(sft.parser().parse_args(args + ["--eval-n", "0"]))
    sd = ["--seed", str(seed)] if seed else []
    q = lambda args: "".join(" " + x for x in args)  # the flags as the table shows them
    # a stage: (the command the table shows, the call that runs those same flags)
    sft_stage = lambda args: (f"python sft.py{q(args)}", lambda: sft_run(args))
    grpo_stage = lambda args: (f"python grpo.py{q(args)}", lambda: main(args + ["--eval-every", "0"]))

    def sft2():  # the GRPO1 model writes the next SFT set; SFT from the base on it
        if not os.path.exists(d("distill", "data.jsonl")):
            data.write_split(d("distill"), n_distill, "mix", seed=2)
        sample.main(["--task", "distill", "--model", d("grpo1"), "--data", d("distill", "data.jsonl"),
                     "--out", d("distill", "samples.jsonl"), "--n", str(k), "--max-new-tokens", str(max_new),
                     "--batch-size", "64"] + sd)
        data.main(["traces", "--data", d("distill", "samples.jsonl"), "--out", d("sft2.jsonl")])
        sft_run(from_base + ["--data", d("sft2.jsonl"), "--out", d("sft2")])

    stages = [
        ("base", d("base"), *sft_stage(sd + ["--out", d("base")])),
        ("SFT1", d("sft1"), *sft_stage(from_base + ["--jump", "0.7", "--out", d("sft1")])),
        ("GRPO1", d("grpo1"), *grpo_stage(["--model", d("sft1"), "--level", "easy", "--out", d("grpo1")] + sd)),
        ("SFT2", d("sft2"), f"python data.py synth --out {d('distill')} --n {n_distill} --level mix --seed 2\n"
         f"python sample.py --task distill --model {d('grpo1')} --data {d('distill', 'data.jsonl')} "
         f"--out {d('distill', 'samples.jsonl')} --n {k} --max-new-tokens {max_new} --batch-size 64{q(sd)}\n"
         f"python data.py traces --data {d('distill', 'samples.jsonl')} --out {d('sft2.jsonl')}\n"
         f"python sft.py{q(from_base)} --data {d('sft2.jsonl')} --out {d('sft2')}", sft2),
        ("GRPO2", d("grpo2"), *grpo_stage(["--model", d("sft2"), "--level", "mix", "--out", d("grpo2")] + sd)),
    ]
    test = data.synth_test_records(test_n)
    table_path, rows = d("staircase.json"), {}
    if os.path.exists(table_path):
        with open(table_path) as f:
            rows = json.load(f)
    for name, out, cmd, run in stages:
        if name not in rows or not os.path.exists(os.path.join(out, "config.json")):
            print(f"\n=== {name}: {cmd}", flush=True)
            t0 = time.time()
            run()
            seconds = time.time() - t0
            tok = data.load_tokenizer(out)
            m = M.load_model(out).eval()
            _, s = E.evaluate(m, tok, test, batch_size=100, max_new_tokens=max_new, progress=False)
            rows[name] = dict(accuracy=s["accuracy"], family={k: v[0] for k, v in s["by"]["family"].items()},
                              level={k: v[0] for k, v in s["by"].get("level", {}).items()},
                              seconds=seconds, command=cmd)
            with open(table_path, "w") as f:
                json.dump(rows, f, indent=1)
        r = rows[name]
        print(f"{name}: test accuracy {r['accuracy']:.1%} ({r['seconds'] / 60:.1f} min)", flush=True)
    fams = sorted(next(iter(rows.values()))["family"])
    lines = ["| stage | test accuracy | " + " | ".join(fams) + " | wall-clock | command |",
             "|---|---|" + "---|" * len(fams) + "---|---|"]
    for name, *_ in stages:
        r = rows[name]
        lines.append(f"| {name} | {r['accuracy']:.1%} | " + " | ".join(f"{r['family'][f]:.1%}" for f in fams)
                     + f" | {r['seconds'] / 60:.1f} min | `{r['command'].splitlines()[-1]}` |")
    total = sum(r["seconds"] for r in rows.values())
    lines.append(f"\ntotal {total / 60:.1f} min")
    with open(d("staircase.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
