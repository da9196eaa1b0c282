"""
Supervised fine-tuning: masked cross-entropy on the assistant's tokens, AdamW with warmup then
cosine decay, gradient clipping and accumulation, FSDP2 under torchrun; and the training kit
(FSDP wrapping, atomic checkpoints, metrics.jsonl) that grpo.py reuses.

    python sft.py                    # the demo's base: a tiny VLM from scratch on captions and
                                     # direct answers -> runs/base
    python sft.py --model tiny-text --synth reason --out runs/reasoner     # the demo's reasoner
    torchrun --nproc_per_node=8 sft.py --model DIR --data FILE ...   # FSDP2; the recipe: README
    python sft.py ... --resume       # continue from the latest checkpoint in --out

The loss, once: for the trained positions t of the global batch (the assistant reply and its
closing <|im_end|>, in every row, micro-batch and rank of one optimizer step),

    loss = sum_t -log p(x_t | x_<t) / N,     N = trained positions in the global batch,

so accumulation and data parallelism give exactly the per-token mean of the whole batch (a long
reply weighs more than a short one, as in the paper's trainer). Prompt, image and padding
positions never reach the loss.

Outputs in --out: the final model in the HF layout (config.json, model.safetensors, tokenizer
files, preprocessor_config.json: load_model, eval.py and transformers read it), metrics.jsonl (a
line per step), and checkpoints/step_N/ (the same + optimizer.safetensors, optimizer.json and
trainer_state.json: no pickle anywhere), each written to a .tmp directory and renamed into place
when complete. An --out belongs to one run: a fresh run refuses one that holds checkpoints. A
step whose loss or gradient norm is not finite is skipped (3 in a row stop the run), and
non-finite weights are never saved. One process runs the plain model (no process group, no
wrapping). How it departs from the paper's trainer: no packing (padded micro-batches);
the logits are formed at the trained positions only.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
import uuid

import torch
import torch.nn.functional as F

from tqdm import tqdm

import data
import eval as E
import model as M
from eval import all_reduce_sum, barrier, dist_cleanup, dist_init, is_main, print0, rank_world

IGNORE_INDEX = data.IGNORE_INDEX
GRAD_CLIP = 1.0  # the global gradient norm is clipped to this, as in the paper's trainer
# the demo's tiny model: data.TINY with a narrower language model (64 wide instead of 128): a
# step is cheaper, and in a CPU budget the extra steps matter more than the width
DEMO_TINY = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=192)
# the text reasoner copies numbers from its prompt (the caption, the options) into its work: with
# 4 heads of 16 it copies far more reliably than with 2 of 32, at the same cost
REASONER_TINY = dict(DEMO_TINY, num_attention_heads=4)

# -----------------------------------------------------------------------------
# the loss


def loss_positions(labels):
    """(B, T) bool: the positions whose next token is trained (position t predicts token t + 1;
    the last position predicts nothing). Pass it as model(..., logits=mask) to get the logits
    of those positions only, (N, vocab), in sft_loss's order."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def sft_loss(logits_or_hidden, labels, n_tokens_global, lm_head=None):
    """Sum of the cross-entropy over the trained tokens of this micro-batch, divided by the number
    of trained tokens of the whole global batch (all micro-batches, all ranks): see the top.

    logits_or_hidden: (B, T, V) logits; or (B, T, C) final hidden states with lm_head (a Linear
    or its (V, C) weight); or (N, V) logits of the loss_positions(labels) only (what training
    uses: the (B, T, V) logits of the prompt and padding are never formed). labels (B, T) with
    IGNORE_INDEX where nothing is trained."""
    y = labels[:, 1:]
    y = y[y != IGNORE_INDEX]                                   # (N,) row by row
    x = logits_or_hidden
    if x.dim() == 3:
        x = x[loss_positions(labels).to(x.device)]             # (N, V or C), the same order
        if lm_head is not None:
            x = F.linear(x, lm_head.weight if hasattr(lm_head, "weight") else lm_head)
    return F.cross_entropy(x.float(), y.to(x.device), reduction="sum") / n_tokens_global


def trained_tokens(labels):
    """The trained tokens of a (B, T) label tensor: N of sft_loss, for this micro-batch."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())

# -----------------------------------------------------------------------------
# data: records -> kept rows (length-checked) -> global batches in a fixed order


class NonFinite(RuntimeError):
    """The run cannot go on: steps in a row with a NaN or infinite loss or gradient norm, or
    weights that are not finite where they would be saved."""


class BadData(data.BadInput):
    """A malformed, solution-less or over-long row (without --skip-bad), or no trainable rows."""


def encoded_length(tokenizer, question, answer, images, min_pixels, max_pixels):
    """len(encode_sft(...)["input_ids"]) without processing any pixels (data.prompt_length)."""
    n = data.prompt_length(tokenizer, question, images, min_pixels, max_pixels)
    return n + len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1


def filter_records(records, tokenizer, max_seq_len, suffix, min_pixels, max_pixels, strict=False):
    """-> (kept records, {reason: count}, each kept record's length in tokens). A row without a
    solution, or longer than max_seq_len tokens, is skipped and counted; with strict (sft.py's
    default) it is an error naming the row."""
    kept, skipped, lengths = [], {}, []
    for r in records:
        why = None
        if not isinstance(r.get("solution"), str) or not r["solution"]:
            why = "no solution"
        else:
            n = encoded_length(tokenizer, data.format_question(r, suffix), r["solution"], r["images"],
                               min_pixels, max_pixels)
            if n > max_seq_len:
                why = "longer than --max-seq-len"
                if strict:
                    raise BadData(f"{r.get('source', '?')}: row {r.get('id')!r}: {n} tokens > "
                                  f"--max-seq-len {max_seq_len} (--skip-bad skips such rows)")
        if why is None:
            kept.append(r)
            lengths.append(n)
            continue
        if strict:
            raise BadData(f"{r.get('source', '?')}: row {r.get('id')!r}: {why} (--skip-bad skips such rows)")
        skipped[why] = skipped.get(why, 0) + 1
    return kept, skipped, lengths


class BatchOrder:
    """Row indices of global batch `step`: the rows are an endless stream of epochs, each a
    permutation drawn from (seed, epoch). A pure function of the step, so a resumed run sees
    exactly the rows it would have seen."""

    def __init__(self, n, batch_size, seed):
        self.n, self.batch_size, self.seed, self._perm = n, batch_size, seed, {}

    def perm(self, epoch):
        if epoch not in self._perm:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perm[epoch]

    def __call__(self, step):
        return [self.perm(i // self.n)[i % self.n]
                for i in range(step * self.batch_size, (step + 1) * self.batch_size)]


def micro_batches(rows, rank, world, micro, lengths=None):
    """This rank's share of a global batch (a contiguous block), cut into micro-batches. With
    the rows' lengths, the share is sorted by length first, so each micro-batch pads to its own
    longest row, not the step's (the loss is a mean over all the step's tokens either way)."""
    per_rank = len(rows) // world
    mine = rows[rank * per_rank:(rank + 1) * per_rank]
    if lengths is not None and micro < len(mine):
        mine = sorted(mine, key=lambda i: lengths[i])
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


CACHE_BYTES = 2 << 30  # what EncodedRows may keep per process: 2 GiB


class EncodedRows:
    """rows[i] -> its SFT encoding (ids, labels, pixel values), made on first use and kept while
    the kept tensors fit in CACHE_BYTES. A small set trained for many epochs (the demo's SFT2 sees
    each row ~16 times) is tokenized and its images decoded and normalized once, not every epoch;
    a set too big for the budget keeps its first rows and encodes the rest each time."""

    def __init__(self, tokenizer, rows, suffix, budget=CACHE_BYTES, **px):
        self.tokenizer, self.rows, self.suffix, self.px = tokenizer, rows, suffix, px
        self.kept, self.free = {}, budget

    def __call__(self, i):
        if i in self.kept:
            return self.kept[i]
        r = self.rows[i]
        question = data.format_question(r, self.suffix)
        enc = data.encode_sft(self.tokenizer, question, r["solution"], r["images"], **self.px)
        size = sum(v.numel() * v.element_size() for v in enc.values() if v is not None)
        if size <= self.free:
            self.kept[i], self.free = enc, self.free - size
        return enc


def encode_batch(encoded, idx, pad_id, device):
    """Row indices -> one padded SFT micro-batch (ids, labels, images) on device."""
    batch = data.collate([encoded(i) for i in idx], pad_id)
    return {k: v.to(device) if v is not None else None for k, v in batch.items()}


# -----------------------------------------------------------------------------
# the training kit: FSDP2 wrapping, checkpoints, metrics, the schedule (grpo.py imports these)


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def shard_model(model, device, bf16=False):
    """FSDP2: fully_shard each decoder layer, each vision block, then the root (embedding, tied
    lm_head, final norm, patch embed and merger stay in the root's group). With bf16 the
    gathered weights and the compute are bf16, the gradient reduction and the optimizer's
    master weights fp32. One process: returned as it is, moved to `device` (the single-process
    path uses autocast for bf16 instead). Why no one-rank FSDP: `python sft.py` needs no process
    group, and a plain module is the easiest thing to read and debug."""
    _, world = rank_world()
    if world == 1:
        return model.to(device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    kw = dict(mesh=mesh, mp_policy=mp)
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    if getattr(model, "visual", None) is not None:
        for block in model.visual.blocks:
            fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def full_state_dict(model):
    """The full (unsharded) state dict on CPU, on rank 0; {} on the other ranks of a sharded
    model. Collective under FSDP: every rank must call it."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def weights_finite(model):
    """True when every weight is finite, on every rank (collective under FSDP)."""
    bad = None
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p  # this rank's shard of a DTensor
        n = (~torch.isfinite(t.detach())).sum()
        bad = n if bad is None else bad + n
    return bad is None or int(all_reduce_sum(bad.double())) == 0


def check_finite(model, what):
    if not weights_finite(model):
        raise NonFinite(f"the weights are not finite: not writing {what}; lower --lr and continue from "
                        "the last checkpoint with --resume")


# what transformers' processors read besides the weights and the tokenizer: a starting directory's
# files of these kinds travel into every checkpoint and export (ours are never overwritten)
SIDE_SUFFIXES = (".json", ".jinja", ".txt", ".model")
OWN_FILES = {"config.json", "trainer_state.json", "optimizer.json", "eval.json", M.SAFETENSORS_INDEX}


def write_side_files(model, folder, source=None, max_pixels=None):
    """Copy the start directory's side files (generation_config.json, preprocessor_config.json,
    chat_template.json, ...) that `folder` lacks; then, for a model with a vision tower, write a
    preprocessor_config.json for Qwen2.5-VL's image processor if there still is none."""
    if source and os.path.isdir(source):
        for name in sorted(os.listdir(source)):
            src, dst = os.path.join(source, name), os.path.join(folder, name)
            side = name.endswith(SIDE_SUFFIXES) or name.startswith(("LICENSE", "NOTICE"))
            if side and name not in OWN_FILES and os.path.isfile(src) and not os.path.exists(dst):
                shutil.copyfile(src, dst)
    pre = os.path.join(folder, "preprocessor_config.json")
    if getattr(model.config, "vision", None) is not None and not os.path.exists(pre):
        with open(pre, "w") as f:
            json.dump(data.preprocessor_config(data.MIN_PIXELS, max_pixels or data.MAX_PIXELS), f, indent=2)


def save_optimizer(model, optimizer, folder):
    """The optimizer's full (unsharded) state, gathered on rank 0: its tensors to
    optimizer.safetensors, keyed "<parameter name>.<state name>", its param groups to
    optimizer.json. Loading (load_optimizer) reshards it, so a run may resume on another number
    of ranks. No pickle. Collective under FSDP."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return
    tensors, values = {}, {}
    for name, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{name}.{k}"] = v.detach().cpu().contiguous()
            else:
                values[f"{name}.{k}"] = v
    save_file(tensors, os.path.join(folder, "optimizer.safetensors"))
    with open(os.path.join(folder, "optimizer.json"), "w") as f:
        json.dump({"param_groups": osd["param_groups"], "values": values}, f)


def load_optimizer(model, optimizer, folder):
    """Restore what save_optimizer wrote into `optimizer`, resharded to this run's ranks (every
    rank reads the full state, then keeps its shard). Collective under FSDP."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    with open(os.path.join(folder, "optimizer.json")) as f:
        meta = json.load(f)
    state = {}
    for key, v in [*load_file(os.path.join(folder, "optimizer.safetensors")).items(), *meta["values"].items()]:
        name, k = key.rsplit(".", 1)
        state.setdefault(name, {})[k] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    if state:  # an optimizer that never stepped has no state to restore
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))


def _swap_in(tmp, path):
    """Rename the finished directory tmp to path (replacing an older one)."""
    old = path + ".old"
    if os.path.exists(path):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if os.path.exists(old):
        shutil.rmtree(old)


def save_checkpoint(model, tokenizer, path, optimizer=None, step=0, extra=None, source=None, max_pixels=None):
    """Write a checkpoint directory, atomically: everything goes to path + ".tmp", which is renamed
    to path once complete (a crash leaves the previous checkpoint as it was). Contents: the HF
    layout (config.json, model.safetensors, tokenizer files, side files: write_side_files;
    float32 master weights, so a resume is exact), and with an optimizer: save_optimizer's files
    and trainer_state.json (step, extra, RNG state as lists of ints). Refuses non-finite weights
    (NonFinite). Collective under FSDP."""
    check_finite(model, path)
    tmp = path + ".tmp"
    if is_main():
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    barrier()
    sd = full_state_dict(model)
    if is_main():
        M.save_model(model, tmp, state_dict=sd)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_side_files(model, tmp, source, max_pixels)
    del sd
    if optimizer is not None:
        save_optimizer(model, optimizer, tmp)
        if is_main():
            rng = {"torch": torch.get_rng_state().tolist()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state().tolist()
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({"step": step, "extra": extra or {}, "rng": rng, "world_size": rank_world()[1]}, f)
    barrier()
    if is_main():
        _swap_in(tmp, path)
    barrier()


def read_trainer_state(path):
    """trainer_state.json of a checkpoint, checked -> dict. A checkpoint of the older format
    (pickled trainer_state.pt and optimizer/) is refused, never unpickled: a pickle can run code."""
    f = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(f):
        old = os.path.isfile(os.path.join(path, "trainer_state.pt"))
        raise data.BadInput(f"{path}: " + ("a checkpoint of an older format (pickled trainer_state.pt): not "
                                           "loaded, since unpickling can run code" if old else "no trainer_state.json"))
    try:
        with open(f) as fh:
            state = json.load(fh)
        ok = (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("extra"), dict)
              and all(isinstance(v, list) and all(isinstance(b, int) and 0 <= b < 256 for b in v)
                      for v in state["rng"].values()))
    except (ValueError, AttributeError, KeyError):
        ok = False
    if not ok:
        raise data.BadInput(f"{f}: malformed trainer state")
    return state


def load_checkpoint(path, model=None, optimizer=None):
    """Restore what save_checkpoint wrote: weights into `model` (plain or sharded), the optimizer
    state (resharded to this run's ranks) and the RNG state. Returns the trainer state dict
    (step, extra, run_id). Reads JSON and safetensors only. Collective under FSDP."""
    state = read_trainer_state(path)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    if model is not None:
        sd = data.open_model(path, dtype=torch.float32, device="cpu").state_dict()
        if is_sharded(model):
            set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))
        else:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    v.copy_(sd[k])
    if optimizer is not None:
        load_optimizer(model, optimizer, path)
    torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["rng"]["cuda"], dtype=torch.uint8))
    return state


def checkpoint_dir(out, step):
    return os.path.join(out, "checkpoints", f"step_{step:06d}")


def step_dirs(out):
    """The names of out/checkpoints/step_N directories (complete or not), lowest step first."""
    root = os.path.join(out, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted((d for d in names if d.startswith("step_") and d[5:].isdigit()), key=lambda d: int(d[5:]))


def latest_checkpoint(out):
    """The checkpoint of the highest step under out/checkpoints that is complete (has its
    trainer_state.json), or None. One of the older, pickled format is named and ignored."""
    done = []
    for d in step_dirs(out):
        path = os.path.join(out, "checkpoints", d)
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            done.append(path)
        elif os.path.isfile(os.path.join(path, "trainer_state.pt")):
            print0(f"ignoring {path}: an older checkpoint format (pickled), never loaded")
    return done[-1] if done else None


def claim_out_dir(out, resume):
    """A run directory belongs to one run: a fresh run (no --resume) into an --out that holds
    checkpoints would mix them with its own (and its pruning would delete them), so it is refused.
    With --resume, what a kill left half-done is tidied (rank 0): a .tmp checkpoint is deleted; a
    .old one (killed between save_checkpoint's two renames) goes back in place if its step has none."""
    root = os.path.join(out, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    if not resume and any(d.startswith("step_") for d in names):
        raise data.BadInput(f"{out} already holds a run's checkpoints ({root}): continue it with --resume, "
                            "or use another --out")
    if resume and is_main():
        for d in names:
            path = os.path.join(root, d)
            if d.startswith("step_") and d.endswith(".tmp"):
                shutil.rmtree(path, ignore_errors=True)
            elif d.startswith("step_") and d.endswith(".old"):
                if os.path.exists(path[:-4]):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.replace(path, path[:-4])
    barrier()


def new_run_id():
    """A run's id, kept in its checkpoints: pruning deletes only the checkpoints of its own run."""
    return uuid.uuid4().hex


def prune_checkpoints(out, keep, run_id=None):
    """Delete all but the `keep` most recent step checkpoints of run `run_id` (rank 0); with
    run_id None, of any run. A checkpoint of another run, or one it cannot read, is left alone."""
    if keep <= 0 or not is_main():
        return

    def owner(d):
        try:
            with open(os.path.join(out, "checkpoints", d, "trainer_state.json")) as f:
                return json.load(f)["extra"].get("run_id")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False  # unreadable: nobody's
    mine = [d for d in step_dirs(out) if (owner(d) == run_id if run_id is not None else owner(d) is not False)]
    for d in mine[:-keep]:
        shutil.rmtree(os.path.join(out, "checkpoints", d), ignore_errors=True)


def export_model(model, tokenizer, out, source=None, max_pixels=None):
    """The final model in the HF layout at the top of `out` (next to metrics.jsonl), side files
    included (write_side_files): written to a temporary directory, then each file renamed into
    place. Refuses non-finite weights (NonFinite). Collective under FSDP."""
    check_finite(model, f"the model to {out}")
    tmp = os.path.join(out, ".export.tmp")
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    sd = full_state_dict(model)
    if is_main():
        M.save_model(model, tmp, state_dict=sd)
        tokenizer.save_pretrained(tmp)
        write_side_files(model, tmp, source, max_pixels)
        for f in os.listdir(tmp):
            os.replace(os.path.join(tmp, f), os.path.join(out, f))
        os.rmdir(tmp)
    barrier()


def finite_or_none(x):
    """A metrics value as JSON allows it: NaN and infinities become null (JSON has no NaN)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


class MetricsLogger:
    """Appends one JSON object per line to `path`, on rank 0 only (a no-op elsewhere); non-finite
    numbers are written as null. With resume_step, lines of later steps (from a run that went past
    its last checkpoint) and a last line cut short by a kill are dropped first, so the file reads
    as one run."""

    def __init__(self, path, resume_step=None):
        self.path = path
        self.f = None
        if not is_main() or path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step is not None and os.path.exists(path):
            keep = []
            with open(path) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue  # torn by a kill mid-write
                    if isinstance(row, dict) and row.get("step", 0) <= resume_step:
                        keep.append(line.rstrip("\n") + "\n")
            with open(path + ".tmp", "w") as f:  # a kill now leaves the old file whole
                f.writelines(keep)
            os.replace(path + ".tmp", path)
        elif resume_step is None and os.path.exists(path):
            os.remove(path)  # a fresh run starts a fresh file
        self.f = open(path, "a")

    def log(self, **row):
        if self.f is not None:
            self.f.write(json.dumps({k: finite_or_none(v) for k, v in row.items()}, allow_nan=False) + "\n")
            self.f.flush()

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


class FiniteGuard:
    """An optimizer step whose loss or gradient norm is NaN or infinite is skipped (its
    gradients dropped) and counted; `limit` such steps in a row stop the run (NonFinite), naming
    `last_good`, the last checkpoint written (the caller keeps it up to date)."""

    def __init__(self, limit=3, last_good=None):
        self.limit, self.last_good, self.streak, self.skipped = limit, last_good, 0, 0

    def ok(self, loss, grad_norm, step):
        """True: take the update of optimizer step `step` (1-based); False: skip it."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.streak = 0
            return True
        self.streak += 1
        self.skipped += 1
        print0(f"step {step}: loss {loss}, gradient norm {grad_norm}: update skipped ({self.streak} in a row)")
        if self.streak >= self.limit:
            raise NonFinite(f"{self.limit} steps in a row (the last: step {step}) had a non-finite loss or gradient "
                            f"norm: stopping. The last good checkpoint is {self.last_good or '(none)'}"
                            + ("; continue with --resume (maybe a lower --lr)" if self.last_good else ""))
        return False


def cosine_lr(step, total, warmup, lr, min_lr=0.0):
    """Learning rate of optimizer step `step` (0-based): linear warmup from lr/warmup to lr over
    the first `warmup` steps, then a half cosine from lr down to min_lr at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))

# -----------------------------------------------------------------------------
# the training loop


def backward_sft(model, batches, n_global, world, autocast):
    """Backpropagate the SFT loss of this rank's micro-batches, each one's part of the
    global token mean (n_global: trained tokens of the global batch). Returns this rank's part of
    the loss (float64; the parts of all ranks sum to the global loss)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=batches[0]["labels"].device)
    for b in batches:
        with autocast:
            # the logits of the trained positions only, (N, vocab), from inside the forward
            # (under FSDP the head's weights are gathered there)
            logits = model(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"],
                           logits=loss_positions(b["labels"]))
            loss = sft_loss(logits, b["labels"], n_global)
        # FSDP averages gradients over ranks; the loss is already a global mean, so scale by
        # the world size to turn that average back into the sum over ranks
        (loss * world).backward()
        loss_sum += loss.detach()
    return loss_sum


def build_model(args):
    """(model float32 on CPU in train mode, tokenizer): from --model DIR, or --model tiny built
    from scratch (data.TINY with DEMO_TINY's sizes, REASONER_TINY's for 'tiny-text'; initialized
    from --seed)."""
    if args.model in ("tiny", "tiny-text"):
        tok = data.build_tiny_tokenizer()
        cfg = data.tiny_config(tok, **(REASONER_TINY if args.model == "tiny-text" else DEMO_TINY))
        if args.model == "tiny-text":
            cfg.model_type, cfg.vision, cfg.mrope_section = "qwen2", None, None
        torch.manual_seed(args.seed)
        model = M.Qwen2_5_VL(cfg).init_weights(seed=args.seed)
    else:
        model, tok = M.load_model(args.model, dtype=torch.float32, device="cpu"), data.load_tokenizer(args.model)
    if args.freeze_vision and getattr(model, "visual", None) is not None:
        model.visual.requires_grad_(False)  # the real recipe: vision tower and merger frozen
    model.model.gradient_checkpointing = args.activation_checkpointing
    return model.train(), tok


def load_rows(args, tok, suffix):
    """The training rows: --data (or the synthetic problems) with a solution and within
    --max-seq-len; the others are an error naming the row (skipped and counted with --skip-bad)."""
    if args.data:
        try:
            records, n_bad = data.load_records(args.data, skip_bad=not args.strict)
        except ValueError as e:
            raise BadData(str(e)) from e
    else:
        make = {"traces": data.synth_records, "base": data.base_records, "reason": data.reasoner_records}[args.synth]
        records, n_bad = make(args.n_train, args.level, args.data_seed), 0
    rows, skipped, lengths = filter_records(records, tok, args.max_seq_len, suffix, data.MIN_PIXELS, args.max_pixels,
                                            strict=args.strict)
    if n_bad:
        skipped["malformed"] = n_bad
    if not rows:
        raise BadData(f"no trainable rows (skipped: {skipped})")
    if skipped:
        print0(f"skipped {sum(skipped.values())} rows: " + ", ".join(f"{v} {k}" for k, v in skipped.items()))
    return rows, skipped, lengths


def resume(args, model, opt, path, total, n_rows):
    """Restore this run's checkpoint `path` (weights, optimizer, RNG) -> (the step to start from,
    the run's id)."""
    state = load_checkpoint(path, model, opt)
    print0(f"resumed from {path} at step {state['step']}")
    was = (state["extra"].get("total_steps"), state["extra"].get("rows"))
    if was != (total, n_rows):
        print0(f"warning: the checkpoint's run had (steps, rows) = {was}, this one {(total, n_rows)}: "
               f"the learning rate schedule or the data order will differ")
    return state["step"], state["extra"].get("run_id") or new_run_id()


def train_step(model, opt, params, batches, world, autocast, guard, step):
    """One optimizer step on this rank's micro-batches of the global batch -> (loss, grad norm,
    trained tokens, all tokens), both counts over all ranks. A non-finite loss or gradient norm
    skips the update (guard: FiniteGuard; every rank sees the same global numbers)."""
    device = batches[0]["labels"].device
    # N: trained tokens of the global batch, known before the first backward
    counts = torch.tensor([sum(trained_tokens(b["labels"]) for b in batches),
                           sum(int(b["attention_mask"].sum()) for b in batches)], dtype=torch.float64, device=device)
    n_global, tokens_global = (int(x) for x in all_reduce_sum(counts).tolist())
    loss = all_reduce_sum(backward_sft(model, batches, n_global, world, autocast)).item()
    grad_norm = clip_grad_norm(params, GRAD_CLIP)
    if guard.ok(loss, grad_norm, step + 1):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, grad_norm, n_global, tokens_global


def final_eval(model, tok, args, suffix, autocast, rank, world):
    """Greedy accuracy on the first --eval-n held-out synthetic problems -> summary (eval.json)."""
    recs = data.synth_test_records(args.eval_n)
    t0 = time.time()
    with autocast:
        _, s = E.evaluate(model, tok, recs, batch_size=100, max_new_tokens=192, suffix=suffix,
                          max_pixels=args.max_pixels, rank=rank, world_size=world)
    print0(E.format_summary(s))
    print0(f"evaluated {len(recs)} items in {time.time() - t0:.1f}s")
    if is_main():
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump(s, f, indent=1)
    return s


def prepare(args, device, world):
    """Everything before the first step -> a dict: model (sharded), tok, opt, params, rows,
    skipped, lengths, total, warmup, order, micro, bf16, start, resume_from, run_id."""
    micro = args.micro_batch_size or args.batch_size // world
    if micro < 1 or args.batch_size % (micro * world):
        raise BadData(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size "
                      f"{micro} x {world} processes")
    claim_out_dir(args.out, args.resume)
    resume_from = latest_checkpoint(args.out) if args.resume else None
    if args.resume and resume_from is None:
        print0(f"--resume: no checkpoint in {args.out}/checkpoints, starting from scratch")
    with data.checkpoint_errors(args.model):
        model, tok = build_model(args)
    rows, skipped, lengths = load_rows(args, tok, data.SUFFIXES.get(args.suffix, args.suffix))
    total = args.steps or math.ceil(args.epochs * len(rows) / args.batch_size)
    r = dict(tok=tok, rows=rows, skipped=skipped, lengths=lengths, total=total, micro=micro, resume_from=resume_from,
             warmup=round(args.warmup * total) if args.warmup < 1 else int(args.warmup),
             order=BatchOrder(len(rows), args.batch_size, args.data_seed),
             bf16=args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda"))
    r["model"] = model = shard_model(model, device, r["bf16"])
    r["params"] = params = [p for p in model.parameters() if p.requires_grad]
    r["opt"] = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, args.beta2), eps=1e-8,
                                 weight_decay=args.weight_decay, foreach=True)
    r["start"], r["run_id"] = (resume(args, model, r["opt"], resume_from, total, len(rows)) if resume_from
                               else (0, new_run_id()))
    print0(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters ({sum(p.numel() for p in params) / 1e6:.2f}M "
           f"trained), {len(rows)} rows, {total} steps of {args.batch_size} rows ({world} x "
           f"{args.batch_size // (micro * world)} x {micro}), {'bf16' if r['bf16'] else 'fp32'} on {device}")
    return r


def train(args):
    """One training run (the process group, if any, is already up). Returns a summary dict."""
    rank, world, device = dist_init(args.device)
    t_start = time.time()
    suffix = data.SUFFIXES.get(args.suffix, args.suffix)
    r = prepare(args, device, world)
    model, tok, opt, rows, total, start = r["model"], r["tok"], r["opt"], r["rows"], r["total"], r["start"]
    encoded = EncodedRows(tok, rows, suffix, min_pixels=data.MIN_PIXELS, max_pixels=args.max_pixels)
    logger = MetricsLogger(os.path.join(args.out, "metrics.jsonl"), resume_step=start if r["resume_from"] else None)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    # bf16 in one process: autocast (FSDP's MixedPrecisionPolicy does it on several)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=r["bf16"] and world == 1)
    stop_at = min(total, start + args.stop_after) if args.stop_after else total
    source = args.model if os.path.isdir(args.model) else None  # its side files travel along
    bar = tqdm(total=total, initial=start, desc="sft", disable=not is_main(), dynamic_ncols=True)
    guard, loss, t_run = FiniteGuard(last_good=r["resume_from"]), float("nan"), time.time()
    for step in range(start, stop_at):
        t0 = time.time()
        lr = cosine_lr(step, total, r["warmup"], args.lr, args.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        batches = [encode_batch(encoded, mb, pad_id, device)
                   for mb in micro_batches(r["order"](step), rank, world, r["micro"], r["lengths"])]
        loss, grad_norm, n_tok, n_all = train_step(model, opt, r["params"], batches, world, autocast, guard, step)
        logger.log(step=step + 1, loss=loss, lr=lr, grad_norm=grad_norm, tokens=n_tok, skipped=guard.streak > 0,
                   tokens_per_s=n_all / (time.time() - t0), elapsed=time.time() - t_start)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm:.2f}", refresh=False)
        bar.update(1)
        if step + 1 == stop_at or (args.save_every and (step + 1) % args.save_every == 0):
            path = checkpoint_dir(args.out, step + 1)
            save_checkpoint(model, tok, path, opt, step + 1, dict(total_steps=total, rows=len(rows), world_size=world,
                                                                  run_id=r["run_id"]), source, args.max_pixels)
            guard.last_good = path  # save_checkpoint checked that its weights are finite
            prune_checkpoints(args.out, args.keep_checkpoints, r["run_id"])
    bar.close()
    logger.close()
    summary = dict(steps=stop_at, total_steps=total, loss=loss, rows=len(rows), skipped=r["skipped"],
                   skipped_steps=guard.skipped, train_seconds=time.time() - t_run, checkpoint=guard.last_good)
    if stop_at < total:
        print0(f"stopped after step {stop_at} of {total} (--stop-after); continue with --resume")
        return summary
    export_model(model, tok, args.out, source, args.max_pixels)
    print0(f"trained {total - start} steps in {summary['train_seconds']:.1f}s ({guard.skipped} skipped); final "
           f"loss {loss:.4f}; model in {args.out}")
    if args.eval_n and not args.data and args.synth != "reason":
        summary["eval"] = final_eval(model, tok, args, suffix, autocast, rank, world)
    summary["seconds"] = time.time() - t_start
    print0(f"total wall-clock {summary['seconds']:.1f}s")
    return summary


def clip_grad_norm(params, max_norm):
    """Total gradient norm over all ranks (before clipping); gradients scaled to max_norm when
    above it (max_norm <= 0: measure only). Works on plain and on FSDP2 (DTensor) gradients."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()  # the shards' partial norms, reduced over ranks
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return float(total)

# -----------------------------------------------------------------------------
# CLI


def parser():
    p = data.ArgumentParser(prog="sft.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    n0, n1, pos = data.at_least(0), data.at_least(1), data.positive(float)  # nonsense values refused up front
    a = p.add_argument
    a("--model", default="tiny", help="base checkpoint directory (HF layout, with tokenizer), or 'tiny' "
                                      "('tiny-text': text only) to build a tiny model and tokenizer from scratch")
    a("--data", default=None, help="training JSONL (any format data.load_records reads; the target is "
                                   "each record's solution); default: synthetic problems made in memory")
    a("--n-train", type=n1, default=24000, help="synthetic training problems (without --data)")
    a("--level", default="mix", choices=["easy", "hard", "mix"], help="synthetic level (without --data)")
    a("--synth", default="base", choices=["traces", "base", "reason"], help="what the synthetic rows "
      "teach (without --data): full reasoning traces; the demo's base (captions and direct answers); "
      "the demo's text reasoner (caption + question -> an R1-style trace, text only)")
    a("--data-seed", type=int, default=0, help="seed of the synthetic problems and of the data order")
    a("--suffix", default="", help="text after each question: '', 'r1' (the paper's prompt) or a literal string")
    a("--out", default="runs/base", help="output directory (model, metrics.jsonl, checkpoints/)")
    a("--steps", type=n0, default=1500, help="optimizer steps (0: from --epochs)")
    a("--epochs", type=pos, default=1.0, help="passes over the data when --steps is 0")
    a("--batch-size", type=n1, default=32, help="global batch, rows per optimizer step (all ranks)")
    a("--micro-batch-size", type=n0, default=0, help="rows per forward/backward per process (0: batch / "
                                                      "processes); accumulation = batch / (micro x processes)")
    a("--lr", type=pos, default=3e-3, help="peak learning rate")
    a("--min-lr", type=data.at_least(0.0, float), default=1e-5, help="learning rate at the end of the cosine")
    a("--warmup", type=data.at_least(0.0, float), default=0.05, help="warmup steps (< 1: a fraction of the steps)")
    a("--weight-decay", type=data.at_least(0.0, float), default=0.0, help="AdamW weight decay")
    a("--beta2", type=data.at_least(0.0, float, below=1.0), default=0.95, help="AdamW beta2")
    a("--max-seq-len", type=n1, default=4096, help="longest row, tokens (a longer one is a bad row)")
    # load_rows reads args.strict: --skip-bad clears it
    a("--skip-bad", dest="strict", action="store_false", help="skip and count bad rows (malformed, unreadable "
      "image, no solution, over --max-seq-len); default: stop before training, naming the first")
    a("--max-pixels", type=data.at_least(data.MIN_PIXELS), default=512 * 512, help="image resize cap, pixels")
    a("--freeze-vision", action="store_true", help="train the language model only (vision tower and merger frozen)")
    a("--activation-checkpointing", action="store_true", help="recompute decoder layers in backward (less memory)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
      help="compute dtype (auto: bf16 on CUDA, fp32 on CPU); master weights are fp32")
    a("--device", default=None, help="cpu or cuda (default: cuda if available)")
    a("--seed", type=int, default=0, help="seed of the tiny model's initialization")
    a("--save-every", type=n0, default=0, help="checkpoint every N steps (0: at the end only)")
    a("--keep-checkpoints", type=n0, default=2, help="keep the N most recent step checkpoints (0: all)")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out/checkpoints")
    a("--stop-after", type=n0, default=0, help="end this run after N steps with a checkpoint (e.g. a job "
                                                 "time limit); continue with --resume")
    a("--eval-n", type=n0, default=400, help="at the end, evaluate on this many held-out synthetic test "
                                              "problems, when training on synthetic ones (0: no evaluation)")
    return p


def main(argv=None):
    """The command line: a bad file, row, checkpoint or flag value exits with status 2, a run
    stopped by non-finite numbers with status 1; one line each, no traceback."""
    return data.cli("sft.py", sft_main, argv)


def sft_main(argv=None):
    args = parser().parse_args(argv)
    dist_init(args.device)
    try:
        train(args)
    except NonFinite as e:
        print(f"sft.py: error: {e}", file=sys.stderr, flush=True)
        dist_cleanup()
        sys.exit(1)
    dist_cleanup()


if __name__ == "__main__":
    main()
