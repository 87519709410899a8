"""Zero-shot greedy accuracy of a model on the skill mixture's test split (the floor every trained
method must beat).

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \
        .venv/bin/python scripts/zero_shot_floor.py --n 50 --out docs/zero_shot_floor.json

Prompts are rendered with the model's chat template (add_generation_prompt=True), decoded greedily
in left-padded batches; the first line of each output is checked with the skill's checker.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from elrea_hf import default_backbone
from elrea_hf.data import ALL_SKILLS, DEFAULT_SKILLS, check_answer, skill_mixture


def first_line(text: str) -> str:
    text = text.strip()
    return text.split("\n", 1)[0] if text else ""


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts, batch_size: int, max_new_tokens: int) -> list[str]:
    outputs = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating"):
        texts = [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
            for p in prompts[start : start + batch_size]
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        generated = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,  # only the first line is checked (main)
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: default_backbone())")
    parser.add_argument("--n", type=int, default=50, help="test prompts per skill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skills", nargs="*", default=list(DEFAULT_SKILLS), choices=list(ALL_SKILLS))
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("docs/zero_shot_floor.json"))
    args = parser.parse_args()

    model_path = args.model or default_backbone()
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    test = skill_mixture("test", n=args.n, seed=args.seed, skills=args.skills)

    started = time.perf_counter()
    raw = greedy_answers(model, tokenizer, test["prompt"], args.batch_size, args.max_new_tokens)
    seconds = time.perf_counter() - started

    examples, per_skill = [], {}
    for row, output in zip(test, raw):
        prediction = first_line(output)
        correct = check_answer(row["task"], prediction, row["answer"])
        per_skill.setdefault(row["task"], []).append(correct)
        examples.append({"id": row["id"], "answer": row["answer"], "output": output, "correct": correct})
    accuracy = {task: sum(hits) / len(hits) for task, hits in per_skill.items()}
    total = sum(sum(hits) for hits in per_skill.values())
    result = {
        "model": str(model_path),
        "n_per_skill": args.n,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "accuracy": accuracy,
        "micro_accuracy": total / len(examples),
        "correct": total,
        "total": len(examples),
        "generation_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "examples": examples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for task, value in accuracy.items():
        print(f"{task:16s} {value:6.1%}")
    print(f"{'micro-average':16s} {result['micro_accuracy']:6.1%}  ({total}/{len(examples)}, {seconds:.0f} s)")


if __name__ == "__main__":
    main()
