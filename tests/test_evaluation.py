"""Answer parsing and exact match, checked on the real reference solutions of shared/data (GSM8K,
SVAMP, MATH, BBH), and the ``elrea-hf eval`` command end to end on a tiny bundle."""

import json
import random
import re

import pytest

from elrea_hf import cli
from elrea_hf.data import check_answer, shared_data_dir
from elrea_hf.evaluation import (
    answer_kind,
    bbh_answers_match,
    check_prediction,
    evaluate_bundle,
    exact_match,
    extract_choice_letter,
    extract_math_answer,
    last_boxed,
    load_eval_data,
    math_answers_match,
    multiple_choice_match,
    normalize_math_answer,
    score,
)
from elrea_hf.testing import save_tiny_backbone, tiny_ensemble


def _shared(name):
    try:
        path = shared_data_dir() / f"{name}.jsonl"
    except FileNotFoundError:
        pytest.skip("shared/data not found")
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# Parsers on hand-written cases
# ---------------------------------------------------------------------------------------------


def test_last_boxed_is_brace_balanced_and_takes_the_last():
    text = r"First $\boxed{3}$, then $\boxed{\frac{1}{\sqrt{2}}}$."
    assert last_boxed(text) == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"so \boxed 5.") == "5."
    assert last_boxed("no box here") is None


@pytest.mark.parametrize("prediction, gold", [
    ("1,000", "1000"), ("0.50", "0.5"), ("$5", "5"), (r"\$5", "5"), ("5.0", "5"), ("5.", "5"),
    (r"\frac{1}{2}", "1/2"), (r"\dfrac{1}{2}", "0.5"), (r"\tfrac12", r"\frac{1}{2}"), (r"-\frac12", "-0.5"),
    (r"\text{VW}", "VW"), (r"12\text{ square units}", "12"), (r"30^\circ", "30"), (r"30\%", "30"),
    (r"x = \frac{3}{2}", "1.5"), (r"371,\!043,\!400", "371043400"), (r"2 \sqrt{3}", r"2\sqrt3"),
])  # fmt: skip
def test_equivalent_math_answers_normalise_alike(prediction, gold):
    assert math_answers_match(rf"Therefore, the answer is $\boxed{{{prediction}}}$.", gold)


@pytest.mark.parametrize("prediction, gold", [("1,001", "1000"), ("0.49", "0.5"), (r"\frac{1}{3}", "0.33"),
                                              ("0,1", "1"), ("(1,2)", "(2,1)"), ("2x", "2y")])
def test_different_math_answers_do_not_match(prediction, gold):
    assert not math_answers_match(rf"\boxed{{{prediction}}}", gold)


def test_math_answer_without_box_is_the_final_number_or_the_stated_answer():
    assert extract_math_answer("She pays 3 * 4 = 12 dollars, and 12 + 1,500 = 1,513 in all.") == "1,513"
    assert extract_math_answer(r"So the final answer is $\frac{1}{2}$.") == r"\frac{1}{2}"
    assert extract_math_answer(r"\frac{1}{2}") == r"\frac{1}{2}"  # not its final number, 2
    assert extract_math_answer("no digits at all") is None
    assert not math_answers_match("I do not know", "4")


@pytest.mark.parametrize("text", ["Answer: C", "answer: (C)", "The answer is (C).", "(C)", "C.", "C) Paris", "C",
                                  r"$\text{(C)}$"])
def test_mmlu_letter_is_read_from_the_usual_formats(text):
    assert extract_choice_letter(text) == "C"
    assert multiple_choice_match(text, "C") and not multiple_choice_match(text, "B")


def test_mmlu_letter_outside_the_options_is_none():
    assert extract_choice_letter("E") is None
    assert extract_choice_letter("I am not sure") is None


# ---------------------------------------------------------------------------------------------
# Real reference solutions: parse the response, compare with the answer
# ---------------------------------------------------------------------------------------------


def _match_share(records, texts=None):
    texts = [r["response"] for r in records] if texts is None else texts
    misses = [(r["id"], r["answer"], extract_math_answer(t)) for r, t in zip(records, texts)
              if not math_answers_match(t, r["answer"])]
    return 1 - len(misses) / len(records), misses


@pytest.mark.parametrize("name", ["gsm8k_test", "svamp_test", "math_test"])
def test_reference_solutions_parse_to_their_gold_answer(name):
    records = _shared(name)
    share, misses = _match_share(records)
    # measured: 1.0 on all three (every reference ends in \boxed{answer})
    assert share >= 0.99, f"{name}: {share:.3f} of references match; first misses {misses[:5]}"


@pytest.mark.parametrize("name", ["gsm8k_test", "svamp_test"])
def test_reference_solutions_without_the_boxed_line_match_by_final_number(name):
    """The final-number fallback on real solutions: drop the ``Therefore, the answer is $\\boxed{}$``
    sentence the converter appended. Measured: GSM8K 0.978 (a few solutions end on another
    number: '15 liters of water out of the 24 liters'), SVAMP 1.0."""
    records = _shared(name)
    texts = [re.sub(r"\s*Therefore, the answer is \$\\boxed\{[^$]*\}\$\.\s*$", "", r["response"]) for r in records]
    assert all(r"\boxed" not in t for t in texts)
    share, misses = _match_share(records, texts)
    assert share >= 0.95, f"{name}: {share:.3f} match by final number; first misses {misses[:5]}"


def test_math_gold_answers_match_when_stated_in_other_formats():
    """Every MATH test answer, restated as 'The final answer is $X$.' with \\dfrac for \\frac."""
    records = _shared("math_test")
    texts = [f"The final answer is ${r['answer'].replace(chr(92) + 'frac', chr(92) + 'dfrac')}$." for r in records]
    share, misses = _match_share(records, texts)
    assert share >= 0.99, f"{share:.3f}; first misses {misses[:5]}"  # measured: 1.0


@pytest.mark.parametrize("name", ["gsm8k_test", "svamp_test"])
def test_reference_solutions_do_not_match_a_wrong_answer(name):
    records = _shared(name)
    for r in records:
        wrong = str(float(r["answer"]) + 1)
        assert not math_answers_match(r["response"], wrong), r["id"]


def test_math_answers_of_other_problems_do_not_match():
    records = _shared("math_test")
    rng = random.Random(0)
    for r in records:
        other = rng.choice(records)["answer"]
        same_value = normalize_math_answer(other) == normalize_math_answer(r["answer"])
        assert math_answers_match(r["response"], other) == same_value, (r["id"], r["answer"], other)


# ---------------------------------------------------------------------------------------------
# BBH
# ---------------------------------------------------------------------------------------------


def _bbh_formats(answer):
    formats = [answer, f"So the answer is {answer}.", answer.lower(),
               f"Let's think step by step.\nStep 1: first.\nSo the answer is {answer}."]
    if re.fullmatch(r"\([A-R]\)", answer):
        formats += [answer[1], f"{answer[1]}.", f"The answer is {answer[1]}"]
    return formats


def test_bbh_answers_match_themselves_in_every_format():
    records = _shared("bbh_shared")
    for r in records:
        for text in _bbh_formats(r["answer"]):
            assert check_prediction(r["category"], text, r["answer"], source="bbh"), (r["id"], text)


def test_bbh_answers_of_another_value_do_not_match():
    records = _shared("bbh_shared")
    by_task = {}
    for r in records:
        by_task.setdefault(r["category"], set()).add(r["answer"])
    for r in records:
        for other in sorted(by_task[r["category"]] - {r["answer"]})[:3]:
            assert not check_prediction(r["category"], f"So the answer is {other}.", r["answer"]), (r["id"], other)


def test_bbh_numbers_accept_number_words_and_a_trailing_noun():
    assert bbh_answers_match("So the answer is eight.", "8")
    assert bbh_answers_match("I have 8 instruments", "8")
    assert not bbh_answers_match("So the answer is 18.", "8")


# ---------------------------------------------------------------------------------------------
# Dispatch and scores
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task, source, kind", [
    ("addition", "mixture", "skill"), ("gsm8k", "gsm8k", "math"), ("algebra", "math", "math"),
    ("mathqa", "mathqa", "mathqa"), ("navigate", "bbh", "bbh"), ("mmlu", None, "mmlu"),
    ("my_file", "gsm8k", "math"), ("my_file", "my_file", "exact"),
])  # fmt: skip
def test_answer_kind_picks_the_checker(task, source, kind):
    assert answer_kind(task, source) == kind


def test_mixture_skills_delegate_to_their_checker_on_the_first_line():
    assert check_prediction("uppercase", "APPLE\nmore text", "APPLE")
    assert not check_prediction("uppercase", "apple", "APPLE")  # the skill is case-sensitive
    assert check_prediction("sort_words", "bird, cat, dog", "bird, cat, dog")
    assert check_prediction("addition", "42", "42") == check_answer("addition", "42", "42")


def test_mathqa_and_unknown_tasks():
    assert check_prediction("mathqa", r"... answer : c .\nTherefore, the answer is $\boxed{c}$.", "c")
    assert not check_prediction("mathqa", r"\boxed{b}", "c")
    assert check_prediction("capitals", "Paris.", "paris")
    assert check_prediction("capitals", "Let me think.\nThe answer is Paris", "Paris")
    assert not check_prediction("capitals", "Lyon", "Paris")
    assert exact_match("1,000", "1000.0")


def test_score_is_task_aware_without_a_checker_and_first_line_with_one():
    long_form = r"Two and two.\nSo 2 + 2 = 4.\nTherefore, the answer is $\boxed{4}$."
    assert score([long_form], ["4"], ["gsm8k"]) == [True]
    assert score([long_form], ["4"], ["gsm8k"], check=lambda t, p, a: p == a) == [False]
    assert score(["4"], ["4"], ["my_file"], sources=["gsm8k"]) == [True]


# ---------------------------------------------------------------------------------------------
# Evaluation sets and the eval command
# ---------------------------------------------------------------------------------------------


def test_load_eval_data_names():
    mixture = load_eval_data("mixture", n=12)
    assert len(mixture) == 12 and set(mixture["source"]) == {"mixture"}
    _shared("gsm8k_test")
    combined = load_eval_data("math-combined", n=6)
    assert len(combined) == 6 and set(combined["source"]) <= {"gsm8k", "svamp", "math"}
    assert len(load_eval_data("bbh_shared", n=5)) == 5


@pytest.fixture
def bundle_dir(tmp_path):
    backbone = save_tiny_backbone(tmp_path / "backbone")
    bundle = tmp_path / "bundle"
    tiny_ensemble(backbone).save_pretrained(str(bundle))
    return str(bundle)


@pytest.fixture
def user_jsonl(tmp_path):
    path = tmp_path / "questions.jsonl"
    rows = [
        {"instruction": "add 12 and 30", "answer": "42", "category": "add"},
        {"instruction": "what is 7 plus 5", "response": "7 + 5 = 12.\nTherefore, the answer is $\\boxed{12}$.",
         "answer": "12", "category": "math_words", "source": "gsm8k"},
        {"instruction": "reverse the word apple", "answer": "elppa", "category": "reverse"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("method", ["elrea", "base"])
def test_eval_command_end_to_end(bundle_dir, user_jsonl, tmp_path, monkeypatch, capsys, method):
    monkeypatch.setenv("ELREA_HF_NO_REEXEC", "1")
    out = tmp_path / f"{method}.json"
    cli.main(["eval", bundle_dir, "--data", user_jsonl, "--method", method, "--batch-size", "2",
              "--max-new-tokens", "4", "--output", str(out)])
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["method"] == method and results["n"] == 3
    assert set(results["per_task"]) == {"add", "math_words", "reverse"}
    assert "micro average" in printed and all(t in printed for t in results["per_task"])
    for ex in results["examples"]:  # the stored verdicts are check_prediction's on the generation
        assert ex["correct"] == check_prediction(ex["task"], ex["prediction"], ex["answer"], source=ex["source"])
    assert results["micro_avg"] == sum(ex["correct"] for ex in results["examples"]) / 3
    assert ("mean_routing_weights" in results) == (method == "elrea")


def test_evaluate_bundle_elrea_and_base_differ_and_reject_unknown_method(bundle_dir, user_jsonl):
    elrea = evaluate_bundle(bundle_dir, user_jsonl, max_new_tokens=4, disable_tqdm=True)
    base = evaluate_bundle(bundle_dir, user_jsonl, method="base", max_new_tokens=4, disable_tqdm=True)
    assert [e["id"] for e in elrea["examples"]] == [e["id"] for e in base["examples"]]
    assert len(elrea["mean_routing_weights"]) == 3  # base + 2 experts
    # the tiny experts are random and large: the ensemble's generations are not the base adapter's
    assert [e["prediction"] for e in elrea["examples"]] != [e["prediction"] for e in base["examples"]]
    with pytest.raises(ValueError, match="method"):
        evaluate_bundle(bundle_dir, user_jsonl, method="mixture")
