"""A run is never lost, corrupted or hijacked: non-finite steps are skipped and never saved, a run
directory belongs to one run, bad rows (unreadable images, prompts over the budget, special
tokens typed in a question) are named at load time, empty data and nonsense flags are refused,
checkpoints hold no pickle, command-line errors are one line with status 2, exports carry the
image processor's config, eval.py --out resumes, and a kill mid-save resumes bit for bit."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as E
import grpo
import sample
import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD_ROWS = 12
SFT = ["--device", "cpu", "--steps", "4", "--batch-size", "4", "--micro-batch-size", "2", "--warmup", "1",
       "--lr", "3e-3", "--eval-n", "0"]
GRPO = ["--steps", "4", "--group-size", "2", "--prompts-per-rollout", "4", "--prompts-per-step", "2",
        "--micro-batch", "4", "--max-new-tokens", "4", "--eval-every", "0", "--device", "cpu"]


def sft_run(world, out, *extra, data_path=None):
    return sft.train(sft.parser().parse_args(["--model", world["model"], "--data", data_path or world["data"],
                                              "--out", str(out), *SFT, *extra]))


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def strict_json_lines(path):
    """Each line parsed as JSON proper: NaN or Infinity is an error, not a float."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def fails(main, argv, capsys, code=2):
    """main(argv) exits with `code` -> its error message: one line on stderr (besides progress
    bars), no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "%|" not in line]
    assert e.value.code == code, err
    assert "Traceback" not in err and len(lines) == 1 and ": error: " in lines[0], err
    return lines[0]


def rows_of(world):
    return [json.loads(line) for line in open(world["data"])]


def write_rows(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)

# -----------------------------------------------------------------------------
# 1. non-finite numbers


def test_grpo_absurd_lr_stops_without_nonfinite_checkpoints_or_nan_in_metrics(world, tmp_path, capsys):
    out = tmp_path / "g"
    err = fails(grpo.main, ["--model", world["model"], "--data", world["data"], "--out", str(out), *GRPO,
                            "--lr", "1e30", "--save-every", "1"], capsys, code=1)
    assert "3 steps in a row" in err and "last good checkpoint" in err
    assert not os.path.exists(out / "model.safetensors")  # no export
    for d in sft.step_dirs(out):
        assert all(torch.isfinite(v).all() for v in weights(out / "checkpoints" / d).values())
    rows = strict_json_lines(out / "metrics.jsonl")
    assert rows and any(r["grad_norm"] is None and r["skipped_steps"] > 0 for r in rows)


def test_sft_skips_a_nan_step_and_never_saves_nonfinite_weights(world, tmp_path, monkeypatch):
    real, calls = sft.sft_loss, []

    def poisoned(*a, **k):  # the 3rd step's first micro-batch (2 a step) is NaN
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 5 else loss
    monkeypatch.setattr(sft, "sft_loss", poisoned)
    s = sft_run(world, tmp_path / "s")
    assert s["steps"] == 4 and s["skipped_steps"] == 1
    m = strict_json_lines(tmp_path / "s" / "metrics.jsonl")
    assert [(r["step"], r["loss"] is None, r["skipped"]) for r in m] == [
        (1, False, False), (2, False, False), (3, True, True), (4, False, False)]
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "s").values())
    # weights that are not finite are never written, as a checkpoint or as an export
    model = data.open_model(world["model"])
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    tok = data.load_tokenizer(world["model"])
    with pytest.raises(sft.NonFinite):
        sft.save_checkpoint(model, tok, str(tmp_path / "c" / "step_000001"), step=1)
    with pytest.raises(sft.NonFinite):
        sft.export_model(model, tok, str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "c")

# -----------------------------------------------------------------------------
# 2. a run directory belongs to one run


def test_a_second_fresh_run_into_the_same_out_is_refused(world, tmp_path, capsys):
    out = tmp_path / "r"
    sft_run(world, out, "--save-every", "1", "--keep-checkpoints", "2")
    first = sft.step_dirs(out)
    assert first == ["step_000003", "step_000004"]
    err = fails(sft.main, ["--model", world["model"], "--data", world["data"], "--out", str(out), *SFT], capsys)
    assert "--resume" in err and "another --out" in err
    err = fails(grpo.main, ["--model", world["model"], "--data", world["data"], "--out", str(out), *GRPO], capsys)
    assert "--resume" in err
    assert sft.step_dirs(out) == first
    # pruning touches only its own run's checkpoints
    sft.prune_checkpoints(str(out), 1, run_id="someone else")
    assert sft.step_dirs(out) == first
    sft.prune_checkpoints(str(out), 1, run_id=sft.read_trainer_state(out / "checkpoints" / first[0])["extra"]["run_id"])
    assert sft.step_dirs(out) == first[1:]

# -----------------------------------------------------------------------------
# 3. bad rows found when the data is loaded


def bad_image_files(folder):
    """name -> path of files that are not usable images, and a good one."""
    folder.mkdir(exist_ok=True)
    good = folder / "good.png"
    Image.new("RGB", (60, 40), (200, 30, 30)).save(good)
    files = {"truncated": folder / "truncated.png", "empty": folder / "empty.png", "text": folder / "text.png",
             "thin": folder / "thin.png"}
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noise.save(folder / "noise.png")
    files["truncated"].write_bytes((folder / "noise.png").read_bytes()[:2000])  # the header is intact
    files["empty"].write_bytes(b"")
    files["text"].write_text("not an image")
    Image.new("RGB", (402, 2)).save(files["thin"])  # 201:1
    return good, files


def test_bad_images_and_special_tokens_are_bad_rows_named_at_load_time(world, tmp_path, monkeypatch):
    good, files = bad_image_files(tmp_path)
    row = rows_of(world)[0]
    for name, path in files.items():
        p = write_rows(tmp_path / f"{name}.jsonl", [dict(row, image=str(good)), dict(row, image=str(path))])
        with pytest.raises(data.BadInput, match=rf"{name}\.jsonl:2: .*{name}\.png"):
            data.load_records(p)
        assert data.load_records(p, skip_bad=True)[1] == 1
    for token in ("<|image_pad|>", "<|vision_start|>"):
        p = write_rows(tmp_path / "tok.jsonl", [dict(row, image=str(good), question=f"What is {token}?")])
        with pytest.raises(data.BadInput, match=rf"tok\.jsonl:1: .*{token}".replace("|", r"\|")):
            data.load_records(p)
    # a decompression bomb: more pixels than PIL's limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data._checked_image.cache_clear()
    with pytest.raises(data.BadInput, match="good.png"):
        data.load_records(write_rows(tmp_path / "bomb.jsonl", [dict(row, image=str(good))]))
    data._checked_image.cache_clear()


def test_sixteen_bit_greyscale_is_scaled_not_thresholded(tmp_path):
    grey = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16).repeat(4, 0)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    rgb = np.asarray(data.load_image(tmp_path / "g16.png"))
    assert rgb[0, :, 0].tolist() == [0, 64, 128, 255] and (rgb[..., 0] == rgb[..., 2]).all()


def test_a_bad_row_stops_sft_before_training_or_is_skipped(world, tmp_path, capsys):
    _, files = bad_image_files(tmp_path)
    rows = rows_of(world)
    rows[5] = dict(rows[5], image=str(files["truncated"]))
    path = write_rows(os.path.join(os.path.dirname(world["data"]), "bad_image.jsonl"), rows)
    out = tmp_path / "o"
    err = fails(sft.main, ["--model", world["model"], "--data", path, "--out", str(out), *SFT], capsys)
    assert "bad_image.jsonl:6" in err and not os.path.exists(out / "metrics.jsonl")
    s = sft_run(world, out, "--skip-bad", "--steps", "1", data_path=path)
    assert s["rows"] == WORLD_ROWS - 1 and "skipped 1 rows" in capsys.readouterr().out


def test_grpo_prompts_over_the_budget_are_bad_rows(world, tmp_path, capsys):
    rows = rows_of(world)
    rows[2] = dict(rows[2], question="count " * 300)
    path = write_rows(os.path.join(os.path.dirname(world["data"]), "long.jsonl"), rows)
    args = ["--model", world["model"], "--data", path, *GRPO, "--steps", "1", "--max-prompt-len", "200"]
    err = fails(grpo.main, args + ["--out", str(tmp_path / "a")], capsys)
    assert "long.jsonl:3" in err and "--max-prompt-len 200" in err
    grpo.main(args + ["--out", str(tmp_path / "b"), "--skip-bad"])
    assert "skipped 1 bad rows" in capsys.readouterr().out
    assert [r["step"] for r in strict_json_lines(tmp_path / "b" / "metrics.jsonl")] == [1]

# -----------------------------------------------------------------------------
# 4. empty data and nonsense flags


def test_empty_data_and_nonsense_flags_are_refused(world, tmp_path, capsys):
    Image.new("RGB", (30, 20)).save(tmp_path / "a.png")
    entry = {"pid": "1", "question": "How many?", "image": "a.png", "answer": "2",
             "question_type": "free_form", "answer_type": "integer"}
    (tmp_path / "testmini.json").write_text(json.dumps({"1": entry, "2": dict(entry, pid="2"), "3": "oops"}))
    (tmp_path / "preds.jsonl").write_text("".join(json.dumps({"id": i, "text": "<answer>2</answer>"}) + "\n"
                                                  for i in "12"))
    E.main(["--data", str(tmp_path / "testmini.json"), "--predictions", str(tmp_path / "preds.jsonl"), "--skip-bad"])
    out = capsys.readouterr().out
    assert "skipped 1 bad rows" in out and out.strip().endswith("accuracy 1.0000") and "2 items" in out
    (tmp_path / "empty.jsonl").write_text("\n")
    err = fails(E.main, ["--data", str(tmp_path / "empty.jsonl"), "--predictions", str(tmp_path / "preds.jsonl")], capsys)
    assert "no usable rows" in err
    m, d = ["--model", world["model"]], ["--data", world["data"]]
    for main, argv in [(sft.main, m + d + ["--steps", "-5"]), (sft.main, m + d + ["--batch-size", "0"]),
                       (sft.main, m + d + ["--lr", "nan"]), (grpo.main, m + d + ["--group-size", "0"]),
                       (grpo.main, m + d + ["--prompts-per-step", "0"]), (E.main, m + ["--batch-size", "0"]),
                       (sample.main, m + ["--question", "q", "--top-p", "0"])]:
        assert "must be" in fails(main, argv + ["--out", str(tmp_path / "x")], capsys)
    assert not os.path.exists(tmp_path / "x")

# -----------------------------------------------------------------------------
# 5. checkpoints hold no pickle


class Evil:
    """Unpickling this creates the file `marker`: what a hostile checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_resume_never_unpickles(world, tmp_path, capsys):
    out, marker = tmp_path / "p", str(tmp_path / "pwned")
    ck = out / "checkpoints" / "step_000002"
    shutil.copytree(world["model"], ck)
    torch.save({"step": 2, "extra": {}, "rng": {"torch": torch.get_rng_state()}}, ck / "trainer_state.pt")
    (ck / "optimizer").mkdir()
    (ck / "optimizer" / ".metadata").write_bytes(pickle.dumps(Evil(marker)))
    shutil.copytree(ck, tmp_path / "old")
    try:
        s = sft_run(world, out, "--resume", "--steps", "2")  # the old checkpoint is named and ignored
    finally:
        assert not os.path.exists(marker)  # the pickle never ran
    assert "ignoring" in capsys.readouterr().out and s["steps"] == 2
    with pytest.raises(data.BadInput, match="older format"):
        sft.load_checkpoint(str(tmp_path / "old"))
    assert sorted(os.listdir(sft.checkpoint_dir(out, 2))) == sorted(os.listdir(world["model"]) + [
        "optimizer.json", "optimizer.safetensors", "preprocessor_config.json", "trainer_state.json"])
    (tmp_path / "bad_state").mkdir()
    (tmp_path / "bad_state" / "trainer_state.json").write_text('{"step": "2"}')
    with pytest.raises(data.BadInput, match="malformed trainer state"):
        sft.load_checkpoint(str(tmp_path / "bad_state"))

# -----------------------------------------------------------------------------
# 6. command-line errors: one line, status 2


def test_command_line_errors_are_one_line_with_status_2(world, tmp_path, capsys):
    missing, nockpt = str(tmp_path / "missing.jsonl"), str(tmp_path / "nockpt")
    os.makedirs(nockpt)
    shutil.copy(os.path.join(world["model"], "config.json"), nockpt)
    shutil.copy(os.path.join(world["model"], "tokenizer.json"), nockpt)
    (tmp_path / "nockpt" / "model.safetensors").write_bytes(b"garbage")
    m, d = ["--model", world["model"]], ["--data", world["data"]]
    cases = [(sft.main, m + ["--data", missing], "missing.jsonl"),
             (sft.main, ["--model", nockpt] + d, "bad checkpoint"),
             (grpo.main, m + ["--data", missing], "missing.jsonl"),
             (E.main, ["--model", nockpt] + d, "bad checkpoint"),
             (E.main, d + ["--predictions", missing], "missing.jsonl"),
             (sample.main, m + ["--image", missing, "--question", "q"], "missing.jsonl"),
             (data.main, ["traces", "--data", missing, "--out", str(tmp_path / "t.jsonl")], "missing.jsonl")]
    for main, argv, what in cases:
        assert what in fails(main, argv + ["--out", str(tmp_path / "o")] if main is not data.main else argv, capsys)
    # and through the real entry point
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--data", missing, "--predictions", missing],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("eval.py: error:") and len(p.stderr.splitlines()) == 1

# -----------------------------------------------------------------------------
# 7. exports carry what transformers' processors read


def test_exports_carry_the_image_processor_and_the_start_side_files(world, tmp_path):
    start = tmp_path / "start"
    shutil.copytree(world["model"], start)
    (start / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.7}')
    (start / "chat_template.json").write_text('{"chat_template": "x"}')
    out = tmp_path / "x"
    sft.train(sft.parser().parse_args(["--model", str(start), "--data", world["data"], "--out", str(out), *SFT,
                                       "--steps", "1", "--max-pixels", "20000"]))
    for folder in (out, sft.checkpoint_dir(out, 1)):
        assert json.load(open(os.path.join(folder, "generation_config.json")))["temperature"] == 0.7
        assert os.path.exists(os.path.join(folder, "chat_template.json"))
    from transformers import AutoImageProcessor
    proc = AutoImageProcessor.from_pretrained(str(out))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (150, 230, 3), dtype=np.uint8))
    pv, grid = data.process_image(image, max_pixels=20000)
    got = proc(images=[image], return_tensors="pt")
    assert got["image_grid_thw"][0].tolist() == grid.tolist()
    assert (got["pixel_values"] - pv).abs().max() <= 1e-5


def test_autoprocessor_loads_an_export(world, tmp_path):
    """AutoProcessor also builds Qwen2.5-VL's video processor, which needs torchvision."""
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor
    sft_run(world, tmp_path / "x", "--steps", "1")
    assert type(AutoProcessor.from_pretrained(str(tmp_path / "x"))).__name__ == "Qwen2_5_VLProcessor"

# -----------------------------------------------------------------------------
# 8. eval.py --out is written batch by batch and resumes


def test_eval_out_is_written_per_batch_and_a_rerun_resumes(world, tmp_path, monkeypatch):
    args = ["--model", world["model"], "--data", world["data"], "--limit", "6", "--batch-size", "2",
            "--max-new-tokens", "4", "--device", "cpu"]
    E.main(args + ["--out", str(tmp_path / "straight.jsonl")])
    real, calls = sample.generate, []

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during the third batch
        return real(*a, **k)
    monkeypatch.setattr(sample, "generate", crashing)
    out = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        E.main(args + ["--out", str(out)])
    assert len(out.read_text().splitlines()) == 4          # two batches were kept
    with open(out, "a") as f:
        f.write('{"id": "torn')                             # and a line cut short
    calls[:] = [0, 0, 0, 0]                                 # no more crashes
    E.main(args + ["--out", str(out)])
    assert len(calls) == 5                                  # only the last batch was redone
    assert out.read_text() == (tmp_path / "straight.jsonl").read_text()

# -----------------------------------------------------------------------------
# 9. a kill mid-save


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs, no handler catches it."""


def test_kill_mid_save_resumes_bitwise_equal(world, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    sft_run(world, straight)
    out = tmp_path / "k"
    real = sft.M.save_model

    def dies_at_step_4(model, path, **kw):
        if "step_000004" in path:
            with open(os.path.join(path, "model.safetensors"), "wb") as f:
                f.write(b"\0" * 100)                        # half written
            raise Killed
        return real(model, path, **kw)
    monkeypatch.setattr(sft.M, "save_model", dies_at_step_4)
    with pytest.raises(Killed):
        sft_run(world, out, "--save-every", "2")
    monkeypatch.setattr(sft.M, "save_model", real)
    ck = out / "checkpoints"
    assert sorted(os.listdir(ck)) == ["step_000002", "step_000004.tmp"]
    # and a kill between save_checkpoint's two renames (path -> path.old, path.tmp -> path) of a
    # step saved twice: its previous version waits as .old, the new one is not in place yet
    os.replace(ck / "step_000002", ck / "step_000002.old")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')                                   # a line cut short
    sft_run(world, out, "--save-every", "2", "--resume")
    a, b = weights(straight), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in strict_json_lines(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert sorted(os.listdir(ck)) == ["step_000002", "step_000004"]


# the real thing: `python sft.py` in its own process, SIGKILLed while it writes a checkpoint
KILL_RUN = ["--model", "tiny", "--n-train", "8", "--steps", "12", "--batch-size", "2", "--save-every", "1",
            "--eval-n", "0", "--device", "cpu", "--seed", "0"]


def test_sigkill_mid_checkpoint_then_resume_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL runs no handler, no finally and no atexit, so only the on-disk protocol (write to
    step_N.tmp, rename when complete; --resume deletes the .tmp) stands between a kill and a lost
    run. The kill is aimed at a checkpoint write: after a few complete checkpoints, the parent
    polls the checkpoints directory and kills as soon as a step_N.tmp holds the weights but not
    yet the trainer state (written last). No hook in sft.py: the child is the real script."""
    out, ck = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def sft_py(*extra):
        with open(tmp_path / "log.txt", "a") as log:  # the child keeps its own copy of the descriptor
            return subprocess.Popen([sys.executable, os.path.join(ROOT, "sft.py"), *KILL_RUN, "--out", str(out),
                                     *extra], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def writing(tmp):  # the weights are in, the trainer state (written last) is not
        try:
            files = os.listdir(tmp)
        except FileNotFoundError:  # renamed into place meanwhile
            return False
        return "model.safetensors" in files and "trainer_state.json" not in files
    p, deadline, seen = sft_py(), time.time() + 120, None
    try:
        while p.poll() is None and time.time() < deadline:
            names = os.listdir(ck) if ck.is_dir() else []
            complete = [int(d[5:]) for d in names if d.startswith("step_") and d[5:].isdigit()]
            tmp = [d for d in names if d.endswith(".tmp")]
            if complete and max(complete) >= 3 and tmp and writing(ck / tmp[0]):
                os.kill(p.pid, signal.SIGKILL)
                seen = names
                break
            time.sleep(0.0005)
    finally:
        if p.poll() is None and seen is None:
            p.kill()
        p.wait()
    log = (tmp_path / "log.txt").read_text()
    assert seen is not None and p.returncode == -signal.SIGKILL, f"no kill mid-checkpoint; rc {p.returncode}\n{log}"
    tmp = [d for d in os.listdir(ck) if d.endswith(".tmp")]
    assert len(tmp) == 1 and writing(ck / tmp[0]), os.listdir(ck)   # the kill landed inside save_checkpoint
    assert not (out / "model.safetensors").exists()         # and before the run's end

    # the newest complete checkpoint loads: weights, optimizer state, trainer state
    last = sft.latest_checkpoint(str(out))
    args = sft.parser().parse_args([*KILL_RUN, "--out", str(out)])
    model, _ = sft.build_model(args)
    opt = torch.optim.AdamW(model.parameters())
    with torch.random.fork_rng():
        state = sft.load_checkpoint(last, model, opt)
    assert 3 <= state["step"] < 12 and os.path.basename(last) == f"step_{state['step']:06d}"
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())

    p = sft_py("--resume")
    assert p.wait(timeout=120) == 0, (tmp_path / "log.txt").read_text()
    assert sorted(os.listdir(ck)) == ["step_000011", "step_000012"]   # the .tmp tidied away
    assert [r["step"] for r in strict_json_lines(out / "metrics.jsonl")] == list(range(1, 13))

    # an uninterrupted run with the same flags (in this process: the same code, one thread too)
    straight = tmp_path / "straight"
    sft.train(sft.parser().parse_args([*KILL_RUN, "--out", str(straight)]))
    a, b = weights(straight), weights(out)
    # bit for bit: the checkpoint holds the float32 master weights, Adam's moments and step, and
    # the RNG state exactly, the data order and the learning rate are functions of the step, and
    # one thread sums in one fixed order
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
