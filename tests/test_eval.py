"""eval.py: end to end on a tiny random model, rescoring saved completions, data-parallel = 1 process."""
import json
import os
import subprocess
import sys
import time

import pytest

import data
import eval as E

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    data.write_split(str(d / "bench"), 10, "mix", 7)
    data.make_tiny_checkpoint(str(d / "tiny"), seed=0)
    return d


def run(*args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.update(env_extra or {})
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_eval_end_to_end_tiny_model(fixture):
    out = fixture / "results.jsonl"
    t0 = time.time()
    stdout = run("eval.py", "--model", str(fixture / "tiny"), "--data", str(fixture / "bench" / "data.jsonl"),
                 "--max-new-tokens", "16", "--batch-size", "4", "--out", str(out))
    assert time.time() - t0 < 30
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("accuracy ")
    acc = float(last.split()[1])
    rows = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in rows] == [r["id"] for r in data.load_records(str(fixture / "bench" / "data.jsonl"))[0]]
    assert {"id", "completion", "extracted", "correct"} <= set(rows[0])
    assert acc == sum(r["correct"] for r in rows) / len(rows)
    assert "by family:" in stdout and "by level:" in stdout


def test_rescore_correct_completions_is_one(fixture):
    path = str(fixture / "bench" / "data.jsonl")
    records, _ = data.load_records(path)
    preds = fixture / "preds.jsonl"
    data.write_jsonl(str(preds), [dict(id=r["id"], text=r["solution"]) for r in records])
    stdout = run("eval.py", "--data", path, "--predictions", str(preds))
    assert stdout.strip().splitlines()[-1] == "accuracy 1.0000"
    # and a wrong completion counts as wrong
    results, summary = E.rescore(records, str(preds))
    assert summary["accuracy"] == 1.0 and summary["n"] == len(records)
    data.write_jsonl(str(preds), [dict(id=records[0]["id"], text="<answer>nope</answer>")])
    assert E.rescore(records, str(preds))[1]["accuracy"] == 0.0


def test_rescore_unknown_id_names_line(fixture):
    path = str(fixture / "bench" / "data.jsonl")
    records, _ = data.load_records(path)
    preds = fixture / "bad_preds.jsonl"
    preds.write_text(json.dumps(dict(id=records[0]["id"], text="x")) + "\n" + json.dumps(dict(id="zzz", text="x")) + "\n")
    with pytest.raises(ValueError, match="bad_preds.jsonl:2"):
        E.rescore(records, str(preds))


def test_summary_breakdowns():
    rows = [dict(id=str(i), correct=i % 2 == 0, family=f, level=l)
            for i, (f, l) in enumerate([("count", "easy"), ("count", "hard"), ("bars", "easy"), ("bars", "easy")])]
    s = E.summarize(rows)
    assert s["accuracy"] == 0.5
    assert s["by"]["family"] == {"bars": (0.5, 2), "count": (0.5, 2)}
    assert s["by"]["level"] == {"easy": (2 / 3, 3), "hard": (0.0, 1)}


def test_torchrun_two_processes_match_one(fixture):
    """Data-parallel eval: 2 processes (gloo) gather the same per-item results as 1 process."""
    path = str(fixture / "bench" / "data.jsonl")
    one, two = fixture / "one.jsonl", fixture / "two.jsonl"
    common = ["--model", str(fixture / "tiny"), "--data", path, "--max-new-tokens", "12", "--batch-size", "3"]
    run("eval.py", *common, "--out", str(one))
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "eval.py", *common, "--out", str(two))
    a = [json.loads(line) for line in open(one)]
    b = [json.loads(line) for line in open(two)]
    assert a == b and len(a) == 10
