"""sft.py: the loss normalization, the schedule, FSDP2 on two processes against one, resume,
bad rows, NaN steps skipped then a stop, and checkpoints that load_model and transformers read."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import data
import model as M
import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 6 steps of a global batch of 8 rows over 20 rows: the data order wraps into a second epoch
COMMON = ["--device", "cpu", "--steps", "6", "--batch-size", "8", "--micro-batch-size", "2",
          "--warmup", "2", "--lr", "3e-3", "--eval-n", "0"]


def run(world, out, *extra):
    return sft.train(sft.parser().parse_args(
        ["--model", world["model"], "--data", world["data"], "--out", str(out), *COMMON, *extra]))


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def rel_diff(a, b):
    """max |a - b| / max |a| over all tensors of two state dicts."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a) / max(a[k].abs().max().item() for k in a)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]

# -----------------------------------------------------------------------------
# the math


def test_cosine_lr():
    lrs = [sft.cosine_lr(s, 10, 2, 1.0, 0.1) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_loss_is_the_token_mean_and_untrained_positions_get_zero_gradient():
    torch.manual_seed(0)
    V, B, T = 11, 3, 9
    labels = torch.full((B, T), sft.IGNORE_INDEX)
    labels[0, 3:9] = torch.randint(V, (6,))   # 6 trained tokens (a long reply, no padding)
    labels[1, 6:8] = torch.randint(V, (2,))   # 2 trained, then padding
    labels[2, 4:7] = torch.randint(V, (3,))   # 3 trained, then padding
    logits = torch.randn(B, T, V, requires_grad=True)
    n = sft.trained_tokens(labels)
    assert n == 11
    loss = sft.sft_loss(logits, labels, n)
    terms = [-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
             for b in range(B) for t in range(1, T) if labels[b, t] != sft.IGNORE_INDEX]
    assert len(terms) == 11
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)  # not the mean of row means
    loss.backward()
    keep = sft.loss_positions(labels)
    assert keep.sum() == 11
    assert (logits.grad[~keep] == 0).all()          # prompt, padding and the last position: exactly 0
    assert (logits.grad[keep].abs().sum(-1) > 0).all()
    # micro-batches dividing by the global count add up to the whole batch (accumulation is exact)
    parts = sum(sft.sft_loss(logits[i:i + 1], labels[i:i + 1], n) for i in range(B))
    assert parts.item() == pytest.approx(loss.item(), rel=1e-6)


def test_loss_through_the_model_all_three_forms(world):
    """(B,T,V) logits, hidden states + lm_head, and the (N,V) logits the training loop asks the
    model for agree; padding and prompt positions of the logits get exactly zero gradient."""
    model = M.load_model(world["model"])
    tok = data.load_tokenizer(world["model"])
    recs, _ = data.load_records(world["data"])
    encs = [data.encode_sft(tok, data.format_question(r), r["solution"], r["images"]) for r in recs[:3]]
    b = data.collate(encs, tok.pad_token_id)
    args = (b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"])
    n = sft.trained_tokens(b["labels"])
    full = model(*args)
    full.retain_grad()
    loss = sft.sft_loss(full, b["labels"], n)
    loss.backward()
    keep = sft.loss_positions(b["labels"])
    assert (b["attention_mask"] == 0).any() and (full.grad[b["attention_mask"] == 0] == 0).all()
    assert (full.grad[~keep] == 0).all() and (full.grad[keep] != 0).any()
    with torch.no_grad():
        h = sft.sft_loss(model(*args, logits=False), b["labels"], n, model.lm_head)
        sel = sft.sft_loss(model(*args, logits=keep), b["labels"], n)
    assert h.item() == pytest.approx(loss.item(), rel=1e-5)
    assert sel.item() == pytest.approx(loss.item(), rel=1e-5)


def test_batch_order_is_a_function_of_the_step():
    order = sft.BatchOrder(10, 4, seed=3)
    seq = [i for s in range(5) for i in order(s)]
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:20]) == list(range(10))
    assert sft.BatchOrder(10, 4, seed=3)(3) == order(3)  # fresh object, same rows: resume-safe
    assert sft.micro_batches(list(range(8)), 1, 2, 2) == [[4, 5], [6, 7]]
    lengths = [9, 1, 8, 2, 7, 3, 6, 4]  # rank 1's rows 4-7 sorted by length, then cut
    assert sft.micro_batches(list(range(8)), 1, 2, 2, lengths) == [[5, 7], [6, 4]]
    assert sft.micro_batches(list(range(8)), 1, 2, 4, lengths) == [[4, 5, 6, 7]]  # one micro-batch: as drawn

# -----------------------------------------------------------------------------
# training runs: one process, two processes (torchrun), resume


@pytest.fixture(scope="module")
def runs(world):
    """One-process runs, then the torchrun worker (tests/dist_sft.py) on two processes."""
    r = world["root"]
    out = dict(s6=r / "s6", r3=r / "r3", dist=r / "dist")
    run(world, out["s6"])                               # 6 steps straight
    run(world, out["r3"], "--stop-after", "3")          # steps 1-3 of the same run, then a stop
    shutil.copytree(out["r3"], out["dist"] / "b")       # the two-process resume starts from it
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tests", "dist_sft.py"), "--model", world["model"],
                        "--data", world["data"], "--out", str(out["dist"])],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    assert "dist_sft ok" in p.stdout
    return out


def test_encoded_rows_are_the_encoders_and_kept_within_the_budget(world, monkeypatch):
    tok = data.load_tokenizer(world["model"])
    rows, _ = data.load_records(world["data"])
    ref = [data.encode_sft(tok, data.format_question(r), r["solution"], r["images"]) for r in rows[:4]]
    size = sum(v.numel() * v.element_size() for v in ref[0].values())
    calls = []
    real = data.process_images
    monkeypatch.setattr(data, "process_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    enc = sft.EncodedRows(tok, rows, "", budget=2 * size + size // 2)  # room for two rows of this size
    for epoch in range(2):
        for i in range(4):
            e = enc(i)
            assert e.keys() == ref[i].keys() and all(torch.equal(e[k], ref[i][k]) for k in e)
    assert sorted(enc.kept) == [0, 1] and len(calls) == 2 + 2 * 2  # rows 2 and 3 are encoded each epoch
    b = sft.encode_batch(enc, [3, 0], 0, torch.device("cpu"))
    assert torch.equal(b["input_ids"], data.collate([ref[3], ref[0]], 0)["input_ids"])
    assert torch.equal(b["pixel_values"], torch.cat([ref[3]["pixel_values"], ref[0]["pixel_values"]]))


def test_two_processes_fsdp_equal_one_process(runs):
    """FSDP2 on 2 ranks (gloo) with accumulation 2 == 1 process with accumulation 4, same
    global batches, after 3 optimizer steps."""
    one = weights(sft.checkpoint_dir(runs["r3"], 3))
    two = weights(sft.checkpoint_dir(runs["dist"] / "a", 3))
    assert rel_diff(one, two) <= 1e-5  # measured ~2e-7
    m1, m2 = metrics(runs["r3"]), metrics(runs["dist"] / "a")
    assert [m["lr"] for m in m1] == [m["lr"] for m in m2]
    assert [m["tokens"] for m in m1] == [m["tokens"] for m in m2]
    for a, b in zip(m1, m2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_two_processes_frozen_vision_checkpointing_bf16(runs, world):
    """--freeze-vision --activation-checkpointing --dtype bfloat16 under FSDP2 (dist_sft.py c):
    the vision tower and merger keep their weights, the rest moves; fp32 master weights saved."""
    base, after = weights(world["model"]), weights(runs["dist"] / "c")
    vis = [k for k in base if k.startswith("visual.")]
    assert vis and all(torch.equal(base[k], after[k]) for k in vis)
    assert all(not torch.equal(base[k], after[k]) for k in base if k.startswith("model.layers.") and "weight" in k)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in after.values())
    assert all(math.isfinite(m["loss"]) for m in metrics(runs["dist"] / "c"))


def test_training_moved_the_weights(runs, world):
    base, after = weights(world["model"]), weights(sft.checkpoint_dir(runs["r3"], 3))
    assert rel_diff(base, after) > 1e-3
    losses = [m["loss"] for m in metrics(runs["s6"])]
    assert losses[-1] < losses[0]


def test_resume_equals_straight_run(runs, world):
    """6 steps straight == 3 steps, a stop, 3 resumed steps: same weights (bit for bit in one
    process), same data order and learning rates (the metrics lines), same final loss."""
    r = world["root"] / "r3"
    run(world, r, "--resume")
    straight, resumed = weights(runs["s6"]), weights(r)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    ms, mr = metrics(runs["s6"]), metrics(r)
    assert [m["step"] for m in mr] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(ms, mr):
        assert (a["lr"], a["tokens"], a["loss"]) == (b["lr"], b["tokens"], b["loss"])


def test_resume_across_world_sizes(runs, world):
    """1 rank -> 2 ranks (dist_sft.py b) and 2 ranks -> 1 (here): the sharded optimizer state
    is resharded on load; both end where the straight run ends."""
    straight = weights(runs["s6"])
    assert rel_diff(straight, weights(runs["dist"] / "b")) <= 1e-5
    a1 = world["root"] / "a1"
    shutil.copytree(runs["dist"] / "a", a1)
    run(world, a1, "--resume")
    assert rel_diff(straight, weights(a1)) <= 1e-5


def test_checkpoint_layout_loads_in_load_model_and_transformers(runs, world):
    out = str(runs["s6"])
    ck = sft.checkpoint_dir(out, 6)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_000006"]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "optimizer.safetensors",
              "optimizer.json", "preprocessor_config.json"):
        assert os.path.exists(os.path.join(ck, f)), f
    assert not any(n.endswith(".tmp") for n in os.listdir(os.path.join(out, "checkpoints")))
    ours = M.load_model(out)
    tok = data.load_tokenizer(out)
    from transformers import Qwen2_5_VLForConditionalGeneration
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    recs, _ = data.load_records(world["data"])
    enc = data.encode_sft(tok, data.format_question(recs[0]), recs[0]["solution"], recs[0]["images"])
    b = data.collate([enc], tok.pad_token_id)
    with torch.no_grad():
        a = ours(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"])
        h = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
               image_grid_thw=b["image_grid_thw"], mm_token_type_ids=(b["input_ids"] == ours.config.image_token_id).int()).logits
    # (without mm_token_type_ids transformers 5 gives the image tokens other M-RoPE positions: ~5e-4 off)
    assert (a - h).abs().max() <= 1e-5 * a.abs().max()
    st = sft.read_trainer_state(ck)
    assert st["step"] == 6 and st["extra"]["total_steps"] == 6

# -----------------------------------------------------------------------------
# bad input: over-long rows, NaN loss


def test_overlong_rows_are_an_error_or_skipped_and_counted_with_skip_bad(world, tmp_path, capsys):
    recs = [json.loads(line) for line in open(world["data"])]
    recs[1]["solution"] = "<think>" + "x" * 400 + "</think> <answer>1</answer>"
    recs[2]["solution"] = None
    src = os.path.dirname(world["data"])
    path = os.path.join(src, "bad.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    tok = data.load_tokenizer(world["model"])
    rows, _ = data.load_records(path)
    kept, skipped, _ = sft.filter_records(rows, tok, 300, "", data.MIN_PIXELS, 512 * 512)
    assert len(kept) == 18 and skipped == {"longer than --max-seq-len": 1, "no solution": 1}
    # the length check agrees with the encoder
    r = kept[0]
    assert sft.encoded_length(tok, r["question"], r["solution"], r["images"], data.MIN_PIXELS, 512 * 512) == \
        len(data.encode_sft(tok, r["question"], r["solution"], r["images"])["input_ids"])
    args = ["--model", world["model"], "--data", path, "--out", str(tmp_path), "--device", "cpu",
            "--steps", "1", "--batch-size", "4", "--micro-batch-size", "4", "--max-seq-len", "300", "--eval-n", "0"]
    s = sft.train(sft.parser().parse_args(args + ["--skip-bad"]))
    assert s["rows"] == 18 and sum(s["skipped"].values()) == 2
    assert "skipped 2 rows" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        sft.main(args[:5] + [str(tmp_path / "strict")] + args[6:])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: row 'train0_00001'" in err and "--max-seq-len 300" in err


def test_nan_steps_are_skipped_then_three_in_a_row_stop_at_the_last_good_checkpoint(world, tmp_path, monkeypatch,
                                                                                   capsys):
    real, calls = sft.sft_loss, []

    def poisoned(*a, **k):  # from the 3rd step on (4 micro-batches a step) every loss is NaN
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) > 8 else loss

    monkeypatch.setattr(sft, "sft_loss", poisoned)
    out = str(tmp_path / "nan")
    with pytest.raises(SystemExit) as e:
        sft.main(["--model", world["model"], "--data", world["data"], "--out", out, *COMMON, "--save-every", "2"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "3 steps in a row (the last: step 5)" in err and "step_000004" in err
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_000002", "step_000004"]
    assert not os.path.exists(os.path.join(out, "model.safetensors"))   # no final export
    assert [(m["step"], m["loss"], m["skipped"]) for m in metrics(out)][2:] == [(3, None, True), (4, None, True)]
    monkeypatch.setattr(sft, "sft_loss", real)
    ref = str(tmp_path / "ref")
    run(world, ref, "--stop-after", "2")   # the same two steps, uninterrupted
    assert rel_diff(weights(sft.checkpoint_dir(ref, 2)), weights(sft.checkpoint_dir(out, 2))) == 0
    assert rel_diff(weights(sft.checkpoint_dir(ref, 2)), weights(sft.checkpoint_dir(out, 4))) == 0  # skipped: no update

# -----------------------------------------------------------------------------
# CUDA: a short bf16 run


@pytest.mark.cuda
def test_cuda_bf16_short_run(world, tmp_path):
    out = tmp_path / "cuda"
    s = sft.train(sft.parser().parse_args(
        ["--model", world["model"], "--data", world["data"], "--out", str(out), "--device", "cuda",
         "--dtype", "bfloat16", "--steps", "8", "--batch-size", "8", "--micro-batch-size", "4",
         "--lr", "3e-3", "--eval-n", "0", "--activation-checkpointing"]))
    losses = [m["loss"] for m in metrics(out)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert s["steps"] == 8
    w = weights(out)
    assert all(v.dtype == torch.float32 for v in w.values())  # fp32 master weights saved
    assert rel_diff(weights(world["model"]), w) > 1e-3
