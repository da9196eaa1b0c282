"""
The paper's GRPO recipe, in bytes on each GPU: phase by phase, from the code's own structure.

    python tests/bench/memory_plan.py --model 7b --gpus 8 --gpu-mem 80
    python tests/bench/memory_plan.py --model 3b --gpus 8 --gpu-mem 80 --rollout-batch 320
    python tests/bench/memory_plan.py --check       # predicted vs measured: 3B widths, 2 layers, 2 CPU processes

The models are built on the meta device from their config.json numbers (no download), so the
parameter counts are the real module tree's (7B: 8,292,166,656; 3B: 3,754,622,976). A rank holds,
for the whole run (from the second rollout on): its fp32 shard of the policy, of its gradient (kept
from one optimizer step to the next zero_grad) and of Adam's two moments; its bf16 shard of the
frozen reference; and the reference's root unit (embeddings, head, merger) gathered, which FSDP2
never reshards after a forward that has no backward. Then each phase adds, at its worst moment:

    sampling   all bf16 weights gathered once per generate call (sample.gathered); the KV cache of
               one call of --rollout-batch rows (each prompt's prefill row and its G copies, both
               alive when the copies are made); one decode step's logits and sampling buffers
    reference  no grad, one micro-batch: the units running (FSDP2 keeps a unit's all-gather
               buffer until the next is copied out), the K/V of the micro-batch's prompts and
               rows, one layer's working set, one log-prob chunk (grpo.LOGP_CHUNK tokens x
               vocab); with an old-policy pass, the policy's root gathered afresh with its buffer
    update     the policy's root gathered; the stored activations (each layer's input with
               --activation-checkpointing, else every layer's saved tensors); one layer recomputed
               with its gradients; the head's bf16 gradient; a log-prob chunk's backward; the
               reduce-scatter of the root's gradients at the end; Adam's temporaries

The formulas count what the code allocates (tensor by tensor where it matters, rounded where it
does not); `--check` runs one GRPO rollout of grpo.py's own functions at reduced scale under
torchrun and compares each phase's peak with the prediction (peak RSS from /proc/self/status).
"""

import argparse
import math
import os
import subprocess
import sys
from dataclasses import dataclass, replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import grpo  # noqa: E402
import model as M  # noqa: E402

GB = 1e9
RESERVE = 0.10  # of a GPU's memory left for the CUDA context, NCCL buffers and allocator fragmentation
# FSDP2 units alive at once: in forward a unit's flat all-gather buffer is kept until the next
# unit is copied out (the previous buffer, the next's buffer and weights); in backward the unit
# running and the next one prefetched, with its buffer while it is copied out
LIVE_UNITS = 3
DECODE_BYTES = 32  # per row and vocab entry of a decode step: bf16 logits, fp32 copy, ban, probs, fp64 CDF

# -----------------------------------------------------------------------------
# the models, by hand from their config.json numbers


def qwen25vl(layers, hidden, inter, heads, kv_heads, vocab, tied):
    return M.Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, mrope_section=[16, 24, 24],
                    tie_word_embeddings=tied, vision=M.VisionConfig(out_hidden_size=hidden))


CONFIGS = {"7b": lambda: qwen25vl(28, 3584, 18944, 28, 4, 152064, False),   # the vision tower: 32 blocks
           "3b": lambda: qwen25vl(36, 2048, 11008, 16, 2, 151936, True)}    # of 1280, as in both checkpoints


@dataclass
class Units:
    """Parameter counts of the FSDP2 units as sft.shard_model wraps them (each decoder layer, each
    vision block, the root: the rest), and per-rank shard sizes (dim 0 padded to the world size)."""
    total: int
    trainable: int
    layer: int            # one decoder layer
    root: int             # embeddings, head, final norm, patch embed, merger
    root_trainable: int
    shard: int            # one rank's elements of all parameters
    shard_trainable: int
    largest_shard: int    # the largest trainable parameter shard (Adam's per-tensor temporaries on CPU)


_UNITS = {}


def units(cfg, world, freeze_vision=True):
    key = (repr(cfg), world, freeze_vision)  # building the meta model takes a moment; plans ask often
    if key not in _UNITS:
        _UNITS[key] = count_units(cfg, world, freeze_vision)
    return _UNITS[key]


def count_units(cfg, world, freeze_vision):
    with torch.device("meta"):
        m = M.Qwen2_5_VL(cfg)
    sizes = dict(total=0, trainable=0, layer=0, root=0, root_trainable=0, shard=0, shard_trainable=0, largest_shard=0)
    for name, p in m.named_parameters():  # a tied head is the embedding: counted once
        trains = not (freeze_vision and name.startswith("visual."))
        shard = math.ceil(p.shape[0] / world) * (p.numel() // p.shape[0])
        in_root = not (name.startswith("model.layers.") or name.startswith("visual.blocks."))
        sizes["total"] += p.numel()
        sizes["shard"] += shard
        sizes["layer"] += p.numel() if name.startswith("model.layers.0.") else 0
        sizes["root"] += p.numel() if in_root else 0
        if trains:
            sizes["trainable"] += p.numel()
            sizes["shard_trainable"] += shard
            sizes["root_trainable"] += p.numel() if in_root else 0
            sizes["largest_shard"] = max(sizes["largest_shard"], shard)
    return Units(**sizes)

# -----------------------------------------------------------------------------
# the recipe's flags, and the bytes they cost


@dataclass
class Recipe:
    gpus: int = 8
    group: int = 5                   # G
    prompts_per_rollout: int = 512
    prompts_per_step: int = 128      # < per rollout: the reference pass runs the old policy too
    rollout_batch: int = None        # rows per generate call per rank (None: grpo's default)
    micro_batch: int = 4
    prompt_len: int = 450            # tokens of the longest prompt: ~350 image + ~100 text
    image_tokens: int = 350
    max_prompt_len: int = 6144       # grpo's --max-prompt-len (what the default rollout batch assumes)
    max_new: int = 2048
    checkpointing: bool = True       # --activation-checkpointing
    logp_chunk: int = 1024           # grpo.LOGP_CHUNK
    bf16: bool = True
    device: str = "cuda"

    @property
    def rows(self):  # per rank per rollout
        return self.prompts_per_rollout // self.gpus * self.group


def rollout_batch(cfg, r):
    if r.rollout_batch:
        return r.rollout_batch
    a = argparse.Namespace(max_prompt_len=r.max_prompt_len, max_new_tokens=r.max_new, group_size=r.group)
    return min(grpo.default_rollout_batch(cfg, a, 2 if r.bf16 else 4), r.rows)


def prompts_in_micro_batch(r):
    """The most distinct prompts in one micro-batch (rows go group after group)."""
    mb, G = r.micro_batch, r.group
    return max(len({row // G for row in range(s, min(s + mb, r.rows))}) for s in range(0, r.rows, mb))


def layer_bytes_per_token(cfg, pb, saved=True):
    """A decoder layer, per token: the tensors its forward saves for backward (saved=True), or
    the gradients alive while it runs backward (saved=False). Norms keep fp32 copies."""
    C, I, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    Ckv = cfg.num_key_value_heads * cfg.head_dim
    if not saved:
        return pb * (2 * I + 4 * C) + 8 * C
    norms = 2 * (4 * C + pb * C)
    attn = pb * (C + 2 * Ckv) + pb * (2 * C + 2 * Ckv) + pb * C + 4 * H + pb * C  # qkv, rope, sdpa out + lse, o_proj in
    return norms + attn + pb * 4 * I                                              # gate, silu, up, product


def nograd_bytes_per_token(cfg, pb):
    """A decoder layer run without grad, per token: the MLP's three intermediates and a few widths."""
    return pb * (3 * cfg.intermediate_size + 6 * cfg.hidden_size)


def mask_bytes(cfg, B, T, S, pb):
    """Attention over T new tokens and S slots: the (B, 1, T, S) bool mask, its GQA copy
    (B, 1, H / Hkv * T, S) and the float mask SDPA makes of that."""
    G = cfg.num_attention_heads // cfg.num_key_value_heads if T > 1 else 1
    return B * T * S + (B * G * T * S * (1 + pb) if T > 1 else 0)


def vision_bytes(cfg, images, image_tokens, pb):
    """The frozen vision tower on `images` images, no grad: patch rows, one block's MLP, the merger."""
    v = cfg.vision
    patches = images * image_tokens * v.spatial_merge_size ** 2
    return patches * (1176 * (4 + pb) + pb * (3 * v.intermediate_size + 6 * v.hidden_size))


def plan(cfg, r):
    """-> (persistent terms, {phase: {moment: terms}}); terms are [(what, bytes per GPU)]. A
    phase's peak is the persistent bytes plus its worst moment."""
    u = units(cfg, r.gpus)
    pb = 2 if r.bf16 else 4                       # compute dtype: gathered weights, activations, K/V
    kv, V, C, L = grpo.kv_bytes_per_token(cfg, pb), cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
    fsdp = r.gpus > 1
    # one process: autocast keeps a bf16 copy of each trainable weight while its block runs
    weights = ("weights, gathered", pb * u.total) if fsdp else ("bf16 weight copies (autocast)", 2 * u.trainable * r.bf16)
    persistent = [("policy fp32 shard", 4 * u.shard), ("gradient fp32 shard", 4 * u.shard_trainable),
                  ("Adam m, v fp32 shards", 8 * u.shard_trainable), ("reference shard", pb * u.shard)]
    persistent += [("reference root, gathered", pb * u.root)] if fsdp else []
    running = [("units, running", LIVE_UNITS * pb * u.layer)] if fsdp else []

    Rc = rollout_batch(cfg, r) // r.group * r.group
    Pc, Tp, S = Rc // r.group, r.prompt_len, r.prompt_len + r.max_new
    sampling = {
        "gather": [weights, ("all-gather buffer, last unit", pb * u.layer * fsdp)],
        "prefill": [weights, ("K/V, prefill rows", Pc * S * kv), ("vision tower", vision_bytes(cfg, Pc, r.image_tokens, pb)),
                    ("a layer, no grad", Pc * Tp * nograd_bytes_per_token(cfg, pb) + mask_bytes(cfg, Pc, Tp, S, pb))],
        "copy rows": [weights, ("K/V, prefill rows + G copies", (Pc + Rc) * S * kv), ("prefill logits", Pc * V * pb)],
        "decode": [weights, ("K/V, copies", Rc * S * kv), ("logits, sampling buffers", Rc * V * DECODE_BYTES)]}

    mb, Pm, Tc = r.micro_batch, prompts_in_micro_batch(r), r.max_new
    Slp, N = Tp + Tc - 1, mb * Tc                 # cache slots of completion_logps, completion tokens
    K = min(r.logp_chunk, N)
    kv_mb = ("K/V, micro-batch", (Pm + mb) * Slp * kv)
    layer_ng = ("a layer, no grad", N * nograd_bytes_per_token(cfg, pb) + mask_bytes(cfg, mb, Tc, Slp, pb))
    hidden = ("final hidden states", 2 * N * C * pb)
    scoring = [kv_mb, layer_ng, hidden, ("a log-prob chunk", K * V * 8)]
    reference = {"reference forward": running + scoring}
    if r.prompts_per_step < r.prompts_per_rollout:
        reference["old-policy forward"] = [("policy root, gathered", pb * u.root * fsdp)] + running + scoring
        reference["old-policy root, gathering"] = [("policy root, first unit, their buffers",
                                                     2 * pb * (u.root + u.layer) * fsdp)]

    tokens = Pm * Tp + N                          # the prompt pass and the completion pass
    saved, grads = layer_bytes_per_token(cfg, pb), layer_bytes_per_token(cfg, pb, saved=False)
    attn_saved = mb * (cfg.num_attention_heads // cfg.num_key_value_heads) * Tc * Slp * pb  # SDPA keeps the float mask
    stored = ([("layer inputs (checkpointing)", L * tokens * C * pb)] if r.checkpointing else
              [("every layer's saved tensors", L * (tokens * saved + attn_saved))])
    stored += [kv_mb, ("masks", Pm * Tp * Tp + mb * Tc * Slp), ("final norm, hidden states", N * C * (4 + 3 * pb))]
    root = [("policy root, gathered", pb * u.root)] if fsdp else [weights]
    head = V * C * pb                             # the head's gradient, unsharded until the root's reduce-scatter
    recompute = N * (saved * r.checkpointing + grads) + attn_saved * r.checkpointing + mask_bytes(cfg, mb, Tc, Slp, pb)
    adam = 4 * u.shard_trainable if r.device == "cuda" else 8 * u.largest_shard  # foreach: one list; CPU: per tensor
    update = {
        "forward": root + running + stored + [layer_ng],
        "root regathered for backward": [("policy root and its all-gather buffer", 2 * pb * u.root * fsdp)] + stored,
        "log-prob backward": root + stored + [("head gradients", head * min(2, math.ceil(N / K))),
                                              ("a log-prob chunk, backward", K * V * 16)],
        "layer backward": root + running + stored + [("head gradient", head),
                                                     ("a layer recomputed, its gradients", recompute),
                                                     ("layer gradient, reduce-scatter", u.layer * (pb + 4) * fsdp)],
        "root reduce-scatter": root + [("root gradients, fp32 copy", u.root_trainable * (pb + 4 * fsdp))],
        "optimizer step": [("Adam temporaries", adam)]}
    return persistent, {"sampling": sampling, "reference": reference, "update": update}


def peaks(persistent, phases):
    """-> {phase: (peak bytes, worst moment, its terms)}."""
    base = sum(b for _, b in persistent)
    out = {}
    for phase, moments in phases.items():
        worst = max(moments, key=lambda m: sum(b for _, b in moments[m]))
        out[phase] = (base + sum(b for _, b in moments[worst]), worst, moments[worst])
    return out

# -----------------------------------------------------------------------------
# the report


def report(name, cfg, r, gpu_mems=(80, 141)):
    u, rb = units(cfg, r.gpus), rollout_batch(cfg, r)
    persistent, phases = plan(cfg, r)
    pk = peaks(persistent, phases)
    print(f"Qwen2.5-VL-{name.upper()} on {r.gpus} GPU(s): {u.total / 1e9:.2f} B parameters, {u.trainable / 1e9:.2f} B "
          f"trained (vision frozen); {r.prompts_per_rollout} prompts x {r.group} a rollout, {r.rows} rows per GPU")
    print(f"  flags: --rollout-batch {rb} ({rb // r.group} prompts a generate call), --micro-batch {r.micro_batch}, "
          f"prompts of {r.prompt_len} + {r.max_new} new tokens, activation checkpointing "
          f"{'on' if r.checkpointing else 'off'}, log-prob chunk {r.logp_chunk}, {'bf16' if r.bf16 else 'fp32'} compute")
    print(f"  {'always held':<44}{sum(b for _, b in persistent) / GB:7.1f} GB")
    for what, b in persistent:
        print(f"    {what:<42}{b / GB:7.1f}")
    for phase, (peak, worst, terms) in pk.items():
        print(f"  {phase + ' peak (' + worst + ')':<44}{peak / GB:7.1f} GB")
        for what, b in terms:
            print(f"    {what:<42}{b / GB:7.1f}")
    peak = max(p for p, _, _ in pk.values())
    fits = ", ".join(f"{'fits' if fits_in(peak, m) else 'does NOT fit'} in {m} GB" for m in gpu_mems)
    print(f"  peak {peak / GB:.1f} GB per GPU: {fits} (keeping {RESERVE:.0%} for the CUDA context and fragmentation)")
    return peak


def fits_in(peak, gpu_mem):
    return peak <= (1 - RESERVE) * gpu_mem * GB


def fitting_flags(cfg, r, gpu_mem):
    """The largest rollout batch (whole groups) and micro-batch (<= the given one) that fit, or None."""
    for mb in [m for m in (16, 8, 4, 2, 1) if m <= r.micro_batch]:
        for rb in range(r.rows, 0, -r.group):
            t = replace(r, rollout_batch=rb, micro_batch=mb)
            if fits_in(max(p for p, _, _ in peaks(*plan(cfg, t)).values()), gpu_mem):
                return t
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="7b", choices=list(CONFIGS))
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-mem", type=float, default=80, help="GB per GPU")
    d = Recipe()
    for f in ("rollout_batch", "micro_batch", "prompt_len", "image_tokens", "max_prompt_len", "max_new", "logp_chunk",
              "group", "prompts_per_rollout", "prompts_per_step"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(d, f))
    p.add_argument("--no-checkpointing", action="store_true", help="plan without --activation-checkpointing")
    p.add_argument("--check", action="store_true", help="predicted vs measured at reduced scale (2 CPU processes)")
    a = p.parse_args(argv)
    if a.check:
        return check_main()
    cfg = CONFIGS[a.model]()
    r = Recipe(**{f: getattr(a, f) for f in ("gpus", "rollout_batch", "micro_batch", "prompt_len", "image_tokens",
                                              "max_prompt_len", "max_new", "logp_chunk", "group",
                                              "prompts_per_rollout", "prompts_per_step")}, checkpointing=not a.no_checkpointing)
    report(a.model, cfg, r, sorted({80, 141, int(a.gpu_mem)}))
    for what, t in ((f"all {r.rows} rows in one generate call, as before --rollout-batch", replace(r, rollout_batch=r.rows)),
                    ("without --activation-checkpointing", replace(r, checkpointing=not r.checkpointing))):
        if t.checkpointing or r.checkpointing:
            print(f"  ({what}: peak {max(pk for pk, _, _ in peaks(*plan(cfg, t)).values()) / GB:.1f} GB)")
    t = fitting_flags(cfg, r, a.gpu_mem)
    if t is None:
        held = sum(b for _, b in plan(cfg, r)[0])
        print(f"nothing fits in {a.gpu_mem:g} GB: the sharded weights, gradients and Adam states alone are "
              f"{held / GB:.1f} GB a GPU, of {(1 - RESERVE) * a.gpu_mem:.0f} usable; use more GPUs")
    else:
        print(f"fits in {a.gpu_mem:g} GB: --rollout-batch {t.rollout_batch} --micro-batch {t.micro_batch}"
              f"{' --activation-checkpointing' if t.checkpointing else ''} (log-prob chunk {t.logp_chunk})")

# -----------------------------------------------------------------------------
# --check: the plan against measurement, at reduced scale on the CPU


def check_config(tok, vocab, layers=2, blocks=2):
    """Qwen2.5-VL-3B's widths with `layers` decoder layers and `blocks` vision blocks, tied head,
    `vocab` entries, the tiny tokenizer's special ids."""
    import data
    cfg = data.tiny_config(tok, hidden_size=2048, intermediate_size=11008, num_hidden_layers=layers,
                           num_attention_heads=16, num_key_value_heads=2, mrope_section=[16, 24, 24],
                           vision_depth=blocks, vision_hidden_size=1280, vision_intermediate_size=3420,
                           vision_heads=16, fullatt_block_indexes=[blocks - 1])
    cfg.vocab_size = vocab
    return cfg


def write_check_model(path, vocab, seed=0):
    """A random bf16 checkpoint of check_config with the tiny tokenizer (rank 0 only)."""
    import data
    tok = data.save_tiny_tokenizer(path)
    torch.manual_seed(seed)
    m = M.Qwen2_5_VL(check_config(tok, vocab)).init_weights(seed=seed).to(torch.bfloat16)
    M.save_model(m, path)


def status():
    """This process's memory from /proc/self/status, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if v.strip().endswith("kB"):
                out[k] = int(v.split()[0]) * 1024
    return out


def reset_peak():
    """VmHWM := the current RSS (Linux: 5 into /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# fp32 compute: on an AVX2 CPU without bf16 instructions a bf16 matmul with an untransposed weight
# (every linear layer's input gradient) runs at ~0.1 GFLOP/s, a bf16 update takes many minutes.
# In fp32 two processes at 3B's vocabulary (151936) would need ~17 GB: the check takes 65536.
CHECK_VOCAB = 65536
# 2 micro-batches a step, as the recipe has many: from the second on, the step's gradient shards are all held
CHECK = Recipe(gpus=2, group=5, prompts_per_rollout=8, prompts_per_step=4, rollout_batch=10, micro_batch=5,
               image_tokens=16, max_new=32, logp_chunk=128, bf16=False, device="cpu")


def check_flags(r, model, out):
    """grpo.py's flags for the recipe r, on the CPU."""
    return ["--model", model, "--out", out, "--group-size", str(r.group), "--prompts-per-rollout",
            str(r.prompts_per_rollout), "--prompts-per-step", str(r.prompts_per_step), "--rollout-batch",
            str(r.rollout_batch), "--micro-batch", str(r.micro_batch), "--max-new-tokens", str(r.max_new),
            "--beta", "0.01", "--lr", "1e-6", "--top-p", "0.99", "--freeze-vision", "--suffix", "r1",
            "--bf16" if r.bf16 else "--no-bf16", "--device", "cpu", "--eval-every", "0"] + \
        (["--activation-checkpointing"] if r.checkpointing else [])


def check_rollout(policy, ref, opt, tok, records, step, a, device, autocast, base=None):
    """One rollout as grpo.main runs it (sample, score, log-probs, update). With base (bytes of
    anonymous memory before any model existed): each phase's peak above it, from VmHWM reset at
    the phase's start, less the file-backed pages (code, mapped files) resident at its end."""
    import gc
    import eval as E
    rank, world = E.rank_world()
    got, pad = {}, grpo.pad_of(tok)

    def phase(name, fn):
        gc.collect()
        reset_peak()
        out = fn()
        s = status()
        got[name] = s["VmHWM"] - s["RssFile"] - s.get("RssShmem", 0) - (base or 0)
        if base is not None:
            E.print0(f"  {name}: {got[name] / GB:.2f} GB")
        return out
    gidx, recs = grpo.rollout_prompts(records, list(range(len(records))), step, a, rank, world)
    encs, s = phase("sampling", lambda: grpo.rollout(policy, tok, recs, gidx, a, autocast))
    items = grpo.build_sequences(encs, s, adv=grpo.score(s, recs, a)[3])
    phase("reference", lambda: grpo.reference_logps(policy, ref, items, a, pad, autocast))
    phase("update", lambda: grpo.update(policy, opt, items, a, pad, world, device, autocast))
    return got, max(len(e["input_ids"]) for e in encs), int(s.lengths.max())


def check_worker(r, vocab, root):
    """Under torchrun: build (rank 0) and load the reduced model, one warm-up rollout of 2 new
    tokens (gradients, Adam's states and the reference's gathered root then exist, as from the
    second rollout of a run on), then the measured rollout -> rank 0 prints the comparison."""
    import data
    import eval as E
    rank, world, device = E.dist_init("cpu")
    base = status()["RssAnon"]
    model = os.path.join(root, "model")
    if rank == 0:
        write_check_model(model, vocab)
    E.barrier()
    grpo.LOGP_CHUNK = r.logp_chunk
    a = grpo.get_args(check_flags(r, model, os.path.join(root, "out")))
    policy, ref, opt, tok, autocast = grpo.setup(a, device, world)
    records = data.synth_records(4 * r.prompts_per_rollout, "easy", seed=1, image_size=112)
    warm = argparse.Namespace(**{**vars(a), "max_new_tokens": 2})
    E.print0("warm-up rollout (2 new tokens)")
    check_rollout(policy, ref, opt, tok, records, 0, warm, device, autocast)
    E.print0(f"measured rollout ({a.max_new_tokens} new tokens)")
    got, prompt_len, new = check_rollout(policy, ref, opt, tok, records, 1, a, device, autocast, base)
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, got)
    if rank == 0:
        compare(replace(r, prompt_len=prompt_len, max_new=new), vocab, everyone)
    E.dist_cleanup()


def compare(r, vocab, measured, tolerance=0.15):
    import data
    cfg = check_config(data.build_tiny_tokenizer(), vocab)
    pk = peaks(*plan(cfg, r))
    print(f"\npredicted vs measured, GB per process: Qwen2.5-VL-3B widths, {cfg.num_hidden_layers} decoder layers, "
          f"{cfg.vision.depth} vision blocks, vocab {vocab}, {units(cfg, r.gpus).total / 1e6:.0f} M parameters; "
          f"{r.gpus} processes (FSDP2, gloo, {'bf16' if r.bf16 else 'fp32'} compute); prompts of {r.prompt_len} "
          f"tokens, {r.max_new} new")
    held = sum(b for _, b in plan(cfg, r)[0])
    print(f"  {'phase':<11}{'worst moment':<28}{'predicted':>10}" + "".join(f"{'rank ' + str(i):>12}" for i in range(len(measured)))
          + f"   above the {held / GB:.2f} GB always held: predicted, measured")
    ok = True
    for phase, (peak, worst, _) in pk.items():
        errs = [m[phase] / peak - 1 for m in measured]
        ok &= all(abs(e) <= tolerance for e in errs)
        print(f"  {phase:<11}{worst:<28}{peak / GB:10.2f}" + "".join(f"{m[phase] / GB:7.2f} {e:+4.0%}" for m, e in zip(measured, errs))
              + f"   {(peak - held) / GB:.2f}, " + ", ".join(f"{(m[phase] - held) / GB:.2f}" for m in measured))
    print(f"each within {tolerance:.0%}: {'yes' if ok else 'NO'}")
    return ok


def check_main():
    """--check: a plain process relaunches itself under torchrun with 2 processes."""
    if "RANK" in os.environ:
        return check_worker(CHECK, CHECK_VOCAB, os.environ["MEMORY_PLAN_DIR"])
    import tempfile
    with tempfile.TemporaryDirectory() as root:
        # allocations of 64 kB and more are mmapped, so a freed tensor leaves the RSS at once
        env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", MEMORY_PLAN_DIR=root,
                   PYTHONPATH=ROOT)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={CHECK.gpus}",
               os.path.abspath(__file__), "--check"]
        return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
