"""Gradient features against independent references: a one-example-at-a-time autograd loop with a
dense, explicitly materialised projection matrix."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from elrea_hf.features import (
    EpochSnapshot,
    InstructionExample,
    InstructionMasker,
    InstructionMaskError,
    examples_from_prompts,
    instruction_gradient_features,
    lora_modules,
    lora_per_sample_gradients,
)
from elrea_hf.projection import ProjectionSpec, RademacherProjector, make_projector

PROMPTS = [
    "add 12 and 30",
    "reverse the word apple",
    "count the letter r in strawberry",
    [{"role": "user", "content": "sort these words: fox dog"}],
    "true and false or not true",
]


def _peft(model, seed=0):
    torch.manual_seed(seed)
    m = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return m


def _snapshot(model, seed, epoch=0):
    g = torch.Generator().manual_seed(seed)
    mods = lora_modules(model, "default")
    w = {n: m.weight.detach().clone() + 0.05 * torch.randn(m.weight.shape, generator=g) for n, m in mods.items()}
    return EpochSnapshot(
        epoch=epoch, lr=1e-4 * (seed + 1), beta1=0.9, beta2=0.999, eps=1e-8, weights=w,
        exp_avg={n: 1e-3 * torch.randn(t.shape, generator=g) for n, t in w.items()},
        exp_avg_sq={n: 1e-6 * torch.rand(t.shape, generator=g) for n, t in w.items()},
        step={n: 10.0 + seed for n in w},
    )


def _reference_features(model, snapshots, examples, R):
    """Naive: for each example and epoch, load the weights, one autograd.grad, eq 5 by hand,
    project with the dense R, average over epochs, normalise."""
    mods = lora_modules(model, "default")
    names = list(mods)
    params = [mods[n].weight for n in names]
    out = []
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        per_epoch = []
        for s in snapshots:
            with torch.no_grad():
                for n in names:
                    mods[n].weight.copy_(s.weights[n])
            model.eval()
            logits = model(input_ids=ids).logits[0]
            logp = torch.log_softmax(logits[:-1], -1)
            terms = [-logp[t - 1, ex.input_ids[t]] for t in range(1, len(ex.input_ids)) if ex.loss_mask[t]]
            loss = torch.stack(terms).mean()
            grads = torch.autograd.grad(loss, params)
            upd = []
            for n, g in zip(names, grads):
                m = (s.beta1 * s.exp_avg[n] + (1 - s.beta1) * g) / (1 - s.beta1 ** s.step[n])
                v = (s.beta2 * s.exp_avg_sq[n] + (1 - s.beta2) * g**2) / (1 - s.beta2 ** s.step[n])
                upd.append((s.lr * m / (v.sqrt() + s.eps)).flatten())
            per_epoch.append(R @ torch.cat(upd))
        f = torch.stack(per_epoch).mean(0)
        out.append(f / f.norm())
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["rademacher", "countsketch"])
def test_features_match_naive_per_example_loop(tiny_model, tokenizer, kind):
    model = _peft(tiny_model)
    masker = InstructionMasker(tokenizer)
    examples = examples_from_prompts(masker, PROMPTS)
    snaps = [_snapshot(model, 0, 0), _snapshot(model, 1, 1)]
    dim = sum(m.weight.numel() for m in lora_modules(model, "default").values())
    spec = ProjectionSpec(dim=dim, d_proj=64, seed=3, block_size=100, kind=kind)
    before = {n: m.weight.clone() for n, m in lora_modules(model, "default").items()}
    got = instruction_gradient_features(model, snaps, examples, spec, batch_size=3, pad_token_id=tokenizer.pad_token_id)
    for n, m in lora_modules(model, "default").items():
        assert torch.equal(m.weight, before[n]), "adapter weights must be restored"
    R = make_projector(spec).dense_matrix()  # explicitly materialised
    want = _reference_features(model, snaps, examples, R)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_per_sample_gradients_independent_of_batch_composition(tiny_model, tokenizer):
    model = _peft(tiny_model)
    masker = InstructionMasker(tokenizer)
    examples = examples_from_prompts(masker, PROMPTS)
    from elrea_hf.features import _pad_batch

    together = lora_per_sample_gradients(model, *_pad_batch(examples, tokenizer.pad_token_id, "cpu"))
    alone = torch.cat([lora_per_sample_gradients(model, *_pad_batch([e], 0, "cpu")) for e in examples])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)


def test_token_budget_batches_and_features_do_not_depend_on_them(tiny_model, tokenizer):
    from elrea_hf.features import _length_sorted_batches

    lengths = [30, 10, 12, 50, 11, 29]
    batches = _length_sorted_batches(lengths, batch_size=3, max_batch_tokens=60)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # nothing dropped
    assert batches == [[1, 4, 2], [5, 0], [3]]  # 3 x 12 <= 60, 2 x 30 <= 60, 50 alone
    assert all(len(b) * max(lengths[i] for i in b) <= 60 for b in batches)
    assert _length_sorted_batches([100], 8, 10) == [[0]]  # a longer example still gets a batch

    model = _peft(tiny_model)
    examples = examples_from_prompts(InstructionMasker(tokenizer), PROMPTS)
    dim = sum(m.weight.numel() for m in lora_modules(model, "default").values())
    spec = ProjectionSpec(dim=dim, d_proj=64, seed=3)
    snaps = [_snapshot(model, 0, 0)]
    whole = instruction_gradient_features(model, snaps, examples, spec, batch_size=8, pad_token_id=tokenizer.pad_token_id)
    budget = instruction_gradient_features(model, snaps, examples, spec, batch_size=8, max_batch_tokens=1,
                                           pad_token_id=tokenizer.pad_token_id)
    torch.testing.assert_close(budget, whole, rtol=1e-4, atol=1e-5)


def test_projection_is_independent_of_chunking_and_matches_dense():
    spec = ProjectionSpec(dim=1000, d_proj=64, seed=7, block_size=128, kind="rademacher")
    x = torch.randn(10, 1000, dtype=torch.float64).float()
    proj = RademacherProjector(spec)
    R = proj.dense_matrix()
    assert set(R.unique().tolist()) == {-1.0, 1.0}
    assert abs(R.mean().item()) < 0.02
    torch.testing.assert_close(proj.project(x), x @ R.T, rtol=1e-5, atol=1e-4)
    # batch size changes only BLAS summation order: equal to float32 round-off
    torch.testing.assert_close(torch.cat([proj.project(x[i : i + 1]) for i in range(10)]), proj.project(x), rtol=1e-4, atol=1e-3)
    assert torch.equal(proj.project(x), proj.project(x))
    assert not torch.equal(RademacherProjector(ProjectionSpec(1000, 64, seed=8, block_size=128, kind="rademacher")).dense_matrix(), R)


def test_user_content_mask_covers_exactly_the_user_message(tokenizer):
    masker = InstructionMasker(tokenizer)
    ids = masker.render("add 12 and 30")
    mask = masker.mask(ids)
    content = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert content == "add 12 and 30"
    # the same rule works on ids rendered by TRL/transformers directly, and with a system message
    ids2 = masker.render([{"role": "system", "content": "be brief"}, {"role": "user", "content": "fox dog"}])
    assert tokenizer.decode([i for i, m in zip(ids2, masker.mask(ids2)) if m]) == "fox dog"
    all_mask = InstructionMasker(tokenizer, mode="all_prompt").mask(ids)
    assert sum(all_mask) == len(ids) - 1


def test_mask_errors_are_clear(tokenizer):
    masker = InstructionMasker(tokenizer)
    ids = masker.render("add 12 and 30")
    with pytest.raises(InstructionMaskError, match="generation prompt"):
        masker.mask(ids[:-3])
    plain = tokenizer("just some text", add_special_tokens=False)["input_ids"]
    assert sum(masker.mask(plain)) == len(plain) - 1


def test_content_mask_separates_skills_better_than_all_prompt_tokens(tiny_model, tokenizer):
    """With template/system tokens in the loss, features of unrelated prompts look alike."""
    model = _peft(tiny_model)
    snap = _snapshot(model, 0)
    dim = sum(m.weight.numel() for m in lora_modules(model, "default").values())
    spec = ProjectionSpec(dim=dim, d_proj=256, seed=0)
    prompts = ["add 12 and 30", "reverse the word apple", "monday tuesday", "convert 3 meters", "fox dog"]

    def mean_cos(mode):
        ex = examples_from_prompts(InstructionMasker(tokenizer, mode=mode), prompts)
        f = instruction_gradient_features(model, [snap], ex, spec, pad_token_id=tokenizer.pad_token_id)
        c = f @ f.T
        return (c.sum() - c.diag().sum()) / (len(prompts) * (len(prompts) - 1))

    assert mean_cos("user_content") < mean_cos("all_prompt") - 0.1


def test_snapshot_roundtrip(tmp_path, tiny_model):
    model = _peft(tiny_model)
    s = _snapshot(model, 2, epoch=1)
    s.save(tmp_path / "e.safetensors")
    t = EpochSnapshot.load(tmp_path / "e.safetensors")
    assert (t.epoch, t.lr, t.step) == (s.epoch, s.lr, s.step)
    for n in s.names:
        assert torch.equal(t.exp_avg_sq[n], s.exp_avg_sq[n])
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(OSError, match="bad.safetensors"):
        EpochSnapshot.load(tmp_path / "bad.safetensors")


def test_non_finite_gradient_names_the_caller_example_ids(tiny_model, tokenizer):
    model = _peft(tiny_model)
    examples = examples_from_prompts(InstructionMasker(tokenizer), PROMPTS)
    # A token only prompt 2 contains embeds to NaN: only that example's gradient is NaN.
    others = {t for i, e in enumerate(examples) if i != 2 for t in e.input_ids}
    token = next(t for t in examples[2].input_ids if t not in others)
    model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, out: out.masked_fill((inputs[0] == token)[..., None], float("nan")))
    dim = sum(m.weight.numel() for m in lora_modules(model, "default").values())
    spec = ProjectionSpec(dim=dim, d_proj=64)
    with pytest.raises(ValueError, match=r"non-finite.*\['ex-c'\]"):
        instruction_gradient_features(model, [_snapshot(model, 0)], examples, spec, batch_size=2,
                                      example_ids=["ex-a", "ex-b", "ex-c", "ex-d", "ex-e"])


def test_snapshot_of_another_adapter_shape_is_refused(tmp_path, tokenizer):
    from elrea_hf.testing import tiny_llama

    small, large = _peft(tiny_llama(tokenizer)), get_peft_model(
        tiny_llama(tokenizer), LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    _snapshot(large, 0).save(tmp_path / "epoch_0.safetensors")
    snap = EpochSnapshot.load(tmp_path / "epoch_0.safetensors")
    dim = sum(m.weight.numel() for m in lora_modules(small, "default").values())
    examples = examples_from_prompts(InstructionMasker(tokenizer), PROMPTS[:2])
    with pytest.raises(ValueError, match=r"epoch_0\.safetensors.*lora_A\.weight has shape \(8, 32\) there, \(4, 32\)"):
        instruction_gradient_features(small, [snap], examples, ProjectionSpec(dim=dim, d_proj=64))
    other_targets = get_peft_model(tiny_llama(tokenizer), LoraConfig(r=4, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"epoch_0\.safetensors does not match adapter 'default'.*names 8 LoRA weights"):
        instruction_gradient_features(other_targets, [snap], examples, ProjectionSpec(dim=dim, d_proj=64))
