"""ELREAGradientCallback inside a real SFTTrainer on the tiny model."""

import os

import pytest
import torch
from peft import LoraConfig
from trl import SFTTrainer

from elrea_hf.callback import ELREAGradientCallback
from elrea_hf.features import (
    InstructionMasker,
    examples_from_prompts,
    instruction_gradient_features,
    lora_state,
)
from elrea_hf.testing import tiny_llama, tiny_prompt_completion_dataset, tiny_sft_config, tiny_tokenizer

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)


def _train(tmp_path, callback=None, **cfg):
    tok = tiny_tokenizer()
    trainer = SFTTrainer(
        model=tiny_llama(tok), args=tiny_sft_config(tmp_path, **cfg), train_dataset=tiny_prompt_completion_dataset(),
        processing_class=tok, peft_config=LoraConfig(**LORA), callbacks=[callback] if callback else None,
    )
    trainer.train()
    return trainer


def test_callback_does_not_change_training(tmp_path):
    plain = _train(tmp_path / "a")
    cb = ELREAGradientCallback(d_proj=64)
    with_cb = _train(tmp_path / "b", callback=cb)
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(plain) == losses(with_cb)
    a, b = lora_state(plain.model, "default"), lora_state(with_cb.model, "default")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_callback_writes_snapshots_and_features(tmp_path):
    cb = ELREAGradientCallback(d_proj=64)
    trainer = _train(tmp_path, callback=cb, gradient_accumulation_steps=2)
    assert cb.completed_epochs() == [0, 1]
    feats, index = cb.features()
    assert feats.shape == (12, 64) and index.tolist() == list(range(12))
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(12))
    snaps = cb.snapshots()
    # The final snapshot holds the trained adapter; lr is the mean over the epoch's steps (> 0).
    final = lora_state(trainer.model, "default")
    assert all(torch.equal(snaps[-1].weights[n], final[n]) for n in final)
    assert snaps[0].lr > snaps[1].lr > 0
    # The same features come out of the stand-alone extraction function on the raw prompts.
    masker = InstructionMasker(trainer.processing_class)
    ds = tiny_prompt_completion_dataset()
    examples = examples_from_prompts(masker, ds["prompt"])
    again = instruction_gradient_features(trainer.model, snaps, examples, cb.projection,
                                          pad_token_id=trainer.processing_class.pad_token_id)
    torch.testing.assert_close(again, feats, rtol=1e-4, atol=1e-5)


def test_resume_reuses_finished_epochs(tmp_path):
    cb = ELREAGradientCallback(d_proj=64)
    _train(tmp_path, callback=cb, save_strategy="epoch")
    first = cb.features()[0]
    stamp = os.path.getmtime(cb.epoch_features_path(0))
    # Resume from the end of epoch 1 into a third epoch: epoch 0/1 features are kept, epoch 2 added.
    tok = tiny_tokenizer()
    cb2 = ELREAGradientCallback(d_proj=64)
    trainer = SFTTrainer(
        model=tiny_llama(tok), args=tiny_sft_config(tmp_path, num_train_epochs=3, save_strategy="epoch"),
        train_dataset=tiny_prompt_completion_dataset(), processing_class=tok, peft_config=LoraConfig(**LORA),
        callbacks=[cb2],
    )
    ckpts = sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint-"))
    trainer.train(resume_from_checkpoint=str(tmp_path / ckpts[-1]))
    assert cb2.completed_epochs() == [0, 1, 2]
    assert os.path.getmtime(cb2.epoch_features_path(0)) == stamp
    assert cb2.features()[0].shape == first.shape


def test_non_adam_optimizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Adam-family"):
        _train(tmp_path, callback=ELREAGradientCallback(d_proj=64), optim="sgd")
