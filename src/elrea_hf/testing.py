"""Tiny, network-free fixtures for tests: a random Llama and a byte-level BPE tokenizer with a chat
template shaped like SmolLM2's (including its injected default system prompt), built in-process in
well under a second so that unit tests exercise the same code paths as the real backbone."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "add 12 and 30 reverse the word apple sort these words count the letter r in strawberry",
    "what is 7 plus 5 the answer is 12 true and false or not true evaluate the expression",
    "monday tuesday wednesday thursday friday saturday sunday days after today",
    "convert 3 meters to centimeters last letters of the words hello world concatenated",
    "You are a tiny test assistant. The quick brown fox jumps over the lazy dog 0123456789",
]


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences (deterministic), ChatML special tokens,
    eos = pad = <|im_end|> like SmolLM2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_llama(tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random Llama (a few hundred thousand parameters) matching ``tokenizer``."""
    tokenizer = tokenizer or tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny_backbone(path, seed: int = 0) -> str:
    """Write a tiny model + tokenizer checkpoint to ``path`` (what the pipeline tests load by path)."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_prompt_completion_dataset(n: int = 12, seed: int = 0):
    """A small conversational prompt-completion data set with three obviously different 'skills'."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    words = ["apple", "fox", "dog", "world", "hello", "strawberry"]
    rows = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a, b = rng.randint(1, 30), rng.randint(1, 30)
            q, ans, task = f"add {a} and {b}", str(a + b), "add"
        elif kind == 1:
            w = rng.choice(words)
            q, ans, task = f"reverse the word {w}", w[::-1], "reverse"
        else:
            q, ans, task = f"evaluate true and {rng.choice(['true', 'false'])}", rng.choice(["True", "False"]), "bool"
        rows.append({"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": ans}],
                     "task": task, "answer": ans, "id": f"tiny-{i}"})
    return Dataset.from_list(rows)


def tiny_sft_config(output_dir, **overrides):
    """SFTConfig settings that run on CPU in seconds (bf16 and gradient checkpointing off, plain AdamW)."""
    from trl import SFTConfig

    kwargs = dict(
        output_dir=str(output_dir), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        optim="adamw_torch", learning_rate=1e-3, num_train_epochs=2, per_device_train_batch_size=4,
        max_length=128, report_to=[], save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)
