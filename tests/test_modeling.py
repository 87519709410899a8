"""ELREAForCausalLM against independent references: single PEFT adapters run one at a time and
logits combined by hand with hand-computed eq 9 weights."""

import math
import os

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import elrea_hf  # noqa: F401  (registers the auto classes)
from elrea_hf.bundle import BundleError
from elrea_hf.features import InstructionMasker, examples_from_prompts, instruction_gradient_features
from elrea_hf.modeling import ELREAForCausalLM
from elrea_hf.projection import ProjectionSpec
from elrea_hf.testing import save_tiny_backbone, tiny_ensemble

PROMPTS = ["add 12 and 30", "reverse the word apple fox dog"]


@pytest.fixture
def backbone_dir(tmp_path):
    return save_tiny_backbone(tmp_path / "backbone")


@pytest.fixture
def ensemble(backbone_dir):
    return tiny_ensemble(backbone_dir)


def _batch(tok, prompts):
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _hand_weights(features, centroids):
    """Eq 9 in plain Python: z-scored cosines -> softmax; base weight 1 - max cosine."""
    rows = []
    for f in features.tolist():
        cos = [sum(a * b for a, b in zip(f, c)) for c in centroids.tolist()]
        mean = sum(cos) / len(cos)
        std = math.sqrt(sum((x - mean) ** 2 for x in cos) / len(cos))
        z = [(x - mean) / std for x in cos]
        e = [math.exp(v) for v in z]
        rows.append([1 - max(cos)] + [v / sum(e) for v in e])
    return torch.tensor(rows)


def _naive_greedy(ensemble, backbone_dir, bundle_dir, prompt, weights, steps=6):
    """Each adapter in its own PeftModel, full re-forward each step, logits combined by hand."""
    tok = AutoTokenizer.from_pretrained(backbone_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    models = []
    for name in ensemble.adapter_names:
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(backbone_dir), os.path.join(bundle_dir, name))
        models.append(m.eval())
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = sum(w * m(input_ids=ids).logits[0, -1] for w, m in zip(weights.tolist(), models))
            nxt = int(logits.argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_routing_weights_match_hand_computation(ensemble):
    w = ensemble.route(PROMPTS)
    masker = InstructionMasker(ensemble.tokenizer)
    feats = instruction_gradient_features(ensemble.peft_model, ensemble.snapshots, examples_from_prompts(masker, PROMPTS),
                                          ProjectionSpec.from_dict(ensemble.config.projection),
                                          adapter_name="base", pad_token_id=ensemble.tokenizer.pad_token_id)
    torch.testing.assert_close(w, _hand_weights(feats, ensemble.centroids), rtol=1e-5, atol=1e-6)
    # Left-padded input_ids recover the same user content, hence the same weights.
    enc = _batch(ensemble.tokenizer, PROMPTS)
    torch.testing.assert_close(ensemble.route(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]), w,
                               rtol=1e-4, atol=1e-5)


def test_greedy_equals_naive_weighted_reference(ensemble, backbone_dir, tmp_path):
    ensemble.save_pretrained(tmp_path / "bundle")
    enc = _batch(ensemble.tokenizer, PROMPTS)
    out, weights = ensemble.generate(**enc, max_new_tokens=6, do_sample=False, return_routing_weights=True)
    for i, prompt in enumerate(PROMPTS):
        want = _naive_greedy(ensemble, backbone_dir, tmp_path / "bundle", prompt, weights[i])
        got = out[i, enc["input_ids"].shape[1]:].tolist()
        assert got[: len(want)] == want


def test_single_expert_at_weight_one_equals_plain_peft(ensemble, backbone_dir, tmp_path):
    ensemble.save_pretrained(tmp_path / "bundle")
    enc = _batch(ensemble.tokenizer, PROMPTS[:1])
    w = torch.tensor([[0.0, 0.0, 1.0]])
    got = ensemble.generate(**enc, routing_weights=w, max_new_tokens=8, do_sample=False)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(backbone_dir), tmp_path / "bundle" / "expert_1").eval()
    want = plain.generate(**enc, max_new_tokens=8, do_sample=False)
    assert got.tolist() == want.tolist()


def test_save_load_generate_identical_and_auto_dispatch(ensemble, tmp_path):
    ensemble.save_pretrained(tmp_path / "bundle")
    files = set()
    for root, _, names in os.walk(tmp_path / "bundle"):
        files |= {os.path.relpath(os.path.join(root, n), tmp_path / "bundle") for n in names}
    assert {"config.json", "routing.safetensors", "gradient_state/epoch_0.safetensors", "gradient_state/epoch_1.safetensors",
            "base/adapter_model.safetensors", "expert_0/adapter_config.json", "expert_1/adapter_model.safetensors",
            "generation_config.json"} <= files
    assert "adapter_config.json" not in files
    # Data is safetensors/JSON only; the one .py file is the trust_remote_code shim (imports elrea_hf).
    assert all(f.endswith((".json", ".safetensors", ".md", ".jinja", ".txt")) or f == "elrea_auto.py" for f in files), files
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "bundle"), type(ensemble.config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bundle")
    assert isinstance(loaded, ELREAForCausalLM)
    enc = _batch(ensemble.tokenizer, PROMPTS)
    a = ensemble.generate(**enc, max_new_tokens=5, do_sample=False)
    b = loaded.generate(**enc, max_new_tokens=5, do_sample=False)
    assert a.tolist() == b.tolist()


def test_sampling_is_seeded_and_beam_search_refused(ensemble):
    enc = _batch(ensemble.tokenizer, PROMPTS)
    torch.manual_seed(0)
    a = ensemble.generate(**enc, max_new_tokens=5, do_sample=True, temperature=1.0, num_return_sequences=2)
    torch.manual_seed(0)
    b = ensemble.generate(**enc, max_new_tokens=5, do_sample=True, temperature=1.0, num_return_sequences=2)
    assert a.shape[0] == 4 and a.tolist() == b.tolist()
    with pytest.raises(NotImplementedError, match="beam search"):
        ensemble.generate(**enc, max_new_tokens=3, num_beams=2)


def test_forward_returns_weighted_logits(ensemble):
    enc = _batch(ensemble.tokenizer, PROMPTS[:1])
    w = torch.tensor([[0.2, 0.5, 0.3]])
    out = ensemble(**enc, routing_weights=w)
    peft = ensemble.peft_model
    parts = []
    for name in ensemble.adapter_names:
        peft.set_adapter(name)
        with torch.no_grad():
            parts.append(peft(**enc).logits)
    torch.testing.assert_close(out.logits, sum(x * y for x, y in zip(w[0].tolist(), parts)), rtol=1e-5, atol=1e-5)


def test_bad_bundles_fail_with_the_file_named(ensemble, tmp_path, backbone_dir):
    bundle = tmp_path / "bundle"
    ensemble.save_pretrained(bundle)
    (bundle / "expert_0" / "adapter_model.bin").write_bytes(b"not loaded")  # pickle: ignored, never read
    assert isinstance(ELREAForCausalLM.from_pretrained(bundle), ELREAForCausalLM)
    (bundle / "routing.safetensors").write_bytes(b"corrupt")
    with pytest.raises(BundleError, match="routing.safetensors"):
        ELREAForCausalLM.from_pretrained(bundle)
    ensemble.save_pretrained(bundle)
    os.remove(bundle / "expert_1" / "adapter_model.safetensors")
    with pytest.raises(BundleError, match="expert_1"):
        ELREAForCausalLM.from_pretrained(bundle)


def test_mismatched_backbone_is_refused(ensemble, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    ensemble.save_pretrained(tmp_path / "bundle")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="different backbone"):
        ELREAForCausalLM.from_pretrained(tmp_path / "bundle", base_model_name_or_path=str(tmp_path / "other"))


def test_bad_prompts(ensemble):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        ensemble.route(["  "])
    with pytest.raises(ValueError, match="context"):
        ensemble.route(["add " * 300])
    ids = ensemble.tokenizer("<|im_start|>user\nadd 1 and 2", return_tensors="pt", add_special_tokens=False)
    with pytest.raises(ValueError, match="generation prompt"):
        ensemble.generate(**ids, max_new_tokens=2)


def test_push_to_hub_uploads_every_bundle_file(ensemble, monkeypatch, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))

    def fake_commit(self, repo_id, operations, **kw):
        calls["repo"] = repo_id
        calls["files"] = {op.path_in_repo: open(op.path_or_fileobj, "rb").read() if isinstance(op.path_or_fileobj, str)
                          else op.path_or_fileobj for op in operations}
        return None

    monkeypatch.setattr(HfApi, "create_commit", fake_commit)
    monkeypatch.setattr(HfApi, "preupload_lfs_files", lambda self, *a, **k: None, raising=False)
    ensemble.model_card = "# my ELREA model\n"
    ensemble.push_to_hub("user/elrea-tiny")
    assert calls["repo"] == "user/elrea-tiny"
    # Exactly the files save_pretrained writes, byte for byte, model card and remote-code shim included.
    local = tmp_path / "local"
    ensemble.save_pretrained(local)
    expected = {str(p.relative_to(local)).replace(os.sep, "/"): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    assert set(calls["files"]) == set(expected)
    assert all(calls["files"][name] == data for name, data in expected.items())
    for required in ("config.json", "routing.safetensors", "gradient_state/epoch_0.safetensors", "base/adapter_config.json",
                     "base/adapter_model.safetensors", "expert_0/adapter_model.safetensors", "expert_1/adapter_model.safetensors",
                     "README.md", "tokenizer.json", "generation_config.json", "elrea_auto.py"):
        assert required in expected, required
    assert all(name.count("/") <= 1 for name in expected)  # PushToHubMixin / Hub UI: one folder level
    assert calls["files"]["README.md"] == b"# my ELREA model\n"


def test_trust_remote_code_loads_the_installed_classes(ensemble, tmp_path):
    bundle = tmp_path / "bundle"
    ensemble.save_pretrained(bundle)
    cfg = AutoConfig.from_pretrained(bundle)
    assert cfg.auto_map["AutoModelForCausalLM"] == "elrea_auto.ELREAForCausalLM"
    model = AutoModelForCausalLM.from_pretrained(bundle, trust_remote_code=True)
    assert type(model).__name__ == "ELREAForCausalLM" and isinstance(model.config, elrea_hf.ELREAConfig)
    again = tmp_path / "again"
    model.save_pretrained(again)  # no package module is copied into a bundle
    assert sorted(p.name for p in again.glob("*.py")) == ["elrea_auto.py"]


def test_a_4bit_bitsandbytes_backbone_routes_and_generates(ensemble, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    bundle = tmp_path / "bundle"
    ensemble.save_pretrained(bundle)
    q = AutoModelForCausalLM.from_pretrained(
        bundle, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    assert type(q.peft_model.get_base_model().model.layers[0].mlp.gate_proj).__name__ == "Linear4bit"
    enc = _batch(q.tokenizer, PROMPTS)
    out, w = q.generate(**enc, max_new_tokens=3, do_sample=False, return_routing_weights=True)
    assert out.shape[0] == 2 and w.shape == (2, 3) and torch.isfinite(w).all()


def test_zero_weight_experts_are_not_run_and_do_not_change_the_logits(ensemble, monkeypatch):
    from elrea_hf.batched_lora import BatchedLoraRows

    enc = _batch(ensemble.tokenizer, PROMPTS[:2])
    w = torch.tensor([[0.2, 0.0, 0.8], [0.4, 0.6, 0.0]])  # top-1 routing: one expert per prompt
    seen = []
    real = BatchedLoraRows.apply
    monkeypatch.setattr(BatchedLoraRows, "apply", lambda self, rows: seen.append(rows.tolist()) or real(self, rows))
    out = ensemble(**enc, routing_weights=w)
    assert seen == [[0, 2, 0, 1]]  # (prompt 0: base, expert_1), (prompt 1: base, expert_0)
    monkeypatch.undo()
    full = sum(w[:, i, None, None] * ensemble(**enc, routing_weights=torch.eye(3)[i].expand(2, 3)).logits
               for i in range(3))
    torch.testing.assert_close(out.logits, full, rtol=1e-5, atol=1e-5)


def test_batched_lora_rows_equal_peft_mixed_adapter_batches(ensemble):
    from elrea_hf.batched_lora import BatchedLoraRows

    enc = _batch(ensemble.tokenizer, PROMPTS * 2)
    names = ensemble.adapter_names
    per_row = [names[0], names[2], names[1], names[0]]
    peft = ensemble.peft_model.eval()
    with torch.no_grad():
        want = peft(**enc, adapter_names=per_row).logits
        with BatchedLoraRows(peft, names).apply(torch.tensor([names.index(n) for n in per_row])):
            got = peft(**enc).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # A nested apply (each decoding step inside generate) swaps the layout, never adds hooks twice.
    rows = BatchedLoraRows(peft, names)
    with torch.no_grad(), rows.apply(torch.zeros(4, dtype=torch.long)):
        with rows.apply(torch.tensor([names.index(n) for n in per_row])):
            nested = peft(**enc).logits
        assert rows.active
    assert not rows.active
    torch.testing.assert_close(nested, want, rtol=1e-5, atol=1e-5)
