"""The first SFT set end to end on tiny random models: a synthetic split -> sample.py --task
caption (tiny VLM) -> sample.py --task reason (tiny text-only qwen2) -> data.py traces -> SFT
records that data.load_records and sft.filter_records accept. Reruns skip the records already
done (counted at sample.generate), and a line torn by a crash is redone. Random models are never
right, so the conversion is also checked on injected correct traces."""

import json
import re

import pytest
import torch

import data
import reward
import sample
import sft

N = 6  # records


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data.write_split(root / "set", N, "easy", seed=0)
    data.make_tiny_checkpoint(root / "vlm", seed=0)
    data.make_tiny_text_checkpoint(root / "r1", seed=1)
    return root


@pytest.fixture
def calls(monkeypatch):
    """Every prompt that reaches sample.generate, as a list of input_ids lists."""
    seen, real = [], sample.generate

    def counting(model, prompts, **kw):
        seen.extend(p["input_ids"].tolist() for p in prompts)
        return real(model, prompts, **kw)
    monkeypatch.setattr(sample, "generate", counting)
    return seen


def lines(path):
    return [json.loads(l) for l in open(path, encoding="utf-8") if l.strip()]


def caption(world, out):
    return sample.main(["--task", "caption", "--model", str(world / "vlm"), "--data",
                        str(world / "set" / "data.jsonl"), "--out", str(out), "--batch-size", "4",
                        "--max-new-tokens", "12", "--device", "cpu"])


def reason(world, data_path, out):
    return sample.main(["--task", "reason", "--model", str(world / "r1"), "--data", str(data_path),
                        "--out", str(out), "--n", "2", "--batch-size", "4", "--max-new-tokens", "16",
                        "--device", "cpu"])


def test_caption_reason_filter(world, tmp_path, calls, capsys):
    tok = data.load_tokenizer(world / "r1")
    src, _ = data.load_records(world / "set" / "data.jsonl")

    # caption: one line per record, the record plus `caption`, readable as data
    caps = tmp_path / "captions.jsonl"
    assert caption(world, caps) == N and len(calls) == N
    assert all(data.IMAGE_PAD in tok.decode(c) for c in calls)  # the VLM saw the images
    recs, _ = data.load_records(caps)
    assert [r["id"] for r in recs] == [r["id"] for r in src]
    assert all(isinstance(r["meta"]["caption"], str) for r in recs)
    assert [r["images"] for r in recs] == [r["images"] for r in src]
    assert recs[0]["meta"]["family"] == src[0]["meta"]["family"]  # meta rides along

    # a rerun does nothing; a crash mid-batch (a torn last line) redoes only what is missing
    calls.clear()
    assert caption(world, caps) == 0 and calls == []
    rows = caps.read_text().splitlines(keepends=True)
    caps.write_text("".join(rows[:3]) + rows[3][:20])
    assert caption(world, caps) == N - 3 and len(calls) == N - 3
    assert sorted(r["id"] for r in lines(caps)) == sorted(r["id"] for r in src)

    # reason: the text model sees caption + question, no image; n traces per record
    calls.clear()
    traces = tmp_path / "traces.jsonl"
    assert reason(world, caps, traces) == N and len(calls) == N
    first = tok.decode(calls[0])
    assert data.IMAGE_PAD not in first and "Image description:" in first
    by_id = {r["id"]: r for r in data.load_records(caps)[0]}
    r0 = by_id[lines(traces)[0]["id"]]
    assert r0["meta"]["caption"] in first and data.format_question(r0) in first
    out = lines(traces)
    assert len(out) == N and all(len(r["traces"]) == 2 for r in out)
    assert all({"text", "length", "finished"} <= set(t) for r in out for t in r["traces"])
    calls.clear()
    assert reason(world, caps, traces) == 0 and calls == []

    # filter: random traces are never right; the command still writes a valid (empty) file
    capsys.readouterr()
    c = data.main(["traces", "--data", str(traces), "--out", str(tmp_path / "sft.jsonl")])
    assert sum(c[k] for k in data.DROP_REASONS + ("kept",)) == 2 * N
    assert "traces: 12 read" in capsys.readouterr().out
    if c["kept"] == 0:  # a data file without rows is an error when it is read
        with pytest.raises(data.BadInput, match="no usable rows"):
            data.load_records(tmp_path / "sft.jsonl")

    # the conversion, on injected traces: per record one long correct, one wrong, one short correct
    rows = lines(traces)
    for r in rows:
        a = r["answer"]
        r["traces"] = [
            {"text": f"<think>\nLooking at the description. So it is {a}. Wait, let me recheck. "
                     f"Yes {a}.\n</think>\n\nThe answer is {a}.\n\n\\boxed{{{a}}}", "finished": True},
            {"text": "<think>\nno idea\n</think>\n\n\\boxed{zzz}", "finished": True},
            {"text": f"<think>It is {a}.</think> \\boxed{{{a}}}", "finished": True}]
    data.write_jsonl(tmp_path / "good.jsonl", rows)
    c = data.main(["traces", "--data", str(tmp_path / "good.jsonl"), "--out", str(tmp_path / "sft.jsonl")])
    assert (c["kept"], c["wrong"], c["not_shortest"], c["records_kept"]) == (N, N, N, N)
    sft_recs, bad = data.load_records(tmp_path / "sft.jsonl")
    assert bad == 0 and [r["id"] for r in sft_recs] == [r["id"] for r in rows]
    for r, s in zip(sft_recs, src):
        assert r["solution"] == f"<think>It is {s['answer']}.</think> <answer>{s['answer']}</answer>"
        assert r["images"] == s["images"] and r["answer"] == s["answer"] and r["choices"] == s["choices"]
        assert reward.accuracy_reward(r["solution"], s["answer"], s["choices"]) == 1.0
        assert "traces" not in r["meta"] and "caption" in r["meta"]
    kept, why, _ = sft.filter_records(sft_recs, data.load_tokenizer(world / "vlm"), max_seq_len=512,
                                   suffix="", min_pixels=data.MIN_PIXELS, max_pixels=512 * 512)
    assert len(kept) == N, why


def test_cli_errors(world, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.main(["--task", "caption", "--model", str(world / "vlm"), "--data", "x.jsonl"])
    assert "--task caption needs --data and --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main(["--task", "reason", "--model", str(world / "r1"), "--data", "a", "--out", "b",
                     "--reason-prompt", "no fields"])
    assert "{caption} and {question}" in capsys.readouterr().err
    # reasoning over records that were never captioned names the record (one line, status 2)
    with pytest.raises(SystemExit) as e:
        reason(world, world / "set" / "data.jsonl", tmp_path / "t.jsonl")
    assert e.value.code == 2
    assert re.search(r"data.jsonl:1: record .* has no caption", capsys.readouterr().err)
    # a bad line that is not the last one is an error, not silently dropped
    out = tmp_path / "c.jsonl"
    out.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(SystemExit) as e:
        caption(world, out)
    assert e.value.code == 2 and "c.jsonl:2: malformed JSON" in capsys.readouterr().err


def test_distill_the_iterative_loop(world, tmp_path, calls):
    """sample.py --task distill: the VLM itself answers each record n times (with its image),
    written like the reason step's output; a rerun skips; data.py traces keeps the shortest
    correct answer in the synthetic world's own shape, summary included."""
    run = lambda: sample.main(["--task", "distill", "--model", str(world / "vlm"), "--data",
                               str(world / "set" / "data.jsonl"), "--out", str(tmp_path / "s.jsonl"),
                               "--n", "3", "--batch-size", "4", "--max-new-tokens", "8", "--device", "cpu"])
    assert run() == N and len(calls) == N
    tok = data.load_tokenizer(world / "vlm")
    src, _ = data.load_records(world / "set" / "data.jsonl")
    assert all(data.IMAGE_PAD in tok.decode(c) for c in calls)
    assert tok.decode(calls[0]).count(src[0]["question"]) == 1
    rows = lines(tmp_path / "s.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in src] and all(len(r["traces"]) == 3 for r in rows)
    calls.clear()
    assert run() == 0 and calls == []
    for r, s in zip(rows, src):
        a = s["answer"]
        r["traces"] = [{"text": f"<think>a b c. x is {a}.</think> The x is {a}. <answer>{a}</answer>", "finished": True},
                       {"text": f"<think>x is {a}.</think> The x is {a}. <answer>{a}</answer>", "finished": True},
                       {"text": f"<think>x.</think> The x is 0{a}1. <answer>0{a}1</answer>", "finished": True}]
    data.write_jsonl(tmp_path / "good.jsonl", rows)
    c = data.main(["traces", "--data", str(tmp_path / "good.jsonl"), "--out", str(tmp_path / "sft.jsonl")])
    assert (c["kept"], c["records_kept"]) == (N, N)
    for r, s in zip(data.load_records(tmp_path / "sft.jsonl")[0], src):
        assert r["solution"] == f"<think>x is {s['answer']}.</think> The x is {s['answer']}. <answer>{s['answer']}</answer>"
