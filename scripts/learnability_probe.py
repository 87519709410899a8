"""Learnability probe for the skill mixture: can one small LoRA teach SmolLM2-135M each skill?

Trains a single rank-8 LoRA (all linear layers) on ``--n-train`` examples of every skill with a
plain PyTorch loop (completion-only loss, AdamW, linear decay), and after each epoch reports the
teacher-forced exact match per skill on ``--n-test`` test prompts: an example counts as correct when
the argmax token at every answer position, through ``<|im_end|>``, is the gold token, i.e. greedy
decoding would emit exactly the bare answer. A skill that stays near 0% here is a poor benchmark
skill (design.md §10); one at 100% after a few steps carries no signal.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \
        .venv/bin/python scripts/learnability_probe.py --n-train 64 --epochs 2 --lr 1e-3

About 160 optimizer steps of batch 8 for the defaults: ~5 min on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from elrea_hf import default_backbone
from elrea_hf.data import ALL_SKILLS, skill_mixture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=64, help="training examples per skill")
    parser.add_argument("--n-test", type=int, default=20, help="test prompts per skill")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skills", nargs="*", default=list(ALL_SKILLS), choices=list(ALL_SKILLS))
    parser.add_argument("--out", type=Path, default=Path("docs/learnability_probe.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    path = default_backbone()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def encode(row) -> tuple[list[int], int]:
        """Token ids of prompt + completion up to its <|im_end|>, and the prompt length."""
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids
        return full_ids[: full_ids.index(end_id, len(prompt_ids)) + 1], len(prompt_ids)

    def collate(items):
        length = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), length), tokenizer.pad_token_id)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        labels = torch.full((len(items), length), -100)
        for k, (ids, prompt_len) in enumerate(items):
            input_ids[k, : len(ids)] = torch.tensor(ids)
            attention_mask[k, : len(ids)] = 1
            labels[k, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        return input_ids, attention_mask, labels

    @torch.no_grad()
    def evaluate(rows, encoded) -> dict[str, float]:
        model.eval()
        hits: dict[str, list[bool]] = {}
        for start in range(0, len(encoded), 25):
            input_ids, attention_mask, labels = collate(encoded[start : start + 25])
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            predicted, gold = logits[:, :-1].argmax(-1), labels[:, 1:]
            correct = ((predicted == gold) | (gold == -100)).all(-1)
            for row, ok in zip(rows[start : start + 25], correct.tolist()):
                hits.setdefault(row["task"], []).append(ok)
        model.train()
        accuracy = {task: sum(v) / len(v) for task, v in hits.items()}
        accuracy["micro"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
        return accuracy

    train = skill_mixture("train", n=args.n_train, skills=args.skills)
    test = skill_mixture("test", n=args.n_test, skills=args.skills)
    train_encoded, test_encoded, test_rows = [encode(r) for r in train], [encode(r) for r in test], list(test)

    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    total = (len(train_encoded) + args.batch_size - 1) // args.batch_size * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total)
    rng, step, started, results = random.Random(0), 0, time.time(), {"args": vars(args) | {"out": str(args.out)}}
    for epoch in range(1, args.epochs + 1):
        order = list(range(len(train_encoded)))
        rng.shuffle(order)
        for start in range(0, len(order), args.batch_size):
            input_ids, attention_mask, labels = collate([train_encoded[i] for i in order[start : start + args.batch_size]])
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step % 25 == 0:
                print(f"step {step}/{total} loss {loss.item():.3f} {time.time() - started:.0f}s", flush=True)
        results[f"epoch_{epoch}"] = evaluate(test_rows, test_encoded)
        print(f"epoch {epoch}", {k: round(v, 2) for k, v in results[f"epoch_{epoch}"].items()}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
