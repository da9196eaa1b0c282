"""
GRPO, by hand: sample G completions per prompt, score them, push up the better ones.

    python grpo.py                    # the embedded demo: runs/sft1 -> runs/grpo1, 100 rollouts
    python grpo.py --staircase        # the whole demo: base -> SFT1 -> GRPO1 -> SFT2 -> GRPO2
    torchrun --nproc_per_node=8 grpo.py --model DIR --data train.jsonl ...   # FSDP2 (README)

One rollout, in train(): 1) `rollout`: G completions for each of P prompts (sample.py,
--rollout-batch rows per call, weights gathered once per call); 2) `score`: reward 1 if the
answer matches, else 0 (reward.py), and group advantages (`draw_rollout` runs 1 and 2, again on
new prompts with --dynamic-sampling); 3) `reference_logps`: log-probs of the drawn tokens under
the frozen start model and, if the rollout is reused, under the sampling policy; 4) `update`: one optimizer step per minibatch on the clipped objective (`grpo_loss`,
formula below; a step whose loss or gradient norm is not finite is skipped, and 3 in a row stop
the run); 5) `rollout_metrics`: a line of metrics.jsonl (reward, accuracy per family, kl,
clip_frac, entropy, signal_frac: the share of groups whose rewards differ, logp_gap, draws,
time per phase; test_accuracy every --eval-every rollouts).

How this departs from the paper's trainer (EasyR1 on verl): our own sampler instead of vLLM;
padded batches, no packing; the log-prob passes run each prompt and its image once and its G
completions on copies of its K/V (`completion_logps`: the same numbers as one pass over prompt +
completion per row, fewer token passes); when a rollout makes one optimizer step, logp_old is
logp.detach() (rho = 1 exactly) instead of a recomputed pass. The defaults are the demo's (16
prompts x 8 a step, lr 1e-4, beta 0.1 for its larger lr); the paper's flags are in the README.
The last section, `staircase`, runs the demo's five stages from nothing.
"""

import argparse
import json
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F

import data
import eval as E
import model as M
import reward
import sample
import sft

GRAD_CLIP = 1.0  # max gradient norm, as the paper's trainer (sft.py uses the same)
MAX_DRAWS = 4  # --dynamic-sampling: draws of a rollout's prompts at most (the first included)
OVERLONG_BUFFER = 0.25  # --overlong penalty: the last quarter of max_new_tokens is penalized (DAPO: 4k of 20k)

# -----------------------------------------------------------------------------
# the objective
#
# For a prompt with G completions o_1..o_G and rewards r_1..r_G, every token t of o_i gets
#     A_i   = (r_i - mean(r)) / (std(r) + 1e-6)             (--no-std: r_i - mean(r), Dr.GRPO)
#     rho_t = exp(logp_t - logp_old_t)
#     pg_t  = max(-A rho_t, -A clip(rho_t, 1 - eps_low, 1 + eps_high))
#     pg_t  = min(pg_t, -A dual_clip)       if A < 0 (a far-off-policy bad sample cannot blow up)
#     kl_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1      (k3 estimator: >= 0, 0 iff equal)
#     loss  = sum_t (pg_t + beta kl_t) / (completion tokens of the minibatch, all ranks)
# A group whose rewards are all equal has A = 0 and teaches nothing: we count the groups with
# signal. The known fixes, each a flag (the default is the paper's trainer, written above):
#   --loss-agg seq-mean   sum_t (...) / |o_i|, then a mean over completions (the original GRPO;
#                         a long completion's tokens weigh less, so long wrong answers are cheap)
#   --loss-agg constant   sum_t (...) / (completions x max_new_tokens)   (Dr.GRPO, with --no-std)
#   --ratio sequence      GSPO: one ratio per completion, s_i = exp(mean_t (logp_t - logp_old_t)),
#                         on every token of o_i (its gradient: s_i grad logp_t), clipped at
#                         1 -/+ (3e-4, 4e-4); with --loss-agg seq-mean, GSPO's objective exactly
#   --tis-cap C           pg_t *= min(exp(logp_old_t - logp_sampler_t), C): truncated importance
#                         sampling, for when the sampler's numbers differ from the trainer's (bf16)
#   --overlong mask       a completion that ran out of max_new_tokens is left out of the loss
#   --overlong penalty    r_i += clip((L - L_buf - |o_i|) / L_buf, -1, 0), L = max_new_tokens (DAPO)
#   --dynamic-sampling    a prompt whose group has no signal is replaced by another (DAPO), below


def group_advantages(rewards, group_size, scale_std=True, eps=1e-6):
    """rewards (N,) ordered group after group -> (advantages (N,), groups with signal (int))."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps) if group_size > 1 else adv
    signal = int((r.max(dim=1).values > r.min(dim=1).values).sum())
    return adv.flatten(), signal


def overlong_penalty(lengths, max_new_tokens, buffer=OVERLONG_BUFFER):
    """DAPO's soft length penalty, (N,) completion lengths -> (N,) in [-1, 0]: 0 up to
    L - L_buf tokens, then falling linearly to -1 at the budget L."""
    L, buf = max_new_tokens, max(1.0, buffer * max_new_tokens)
    return ((L - buf - lengths.float()) / buf).clamp(-1.0, 0.0)


def tis_weights(old_logp, sampled_logp, cap):
    """Truncated importance sampling, per token: min(pi_trainer / pi_sampler, cap)."""
    return torch.exp(old_logp.float() - sampled_logp.float()).clamp(max=cap)


def grpo_loss(logp, old_logp, ref_logp, adv, n_norm, clip_low=0.2, clip_high=0.3, dual_clip=3.0,
              beta=0.01, seq_id=None, agg="token-mean", ratio="token", weight=None, is_weight=None):
    """Per-token inputs, flat over the completion tokens of a micro-batch (N,): logp (with grad),
    old_logp, ref_logp (None when beta == 0), adv (its completion's advantage); seq_id (N,): its
    completion's index, for --loss-agg seq-mean and --ratio sequence; weight (N,): 0 for tokens
    left out of the loss (--overlong mask); is_weight (N,): truncated importance weights
    (--tis-cap). n_norm: the divisor over the whole minibatch on all ranks (completion tokens,
    completions, or completions x max_new_tokens). -> (loss, stats)."""
    log_ratio = logp - old_logp
    if ratio == "sequence" or agg == "seq-mean":
        n = torch.bincount(seq_id).clamp(min=1).to(logp.dtype)              # tokens per completion
    if ratio == "sequence":  # the value of the completion's mean log-ratio, the gradient of logp_t
        seq_lr = torch.zeros_like(n).index_add_(0, seq_id, log_ratio.detach()) / n
        log_ratio = seq_lr[seq_id] + logp - logp.detach()
    ratio_t = torch.exp(log_ratio)
    pg = torch.maximum(-adv * ratio_t, -adv * ratio_t.clamp(1 - clip_low, 1 + clip_high))
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    if is_weight is not None:
        pg = pg * is_weight
    per_tok = pg
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + beta * kl
    w = 1.0 / n[seq_id] if agg == "seq-mean" else torch.ones_like(logp)
    if weight is not None:
        w = w * weight
    loss = (per_tok * w).sum() / n_norm
    with torch.no_grad():
        clipped = ((ratio_t < 1 - clip_low) & (adv < 0)) | ((ratio_t > 1 + clip_high) & (adv > 0))
        stats = dict(kl=kl.detach().sum().item(), clipped=clipped.sum().item(), tokens=logp.numel())
    return loss, stats


# -----------------------------------------------------------------------------
# the rows of a rollout and their log-probs


def build_sequences(encs, s, adv=None, keep=None):
    """Prompt encodings (P) + Samples (P*n rows) [+ advantages (P*n,), keep (P*n,): 0 for a row
    left out of the loss] -> one item per row: its prompt (id and encoding, shared by the rows of
    a group), its completion tokens and their log-probs under the sampler, its advantage."""
    items = []
    for r in range(len(s.lengths)):
        i, n = int(s.prompt_index[r]), int(s.lengths[r])
        items.append(dict(prompt_id=i, prompt=encs[i], completion=s.tokens[r, :n], n_comp=n,
                          sampled=s.logprobs[r, :n], keep=1.0 if keep is None else float(keep[r])))
        if adv is not None:
            items[-1]["adv"] = float(adv[r])
    return items


LOGP_CHUNK = 1024  # tokens per log-softmax block: 1024 x 152k vocab in fp32 is 0.6 GB, the whole batch ~5 GB


def pick(h, head, targets, with_entropy=False, chunk=None):
    """Final hidden states h (N, C), the output layer `head`, targets (N,) -> log-prob of each
    target (N,), and the entropy (N,) if asked. The logits are made from h a chunk of tokens at a
    time (LOGP_CHUNK), so the fp32 (N, vocab) log-softmax is never held whole; with grad, each
    chunk is checkpointed: backward recomputes its logits instead of keeping them."""
    chunk = chunk or LOGP_CHUNK

    def one(h, y):  # (n, C), (n,) -> (n,), (n,) or None
        logp_all = F.log_softmax(head(h).float(), dim=-1)
        ent = None
        if with_entropy:
            with torch.no_grad():
                ent = -(logp_all.exp() * logp_all).sum(-1)
        return logp_all.gather(-1, y[:, None]).squeeze(1), ent

    grad = torch.is_grad_enabled() and h.requires_grad
    outs = [torch.utils.checkpoint.checkpoint(one, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
            if grad else one(h[i:i + chunk], targets[i:i + chunk]) for i in range(0, len(targets), chunk)]
    logp = torch.cat([lp for lp, _ in outs])
    return logp, torch.cat([e for _, e in outs]) if with_entropy else None


def completion_logps(model, items, pad_id, with_entropy=False):
    """Log-prob of each completion token of `items` (rows from build_sequences), flat (N,), row
    after row; with the entropy there (N,) if asked.

    The G rows of a group share their prompt and image (on the demo 2/3 of a row's tokens), so
    they are not run G times: each distinct prompt runs once, filling a KV cache (with grad);
    each row gets a copy of its prompt's K/V (select_rows: in backward the copies' gradients add
    up); then only the completions run, on top of the copies. That is (Tp + Tc) / (Tp / G + Tc)
    times fewer token passes than a forward over prompt + completion per row, with the same
    numbers (tests/test_grpo.py). Completion token 0 is predicted at the prompt's last position,
    token t > 0 at completion position t - 1; logits are computed at those N positions only, and
    LOGP_CHUNK of them at a time (`pick`)."""
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
    # pick runs inside the forward (a sharded model's head is gathered there), on the final
    # hidden states of the positions that predict a completion token
    logp, ent = model(ids, am, pv, grid, position_ids=pos, cache=cache,                # (R,)
                      logits=lambda h, head: pick(h[:, -1][index], head, comp[:, 0], with_entropy))
    if Tc == 1:
        return logp, ent
    # the completions, token t fed at position next_pos + t (as the sampler fed it); `feed` marks the
    # positions whose next token is a real one, (R, Tc - 1); the rest is padding, never attended to
    feed = torch.arange(Tc - 1, device=dev) < (lens - 1)[:, None]
    p = (next_pos[index][:, None] + torch.arange(Tc - 1, device=dev)).expand(3, R, Tc - 1)
    logp_rest, ent_rest = model(comp[:, :-1], feed.long(), position_ids=p, cache=cache.select_rows(index),
                                logits=lambda h, head: pick(h[feed], head, comp[:, 1:][feed], with_entropy))  # (N - R,)
    # back into row order: row r's token 0, then its tokens 1.. (N,)
    t = torch.arange(Tc, device=dev).expand(R, Tc)[torch.arange(Tc, device=dev) < lens[:, None]]
    first_tok = t == 0
    logp = torch.zeros(len(t), device=dev).masked_scatter(first_tok, logp).masked_scatter(~first_tok, logp_rest)
    if with_entropy:
        ent = torch.zeros(len(t), device=dev).masked_scatter(first_tok, ent).masked_scatter(~first_tok, ent_rest)
    return logp, ent

# -----------------------------------------------------------------------------
# one rollout: prompts -> samples -> rewards -> log-probs -> update -> metrics


def rollout_prompts(records, order, step, a, rank, world):
    """This rank's prompts of rollout `step` -> (global prompt indices, records). Minibatch j of
    the rollout is global prompts [j * pps, (j + 1) * pps); each rank holds its slice of every
    minibatch, so N ranks take the same optimizer steps as one process."""
    pps_local = a.prompts_per_step // world
    gidx = [step * a.prompts_per_rollout + j * a.prompts_per_step + rank * pps_local + i
            for j in range(a.prompts_per_rollout // a.prompts_per_step) for i in range(pps_local)]
    return gidx, [records[order[g % len(order)]] for g in gidx]


KV_BUDGET = 20 * 2**30  # bytes of KV cache one generate call may fill (beside bf16 weights on an 80 GB GPU)


def kv_bytes_per_token(cfg, dtype_bytes):
    """One token's K and V in every layer."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes


def default_rollout_batch(cfg, a, dtype_bytes):
    """--rollout-batch when not given: the most rows, whole groups, whose KV cache fits KV_BUDGET.
    A prompt holds G + 1 rows of max_prompt_len + max_new_tokens slots at once (its prefill row
    and the G copies generate makes of it). On a CPU demo model: every row of the rollout."""
    per_prompt = kv_bytes_per_token(cfg, dtype_bytes) * (a.max_prompt_len + a.max_new_tokens) * (a.group_size + 1)
    return max(1, KV_BUDGET // per_prompt) * a.group_size


def rollout(policy, tok, recs, gidx, a, autocast):
    """Each prompt encoded once, G completions each -> (encodings (P), sample.Samples (P*G rows)).
    The prompts are sampled a.rollout_batch // G at a time (the KV cache of one call is what
    sampling adds to memory); the draws depend on (seed, global prompt index), not on the rank
    or the batch, so the chunks draw what one call would."""
    suffix = data.SUFFIXES.get(a.suffix, a.suffix)
    encs = [data.encode_prompt(tok, data.format_question(r, suffix), r["images"], max_pixels=a.max_pixels)
            for r in recs]
    per_call = max(1, a.rollout_batch // a.group_size)
    kw = dict(n=a.group_size, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
              seed=a.seed, tokenizer=tok, pad_id=pad_of(tok), max_prompt_len=a.max_prompt_len, compile=a.compile)
    with autocast:
        parts = [sample.generate(policy, encs[i:i + per_call], keys=gidx[i:i + per_call], **kw)
                 for i in range(0, len(encs), per_call)]
    return encs, concat_samples(parts, per_call, pad_of(tok))


def concat_samples(parts, per_call, pad_id):
    """The Samples of consecutive generate calls of per_call prompts each -> one Samples, as one
    call over all the prompts returns it (rows padded to the longest, prompt indices global)."""
    L = max(s.tokens.shape[1] for s in parts)
    widen = lambda t, v: F.pad(t, (0, L - t.shape[1]), value=v)
    cat = lambda f: torch.cat([f(s) for s in parts])
    return sample.Samples(cat(lambda s: widen(s.tokens, pad_id)), cat(lambda s: widen(s.logprobs, 0.0)),
                          cat(lambda s: s.lengths), cat(lambda s: s.finished),
                          torch.cat([s.prompt_index + j * per_call for j, s in enumerate(parts)]),
                          cat(lambda s: s.sample_index), [t for s in parts for t in s.texts])


def select_groups(draws, choice, G, pad_id):
    """Samples of D draws of the same P prompt slots, choice (P,): the draw each slot takes ->
    one Samples of P groups, group p from draw choice[p]."""
    P = len(choice)
    s = concat_samples(draws, P, pad_id)
    rows = torch.cat([choice[p] * P * G + p * G + torch.arange(G) for p in range(P)])
    return sample.Samples(s.tokens[rows], s.logprobs[rows], s.lengths[rows], s.finished[rows],
                          torch.arange(P).repeat_interleave(G), s.sample_index[rows], [s.texts[r] for r in rows])


def score(s, recs, a):
    """The P*G completions (group after group) -> (acc, fmt, rewards, adv: each (P*G,), groups
    with signal). reward = accuracy + format_weight * format (the paper: accuracy alone)
    [+ the overlong penalty]."""
    G = a.group_size
    acc = torch.tensor([reward.accuracy_reward(t, recs[r // G]["answer"], recs[r // G].get("choices"))
                        for r, t in enumerate(s.texts)])
    fmt = torch.tensor([reward.format_reward(t) for t in s.texts])
    rewards = acc + a.format_weight * fmt
    if a.overlong == "penalty":
        rewards = rewards + overlong_penalty(s.lengths, a.max_new_tokens)
    adv, signal = group_advantages(rewards, G, scale_std=not a.no_std)
    return acc, fmt, rewards, adv, signal


def draw_rollout(policy, tok, records, order, step, a, rank, world, device, autocast, times):
    """Sample and score rollout `step` -> (recs, encs, Samples, scores, draws); the seconds
    spent go to times["sample"] and times["score"]. With
    --dynamic-sampling (DAPO), while some prompt's G rewards are all equal, the rollout's prompts
    are drawn again (new ones), up to MAX_DRAWS times, and each prompt slot takes the first group
    with signal drawn for it (or its first, if none has). DAPO fills the step with the first
    groups with signal in any order; slots keep each rank's share of a step fixed, so N ranks
    still equal one process. The extra draws count in time_sample and in `draws`."""
    n_draws, G, got = MAX_DRAWS if a.dynamic_sampling else 1, a.group_size, []
    clock = lambda key, t0: times.update({key: times.get(key, 0.0) + time.time() - t0})
    for d in range(n_draws):
        t0 = time.time()
        gidx, recs = rollout_prompts(records, order, step * n_draws + d, a, rank, world)
        encs, s = rollout(policy, tok, recs, gidx, a, autocast)
        clock("sample", t0)
        t0 = time.time()
        got.append((recs, encs, s, score(s, recs, a)))
        clock("score", t0)
        r = torch.stack([sc[2].view(-1, G) for *_, sc in got])                     # (D, P, G) rewards
        has = r.amax(-1) > r.amin(-1)                                              # (D, P) signal
        lacking = torch.tensor(float((~has.any(0)).sum()), device=device)
        if d + 1 == n_draws or E.all_reduce_sum(lacking).item() == 0:
            break
    if len(got) == 1:
        return (*got[0], 1)
    choice = has.int().argmax(0).tolist()                                          # the first draw with signal
    recs = [got[c][0][p] for p, c in enumerate(choice)]
    encs = [got[c][1][p] for p, c in enumerate(choice)]
    s = select_groups([g[2] for g in got], choice, G, pad_of(tok))
    return recs, encs, s, score(s, recs, a), len(got)


def reference_logps(policy, ref, items, a, pad_id, autocast):
    """Sets each item's "ref": its tokens' log-probs under the frozen start model (None when
    beta is 0), and "old": under the sampling policy (None when the rollout makes one optimizer
    step: then logp_old = logp.detach() in `update`). No grad, micro-batch by micro-batch."""
    on_policy = a.mu == 1 and a.prompts_per_step == a.prompts_per_rollout
    with torch.no_grad(), autocast:
        for i in range(0, len(items), a.micro_batch):
            mb = items[i:i + a.micro_batch]
            ref_lp = completion_logps(ref, mb, pad_id)[0] if a.beta > 0 else None
            old_lp = None if on_policy else completion_logps(policy, mb, pad_id)[0]
            off = 0
            for it in mb:
                n = it["n_comp"]
                it["ref"] = ref_lp[off:off + n].float() if ref_lp is not None else None
                it["old"] = old_lp[off:off + n] if old_lp is not None else None
                off += n


def policy_loss(policy, mb, n_norm, a, pad_id, device, autocast):
    """The objective on one micro-batch of rows, with grad -> (loss, stats, entropy (N,)).
    stats["gap"]: sum of |logp_old - logp_sampler|, the trainer's and the sampler's numbers for
    the same tokens under the same weights (0 up to rounding in fp32; bf16 on a GPU is not)."""
    with autocast:
        logp, ent = completion_logps(policy, mb, pad_id, with_entropy=True)
    cat = lambda key: torch.cat([it[key] if it[key] is not None else torch.zeros(0) for it in mb]).to(device)
    per_tok = lambda key: torch.cat([torch.full((it["n_comp"],), float(it[key])) for it in mb]).to(device)
    old = logp.detach() if mb[0]["old"] is None else cat("old")
    ref_lp = cat("ref") if mb[0]["ref"] is not None else None
    seq_id = torch.cat([torch.full((it["n_comp"],), i) for i, it in enumerate(mb)]).to(device)
    sampled = cat("sampled")
    is_weight = tis_weights(old, sampled, a.tis_cap) if a.tis_cap > 0 else None
    weight = per_tok("keep") if any(it["keep"] < 1 for it in mb) else None
    loss, st = grpo_loss(logp, old, ref_lp, per_tok("adv"), n_norm, a.clip_low, a.clip_high, a.dual_clip, a.beta,
                         seq_id, a.loss_agg, a.ratio, weight, is_weight)
    st["gap"] = (old.float() - sampled.float()).abs().sum().item()
    return loss, st, ent


def update(policy, opt, items, a, pad_id, world, device, autocast, guard=None, rollout=0):
    """mu passes over the rollout's rows, one optimizer step per minibatch (this rank's rows of
    prompts_per_step prompts), micro-batches accumulated. A step whose loss or gradient norm is
    not finite is skipped (guard: sft.FiniteGuard, which stops the run after 3 in a row).
    -> summed stats for the metrics."""
    policy.train()
    stats = dict(loss=0.0, kl=0.0, clipped=0, tokens=0, gap=0.0, entropy=0.0, grad_norm=0.0, skipped=0)
    rows_per_step = a.prompts_per_step // world * a.group_size
    for _ in range(a.mu):
        for s0 in range(0, len(items), rows_per_step):
            step_items = items[s0:s0 + rows_per_step]
            # the loss's divisor: completion tokens, completions, or completions x max_new_tokens of
            # the minibatch on all ranks (rows left out by --overlong mask not counted)
            n = torch.tensor([float(sum(it["n_comp"] * it["keep"] for it in step_items)),
                              float(sum(it["keep"] for it in step_items))], device=device)
            n_tok, n_seq = E.all_reduce_sum(n)
            n_norm = {"token-mean": n_tok, "seq-mean": n_seq, "constant": n_seq * a.max_new_tokens}[a.loss_agg].clamp(min=1)
            opt.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            for m0 in range(0, len(step_items), a.micro_batch):
                loss, st, ent = policy_loss(policy, step_items[m0:m0 + a.micro_batch], n_norm, a, pad_id,
                                            device, autocast)
                (loss * world).backward()  # FSDP averages gradients over ranks; the loss is already a global mean
                step_loss += loss.detach()
                stats["loss"] += loss.item()
                for k in ("kl", "clipped", "tokens", "gap"):
                    stats[k] += st[k]
                stats["entropy"] += ent.sum().item()
            gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), GRAD_CLIP)
            stats["grad_norm"] = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
            # the global loss and norm: every rank takes or skips the step alike
            if guard is None or guard.ok(E.all_reduce_sum(step_loss).item(), stats["grad_norm"], rollout):
                opt.step()
            else:
                stats["skipped"] += 1
    opt.zero_grad(set_to_none=True)
    return stats


def family_sums(acc, families):
    """acc (N,) and each row's synthetic family (None for other data) -> (len(data.FAMILIES), 2):
    [correct, rows] per family, a fixed shape that sums over ranks. Logged as accuracy_<family>:
    where the reward rises, and where the policy drifts."""
    pairs = list(zip(acc.tolist(), families))
    return torch.tensor([[float(sum(a for a, f in pairs if f == name)), float(families.count(name))]
                         for name in data.FAMILIES])


def rollout_metrics(step, a, s, scores, stats, recs, times, device, t_start, draws=1):
    """One line of metrics.jsonl: this rank's rollout, summed over ranks, as means. logp_gap: the
    mean |logp_trainer - logp_sampler| per token; draws: the prompt draws of --dynamic-sampling."""
    acc, fmt, rewards, _, signal = scores
    G, P = a.group_size, len(recs)
    vals = torch.tensor([float(rewards.sum()), float(acc.sum()), float(fmt.sum()), float(len(rewards)),
                         stats["kl"], stats["clipped"], stats["tokens"], stats["entropy"], float(signal),
                         float(P), float(s.lengths.sum()), stats["loss"], stats["gap"]], device=device)
    fams = [(recs[r // G].get("meta") or {}).get("family") for r in range(len(acc))]
    vals = E.all_reduce_sum(torch.cat([vals, family_sums(acc, fams).flatten().to(device)]))
    (rew, acc, fmt, R, kl, clipped, tokens, ent, signal, P, gen, loss, gap), fam = vals[:13].tolist(), vals[13:].view(-1, 2)
    n_opt, T = a.mu * a.prompts_per_rollout // a.prompts_per_step, max(tokens, 1)
    row = dict(step=step + 1, reward=rew / R, accuracy=acc / R, format=fmt / R, kl=kl / T, clip_frac=clipped / T,
               entropy=ent / T, response_length=gen / R, signal_frac=signal / P, loss=loss / n_opt,
               logp_gap=gap / T, draws=draws,
               grad_norm=stats["grad_norm"], skipped_steps=stats["skipped"], lr=a.lr,
               **{f"time_{k}": v for k, v in times.items()},
               tokens_per_s=gen / max(sum(times.values()), 1e-9), elapsed=time.time() - t_start)
    row.update({f"accuracy_{name}": float(fam[i, 0] / fam[i, 1]) for i, name in enumerate(data.FAMILIES) if fam[i, 1] > 0})
    return row


def test_metrics(policy, tok, test, step, rank, world, compile=False):
    """Greedy accuracy on the held-out synthetic test, overall and per family."""
    _, summary = E.evaluate(policy, tok, test, rank=rank, world_size=world, progress=False, compile=compile)
    E.print0(f"step {step + 1}: test accuracy {summary['accuracy']:.3f}")
    return dict(test_accuracy=summary["accuracy"],
                **{f"test_{k}": v[0] for k, v in summary["by"].get("family", {}).items()})
# -----------------------------------------------------------------------------
# the run


def get_args(argv=None):
    p = data.ArgumentParser(prog="grpo.py", description="GRPO on a vision-language model (see the module docstring)")
    n0, n1, pos, nonneg = data.at_least(0), data.at_least(1), data.positive(float), data.at_least(0.0, float)
    # model and data
    p.add_argument("--model", default="runs/sft1", help="policy to start from (checkpoint dir); also the KL reference")
    p.add_argument("--data", default=None, help="training prompts (JSONL, any reader format); default: synthetic problems")
    p.add_argument("--n-train", type=n1, default=4000, help="synthetic training problems when --data is not given")
    p.add_argument("--level", default="mix", choices=["easy", "hard", "mix"],
                   help="their level (the demo's GRPO1: mix, GRPO2: hard)")
    p.add_argument("--out", default="runs/grpo1", help="output directory (checkpoints, metrics.jsonl)")
    p.add_argument("--suffix", default="", help="text after each question: '' or 'r1' (the paper's prompt)")
    p.add_argument("--max-pixels", type=data.at_least(data.MIN_PIXELS), default=512 * 512, help="image resize cap, pixels")
    p.add_argument("--max-prompt-len", type=n1, default=6144, help="longest prompt, tokens: a longer one is a bad "
                   "row, found when the data is loaded")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad rows of --data (malformed, unreadable "
                   "image, prompt over --max-prompt-len); default: stop before training, naming the first")
    # sampling
    p.add_argument("--group-size", type=n1, default=8, help="G: completions per prompt")
    p.add_argument("--temperature", type=nonneg, default=1.0, help="rollout temperature")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help=sample.COMPILE_HELP
                   + "; default: on a CPU with a C++ compiler (the demo's staircase: 23 min instead of 27), off on CUDA")
    p.add_argument("--top-p", type=sample.top_p, default=1.0, help="rollout nucleus mass")
    p.add_argument("--max-new-tokens", type=n1, default=192, help="completion budget, tokens")
    p.add_argument("--rollout-batch", type=n1, default=None, help="rows (prompts x G) per generate call, per rank "
                   "(default: what fits KV_BUDGET of KV cache at --max-prompt-len + --max-new-tokens slots)")
    # objective
    p.add_argument("--beta", type=nonneg, default=0.1, help="KL coefficient (k3 estimator to the start model); "
                   "the paper's 0.01 goes with its lr 1e-6, the demo's lr 1e-4 needs a firmer anchor")
    p.add_argument("--clip-low", type=data.at_least(0.0, float, below=1.0), default=None,
                   help="eps_low: ratio floor 1 - eps_low (default 0.2; 3e-4 with --ratio sequence, GSPO's)")
    p.add_argument("--clip-high", type=nonneg, default=None,
                   help="eps_high: ratio ceiling 1 + eps_high (default 0.3; 4e-4 with --ratio sequence)")
    p.add_argument("--dual-clip", type=data.at_least(1.0, float), default=3.0,
                   help="cap on the loss of negative-advantage tokens, x|A|")
    p.add_argument("--no-std", action="store_true", help="advantage r - mean(r), without dividing by std (Dr.GRPO)")
    p.add_argument("--loss-agg", default="token-mean", choices=["token-mean", "seq-mean", "constant"],
                   help="the loss over a minibatch: a mean over its tokens (DAPO, the paper's trainer), over each "
                   "completion's tokens then over completions (GRPO), or a sum / (completions x max_new_tokens) (Dr.GRPO)")
    p.add_argument("--ratio", default="token", choices=["token", "sequence"],
                   help="importance ratio per token, or one per completion (GSPO)")
    p.add_argument("--tis-cap", type=nonneg, default=0.0, help="truncated importance sampling: weight each token's "
                   "policy loss by min(pi_trainer / pi_sampler, cap) (0: off)")
    p.add_argument("--overlong", default="keep", choices=["keep", "mask", "penalty"],
                   help="a completion that runs out of --max-new-tokens: trained on as any other, left out of the "
                   "loss, or a soft length penalty over the last quarter of the budget (DAPO)")
    p.add_argument("--dynamic-sampling", action="store_true", help="replace prompts whose G rewards are all equal "
                   f"by new ones, up to {MAX_DRAWS} draws a rollout (DAPO)")
    p.add_argument("--format-weight", type=nonneg, default=0.0, help="weight of the format reward (paper: 0)")
    # optimization
    p.add_argument("--steps", type=n1, default=100, help="rollouts")
    p.add_argument("--prompts-per-rollout", type=n1, default=16, help="prompts sampled per rollout (all ranks)")
    p.add_argument("--prompts-per-step", type=n1, default=16, help="prompts per optimizer step (all ranks)")
    p.add_argument("--mu", type=n1, default=1, help="passes over each rollout")
    p.add_argument("--micro-batch", type=n1, default=64, help="sequences per forward/backward, per rank")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="keep each decoder layer's input only, recompute the rest in backward (less memory)")
    p.add_argument("--lr", type=pos, default=1e-4, help="AdamW learning rate (constant, no warmup)")
    p.add_argument("--weight-decay", type=nonneg, default=0.01, help="AdamW weight decay")
    p.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower and merger")
    # bookkeeping
    p.add_argument("--eval-every", type=n0, default=50, help="evaluate on the held-out synthetic test every N rollouts (0: off)")
    p.add_argument("--eval-n", type=n1, default=400, help="held-out items per evaluation")
    p.add_argument("--save-every", type=n1, default=50, help="checkpoint every N rollouts")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--seed", type=int, default=0, help="seed for prompt order and sampling")
    p.add_argument("--staircase", action="store_true", help="the whole embedded demo from nothing into runs/ "
                   "(see staircase(); with --seed and --[no-]compile); other flags are ignored")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 compute (default: on CUDA)")
    a = p.parse_args(argv)
    gspo = a.ratio == "sequence"  # GSPO's ratio is a mean over hundreds of tokens: its clip range is narrow
    a.clip_low = (3e-4 if gspo else 0.2) if a.clip_low is None else a.clip_low
    a.clip_high = (4e-4 if gspo else 0.3) if a.clip_high is None else a.clip_high
    return a


def pad_of(tok):
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def setup(a, device, world):
    """-> (policy, ref, optimizer, tokenizer, autocast). The policy keeps fp32 master weights;
    the reference is the frozen start model (bf16 with --bf16); both FSDP2-sharded under torchrun.
    In one process bf16 is autocast around the policy's passes (FSDP's MixedPrecisionPolicy does
    it on several ranks); the weights, the loss and the optimizer stay fp32."""
    bf16 = a.bf16 if a.bf16 is not None else str(device).startswith("cuda")
    torch.manual_seed(a.seed)
    tok = data.load_tokenizer(a.model)
    policy = data.open_model(a.model, dtype=torch.float32, device=device)
    ref = data.open_model(a.model, dtype=torch.bfloat16 if bf16 else torch.float32, device=device).eval()
    ref.requires_grad_(False)
    if a.freeze_vision and hasattr(policy, "visual"):
        policy.visual.requires_grad_(False)
    policy.model.gradient_checkpointing = a.activation_checkpointing
    if a.rollout_batch is None:
        a.rollout_batch = default_rollout_batch(policy.config, a, 2 if bf16 else 4)
    policy = sft.shard_model(policy, device, bf16)
    ref = sft.shard_model(ref, device, bf16)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and world == 1)
    opt = torch.optim.AdamW([q for q in policy.parameters() if q.requires_grad], lr=a.lr,
                            weight_decay=a.weight_decay, betas=(0.9, 0.999))
    return policy, ref, opt, tok, autocast


def build_start_model(seed, compile=False):
    """The demo's default --model, runs/sft1, is not there yet: build the stages before GRPO1
    (base, reasoner, SFT1) with the staircase, in rank 0 alone, while the other ranks wait."""
    E.print0("grpo.py: no runs/sft1 yet, so building the stages before GRPO1 first (the base, the text "
             "reasoner and SFT1: about 14 minutes on 2 CPU cores; runs/staircase.md says what they are)")
    if int(os.environ.get("RANK", 0)) == 0:
        hidden = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}  # one plain process
        try:
            staircase(seed=seed, until="SFT1", compile=compile)
        finally:
            os.environ.update(hidden)
    while "SFT1" not in (json.load(open("runs/staircase.json")) if os.path.exists("runs/staircase.json") else {}):
        time.sleep(5)


def load_prompts(a, tok):
    """The training prompts: --data, where a bad row or a prompt over --max-prompt-len is an error
    naming its file:line (with --skip-bad: skipped and counted), or the synthetic problems."""
    if not a.data:
        return data.synth_records(a.n_train, a.level, seed=1)
    records, n_bad = data.load_records(a.data, skip_bad=a.skip_bad)
    suffix = data.SUFFIXES.get(a.suffix, a.suffix)
    length = lambda r: data.prompt_length(tok, data.format_question(r, suffix), r["images"], max_pixels=a.max_pixels)
    records, n_long = data.within_budget(records, length, a.max_prompt_len, a.skip_bad, "--max-prompt-len")
    if n_bad + n_long:
        E.print0(f"skipped {n_bad + n_long} bad rows of {a.data}")
    return records


def main(argv=None):
    """The command line: a bad file, row, checkpoint or flag value exits with status 2, a run
    stopped by non-finite numbers with status 1; one line each, no traceback."""
    return data.cli("grpo.py", grpo_main, argv)


def grpo_main(argv=None):
    a = get_args(argv)
    default_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the staircase's stages run there
    stages_compile = sample.compile_by_default(default_device) if a.compile is None else a.compile
    if a.staircase:
        return staircase(seed=a.seed, compile=stages_compile)
    if a.model == "runs/sft1" and not os.path.exists(os.path.join(a.model, "config.json")):
        build_start_model(a.seed, stages_compile)
    rank, world, device = E.dist_init(a.device)
    a.compile = sample.compile_by_default(device) if a.compile is None else a.compile
    if a.prompts_per_rollout % a.prompts_per_step or a.prompts_per_step % world:
        raise data.BadInput("--prompts-per-rollout must be a multiple of --prompts-per-step, and that a multiple "
                            "of the number of processes")
    sft.claim_out_dir(a.out, a.resume)
    records = load_prompts(a, data.load_tokenizer(a.model))
    try:
        train(a, records, rank, world, device)
    except sft.NonFinite as e:
        print(f"grpo.py: error: {e}", file=sys.stderr, flush=True)
        E.dist_cleanup()
        sys.exit(1)
    E.dist_cleanup()


def train(a, records, rank, world, device):
    """The rollouts, from the start or from the latest checkpoint in --out (--resume)."""
    policy, ref, opt, tok, autocast = setup(a, device, world)
    start, ck, run_id = 0, sft.latest_checkpoint(a.out) if a.resume else None, sft.new_run_id()
    if ck:
        state = sft.load_checkpoint(ck, policy, opt)
        start, run_id = state["step"], state["extra"].get("run_id") or run_id
        E.print0(f"resumed from {ck} at step {start}")
    test = data.synth_test_records(a.eval_n) if a.eval_every else None
    log = sft.MetricsLogger(os.path.join(a.out, "metrics.jsonl"), resume_step=start if ck else None)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(a.seed)).tolist()
    guard, t_start = sft.FiniteGuard(last_good=ck), time.time()
    from tqdm import tqdm
    for step in tqdm(range(start, a.steps), initial=start, total=a.steps, desc="grpo", disable=rank != 0):
        times = {}
        recs, encs, s, scores, draws = draw_rollout(policy, tok, records, order, step, a, rank, world,
                                                    device, autocast, times)          # 1. sample, 2. score
        t0 = time.time()
        keep = s.finished if a.overlong == "mask" else None
        items = build_sequences(encs, s, adv=scores[3], keep=keep)                   # 3. log-probs
        reference_logps(policy, ref, items, a, pad_of(tok), autocast)
        times["reference"], t0 = time.time() - t0, time.time()
        stats = update(policy, opt, items, a, pad_of(tok), world, device, autocast, guard, step + 1)  # 4. update
        times["update"] = time.time() - t0
        row = rollout_metrics(step, a, s, scores, stats, recs, times, device, t_start, draws)  # 5. metrics
        if test is not None and ((step + 1) % a.eval_every == 0 or step + 1 == a.steps):
            row.update(test_metrics(policy, tok, test, step, rank, world, a.compile))
        log.log(**row)
        if (step + 1) % a.save_every == 0 or step + 1 == a.steps:
            path = sft.checkpoint_dir(a.out, step + 1)
            sft.save_checkpoint(policy, tok, path, optimizer=opt, step=step + 1, extra=dict(run_id=run_id),
                                source=a.model, max_pixels=a.max_pixels)
            guard.last_good = path  # save_checkpoint checked that its weights are finite
    sft.export_model(policy, tok, a.out, source=a.model, max_pixels=a.max_pixels)  # the final policy, HF layout
    log.close()


# -----------------------------------------------------------------------------
# the demo's staircase: every actor of the paper trained here, from nothing, on the embedded world
#
#   base      a tiny VLM that perceives and answers directly (captions and short answers, no
#             <think> work): the analogue of Qwen2.5-VL-Instruct
#   reasoner  a tiny text-only qwen2 model: caption + question -> an R1-style trace, with R1's
#             faults (reflections after the answer, rambling, wrong answers): DeepSeek-R1-Distill's
#   SFT1      the base captions the pool's images, the reasoner solves each from its caption (k
#             traces), data.py traces filters them (the first SFT set), the base is fine-tuned on it
#   GRPO1     on harder problems than SFT1's: easy and hard mixed
#   SFT2      GRPO1 answers a pool k times, the shortest correct answers fine-tune the base again
#   GRPO2     on hard problems only, the hardest set the world has, three times as many rollouts
# As in the paper, SFT's questions are the easier ones and each GRPO set is harder than the one
# before: SFT's pools are easy problems, so the work on hard ones (a fourth bar, a fourth row, more
# shapes) is learned by GRPO alone (the base saw their images, with captions and short answers).
# Each SFT starts from the base, so SFT2 keeps what GRPO1 wrote for easy problems and only part of
# what it found on hard ones, which GRPO2 finds again. With pools of easy and hard problems SFT2
# held all GRPO1 found, and GRPO2 moved it -1.0 to +0.9 (README, "What we learned").

DEMO = dict(base_n=24000, base_steps=1500, reasoner_n=32000, reasoner_steps=1000, pool=4000, k=4, sft1_steps=1200,
            grpo_n=4000, grpo1_steps=100, n_distill=4000, k2=4, sft2_steps=1800, grpo2_steps=300, test_n=2000,
            grpo_flags=[], sft_level="easy", grpo1_level="mix", grpo2_level="hard")
# SFT2 trains longer than SFT1: at 1200 steps it fell below GRPO1 in one seed of three (with SFT pools of
# easy and hard problems); GRPO2's 300 rollouts beat 100 by 1.3 and 2.7 points (seeds 0, 1)
MAX_NEW = 192  # completion budget of the distillation samples and the tests (traces <= ~90 tokens)


def command(script, args):
    """(the command line, a call that runs it in this process)."""
    run = {"sft.py": lambda: sft.train(sft.parser().parse_args(args)), "grpo.py": lambda: main(args),
           "sample.py": lambda: sample.main(args), "data.py": lambda: data.main(args)}[script]
    return "python " + script + "".join(" " + (f'"{x}"' if " " in x else x) for x in args), run


def staircase_stages(root, seed, c, compile=False):
    """The stages, each (name, its output model dir, its commands as (line, call)); c: DEMO's sizes."""
    d = lambda *p: os.path.join(root, *p)
    sd = ["--seed", str(seed)] if seed else []
    cf = ["--compile"] if compile else []  # every sampling command: one compiled step for the whole process
    px = ["--eval-n", "0"]
    from_base = ["--model", d("base"), "--lr", "2e-3", "--data-seed", "1"] + px  # the trace grammar is new to the base
    pool, dis = d("pool1"), d("distill")
    grpo = lambda steps: (["--n-train", str(c["grpo_n"]), "--steps", str(steps), "--eval-every", "0"]
                          + c["grpo_flags"] + sd + cf)
    return [
        ("base", d("base"), [command("sft.py", ["--synth", "base", "--level", "mix", "--n-train", str(c["base_n"]),
                                                "--steps", str(c["base_steps"]), "--out", d("base")] + sd + px)]),
        ("reasoner", d("reasoner"), [command("sft.py", [
            "--model", "tiny-text", "--synth", "reason", "--n-train", str(c["reasoner_n"]), "--steps", str(c["reasoner_steps"]),
            "--micro-batch-size", "8", "--out", d("reasoner")] + sd + px)]),
        ("SFT1", d("sft1"), [
            command("data.py", ["synth", "--out", pool, "--n", str(c["pool"]), "--level", c["sft_level"], "--seed", "1"]),
            command("sample.py", ["--task", "caption", "--model", d("base"), "--data", d("pool1", "data.jsonl"),
                                  "--out", d("pool1", "captions.jsonl"), "--caption-prompt", data.CAPTION_PROMPT,
                                  "--max-new-tokens", "64", "--batch-size", "100"] + cf),
            command("sample.py", ["--task", "reason", "--model", d("reasoner"), "--data", d("pool1", "captions.jsonl"),
                                  "--out", d("pool1", "traces.jsonl"), "--reason-prompt", data.REASON_TEMPLATE,
                                  "--n", str(c["k"]), "--max-new-tokens", str(MAX_NEW), "--batch-size", "100"] + sd + cf),
            command("data.py", ["traces", "--data", d("pool1", "traces.jsonl"), "--out", d("sft1.jsonl"),
                                "--max-words", str(data.MAX_WORDS)]),
            command("sft.py", from_base + ["--data", d("sft1.jsonl"), "--steps", str(c["sft1_steps"]), "--out", d("sft1")])]),
        ("GRPO1", d("grpo1"), [command("grpo.py", ["--model", d("sft1"), "--level", c["grpo1_level"], "--out", d("grpo1")]
                                       + grpo(c["grpo1_steps"]))]),
        ("SFT2", d("sft2"), [
            command("data.py", ["synth", "--out", dis, "--n", str(c["n_distill"]), "--level", c["sft_level"], "--seed", "2"]),
            command("sample.py", ["--task", "distill", "--model", d("grpo1"), "--data", d("distill", "data.jsonl"),
                                  "--out", d("distill", "samples.jsonl"), "--n", str(c["k2"]),
                                  "--max-new-tokens", str(MAX_NEW), "--batch-size", "64"] + sd + cf),
            command("data.py", ["traces", "--data", d("distill", "samples.jsonl"), "--out", d("sft2.jsonl")]),
            command("sft.py", from_base + ["--data", d("sft2.jsonl"), "--steps", str(c["sft2_steps"]), "--out", d("sft2")])]),
        ("GRPO2", d("grpo2"), [command("grpo.py", ["--model", d("sft2"), "--level", c["grpo2_level"], "--out", d("grpo2")]
                                       + grpo(c["grpo2_steps"]))]),
    ]


def run_stage(name, out, commands, test, compile=False):
    """Run one stage's commands, then test its model greedily -> its row of staircase.json (the
    text reasoner has no row of its own: the filters' counts in SFT1's row say how it did)."""
    t0 = time.time()
    results = []
    shutil.rmtree(out, ignore_errors=True)  # a stage not recorded as done starts afresh
    for line, call in commands:
        print(f"\n=== {name}: {line}", flush=True)
        results.append(call())
    row = dict(seconds=time.time() - t0, commands=[line for line, _ in commands])
    if name == "SFT1":  # the first SFT set: what each filter dropped, and the traces from a wrong caption
        kept, _ = data.load_records(os.path.join(os.path.dirname(out), "sft1.jsonl"))
        wrong = sum(r["meta"]["caption"] != data.caption_text(r["meta"]["family"], r["meta"]["scene"]) for r in kept)
        row.update(filters=results[3], kept=len(kept), wrong_caption=wrong)
    if name != "reasoner":
        m = M.load_model(out).eval()
        res, s = E.evaluate(m, data.load_tokenizer(out), test, batch_size=100, max_new_tokens=MAX_NEW, progress=False,
                            compile=compile)
        row.update(accuracy=s["accuracy"], family={k: v[0] for k, v in s["by"]["family"].items()},
                   level={k: v[0] for k, v in s["by"].get("level", {}).items()}, correct=[int(r["correct"]) for r in res])
    return row


def paired_step(a, b):
    """(b - a in points, its standard error): the same problems before and after, so the error is
    that of the per-problem difference."""
    diff = [y - x for x, y in zip(a["correct"], b["correct"])]
    mean = sum(diff) / len(diff)
    var = sum((x - mean) ** 2 for x in diff) / max(len(diff) - 1, 1)
    return 100 * mean, 100 * (var / len(diff)) ** 0.5


def write_table(rows, path):
    """staircase.md: accuracy per stage, overall, per family and level, the step from the stage
    before with its paired standard error, and the wall-clock of each stage (reasoner included)."""
    tested = [n for n in rows if "accuracy" in rows[n]]
    fams = sorted(rows[tested[0]]["family"])
    lines = ["| stage | test accuracy | step (paired SE) | " + " | ".join(fams) + " | easy / hard | wall-clock |",
             "|---|---|---|" + "---|" * len(fams) + "---|---|"]
    for i, n in enumerate(tested):
        r = rows[n]
        step = "" if i == 0 else "{:+.1f} ({:.1f})".format(*paired_step(rows[tested[i - 1]], r))
        lines.append(f"| {n} | {r['accuracy']:.1%} | {step} | " + " | ".join(f"{r['family'][f]:.0%}" for f in fams)
                     + f" | {r['level'].get('easy', 0):.1%} / {r['level'].get('hard', 0):.1%} | {r['seconds'] / 60:.1f} min |")
    total = sum(r["seconds"] for r in rows.values())
    lines.append(f"\nthe whole loop, reasoner ({rows['reasoner']['seconds'] / 60:.1f} min) included: {total / 60:.1f} min")
    if "filters" in rows.get("SFT1", {}):
        r = rows["SFT1"]
        lines.append(f"first SFT set: {r['kept']} records kept; traces dropped: "
                     + ", ".join(f"{k} {v}" for k, v in r["filters"].items() if k in data.DROP_REASONS)
                     + f"; reflections cut {r['filters']['cut']}; kept traces from a wrong caption {r['wrong_caption']}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def draw_chart(rows, path, size=(560, 360)):
    """runs/staircase.png: test accuracy per stage, overall (black, thick) and per family."""
    from PIL import Image, ImageDraw
    tested = [n for n in rows if "accuracy" in rows[n]]
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = 50, 20, size[0] - 110, size[1] - 40
    X = lambda i: x0 + (x1 - x0) * i / max(len(tested) - 1, 1)
    Y = lambda acc: y1 - (y1 - y0) * acc
    for v in range(0, 101, 20):
        d.line([x0, Y(v / 100), x1, Y(v / 100)], fill=(220, 220, 220))
        d.text((x0 - 30, Y(v / 100) - 6), f"{v}%", fill="black")
    for i, n in enumerate(tested):
        d.text((X(i) - 15, y1 + 10), n, fill="black")
    fams = sorted(rows[tested[0]]["family"])
    colours = [(220, 30, 30), (30, 160, 50), (40, 70, 220), (230, 150, 0)]
    series = [(f, colours[j % 4], 1, [rows[n]["family"][f] for n in tested]) for j, f in enumerate(fams)]
    for name, colour, width, ys in series + [("overall", (0, 0, 0), 3, [rows[n]["accuracy"] for n in tested])]:
        d.line([(X(i), Y(y)) for i, y in enumerate(ys)], fill=colour, width=width)
        d.text((x1 + 10, Y(ys[-1]) - 6), name, fill=colour)
    img.save(path)


def staircase(root="runs", seed=0, until=None, sizes=None, compile=False):
    """The paper's loop on the embedded world from nothing, each VLM stage tested greedily on the
    first test_n held-out problems (one standard error ~1 point at 2000). Writes root/
    staircase.json (a row per stage), staircase.md and staircase.png. A stage already in
    staircase.json, with its model on disk, is skipped, so a rerun continues; `until` stops
    after the named stage. seed (--seed) sets the initializations and the sampling. One process:
    with compile (--compile) its sampling shares one compiled decode step."""
    c = {**DEMO, **(sizes or {})}
    test = data.synth_test_records(c["test_n"])
    path, rows = os.path.join(root, "staircase.json"), {}
    if os.path.exists(path):
        with open(path) as f:
            rows = json.load(f)
    for name, out, commands in staircase_stages(root, seed, c, compile):
        if name not in rows or not os.path.exists(os.path.join(out, "config.json")):
            rows[name] = run_stage(name, out, commands, test, compile)
            with open(path, "w") as f:
                json.dump(rows, f)
        print(f"{name}: {rows[name].get('accuracy', float('nan')):.1%} ({rows[name]['seconds'] / 60:.1f} min)", flush=True)
        if name == until:
            return rows
    write_table(rows, os.path.join(root, "staircase.md"))
    draw_chart(rows, os.path.join(root, "staircase.png"))
    return rows


if __name__ == "__main__":
    main()
