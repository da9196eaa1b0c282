"""
reward.py against MathVista's own gold answers, through `eval.py --predictions` (no model, no LLM):

    python tests/bench/mathvista_check.py --data testmini.json    # MathVista's annotation file

Three prediction sets, every completion written `<answer>X</answer>`:
  1. gold      X = the gold answer as the file writes it (multiple choice: the option text)
  2. natural   X = how a model writes it: the option letter, "(B)" and "B" (every letter whose
               option is the gold text, when an option is listed twice); a number with the row's
               unit, "11 years"; otherwise the gold as written
  3. wrong     X = every other option of a multiple-choice row, as text and as letter; gold + 1
               for a numeric row, and gold * 1.01 for a float one (not 0.0). A float gold is
               written to its row's `precision` decimals and reward.py, like MathVista's own
               scorer, accepts what rounds to it: 0.2121 for 0.21 is counted, and explained
Prints how many of 1 and 2 score 0 and how many of 3 score 1, each listed with its pid. Nothing
is downloaded. The images are not needed to score: when the file's images are missing, the
annotation is copied to a temporary directory with blank placeholders at the paths it names.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import eval as E  # noqa: E402
import reward  # noqa: E402

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
UNEXPLAINED = "not explained by the rounding rule"


def read_rows(path):
    """MathVista rows: the annotation JSON (keyed by pid, or a list) or JSONL."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
        return list(data.values()) if isinstance(data, dict) else list(data)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def with_images(path, rows, tmp):
    """path itself if every image it names exists, else a copy in tmp with blank placeholders."""
    base = os.path.dirname(os.path.abspath(path))
    if all(os.path.isfile(os.path.join(base, r["image"])) for r in rows):
        return path
    from PIL import Image
    copy = os.path.join(tmp, os.path.basename(path))
    shutil.copyfile(path, copy)
    for r in rows:
        image = os.path.join(tmp, r["image"])
        os.makedirs(os.path.dirname(image), exist_ok=True)
        Image.new("RGB", (28, 28), "white").save(image, format="PNG")
    return copy


def is_number(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


def predictions(rows):
    """{set name: [(pid, X, note)]}."""
    sets = {"gold": [], "natural": [], "wrong": []}
    for r in rows:
        pid, gold, choices, unit = str(r["pid"]), str(r["answer"]), r.get("choices"), r.get("unit")
        sets["gold"].append((pid, gold, ""))
        if choices:
            for i, c in enumerate(choices):
                for x in (f"({LETTERS[i]})", LETTERS[i]) if c == gold else (c, LETTERS[i]):
                    sets["natural" if c == gold else "wrong"].append((pid, x, f"option {LETTERS[i]}"))
        else:
            sets["natural"].append((pid, f"{gold} {unit}" if unit else gold, ""))
            if is_number(gold):
                decimals = len(gold.split(".")[1]) if "." in gold else 0
                sets["wrong"].append((pid, f"{float(gold) + 1:.{decimals}f}", "gold + 1"))
                if decimals and float(gold) != 0:  # 0.0 * 1.01 is the gold itself
                    sets["wrong"].append((pid, f"{float(gold) * 1.01:.10g}", "gold * 1.01"))
    return sets


def score(data_path, preds, tmp, name):
    """eval.py --predictions on preds -> its result rows, in order."""
    pred_path, out_path = os.path.join(tmp, f"{name}.jsonl"), os.path.join(tmp, f"{name}.results.jsonl")
    with open(pred_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": pid, "text": f"<answer>{x}</answer>"}, ensure_ascii=False) + "\n"
                     for pid, x, _ in preds)
    E.main(["--data", data_path, "--predictions", pred_path, "--out", out_path])
    with open(out_path, encoding="utf-8") as f:
        results = [json.loads(line) for line in f]
    assert [r["id"] for r in results] == [p[0] for p in preds]
    return results


def why(gold, x):
    """Why a wrong float was accepted, when it is the rounding rule."""
    if is_number(gold) and is_number(x) and "." in gold:
        decimals = len(gold.split(".")[1])
        if round(float(x), decimals) == float(gold):
            return f"rounds to {gold} at its {decimals} decimals (MathVista's scorer rounds to `precision` too)"
    return UNEXPLAINED


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="MathVista annotation file (testmini.json) or JSONL")
    a = p.parse_args(argv)
    rows = read_rows(a.data)
    gold_of = {str(r["pid"]): str(r["answer"]) for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        data_path = with_images(a.data, rows, tmp)
        sets = predictions(rows)
        scored = {name: score(data_path, preds, tmp, name) for name, preds in sets.items()}
    print()
    for name, want in (("gold", True), ("natural", True), ("wrong", False)):
        bad = [(p, r) for p, r in zip(sets[name], scored[name]) if r["correct"] != want]
        verb = "accepted" if name == "wrong" else "scored 0"
        rounding = sum(why(gold_of[pid], x) != UNEXPLAINED for (pid, x, _), _r in bad)
        print(f"{name}: {len(bad)} of {len(sets[name])} {verb}"
              + (f" ({rounding} by the rounding rule, {len(bad) - rounding} otherwise)" if name == "wrong" else ""))
        for (pid, x, note), r in bad:
            reason = why(gold_of[pid], x) if name == "wrong" else f"extracted {r['extracted']!r}"
            print(f"  pid {pid}: {x!r} ({note or 'as written'}) vs gold {gold_of[pid]!r}: {reason}")


if __name__ == "__main__":
    main()
