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


def tiny_ensemble(backbone_dir: str, n_experts: int = 2, d_proj: int = 64, seed: int = 0, n_epochs: int = 2):
    """An ``ELREAForCausalLM`` on the tiny backbone with random (non-zero) adapters, random Adam
    state and centroids: what the modeling tests need before a builder has run."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modeling import ELREAForCausalLM

    tok = AutoTokenizer.from_pretrained(backbone_dir)
    backbone = AutoModelForCausalLM.from_pretrained(backbone_dir)
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(seed)
    peft = get_peft_model(backbone, LoraConfig(**cfg), adapter_name="base")
    for c in range(n_experts):
        peft.add_adapter(f"expert_{c}", LoraConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # make the experts clearly different from each other
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    snaps = random_epoch_snapshots(peft, "base", n_epochs, g, lr=1e-3, m_scale=1e-3, v_scale=1e-6, steps_per_epoch=10)
    centroids = torch.nn.functional.normalize(torch.randn(n_experts, d_proj, generator=g), dim=1)
    return ELREAForCausalLM.from_parts(peft, tok, centroids, snaps, base_model_name_or_path=str(backbone_dir),
                                       cluster_sizes=[5] * n_experts)


def random_epoch_snapshots(peft_model, adapter: str, n_epochs: int, generator: torch.Generator, *, lr: float,
                           m_scale: float, v_scale: float, steps_per_epoch: int):
    """Epoch snapshots holding ``adapter``'s current weights and random Adam moments: stands in for
    a training run where only the shapes matter (tests, speed benchmarks)."""
    from .features import EpochSnapshot, lora_modules

    snaps = []
    for e in range(n_epochs):
        w = {n: m.weight.detach().clone() for n, m in lora_modules(peft_model, adapter).items()}
        snaps.append(EpochSnapshot(
            epoch=e, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weights=w,
            exp_avg={n: m_scale * torch.randn(t.shape, generator=generator) for n, t in w.items()},
            exp_avg_sq={n: v_scale * torch.rand(t.shape, generator=generator) for n, t in w.items()},
            step={n: float(steps_per_epoch * (e + 1)) for n in w}))
    return snaps
