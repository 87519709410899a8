"""ELREABuilder end to end on the tiny model: features -> clusters -> experts -> bundle."""

import os

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from trl import SFTTrainer

from elrea_hf import ELREAForCausalLM, ELREAGradientCallback
from elrea_hf.builder import ELREABuilder
from elrea_hf.clustering import GradientClusterer
from elrea_hf.testing import save_tiny_backbone, tiny_prompt_completion_dataset, tiny_sft_config

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _trained(tmp_path, n=18, seed=0):
    backbone = save_tiny_backbone(tmp_path / "backbone")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(backbone)
    cb = ELREAGradientCallback(d_proj=64)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(backbone), args=tiny_sft_config(tmp_path / "run", seed=seed),
                         train_dataset=tiny_prompt_completion_dataset(n), processing_class=tok,
                         peft_config=LoraConfig(**LORA), callbacks=[cb])
    trainer.train()
    return trainer, cb


def _builder(trainer, cb, **kw):
    return ELREABuilder.from_trainer(trainer, cb, expert_learning_rate=1e-3,
                                     clusterer=GradientClusterer(initial_clusters=3, min_cluster_size=2), **kw)


def test_build_writes_a_complete_bundle(tmp_path):
    trainer, cb = _trained(tmp_path)
    builder = _builder(trainer, cb)
    model = builder.build(tmp_path / "bundle")
    files = {os.path.relpath(os.path.join(r, f), tmp_path / "bundle") for r, _, fs in os.walk(tmp_path / "bundle") for f in fs}
    C = len(builder.report_["sizes"])
    assert C >= 2 and sum(builder.report_["sizes"]) == 18
    for f in ["config.json", "generation_config.json", "routing.safetensors", "README.md", "tokenizer_config.json",
              "gradient_state/epoch_0.safetensors", "gradient_state/epoch_1.safetensors",
              "base/adapter_model.safetensors", "base/adapter_config.json"] + \
            [f"expert_{c}/adapter_model.safetensors" for c in range(C)]:
        assert f in files, f
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    centroids = load_file(tmp_path / "bundle" / "routing.safetensors")["centroids"]
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(C))
    base = load_file(tmp_path / "bundle" / "base" / "adapter_model.safetensors")
    for c in range(C):
        expert = load_file(tmp_path / "bundle" / f"expert_{c}" / "adapter_model.safetensors")
        assert any(not torch.equal(base[k], expert[k]) for k in base), f"expert {c} equals the base adapter"
    card = (tmp_path / "bundle" / "README.md").read_text()
    assert "ELREA" in card and "from_pretrained" in card
    loaded = ELREAForCausalLM.from_pretrained(tmp_path / "bundle")
    assert loaded.route(["add 3 and 4"]).shape == (1, C + 1)
    with pytest.raises(FileExistsError):
        builder.build(tmp_path / "bundle")


def test_same_seed_same_clusters_and_adapters(tmp_path):
    t1, c1 = _trained(tmp_path / "a")
    t2, c2 = _trained(tmp_path / "b")
    b1, b2 = _builder(t1, c1), _builder(t2, c2)
    b1.build(tmp_path / "a" / "bundle")
    b2.build(tmp_path / "b" / "bundle")
    assert b1.labels_.tolist() == b2.labels_.tolist()
    for c in range(len(b1.report_["sizes"])):
        x = load_file(tmp_path / "a" / "bundle" / f"expert_{c}" / "adapter_model.safetensors")
        y = load_file(tmp_path / "b" / "bundle" / f"expert_{c}" / "adapter_model.safetensors")
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_interrupted_build_resumes_without_retraining(tmp_path, monkeypatch):
    trainer, cb = _trained(tmp_path)
    builder = _builder(trainer, cb)
    import trl

    real_train, calls = trl.SFTTrainer.train, []

    def dying_train(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed during the second expert")
        return real_train(self, *a, **k)

    monkeypatch.setattr(trl.SFTTrainer, "train", dying_train)
    with pytest.raises(KeyboardInterrupt):
        builder.build(tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists() or not os.listdir(tmp_path / "bundle")
    calls.clear()
    monkeypatch.setattr(trl.SFTTrainer, "train", lambda self, *a, **k: (calls.append(1), real_train(self, *a, **k))[1])
    builder2 = _builder(trainer, cb)
    builder2.build(tmp_path / "bundle")
    assert len(calls) == len(builder2.report_["sizes"]) - 1  # the first expert was reused


def test_features_of_another_dataset_are_refused(tmp_path):
    trainer, cb = _trained(tmp_path)
    trainer.train_dataset = trainer.train_dataset.select(range(10))
    with pytest.raises(ValueError, match="describe 18 examples"):
        _builder(trainer, cb)


def test_features_out_of_order_with_the_dataset_are_refused(tmp_path):
    trainer, cb = _trained(tmp_path)
    trainer.train_dataset = trainer.train_dataset.select(list(reversed(range(18))))
    with pytest.raises(ValueError, match="do not align with the training data set: feature row 0 is data-set example 0"):
        _builder(trainer, cb)


def test_from_model_refuses_a_plain_text_dataset(tmp_path):
    from datasets import Dataset

    text = Dataset.from_list([{"text": "add 1 and 2 gives 3"}])
    with pytest.raises(ValueError, match=r"prompt/completion data set; missing columns \['completion', 'prompt'\]"):
        ELREABuilder.from_model(str(tmp_path), text, LoraConfig(**LORA), tiny_sft_config(tmp_path))
