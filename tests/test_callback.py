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


def _with_long_prompt(position=3, n=12):
    from datasets import Dataset

    rows = tiny_prompt_completion_dataset(n).to_list()
    rows[position]["prompt"] = [{"role": "user", "content": "add " + " and ".join(["12"] * 80)}]
    return Dataset.from_list(rows)


@pytest.mark.parametrize("remove_unused_columns", [True, False])
def test_examples_dropped_by_trl_are_reported_by_position(tmp_path, caplog, remove_unused_columns):
    """TRL silently drops an example whose prompt fills max_length; the features say which they cover."""
    from transformers.utils import logging as hf_logging

    tok = tiny_tokenizer()
    cb = ELREAGradientCallback(d_proj=64)
    trainer = SFTTrainer(model=tiny_llama(tok), train_dataset=_with_long_prompt(),
                         args=tiny_sft_config(tmp_path, max_length=64, num_train_epochs=1,
                                              remove_unused_columns=remove_unused_columns),
                         processing_class=tok, peft_config=LoraConfig(**LORA), callbacks=[cb])
    assert len(trainer.train_dataset) == 11
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            trainer.train()
    finally:
        hf_logging.disable_propagation()
    warning = next(r.getMessage() for r in caplog.records if "dropped 1 of 12" in r.getMessage())
    assert "positions [3]" in warning
    assert ("'tiny-3'" in warning) == (not remove_unused_columns)  # ids only when the column reaches the loader
    feats, index = cb.features()
    assert feats.shape == (11, 64) and index.tolist() == [0, 1, 2] + list(range(4, 12))
    assert cb.features_metadata()["dropped_examples"] == [3]


def test_resuming_into_the_output_dir_of_another_adapter_is_refused(tmp_path):
    shared = str(tmp_path / "elrea")
    _train(tmp_path / "a", callback=ELREAGradientCallback(output_dir=shared, d_proj=64), num_train_epochs=1)
    # A rank-8 run, checkpointed after its first epoch, resumed with the rank-4 run's ELREA folder.
    tok = tiny_tokenizer()
    wide = dict(LORA, r=8)
    SFTTrainer(model=tiny_llama(tok), args=tiny_sft_config(tmp_path / "b", num_train_epochs=1, save_strategy="epoch"),
               train_dataset=tiny_prompt_completion_dataset(), processing_class=tok,
               peft_config=LoraConfig(**wide)).train()
    resumed = SFTTrainer(model=tiny_llama(tok), args=tiny_sft_config(tmp_path / "b", num_train_epochs=2),
                         train_dataset=tiny_prompt_completion_dataset(), processing_class=tok,
                         peft_config=LoraConfig(**wide), callbacks=[ELREAGradientCallback(output_dir=shared, d_proj=64)])
    ckpt = next(p for p in os.listdir(tmp_path / "b") if p.startswith("checkpoint-"))
    with pytest.raises(ValueError, match=r"epoch_0\.safetensors does not match adapter 'default'.*shape \(4, 32\) "
                                         r"there, \(8, 32\) in the model"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "b" / ckpt))


def test_plain_text_dataset_is_refused_with_the_needed_columns(tmp_path):
    from datasets import Dataset

    tok = tiny_tokenizer()
    text = Dataset.from_list([{"text": f"add {i} and {i + 1} gives {2 * i + 1}"} for i in range(8)])
    trainer = SFTTrainer(model=tiny_llama(tok), args=tiny_sft_config(tmp_path), train_dataset=text,
                         processing_class=tok, peft_config=LoraConfig(**LORA), callbacks=[ELREAGradientCallback(d_proj=64)])
    with pytest.raises(ValueError, match=r"example 0 has no prompt tokens.*columns 'prompt' and 'completion'"):
        trainer.train()


def test_float16_features_match_float32_and_give_the_same_clusters(tmp_path):
    """Two callbacks on one run, storing in float32 and float16: features agree to float16
    precision and the clusterer assigns identical labels."""
    from elrea_hf.clustering import GradientClusterer

    cb32 = ELREAGradientCallback(output_dir=str(tmp_path / "f32"), d_proj=64, features_part_size=5)
    cb16 = ELREAGradientCallback(output_dir=str(tmp_path / "f16"), d_proj=64, feature_dtype="float16")
    tok = tiny_tokenizer()
    SFTTrainer(model=tiny_llama(tok), args=tiny_sft_config(tmp_path), train_dataset=tiny_prompt_completion_dataset(30),
               processing_class=tok, peft_config=LoraConfig(**LORA), callbacks=[cb32, cb16]).train()
    f32, f16 = cb32.features()[0], cb16.features()[0]
    assert len(cb32.feature_store().parts) == 6 and cb16.feature_store().dtype == "float16"
    assert (f16 - f32).abs().max() < 1e-3
    torch.testing.assert_close(cb32.feature_store().load(7, 19), f32[7:19])
    clusterer = dict(initial_clusters=3, min_cluster_size=2, random_state=0)
    labels32 = GradientClusterer(**clusterer).fit_predict(f32.numpy())
    labels16 = GradientClusterer(**clusterer).fit_predict(f16.numpy())
    assert labels32.tolist() == labels16.tolist()
