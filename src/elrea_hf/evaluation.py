"""Greedy generation and exact-match accuracy on prompt/completion data sets, for the base adapter
and for the ensemble on the *same* prompts (so the two can be compared pair by pair)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm


def first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0].strip() if text else ""


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
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None):
        enc = _encode(tokenizer, prompts[i : i + batch_size])
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
          check: Callable[[str, str, str], bool]) -> list[bool]:
    return [bool(check(t, first_line(p), a)) for p, a, t in zip(predictions, answers, tasks)]
