"""Greedy generation, answer parsing and exact-match accuracy, for the base adapter and for the
ensemble on the *same* prompts (so the two can be compared pair by pair).

Answer checking is task-aware (:func:`check_prediction`):

- the embedded skill mixture: the skill's own checker (:func:`elrea_hf.data.check_answer`) on the
  first line of the generation;
- math (GSM8K, SVAMP, MATH and its subjects): the last ``\\boxed{...}`` of the *whole* generation,
  else the final number, compared after LaTeX and numeric normalisation
  (:func:`math_answers_match`); MathQA: the option letter;
- BBH: the text after "the answer is", as an option letter ``(B)``, a number, or words
  (:func:`bbh_answers_match`);
- MMLU: the option letter A-D (:func:`multiple_choice_match`);
- anything else (a user's JSONL): normalised exact match (:func:`exact_match`).
"""

from __future__ import annotations

import math
import os
import random
import re
import string
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

logger = logging.get_logger(__name__)


def first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0].strip() if text else ""


# ---------------------------------------------------------------------------------------------
# Math answers
# ---------------------------------------------------------------------------------------------

#: Sources of ``../shared/data`` whose answers are parsed as math.
MATH_SOURCES = ("gsm8k", "svamp", "math", "mathqa")
#: MATH subjects (the ``category`` of ``math_*.jsonl`` records).
MATH_SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
    "prealgebra", "precalculus",
)  # fmt: skip

_NUMBER = r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_FINAL_NUMBER = re.compile(rf"{_NUMBER}(?:\s*/\s*\d+(?:\.\d+)?)?")


def _balanced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at ``text[start] == "{"`` and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or brace-less ``\\boxed 5``) in
    ``text``, brace-balanced so that ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``; None if none."""
    found = None
    for match in re.finditer(r"\\(?:boxed|fbox)\s*", text):
        end = match.end()
        if end < len(text) and text[end] == "{":
            group = _balanced(text, end)
            if group is not None:
                found = group[0]
        else:
            bare = re.match(r"[^\s$]+", text[end:])
            if bare:
                found = bare.group(0)
    return found


def _final_number(text: str) -> str | None:
    matches = _FINAL_NUMBER.findall(text)
    return matches[-1].replace(" ", "") if matches else None


def extract_math_answer(text: str) -> str | None:
    """The answer a math solution commits to: the last ``\\boxed{...}``, else the text after the
    last "the answer is" (when it is a short expression), else the final number; None if none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    after = _after_answer_is(text)
    if after is not None:
        inline_math = re.search(r"(?<!\\)\$((?:\\\$|[^$])+?)(?<!\\)\$", after)
        if inline_math:  # "the answer is $x^2 + 2$ since ...": the formula
            return inline_math.group(1).strip()
        after = after.strip().rstrip(".").strip()
        if after and (_to_number(normalize_math_answer(after)) is not None or len(after.split()) <= 3):
            return after  # "the answer is $\frac{1}{2}$", "the answer is (-7, -2)."
        number = _final_number(after)
        if number is not None:
            return number
    stripped = text.strip()
    if stripped and "\n" not in stripped and _to_number(normalize_math_answer(stripped)) is not None:
        return stripped  # a bare short answer such as "\frac{1}{2}" (its final number would be 2)
    return _final_number(text)


def _strip_command(text: str, command: str) -> str:
    """Replace every ``\\command{X}`` by ``X`` (brace-balanced)."""
    pattern = re.compile(rf"\\{command}\s*(?=\{{)")
    while True:
        match = pattern.search(text)
        if not match:
            return text
        group = _balanced(text, match.end())
        if group is None:
            return text
        text = text[: match.start()] + group[0] + text[group[1] :]


def _frac_to_slash(text: str) -> str:
    """``\\frac{a}{b}`` -> ``(a)/(b)`` (brace-balanced; single-token forms like ``\\frac12`` too)."""
    text = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", text)
    while True:
        match = re.search(r"\\frac\s*(?=\{)", text)
        if not match:
            return text
        numerator = _balanced(text, match.end())
        if numerator is None or numerator[1] >= len(text) or text[numerator[1]] != "{":
            return text
        denominator = _balanced(text, numerator[1])
        if denominator is None:
            return text
        num, den = numerator[0], denominator[0]
        num = num if re.fullmatch(r"-?\w+", num) else f"({num})"
        den = den if re.fullmatch(r"\w+", den) else f"({den})"
        text = text[: match.start()] + f"{num}/{den}" + text[denominator[1] :]


def normalize_math_answer(text: str) -> str:
    """A canonical string for a math answer, so equal answers written differently compare equal.

    Removes ``$``, ``\\boxed``, ``\\left``/``\\right``, spacing commands, ``\\text{}``-like wrappers
    (their content stays), degrees, percent signs, a leading ``x =``, thousands separators
    (``1,000`` and ``5,\\!525``), a trailing period and all whitespace; turns ``\\dfrac``/``\\tfrac``
    into ``\\frac`` and ``\\frac{a}{b}`` into ``a/b``; writes numbers canonically (``5.0`` -> ``5``,
    ``0.50`` -> ``0.5``). Values are compared exactly by :func:`math_answers_match`.
    """
    text = str(text).strip()
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    text = text.replace("\\$", "").replace("$", "")
    text = re.sub(r"\\(?:left|right)\b", "", text)
    text = re.sub(r"\\[!,;:> ]|~", "", text)
    text = re.sub(r"\\(?:d|t)frac", r"\\frac", text)
    for command in ("text", "textbf", "textrm", "mathrm", "mathbf", "mbox", "operatorname"):
        text = _strip_command(text, command)
    text = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree", "", text)
    text = text.replace("\\%", "").replace("%", "")
    text = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", text)
    text = _frac_to_slash(text)
    text = re.sub(r"^\s*[a-zA-Z]\s*=(?!=)", "", text)  # "x = 5" -> "5"
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    text = re.sub(r"\s+", "", text)
    while text.endswith("."):
        text = text[:-1]
    number = _to_number(text)
    if number is not None:
        return _format_number(number)
    # a number followed by a unit word ("12squareunits", "18integers", "5cm"): the number
    unit = re.fullmatch(rf"({_NUMBER})([a-zA-Z]+)", text)
    if unit and unit.group(2) not in ("i", "e", "x", "y", "z", "n", "t", "a", "b", "c", "pi"):
        number = _to_number(unit.group(1))
        if number is not None:
            return _format_number(number)
    return text


def _to_number(text: str) -> Fraction | None:
    """Exact value of ``-3``, ``0.25``, ``7/2``, ``(7)/(2)``, ``-1/2``; None for anything else."""
    text = (text or "").replace(" ", "")
    if not text:
        return None
    match = re.fullmatch(r"\(?(-?(?:\d+(?:\.\d+)?|\.\d+))\)?(?:/\(?(\d+(?:\.\d+)?)\)?)?", text)
    if not match:
        match = re.fullmatch(r"-\(?(\d+(?:\.\d+)?)\)?/\(?(\d+(?:\.\d+)?)\)?", text)
        if not match:
            return None
        numerator, denominator = "-" + match.group(1), match.group(2)
    else:
        numerator, denominator = match.group(1), match.group(2)
    try:
        value = Fraction(numerator)
        if denominator is not None:
            value /= Fraction(denominator)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def _format_number(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    as_float = float(value)
    decimal = repr(as_float)
    if Fraction(decimal) == value:  # terminating decimal: 1/2 -> 0.5
        return decimal
    return f"{value.numerator}/{value.denominator}"


def math_answers_match(prediction: str, answer: str) -> bool:
    """Whether a generated math solution ``prediction`` reaches the gold ``answer``.

    The prediction's answer is :func:`extract_math_answer` (last ``\\boxed{}``, else final number);
    the gold answer is used as given (its own ``\\boxed{}`` removed). Both are compared after
    :func:`normalize_math_answer`, numerically where both are numbers (``1/2`` == ``0.5``).
    """
    extracted = extract_math_answer(prediction)
    if extracted is None:
        return False
    pred, gold = normalize_math_answer(extracted), normalize_math_answer(answer)
    if pred == gold:
        return True
    pred_value, gold_value = _to_number(pred), _to_number(gold)
    if pred_value is not None and gold_value is not None:
        return pred_value == gold_value
    return pred.casefold() == gold.casefold()


# ---------------------------------------------------------------------------------------------
# Multiple choice, BBH, free text
# ---------------------------------------------------------------------------------------------

#: The 27 BIG-Bench Hard tasks (the ``category`` of ``bbh_*.jsonl`` records).
BBH_TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting",
)  # fmt: skip

_ANSWER_IS = re.compile(r"\b(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*:?", re.IGNORECASE)
_NUMBER_WORDS = {
    w: i for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}  # fmt: skip


def _after_answer_is(text: str) -> str | None:
    """The rest of the line after the last "the answer is" / "Answer:" in ``text``; None if absent."""
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].strip()
    return rest.splitlines()[0].strip() if rest else ""


def extract_answer_text(text: str) -> str:
    """What a free-form generation answers: the text after the last "the answer is" when present,
    else its first line."""
    after = _after_answer_is(text)
    return after if after is not None else first_line(text)


def extract_choice_letter(text: str, letters: str = "ABCD") -> str | None:
    """The option letter a generation picks, from "Answer: C", "the answer is (C)", "(C)", "C.",
    "C) ..." or a bare "C"; None if none. ``letters`` are the valid options (case-insensitive)."""
    valid = f"[{re.escape(letters.upper() + letters.lower())}]"
    candidates = [_after_answer_is(text), text]
    for part in candidates:
        if not part:
            continue
        part = part.strip().strip("$*").strip()
        for pattern in (rf"\(({valid})\)", rf"^({valid})(?:[.):\]]|\s|$)", rf"\\text\{{\(?({valid})\)?\}}"):
            match = re.search(pattern, part)
            if match:
                return match.group(1).upper()
    return None


def _clean_words(text: str) -> str:
    """Case-folded words with punctuation removed and whitespace collapsed."""
    text = str(text).casefold().replace(",", " ")
    text = text.translate(str.maketrans("", "", string.punctuation.replace("&", "").replace("'", "")))
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
    """Normalised exact match: :func:`extract_answer_text` of the prediction against the answer,
    case- and punctuation-insensitive, numerically where both are numbers (``1,000`` == ``1000.0``)."""
    pred = extract_answer_text(prediction)
    if _clean_words(pred) == _clean_words(answer):
        return True
    pred_value, gold_value = _to_number(normalize_math_answer(pred)), _to_number(normalize_math_answer(answer))
    return pred_value is not None and gold_value is not None and pred_value == gold_value


def multiple_choice_match(prediction: str, answer: str, letters: str = "ABCD") -> bool:
    """MMLU-style: the option letter of ``prediction`` (:func:`extract_choice_letter`) is the gold
    letter (``"C"``, ``"(C)"``)."""
    gold = extract_choice_letter(answer, letters)
    return gold is not None and extract_choice_letter(prediction, letters) == gold


def bbh_answers_match(prediction: str, answer: str) -> bool:
    """BBH: the text after "the answer is" (else the first line) against the target.

    Option targets ``(B)`` accept ``(B)``, ``B``, ``B.``; numeric targets (object counting) the first
    number or number word; everything else (True/False, Yes/No, word lists) case- and
    punctuation-insensitive words.
    """
    gold = answer.strip()
    pred = extract_answer_text(prediction)
    if re.fullmatch(r"\([A-R]\)", gold):
        return extract_choice_letter(pred, "ABCDEFGHIJKLMNOPQR") == gold[1]
    if re.fullmatch(r"-?\d+", gold):
        match = re.search(r"-?\d+|\b(" + "|".join(_NUMBER_WORDS) + r")\b", pred.casefold().replace(",", ""))
        if match is None:
            return False
        value = _NUMBER_WORDS[match.group(1)] if match.group(1) else int(match.group(0))
        return value == int(gold)
    return _clean_words(pred) == _clean_words(gold)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def answer_kind(task: str, source: str | None = None) -> str:
    """Which checker :func:`check_prediction` uses for ``task`` (and ``source``): ``"skill"``,
    ``"math"``, ``"mathqa"``, ``"bbh"``, ``"mmlu"`` or ``"exact"``."""
    from .data import SKILLS

    if task in SKILLS:
        return "skill"
    for name in (task, source):
        if name is None:
            continue
        key = str(name).casefold()
        if key == "mathqa":
            return "mathqa"
        if key in MATH_SOURCES or key in MATH_SUBJECTS:
            return "math"
        if key == "bbh" or key in BBH_TASKS:
            return "bbh"
        if key == "mmlu" or key.startswith("mmlu_") or key.startswith("mmlu-"):
            return "mmlu"
    return "exact"


def check_prediction(task: str, prediction: str, answer: str, source: str | None = None) -> bool:
    """Whether the whole generation ``prediction`` answers an example of ``task`` correctly.

    ``task`` is a skill of the embedded mixture, a source (``gsm8k``, ``svamp``, ``math``,
    ``mathqa``, ``bbh``, ``mmlu``), a MATH subject or a BBH task; ``source`` is consulted when
    ``task`` is none of these (a user's file with ``"source": "gsm8k"``). Unknown tasks fall back
    to :func:`exact_match`. See :func:`answer_kind`.
    """
    from .data import check_answer

    kind = answer_kind(task, source)
    if kind == "skill":
        return check_answer(task, first_line(prediction), answer)
    if kind == "math":
        return math_answers_match(prediction, answer)
    if kind == "mathqa":
        boxed = last_boxed(prediction)
        letter = boxed.strip() if boxed is not None else extract_choice_letter(prediction, "abcde")
        return bool(letter) and letter.casefold() == answer.strip().casefold()
    if kind == "bbh":
        return bbh_answers_match(prediction, answer)
    if kind == "mmlu":
        return multiple_choice_match(prediction, answer)
    return exact_match(prediction, answer)


def parse_prediction(task: str, prediction: str, source: str | None = None) -> str | None:
    """The answer :func:`check_prediction` reads from ``prediction`` (for reports)."""
    kind = answer_kind(task, source)
    if kind == "skill":
        return first_line(prediction)
    if kind == "math":
        return extract_math_answer(prediction)
    if kind == "mathqa":
        boxed = last_boxed(prediction)
        return boxed if boxed is not None else extract_choice_letter(prediction, "abcde")
    if kind == "mmlu":
        return extract_choice_letter(prediction)
    return extract_answer_text(prediction)


# ---------------------------------------------------------------------------------------------
# Generation and scores
# ---------------------------------------------------------------------------------------------


def _encode(tokenizer, prompts: Sequence) -> dict:
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False) for p in prompts]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence, *, batch_size: int = 16, max_new_tokens: int = 16,
                    routing_weights: torch.Tensor | None = None, desc: str | None = None) -> list[str]:
    """Greedy completions of chat prompts (left-padded batches). ``routing_weights`` [N, 1+C] are
    passed to an ELREA model batch by batch."""
    outputs = []
    device = getattr(model, "device", None)
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None):
        enc = _encode(tokenizer, prompts[i : i + batch_size])
        if device is not None:
            enc = enc.to(device)
        kwargs = {} if routing_weights is None else {"routing_weights": routing_weights[i : i + batch_size]}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
        outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outputs


def accuracy_by_task(correct: Sequence[bool], tasks: Sequence[str]) -> dict:
    per = defaultdict(list)
    for ok, t in zip(correct, tasks):
        per[t].append(ok)
    return {"per_task": {t: sum(v) / len(v) for t, v in sorted(per.items())},
            "micro_avg": sum(correct) / len(correct), "n": len(correct)}


def paired_comparison(a: Sequence[bool], b: Sequence[bool], n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired difference b - a on the same prompts: wins/losses and a 95% bootstrap interval."""
    diffs = [int(y) - int(x) for x, y in zip(a, b)]
    rng = random.Random(seed)
    n = len(diffs)
    boots = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo, hi = boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]
    return {"diff": sum(diffs) / n, "ci95": [lo, hi], "wins": diffs.count(1), "losses": diffs.count(-1),
            "significant": not (lo <= 0 <= hi)}


def score(predictions: Sequence[str], answers: Sequence[str], tasks: Sequence[str],
          check: Callable[[str, str, str], bool] | None = None,
          sources: Sequence[str | None] | None = None) -> list[bool]:
    """Correctness of each prediction.

    With a ``check(task, prediction, answer)`` (such as :func:`elrea_hf.data.check_answer`) it sees
    the first line of each prediction; without one, :func:`check_prediction` sees the whole
    generation (long-form math answers end in ``\\boxed{}``), with ``sources`` as a hint."""
    if check is not None:
        return [bool(check(t, first_line(p), a)) for p, a, t in zip(predictions, answers, tasks)]
    sources = [None] * len(predictions) if sources is None else sources
    return [check_prediction(t, p, a, source=s) for p, a, t, s in zip(predictions, answers, tasks, sources)]


# ---------------------------------------------------------------------------------------------
# Evaluating a bundle
# ---------------------------------------------------------------------------------------------


def _subsample_dataset(dataset, n: int | None, seed: int):
    if n is None or n >= len(dataset):
        return dataset
    return dataset.select(sorted(random.Random(seed).sample(range(len(dataset)), n)))


def load_eval_data(data: str | os.PathLike, n: int | None = None, seed: int = 0):
    """The evaluation set named by ``data``, at most ``n`` examples (drawn with ``seed``).

    ``data`` is ``"mixture"`` (the embedded skill mixture's test split, all skills), ``"math-combined"``
    (GSM8K + SVAMP + MATH test), the name of a file in ``shared/data`` (``"gsm8k_test"``,
    ``"bbh_shared"``) or a path to your own JSONL (:func:`elrea_hf.data.load_jsonl_dataset`).
    """
    from .data import DEFAULT_SKILLS, load_jsonl_dataset, load_shared_jsonl, math_combined, skill_mixture

    if n is not None and n < 1:
        raise ValueError(f"n must be positive, got {n}")
    name = str(data)
    if name == "mixture":
        per_skill = 50 if n is None else math.ceil(n / len(DEFAULT_SKILLS))
        return _subsample_dataset(skill_mixture("test", n=per_skill, seed=seed), n, seed)
    if name == "math-combined":
        per_source = None if n is None else math.ceil(n / 3)
        return _subsample_dataset(math_combined("test", n_per_source=per_source, seed=seed), n, seed)
    if os.path.isfile(name):
        return load_jsonl_dataset(name, n=n, seed=seed)
    return load_shared_jsonl(name, n=n, seed=seed, task_from="category")


def default_max_new_tokens(tasks: Sequence[str], sources: Sequence[str] | None = None) -> int:
    """16 new tokens when every example has a short answer (skill mixture, BBH without CoT, MMLU),
    512 when any is a math problem answered by a worked solution."""
    sources = [None] * len(tasks) if sources is None else sources
    long_form = any(answer_kind(t, s) in ("math", "mathqa") for t, s in zip(tasks, sources))
    return 512 if long_form else 16


def evaluate_bundle(
    bundle,
    data: str | os.PathLike,
    *,
    method: str = "elrea",
    n: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    route_batch_size: int = 64,
    disable_tqdm: bool = False,
) -> dict[str, Any]:
    """Greedy generation of a bundle on an evaluation set, scored by :func:`check_prediction`.

    Args:
        bundle: a bundle folder or Hub id (loaded with ``AutoModelForCausalLM.from_pretrained``), or
            an :class:`~elrea_hf.ELREAForCausalLM`.
        data: see :func:`load_eval_data`.
        method: ``"elrea"`` (the routed ensemble, eq 10) or ``"base"`` (the bundle's base adapter only).
        n: at most this many examples.
        seed: seed of the example draw.
        batch_size: generation batch size.
        max_new_tokens: defaults to :func:`default_max_new_tokens` of the data.
        route_batch_size: prompts routed at a time (``method="elrea"``).
        disable_tqdm: hide progress bars.

    Returns:
        ``{"method", "data", "n", "micro_avg", "per_task", "max_new_tokens", "seconds", "examples"}``,
        plus ``"mean_routing_weights"`` for ELREA; ``examples`` holds each example's ``id, task,
        source, answer, prediction, parsed, correct``.
    """
    if method not in ("elrea", "base"):
        raise ValueError(f"method must be 'elrea' or 'base', got {method!r}")
    t0 = time.time()
    if isinstance(bundle, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        import elrea_hf  # noqa: F401  (registers the auto classes)

        model = AutoModelForCausalLM.from_pretrained(str(bundle))
    else:
        model = bundle
    dataset = load_eval_data(data, n=n, seed=seed)
    if len(dataset) == 0:
        raise ValueError(f"{data}: no examples to evaluate")
    prompts, answers, tasks = dataset["prompt"], dataset["answer"], dataset["task"]
    sources = dataset["source"]
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(tasks, sources)
    tokenizer = model.tokenizer
    results: dict[str, Any] = {"method": method, "data": str(data)}
    desc = None if disable_tqdm else f"{method} generation"
    if method == "base":
        model.peft_model.set_adapter("base")
        predictions = greedy_generate(model.peft_model, tokenizer, prompts, batch_size=batch_size,
                                      max_new_tokens=max_new_tokens, desc=desc)
    else:
        chunks = range(0, len(prompts), route_batch_size)
        weights = torch.cat([model.route(prompts[i : i + route_batch_size])
                             for i in tqdm(chunks, desc="routing", disable=disable_tqdm)])
        predictions = greedy_generate(model, tokenizer, prompts, batch_size=batch_size,
                                      max_new_tokens=max_new_tokens, routing_weights=weights, desc=desc)
        results["mean_routing_weights"] = weights.mean(0).tolist()
    correct = score(predictions, answers, tasks, sources=sources)
    accuracy = accuracy_by_task(correct, tasks)
    results.update(
        n=accuracy["n"], micro_avg=accuracy["micro_avg"], per_task=accuracy["per_task"],
        max_new_tokens=max_new_tokens, seconds=round(time.time() - t0, 1),
        examples=[
            {"id": i, "task": t, "source": s, "answer": a, "prediction": p,
             "parsed": parse_prediction(t, p, source=s), "correct": ok}
            for i, t, s, a, p, ok in zip(dataset["id"], tasks, sources, answers, predictions, correct)
        ],
    )
    return results


def format_accuracy_table(results: dict[str, Any]) -> str:
    """Per-task accuracy and the micro average of :func:`evaluate_bundle` results, as text."""
    counts: dict[str, int] = defaultdict(int)
    for example in results["examples"]:
        counts[example["task"]] += 1
    width = max([len("micro average")] + [len(t) for t in results["per_task"]]) + 2
    lines = [f"{'task':<{width}}{results['method']:>8}{'n':>7}"]
    for task, acc in results["per_task"].items():
        lines.append(f"{task:<{width}}{acc:>8.3f}{counts[task]:>7}")
    lines.append(f"{'micro average':<{width}}{results['micro_avg']:>8.3f}{results['n']:>7}")
    return "\n".join(lines)
