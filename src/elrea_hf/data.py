"""Datasets in TRL's conversational prompt/completion format.

Every loader returns a :class:`datasets.Dataset` with the same columns:

- ``prompt``: ``[{"role": "user", "content": instruction}]``
- ``completion``: ``[{"role": "assistant", "content": target}]`` (SFTTrainer trains on it only)
- ``task``: skill / category name (what the clusters are compared against)
- ``answer``: the short gold answer, as a string, for exact-match evaluation
- ``id``: a stable string id (carry it through training: TRL may drop examples)
- ``source``: where the example comes from (``"mixture"``, ``"gsm8k"``, a file name, ...)

Three kinds of data:

- :func:`skill_mixture`: an embedded synthetic mixture of short-answer skills, generated
  deterministically, sized so that SmolLM2-135M with a LoRA can learn each skill from a few hundred
  examples. Each skill has a checker in :data:`SKILLS`.
- :func:`load_shared_jsonl` / :func:`math_combined`: the real data in ``../shared/data`` (GSM8K,
  SVAMP, MATH, MathQA, BBH), found by :func:`shared_data_dir`.
- :func:`load_jsonl_dataset`: a user's own JSONL file.

Nothing here unpickles anything: the files are JSON lines and the datasets are built in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers.utils import logging

logger = logging.get_logger(__name__)

COLUMNS = ("prompt", "completion", "task", "answer", "id", "source")

# ---------------------------------------------------------------------------------------------
# Answer checking
# ---------------------------------------------------------------------------------------------

_QUOTES = "\"'`“”‘’"


def normalize_answer(text: str) -> str:
    """The normalisation every checker applies to prediction and gold answer alike.

    Strips surrounding whitespace, then repeatedly a trailing period and surrounding quotes or
    backticks, and collapses runs of whitespace to one space. Case is left alone (each checker
    decides). Callers decoding free generation should pass only the first line of the output.
    """
    text = " ".join(str(text).split())
    previous = None
    while text != previous:
        previous = text
        text = text.strip()
        if text.endswith("."):
            text = text[:-1]
        if text and text[0] in _QUOTES:
            text = text[1:]
        if text and text[-1] in _QUOTES:
            text = text[:-1]
    return text


def check_exact_casefold(prediction: str, answer: str) -> bool:
    """Exact match after :func:`normalize_answer`, ignoring case."""
    return normalize_answer(prediction).casefold() == normalize_answer(answer).casefold()


def check_exact_case_sensitive(prediction: str, answer: str) -> bool:
    """Exact match after :func:`normalize_answer`, case-sensitive (for the ``uppercase`` skill)."""
    return normalize_answer(prediction) == normalize_answer(answer)


def check_integer(prediction: str, answer: str) -> bool:
    """Exact match after :func:`normalize_answer` and removing thousands separators (``1,200``)."""

    def clean(text: str) -> str:
        return re.sub(r"(?<=\d),(?=\d{3}\b)", "", normalize_answer(text))

    return clean(prediction) == clean(answer)


def check_word_list(prediction: str, answer: str) -> bool:
    """Exact match of a word sequence, ignoring case and whether words are separated by commas."""

    def words(text: str) -> list[str]:
        return normalize_answer(text).replace(",", " ").casefold().split()

    return words(prediction) == words(answer)


# ---------------------------------------------------------------------------------------------
# The synthetic skill mixture
# ---------------------------------------------------------------------------------------------

# Common, short English words (written for this package).
_WORDS = (
    "apple bread chair table river stone cloud green happy light music paper plant queen round "
    "smile sugar tiger water zebra bird boat book cake coat door duck fish flag frog game gift "
    "goat hand hill horse house juice kite lamp leaf lemon lion milk moon mouse nest night ocean "
    "orange pencil piano pizza rabbit rain ring road rocket salt sand sheep shoe snow sock spoon "
    "star sun train tree truck wind window wolf yard bell bottle bridge brush candle carrot castle "
    "cherry circle clock coin corn cotton cup desk dinner dragon dream eagle earth egg engine "
    "farm feather field finger flower forest fork garden glass glove grape grass hammer hat heart "
    "honey island jacket jungle key king kitten ladder lake lemonade letter map market metal "
    "mirror monkey mountain nose nut onion owl panda parrot peach pearl pepper pillow pocket "
    "potato pumpkin puppy rose ruler saddle school shark shell ship silver skirt sky snake soap "
    "soup spider spring square squirrel stamp storm street summer swan sweater tent thunder "
    "ticket tomato tooth towel tower toy turtle umbrella valley violin wagon wall whale wheel "
    "winter wood wool yellow zoo anchor apron basket beach bean bear bed berry blanket blue "
    "branch brick button camera camel canvas card carpet cat chalk cheese chicken cloud coffee "
    "copper crown crystal dog dolphin drum feast fence fire flute garlic ghost giant gold guitar "
    "helmet jelly kettle knife lantern lizard magnet maple marble meadow melon mint needle "
    "oyster paint palace pasta pebble penguin pepper planet pond quilt radio raven ribbon robot "
    "saucer scarf seed shadow shelf silk slide sofa spice sponge statue straw tablet teapot "
    "thread tulip tunnel vase velvet wallet wave wizard yogurt"
).split()
_WORDS = tuple(dict.fromkeys(_WORDS))  # drop accidental duplicates, keep order

_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_NAMES = (
    "Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Kate", "Leo",
    "Maya", "Noah", "Olivia", "Paul", "Rosa", "Sam", "Tara", "Victor",
)  # fmt: skip
_EVENTS = ("meeting", "party", "class", "concert", "game", "visit", "lesson", "trip")


@dataclass(frozen=True)
class _Item:
    key: str  # what the train/test partition hashes: the problem, independent of its wording
    instruction: str
    answer: str


@dataclass(frozen=True)
class Skill:
    """One synthetic skill: a sampler of (problem, wording, answer) and the answer checker."""

    name: str
    description: str
    sample: Callable[[random.Random], _Item]
    check: Callable[[str, str], bool]


def _addition(rng: random.Random) -> _Item:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    template = rng.choice(
        (
            "What is {a} + {b}? Answer with just the number.",
            "Add {a} and {b}. Reply with only the result.",
            "Compute {a} plus {b}.",
            "{a} + {b} = ?",
        )
    )
    return _Item(f"{min(a, b)}+{max(a, b)}", template.format(a=a, b=b), str(a + b))  # 12+30 is 30+12


def _subtraction(rng: random.Random) -> _Item:
    a = rng.randint(10, 99)
    b = rng.randint(10, a)
    template = rng.choice(
        (
            "What is {a} - {b}? Answer with just the number.",
            "Subtract {b} from {a}. Reply with only the result.",
            "Compute {a} minus {b}.",
            "{a} - {b} = ?",
        )
    )
    return _Item(f"{a}-{b}", template.format(a=a, b=b), str(a - b))


def _uppercase(rng: random.Random) -> _Item:
    word = rng.choice(_WORDS)
    template = rng.choice(
        (
            "Write the word '{w}' in capital letters.",
            "Convert to uppercase: {w}",
            "Uppercase this word and reply with it only: {w}",
            "Spell {w} in all caps.",
        )
    )
    return _Item(word, template.format(w=word), word.upper())


def _first_letters(rng: random.Random) -> _Item:
    words = rng.sample(_WORDS, 3)
    text = " ".join(words)
    template = rng.choice(
        (
            "Take the first letter of each word and join them: {t}",
            "What are the first letters of '{t}', written together?",
            "Write the initials of these words as one lowercase string: {t}",
        )
    )
    return _Item(text, template.format(t=text), "".join(w[0] for w in words))


def _word_count(rng: random.Random) -> _Item:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 6))]
    text = " ".join(words)
    template = rng.choice(
        (
            "How many words are in this text? {t}",
            "Count the words: \"{t}\". Answer with a number.",
            "Number of words in '{t}'?",
        )
    )
    return _Item(text, template.format(t=text), str(len(words)))


def _boolean_expressions() -> tuple[str, ...]:
    """All boolean expressions with exactly two operators over True/False (sorted, deterministic)."""
    values, binary = ("True", "False"), ("and", "or")
    out = []
    for x in values:
        for y in values:
            for op in binary:
                out += [f"not {x} {op} {y}", f"{x} {op} not {y}", f"not ({x} {op} {y})"]
                for z in values:
                    for op2 in binary:
                        out += [f"{x} {op} {y} {op2} {z}", f"({x} {op} {y}) {op2} {z}", f"{x} {op} ({y} {op2} {z})"]
    return tuple(sorted(set(out)))


_BOOLEAN_EXPRESSIONS = _boolean_expressions()


def _evaluate_boolean(expression: str) -> bool:
    """Evaluate an expression of True/False/not/and/or/parentheses (Python precedence) without eval."""
    tokens = expression.replace("(", " ( ").replace(")", " ) ").split()
    pos = 0

    def parse_or() -> bool:
        nonlocal pos
        value = parse_and()
        while pos < len(tokens) and tokens[pos] == "or":
            pos += 1
            rhs = parse_and()
            value = value or rhs
        return value

    def parse_and() -> bool:
        nonlocal pos
        value = parse_not()
        while pos < len(tokens) and tokens[pos] == "and":
            pos += 1
            rhs = parse_not()
            value = value and rhs
        return value

    def parse_not() -> bool:
        nonlocal pos
        if tokens[pos] == "not":
            pos += 1
            return not parse_not()
        if tokens[pos] == "(":
            pos += 1
            value = parse_or()
            pos += 1  # ")"
            return value
        pos += 1
        return tokens[pos - 1] == "True"

    return parse_or()


def _boolean(rng: random.Random) -> _Item:
    expression = rng.choice(_BOOLEAN_EXPRESSIONS)
    template = rng.choice(
        (
            "Evaluate the boolean expression: {e}. Answer True or False.",
            "Is the following True or False? {e}",
            "What does the Python expression `{e}` evaluate to?",
            "True or False: {e}",
            "Evaluate: {e}",
            "{e} is",
        )
    )
    return _Item(expression, template.format(e=expression), str(_evaluate_boolean(expression)))


def _weekday_after(rng: random.Random) -> _Item:
    index, offset = rng.randrange(7), rng.choice((1, 2))
    day, answer = _WEEKDAYS[index], _WEEKDAYS[(index + offset) % 7]
    name, event = rng.choice(_NAMES), rng.choice(_EVENTS)
    templates = {
        1: (
            "If today is {d}, what day is tomorrow?",
            "What day of the week comes right after {d}?",
            "{n}'s {e} is on {d}. The next one is one day later. On which day is it?",
            "{n} arrives on {d} and leaves the following day. Which day does {n} leave?",
        ),
        2: (
            "If today is {d}, what day is the day after tomorrow?",
            "What day of the week is two days after {d}?",
            "{n}'s {e} is on {d}. The next one is two days later. On which day is it?",
            "{n} arrives on {d} and leaves two days later. Which day does {n} leave?",
        ),
    }
    instruction = rng.choice(templates[offset]).format(d=day, n=name, e=event)
    return _Item(instruction, instruction, answer)


def _compare(rng: random.Random) -> _Item:
    a = rng.randint(100, 999)
    if rng.random() < 0.5:  # same hundreds digit: the comparison needs the other digits
        b = rng.choice([x for x in range(a // 100 * 100, a // 100 * 100 + 100) if x != a])
    else:
        b = rng.choice([x for x in range(100, 1000) if x // 100 != a // 100])
    template = rng.choice(
        (
            "Which number is larger: {a} or {b}?",
            "What is the bigger of {a} and {b}? Reply with the number.",
            "Return the maximum of {a} and {b}.",
        )
    )
    return _Item(f"{min(a, b)},{max(a, b)}", template.format(a=a, b=b), str(max(a, b)))


_UNITS = (("meters", "centimeters", 100), ("kilometers", "meters", 1000), ("centimeters", "millimeters", 10))


def _unit_conversion(rng: random.Random) -> _Item:
    source, target, factor = rng.choice(_UNITS)
    value = rng.randint(1, 99)
    template = rng.choice(
        (
            "Convert {v} {s} to {t}. Answer with just the number.",
            "How many {t} are in {v} {s}?",
            "{v} {s} is how many {t}?",
        )
    )
    return _Item(f"{value} {source}", template.format(v=value, s=source, t=target), str(value * factor))


def _sort_words(rng: random.Random) -> _Item:
    while True:
        words = rng.sample(_WORDS, 3)
        if len({w[0] for w in words}) == 3:  # decided by the first letter: no tie-breaking rules
            break
    text = ", ".join(words)
    template = rng.choice(
        (
            "Sort these words alphabetically: {t}",
            "Put in alphabetical order: {t}",
            "Arrange the words {t} in dictionary order.",
        )
    )
    return _Item(text, template.format(t=text), ", ".join(sorted(words)))


_ALL_SKILLS = (
    Skill("addition", "sum of two 2-digit numbers", _addition, check_integer),
    Skill("subtraction", "difference of two 2-digit numbers, never negative", _subtraction, check_integer),
    Skill("uppercase", "a word in capital letters (case-sensitive)", _uppercase, check_exact_case_sensitive),
    Skill("first_letters", "first letters of three words, joined", _first_letters, check_exact_casefold),
    Skill("word_count", "number of words (2-6) in a text", _word_count, check_integer),
    Skill("boolean", "truth value of a 2-operator boolean expression", _boolean, check_exact_casefold),
    Skill("weekday_after", "the weekday one or two days after a given one", _weekday_after, check_exact_casefold),
    Skill("compare", "the larger of two 3-digit numbers", _compare, check_integer),
    Skill("unit_conversion", "metric length conversion by 10, 100 or 1000", _unit_conversion, check_integer),
    Skill("sort_words", "three words in alphabetical order", _sort_words, check_word_list),
)
ALL_SKILLS: dict[str, Skill] = {skill.name: skill for skill in _ALL_SKILLS}

#: skill name -> ``check(prediction, answer) -> bool`` for every skill :func:`skill_mixture` knows.
SKILLS: dict[str, Callable[[str, str], bool]] = {skill.name: skill.check for skill in _ALL_SKILLS}

#: The skills :func:`skill_mixture` uses when ``skills=None``.
DEFAULT_SKILLS: tuple[str, ...] = tuple(SKILLS)

_TEST_MODULUS = 5  # one problem in five belongs to the test side
_MAX_MISSES = 50_000  # consecutive draws without a new instruction before a skill counts as exhausted


def _is_test_problem(task: str, key: str) -> bool:
    """Stable (seed-, process- and platform-independent) train/test partition of a skill's problems."""
    digest = hashlib.sha256(f"{task}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _TEST_MODULUS == 0


def check_answer(task: str, prediction: str, answer: str) -> bool:
    """Whether ``prediction`` answers a :func:`skill_mixture` example of skill ``task`` correctly."""
    try:
        checker = SKILLS[task]
    except KeyError:
        raise KeyError(f"unknown skill {task!r}; known skills: {', '.join(SKILLS)}") from None
    return checker(prediction, answer)


def skill_mixture(
    split: str = "train",
    n: int = 100,
    seed: int = 0,
    skills: Sequence[str] | None = None,
) -> Dataset:
    """A deterministic synthetic mixture of short-answer skills, ``n`` examples per skill.

    Each skill's problems (the numbers or words, not their wording) are split once and for all by a
    hash: one in five is a test problem. So train and test never share a problem, nor therefore an
    instruction, whatever the seeds. Within a split, examples are drawn with
    ``random.Random(f"{seed}-{split}-{skill}")`` until ``n`` distinct instructions are found.
    Completions are the bare answer (``"42"``), so exact match after :func:`normalize_answer` applies.

    Args:
        split: ``"train"`` or ``"test"``.
        n: examples per skill.
        seed: changes which examples are drawn, not the train/test partition.
        skills: names from :data:`SKILLS`; defaults to :data:`DEFAULT_SKILLS`.

    Returns:
        A Dataset with columns prompt, completion, task, answer, id (``mixture-<split>-<task>-<i>``)
        and source (``"mixture"``), grouped by skill in the order given.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    names = list(DEFAULT_SKILLS if skills is None else skills)
    unknown = [name for name in names if name not in ALL_SKILLS]
    if unknown:
        raise ValueError(f"unknown skill(s) {unknown}; known skills: {', '.join(ALL_SKILLS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"skills must not repeat, got {names}")
    want_test = split == "test"
    rows = []
    for name in names:
        skill = ALL_SKILLS[name]
        rng = random.Random(f"{seed}-{split}-{name}")
        seen: set[str] = set()
        misses = 0
        while len(seen) < n:
            item = skill.sample(rng)
            if _is_test_problem(name, item.key) != want_test or item.instruction in seen:
                misses += 1
                if misses > _MAX_MISSES:
                    raise ValueError(
                        f"skill {name!r} has only {len(seen)} distinct {split} instructions; "
                        f"ask for n <= {len(seen)}"
                    )
                continue
            misses = 0
            seen.add(item.instruction)
            rows.append(_row(item.instruction, item.answer, name, item.answer, f"mixture-{split}-{name}-{len(seen) - 1}", "mixture"))
    return _to_dataset(rows)


def _row(instruction: Any, target: Any, task: str, answer: str, id_: str, source: str) -> dict[str, Any]:
    prompt = instruction if isinstance(instruction, list) else [{"role": "user", "content": instruction}]
    completion = target if isinstance(target, list) else [{"role": "assistant", "content": target}]
    return {"prompt": prompt, "completion": completion, "task": task, "answer": answer, "id": id_, "source": source}


def _to_dataset(rows: list[dict[str, Any]]) -> Dataset:
    if not rows:
        return Dataset.from_dict({column: [] for column in COLUMNS})
    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------------
# Real data in ../shared/data
# ---------------------------------------------------------------------------------------------

SHARED_FIELDS = ("id", "source", "category", "instruction", "response", "answer")
ENV_SHARED_DATA = "ELREA_HF_SHARED_DATA"


def shared_data_dir() -> Path:
    """The ``shared/data`` folder: ``$ELREA_HF_SHARED_DATA``, else the first ``shared/data`` found
    walking up from the current directory, then from this package's location.

    Raises:
        FileNotFoundError: neither is found (the message says how to point at the folder).
    """
    configured = os.environ.get(ENV_SHARED_DATA)
    if configured:
        path = Path(configured).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{ENV_SHARED_DATA}={path} is not a folder.")
        return path.resolve()
    starts = [Path.cwd().resolve(), Path(__file__).resolve().parent]
    for start in starts:
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data"
            if candidate.is_dir():
                return candidate
    raise FileNotFoundError(
        "Could not find the shared data folder (shared/data) above "
        f"{starts[0]} or {starts[1]}; set {ENV_SHARED_DATA}=<path to shared/data>."
    )


def _resolve_shared(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = str(name_or_path)
    if os.sep in name or "/" in name:
        raise FileNotFoundError(f"{path} does not exist.")
    folder = shared_data_dir()
    candidate = folder / (name if name.endswith(".jsonl") else f"{name}.jsonl")
    if not candidate.is_file():
        available = ", ".join(sorted(p.stem for p in folder.glob("*.jsonl")))
        raise FileNotFoundError(f"{candidate} does not exist; available in {folder}: {available}")
    return candidate


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line; errors name the file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {lineno}: invalid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def _subsample(rows: list[dict[str, Any]], n: int | None, seed: int) -> list[dict[str, Any]]:
    """At most ``n`` rows drawn with ``random.Random(seed)``, kept in file order."""
    if n is None or n >= len(rows):
        return rows
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def _pick_completion(record: dict[str, Any], completion: str) -> tuple[str, bool]:
    """The completion text and whether the answer stood in for an empty response."""
    if completion == "answer":
        return str(record["answer"]), False
    response = record.get("response")
    if isinstance(response, str) and response.strip():
        return response, False
    return str(record["answer"]), True


def _check_completion_arg(completion: str) -> None:
    if completion not in ("response", "answer"):
        raise ValueError(f"completion must be 'response' or 'answer', got {completion!r}")


def load_shared_jsonl(
    name_or_path: str | os.PathLike,
    n: int | None = None,
    seed: int = 0,
    completion: str = "response",
    task_from: str = "category",
) -> Dataset:
    """Load a file of ``../shared/data`` (``"gsm8k_test"``, ``"bbh_shared.jsonl"`` or a path).

    Args:
        name_or_path: file name in :func:`shared_data_dir` (``.jsonl`` optional) or a path.
        n: keep at most ``n`` records, drawn with ``random.Random(seed)``, in file order.
        seed: seed of that draw.
        completion: ``"response"`` trains on the reference solution (the answer where a source has
            none, as BBH); ``"answer"`` on the short answer only.
        task_from: ``"category"`` (MATH subject, BBH task) or ``"source"`` (gsm8k, math, ...) fills
            the ``task`` column.

    Raises:
        ValueError: a line is not JSON or lacks one of ``id, source, category, instruction,
            response, answer`` (the message names the file and line).
    """
    return _to_dataset(_shared_rows(name_or_path, n, seed, completion, task_from))


def _shared_rows(name_or_path, n: int | None, seed: int, completion: str, task_from: str) -> list[dict[str, Any]]:
    _check_completion_arg(completion)
    if task_from not in ("category", "source"):
        raise ValueError(f"task_from must be 'category' or 'source', got {task_from!r}")
    path = _resolve_shared(name_or_path)
    rows, stand_ins = [], 0
    for lineno, record in _read_jsonl(path):
        missing = [field for field in SHARED_FIELDS if field not in record]
        if missing:
            raise ValueError(
                f"{path}, line {lineno}: missing field(s) {', '.join(missing)}; shared data records "
                f"have {', '.join(SHARED_FIELDS)}"
            )
        if not isinstance(record["instruction"], str) or not record["instruction"].strip():
            raise ValueError(f"{path}, line {lineno}: 'instruction' must be a non-empty string")
        target, stood_in = _pick_completion(record, completion)
        stand_ins += stood_in
        task = record[task_from] or record["source"]
        rows.append(_row(record["instruction"], target, str(task), str(record["answer"]), str(record["id"]), str(record["source"])))
    if stand_ins:
        logger.info(f"{path.name}: {stand_ins} records have no response; their answer is the completion.")
    return _subsample(rows, n, seed)


def math_combined(split: str = "train", n_per_source: int | None = None, seed: int = 0) -> Dataset:
    """GSM8K + SVAMP + MATH (+ MathQA dev for ``split="train"``, when present) from ``../shared/data``.

    The math-reasoning mixture of the ELREA paper's evaluation. Completions are the reference
    solutions (ending in ``Therefore, the answer is $\\boxed{...}$.``); ``task`` is the source.

    Args:
        split: ``"train"`` or ``"test"``.
        n_per_source: at most this many records of each source (all when None).
        seed: seed of the per-source draw.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    names = [f"gsm8k_{split}", f"svamp_{split}", f"math_{split}"]
    if split == "train" and (shared_data_dir() / "mathqa_dev.jsonl").is_file():
        names.append("mathqa_dev")
    rows = []
    for name in names:
        rows += _shared_rows(name, n_per_source, seed, completion="response", task_from="source")
    return _to_dataset(rows)


def load_jsonl_dataset(
    path: str | os.PathLike,
    n: int | None = None,
    seed: int = 0,
    completion: str = "response",
) -> Dataset:
    """Load your own JSONL file into the prompt/completion format.

    Each line is an object with either ``instruction`` and ``response`` and/or ``answer``, or
    ``prompt`` and ``completion`` (strings, or lists of ``{"role", "content"}`` messages). Optional
    fields: ``id`` (default ``<file stem>-<line>``), ``task`` or ``category`` (default: the file
    stem), ``source`` (default: the file stem), ``answer`` (default: the completion text).

    Args:
        path: the JSONL file.
        n: keep at most ``n`` records, drawn with ``random.Random(seed)``, in file order.
        seed: seed of that draw.
        completion: for instruction records, ``"response"`` (falling back to ``answer`` when the
            response is missing or empty) or ``"answer"``.
    """
    _check_completion_arg(completion)
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    stem = path.stem
    rows = []
    for lineno, record in _read_jsonl(path):
        if "prompt" in record and "completion" in record:
            prompt, target = record["prompt"], record["completion"]
            for field, value in (("prompt", prompt), ("completion", target)):
                if not (isinstance(value, str) or _is_messages(value)):
                    raise ValueError(
                        f"{path}, line {lineno}: '{field}' must be a string or a list of "
                        "{'role', 'content'} messages"
                    )
            text = target if isinstance(target, str) else target[-1]["content"]
        elif "instruction" in record and ("response" in record or "answer" in record):
            prompt = record["instruction"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{path}, line {lineno}: 'instruction' must be a non-empty string")
            response, answer = record.get("response"), record.get("answer")
            if completion == "response" and isinstance(response, str) and response.strip():
                text = response
            elif answer is not None and str(answer).strip():
                text = str(answer)
            else:
                wanted = "a non-empty 'answer'" if completion == "answer" else "a non-empty 'response' or 'answer'"
                raise ValueError(f"{path}, line {lineno}: the record has no {wanted}")
            target = text
        else:
            raise ValueError(
                f"{path}, line {lineno}: expected fields 'instruction' and 'response' (or 'answer'), "
                f"or 'prompt' and 'completion'; got {', '.join(sorted(record)) or 'none'}"
            )
        task = record.get("task") or record.get("category") or stem
        answer = record.get("answer", text)
        id_ = record.get("id", f"{stem}-{lineno}")
        rows.append(_row(prompt, target, str(task), str(answer), str(id_), str(record.get("source") or stem)))
    return _to_dataset(_subsample(rows, n, seed))


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    )
