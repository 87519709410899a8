"""The skill mixture (deterministic, disjoint splits, checkable answers, TRL's format) and the loaders
of ../shared/data and of a user's own JSONL."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from trl.data_utils import is_conversational

from elrea_hf import data
from elrea_hf.data import (
    COLUMNS,
    DEFAULT_SKILLS,
    SKILLS,
    check_answer,
    load_jsonl_dataset,
    load_shared_jsonl,
    math_combined,
    shared_data_dir,
    skill_mixture,
)


def instructions(dataset) -> set[str]:
    return {row["prompt"][0]["content"] for row in dataset}


# --- skill mixture ------------------------------------------------------------------------------


def test_default_mixture_has_at_least_eight_skills_with_n_each():
    train = skill_mixture("train", n=30)
    assert len(DEFAULT_SKILLS) >= 8
    assert train.column_names == list(COLUMNS)
    counts = {task: train["task"].count(task) for task in DEFAULT_SKILLS}
    assert counts == {task: 30 for task in DEFAULT_SKILLS}
    assert len(set(train["id"])) == len(train)
    assert train[0]["id"] == f"mixture-train-{DEFAULT_SKILLS[0]}-0"


def test_mixture_is_deterministic_for_a_seed():
    assert skill_mixture("train", n=20, seed=3).to_list() == skill_mixture("train", n=20, seed=3).to_list()
    assert instructions(skill_mixture("train", n=20, seed=3)) != instructions(skill_mixture("train", n=20, seed=4))


def test_train_and_test_never_share_an_instruction_whatever_the_seeds():
    train = instructions(skill_mixture("train", n=300, seed=0))
    for seed in (0, 1):
        assert not train & instructions(skill_mixture("test", n=50, seed=seed))


def test_train_and_test_never_share_a_problem():
    # The partition hashes the problem (numbers, words), not its wording: "12 + 30" in train means
    # no "Add 12 and 30" in test.
    train = skill_mixture("train", n=300, skills=["addition"])
    test = skill_mixture("test", n=50, skills=["addition"])

    def operands(ds):
        return {tuple(sorted(map(int, re.findall(r"\d+", row["prompt"][0]["content"])))) for row in ds}

    assert not operands(train) & operands(test)


def test_skills_can_be_selected_in_order():
    ds = skill_mixture("test", n=3, skills=["boolean", "addition"])
    assert ds["task"] == ["boolean"] * 3 + ["addition"] * 3


def test_unknown_skill_and_impossible_n_are_clear_errors():
    with pytest.raises(ValueError, match="unknown skill"):
        skill_mixture(skills=["telepathy"])
    with pytest.raises(ValueError, match="boolean"):
        skill_mixture("test", n=10_000, skills=["boolean"])
    with pytest.raises(ValueError, match="split"):
        skill_mixture("validation")


def test_every_answer_passes_its_checker_and_another_answer_fails():
    ds = skill_mixture("train", n=40, skills=list(SKILLS))
    for task in SKILLS:
        rows = [row for row in ds if row["task"] == task]
        for row, other in zip(rows, rows[1:] + rows[:1]):
            assert row["completion"][0]["content"] == row["answer"]
            assert check_answer(task, row["answer"], row["answer"])
            if other["answer"] != row["answer"]:
                assert not check_answer(task, other["answer"], row["answer"]), (task, row, other)


@pytest.mark.parametrize(
    "task, prediction, answer, expected",
    [
        ("addition", " 42. ", "42", True),
        ("addition", "42 apples", "42", False),
        ("unit_conversion", "1,200", "1200", True),
        ("uppercase", "'GAME'", "GAME", True),
        ("uppercase", "game", "GAME", False),
        ("weekday_after", "monday.", "Monday", True),
        ("boolean", "`false`", "False", True),
        ("first_letters", "FTH", "fth", True),
        ("sort_words", "berry peach  tree", "berry, peach, tree", True),
        ("sort_words", "peach, berry, tree", "berry, peach, tree", False),
    ],
)
def test_checker_normalisation(task, prediction, answer, expected):
    assert check_answer(task, prediction, answer) is expected


def test_boolean_answers_match_python():
    for expression in data._BOOLEAN_EXPRESSIONS:
        assert data._evaluate_boolean(expression) == eval(expression), expression  # our own fixed strings


def test_examples_are_trl_conversational_prompt_completion():
    for row in skill_mixture("test", n=2):
        assert is_conversational(row)
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["completion"]] == ["assistant"]


# --- ../shared/data -----------------------------------------------------------------------------


def _shared_or_skip() -> Path:
    try:
        return shared_data_dir()
    except FileNotFoundError as err:
        pytest.skip(f"shared data folder not found ({err})")


@pytest.mark.parametrize(
    "name, rows, tasks",
    [
        ("gsm8k_test", 500, {"gsm8k"}),
        ("svamp_test", 300, {"svamp"}),
        ("math_test", 500, {"algebra", "geometry", "number_theory"}),
        ("bbh_shared", 1500, {"boolean_expressions", "word_sorting", "navigate"}),
    ],
)
def test_shared_files_load_in_prompt_completion_format(name, rows, tasks):
    _shared_or_skip()
    ds = load_shared_jsonl(name)
    assert len(ds) == rows and ds.column_names == list(COLUMNS)
    assert tasks <= set(ds["task"])
    row = ds[0]
    assert is_conversational(row) and row["answer"] and row["id"].startswith(row["source"])
    if name == "bbh_shared":  # no reference solutions: the answer is the completion
        assert row["completion"][0]["content"] == row["answer"]
    else:
        assert "\\boxed{" in row["completion"][0]["content"]


def test_shared_subsample_is_seeded_and_answer_only_completion_works():
    _shared_or_skip()
    a = load_shared_jsonl("gsm8k_train.jsonl", n=10, seed=1, completion="answer")
    assert len(a) == 10 and a["id"] == load_shared_jsonl("gsm8k_train", n=10, seed=1)["id"]
    assert a["id"] != load_shared_jsonl("gsm8k_train", n=10, seed=2)["id"]
    assert [row["completion"][0]["content"] for row in a] == a["answer"]


def test_math_combined_mixes_sources():
    shared = _shared_or_skip()
    test = math_combined("test", n_per_source=5)
    assert test["task"] == ["gsm8k"] * 5 + ["svamp"] * 5 + ["math"] * 5
    train = math_combined("train", n_per_source=3)
    expected = {"gsm8k", "svamp", "math"} | ({"mathqa"} if (shared / "mathqa_dev.jsonl").exists() else set())
    assert set(train["task"]) == expected


def test_shared_data_dir_honours_env_then_walks_up_from_cwd(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_SHARED_DATA, str(tmp_path))
    assert shared_data_dir() == tmp_path.resolve()

    monkeypatch.delenv(data.ENV_SHARED_DATA)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "clone" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "clone" / "sub")
    assert shared_data_dir() == (tmp_path / "shared" / "data").resolve()


def test_unknown_shared_name_lists_what_exists(tmp_path, monkeypatch):
    (tmp_path / "gsm8k_test.jsonl").write_text("")
    monkeypatch.setenv(data.ENV_SHARED_DATA, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="available.*gsm8k_test"):
        load_shared_jsonl("gsm9k_test")


RECORD = {"id": "x-0", "source": "x", "category": "c", "instruction": "Q?", "response": "R", "answer": "A"}


def test_malformed_json_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(RECORD) + "\n\n" + '{"id": "x-1", "instruction": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 3: invalid JSON"):
        load_shared_jsonl(path)


def test_missing_field_is_named_with_its_line(tmp_path):
    path = tmp_path / "partial.jsonl"
    lines = [RECORD, {k: v for k, v in RECORD.items() if k != "answer"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(ValueError, match=r"partial\.jsonl, line 2: missing field\(s\) answer"):
        load_shared_jsonl(path)


# --- a user's own JSONL -------------------------------------------------------------------------


def test_user_jsonl_accepts_instruction_and_prompt_completion_records(tmp_path):
    path = tmp_path / "mine.jsonl"
    records = [
        {"instruction": "Say hi", "response": "hi"},
        {"instruction": "2+2?", "answer": "4", "category": "math", "id": "q2"},
        {"prompt": "Name a color", "completion": "red"},
        {"prompt": [{"role": "user", "content": "Yes?"}], "completion": [{"role": "assistant", "content": "Yes"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = load_jsonl_dataset(path)
    assert ds.column_names == list(COLUMNS)
    assert all(is_conversational(row) for row in ds)
    assert [row["completion"][0]["content"] for row in ds] == ["hi", "4", "red", "Yes"]
    assert ds["id"] == ["mine-1", "q2", "mine-3", "mine-4"]
    assert ds["task"] == ["mine", "math", "mine", "mine"]
    assert ds["answer"] == ["hi", "4", "red", "Yes"]


def test_user_jsonl_without_usable_fields_names_the_line(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"mine\.jsonl, line 2: expected fields 'instruction'"):
        load_jsonl_dataset(path)
