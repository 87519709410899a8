"""Speed and memory benchmarks: ``elrea-hf bench features | inference | efficiency``.

Every figure is measured side by side in one run, on the default backbone (SmolLM2-135M-Instruct)
unless ``--model`` says otherwise, and each cost is put next to its own floor:

* ``features`` (issue: gradient features): the naive LESS-style loop (one example at a time:
  autograd, then a dense projection of that one gradient) vs the batched extractor vs a plain
  forward+backward of the same instructions (the floor), plus how well the cheaper CountSketch
  projection preserves inner products and clusterings of the dense one on these features;
* ``inference``: base adapter alone vs ELREA (all experts, top-2), routing included, each part
  against its floor (routing vs a plain forward+backward per stored epoch; decode steps);
* ``efficiency``: the paper's Table 5 protocol (toy lorem-ipsum data, C=4, rank 8, 3 epochs,
  batch 4, 20 new tokens) scaled to this machine, every row with wall time and peak memory.

Peak memory on a CPU is the peak resident set size of a fresh process running only that phase
(``ru_maxrss``), so phases measured in one run do not inherit each other's high-water marks.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import tempfile
import time
from collections.abc import Sequence

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

GIB = 1024**3


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------


def _backbone(model: str | None) -> str:
    from .backbone import default_backbone

    return model or default_backbone()


def _lora_config(rank: int, targets: str):
    from peft import LoraConfig

    modules = "all-linear" if targets == "all-linear" else targets.split(",")
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=modules, task_type="CAUSAL_LM")


def _randomize_lora(peft_model, adapter: str, seed: int, scale: float = 0.02) -> None:
    """Non-zero, small LoRA weights (a fresh LoRA has B = 0, whose A-gradients vanish)."""
    from .features import lora_modules

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(peft_model, adapter).values():
            module.weight.copy_(scale * torch.randn(module.weight.shape, generator=g))


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def realistic_instructions(n: int, seed: int = 0, max_chars: int = 1500) -> tuple[list[str], list[str]]:
    """``n`` instructions of realistic length from ``../shared/data`` (GSM8K, SVAMP, MATH, BBH in
    equal shares, at most ``max_chars`` characters, about 400 tokens), with their source as a
    label; the embedded mixture if the data is absent."""
    from .data import load_shared_jsonl, shared_data_dir, skill_mixture

    try:
        shared_data_dir()
        sources = ["gsm8k_train", "svamp_train", "math_train", "bbh_shared"]
        texts, labels = [], []
        for i, name in enumerate(sources):
            k = n // len(sources) + (i < n % len(sources))
            ds = load_shared_jsonl(name, n=4 * k, seed=seed)
            kept = [t for t in (p[-1]["content"] if isinstance(p, list) else p for p in ds["prompt"])
                    if len(t) <= max_chars][:k]
            texts += kept
            labels += [name.split("_")[0]] * len(kept)
        return texts, labels
    except (FileNotFoundError, OSError):
        ds = skill_mixture("train", n=max(1, n // 8), seed=seed)
        return [p[-1]["content"] for p in ds["prompt"]][:n], list(ds["task"])[:n]


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def _in_fresh_process(fn_name: str, **kwargs) -> dict:
    """Run ``fn_name(**kwargs)`` of this module in a new process; its result gets the process's
    peak resident memory (``peak_mem_gib``)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_phase_entry, (fn_name, kwargs))


def _phase_entry(fn_name: str, kwargs: dict) -> dict:
    torch.set_num_threads(int(os.environ.get("ELREA_BENCH_THREADS", torch.get_num_threads())))
    result = globals()[fn_name](**kwargs)
    result["peak_mem_gib"] = round(_peak_rss_gib(), 3)
    return result


def _write(output: str, result: dict, markdown: str | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
    if markdown is not None:
        with open(os.path.splitext(output)[0] + ".md", "w") as f:
            f.write(markdown)
    print(json.dumps(result, indent=1))
    if markdown:
        print(markdown)


# ----------------------------------------------------------------------------------------------
# bench features
# ----------------------------------------------------------------------------------------------


def _feature_model(model_path: str, rank: int, targets: str, seed: int):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    backbone = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft = get_peft_model(backbone, _lora_config(rank, targets), adapter_name="default")
    _randomize_lora(peft, "default", seed)
    return peft, tok


def _adam_snapshot(model, examples, pad_id: int, steps: int = 2, lr: float = 1e-4):
    """A real Adam state: a few AdamW steps on the instruction loss of the examples."""
    from .features import EpochSnapshot, _pad_batch, instruction_losses, lora_modules

    modules = lora_modules(model, "default")
    params = [m.weight for m in modules.values()]
    opt = torch.optim.AdamW(params, lr=lr)
    model.eval()
    for s in range(steps):
        batch = examples[(8 * s) % len(examples):][:8]
        ids, att, mask = _pad_batch(batch, pad_id, "cpu")
        loss = instruction_losses(model(input_ids=ids, attention_mask=att).logits, ids, mask).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = opt.state
    names = list(modules)
    snap = EpochSnapshot(
        epoch=0, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8,
        weights={n: modules[n].weight.detach().clone() for n in names},
        exp_avg={n: state[modules[n].weight]["exp_avg"].clone() for n in names},
        exp_avg_sq={n: state[modules[n].weight]["exp_avg_sq"].clone() for n in names},
        step={n: float(state[modules[n].weight]["step"]) for n in names})
    opt.zero_grad(set_to_none=True)
    return snap


def _floor_pass(model, examples, pad_id: int, batch_size: int, repeats: int = 1,
                max_batch_tokens: int | None = None, adapter: str = "default") -> float:
    """Plain forward + backward of the instruction loss, whole batches, no per-sample work; batched
    like the extractor (the same length-sorted batches), so that both pay the same padding."""
    from .features import _length_sorted_batches, _pad_batch, instruction_losses, lora_modules

    params = [m.weight for m in lora_modules(model, adapter).values()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    batches = _length_sorted_batches([len(e.input_ids) for e in examples], batch_size, max_batch_tokens)
    model.eval()
    t0 = time.perf_counter()
    for _ in range(repeats):
        for rows in batches:
            ids, att, mask = _pad_batch([examples[i] for i in rows], pad_id, "cpu")
            with torch.enable_grad():
                loss = instruction_losses(model(input_ids=ids, attention_mask=att, use_cache=False).logits,
                                          ids, mask).sum()
                torch.autograd.grad(loss, params)
    seconds = time.perf_counter() - t0
    for p, f in zip(params, flags):
        p.requires_grad_(f)
    return seconds


def _naive_features(model, snapshot, examples, spec, pad_id: int) -> tuple[torch.Tensor, float]:
    """LESS-style: per example, its own autograd pass, Adam normalisation and dense projection."""
    from .features import _pad_batch, adam_normalize, instruction_losses, lora_modules
    from .projection import make_projector

    modules = lora_modules(model, "default")
    params = [m.weight for m in modules.values()]
    names, numels = list(modules), [p.numel() for p in params]
    model.eval()
    out = []
    t0 = time.perf_counter()
    for ex in examples:
        ids, att, mask = _pad_batch([ex], pad_id, "cpu")
        with torch.enable_grad():
            loss = instruction_losses(model(input_ids=ids, attention_mask=att, use_cache=False).logits,
                                      ids, mask).sum()
            grads = torch.autograd.grad(loss, params)
        flat = torch.cat([g.reshape(1, -1) for g in grads], dim=1)
        out.append(make_projector(spec).project(adam_normalize(flat, snapshot, names, numels)))
    return torch.cat(out), time.perf_counter() - t0


def _exact_adam_gradients(model, snapshot, examples, pad_id: int, batch_size: int) -> torch.Tensor:
    from .features import _pad_batch, adam_normalize, lora_modules, lora_per_sample_gradients

    modules = lora_modules(model, "default")
    names, numels = list(modules), [m.weight.numel() for m in modules.values()]
    rows = []
    for b in range(0, len(examples), batch_size):
        ids, att, mask = _pad_batch(examples[b:b + batch_size], pad_id, "cpu")
        rows.append(adam_normalize(lora_per_sample_gradients(model, ids, att, mask), snapshot, names, numels))
    return torch.cat(rows)


def _isometric_coordinates(x: torch.Tensor, chunk: int = 1 << 17) -> torch.Tensor:
    """[n, n] coordinates of the rows of ``x`` [n, dim] with exactly their inner products (from the
    Gram matrix, accumulated in float64 column chunks): distances, cosines and so clusterings of
    the n points are those of ``x``, without clustering millions of dimensions."""
    gram = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64)
    for c in range(0, x.shape[1], chunk):
        xc = x[:, c:c + chunk].double()
        gram += xc @ xc.T
    w, v = torch.linalg.eigh(gram)
    return v * w.clamp_min(0).sqrt()


def _cosines(x: torch.Tensor) -> torch.Tensor:
    x = torch.nn.functional.normalize(x.double(), dim=1)
    return x @ x.T


def _distortion(reference: torch.Tensor, projected: torch.Tensor) -> dict:
    """Inner-product error of unit vectors after projection (off-diagonal cosines)."""
    ref, got = _cosines(reference), _cosines(projected)
    off = ~torch.eye(len(ref), dtype=torch.bool)
    err = (ref - got).abs()[off]
    return {"mean_abs_cos_error": round(float(err.mean()), 5), "max_abs_cos_error": round(float(err.max()), 5)}


def _clusters(features: torch.Tensor, k: int, seed: int):
    from .clustering import GradientClusterer

    x = torch.nn.functional.normalize(features.float(), dim=1).numpy()
    return GradientClusterer(initial_clusters=k, max_balance_rounds=0, min_cluster_size=1, random_state=seed).fit_predict(x)


def bench_features(model: str | None = None, n: int = 128, batch_size: int = 8, d_proj: int = 8192, rank: int = 8,
                   targets: str = "all-linear", naive_examples: int = 4, seed: int = 0,
                   cluster_ks: Sequence[int] = (4, 8, 16)) -> dict:
    """Issue 3's benchmark: naive loop vs batched extractor vs the plain forward+backward floor, for
    both projection kinds, and each kind's inner-product distortion and clustering agreement (ARI at
    several cluster counts) against the unprojected Adam-normalised gradients of the same examples.
    The top-level figures are those of the default projection (:class:`ProjectionSpec`)."""
    from sklearn.metrics import adjusted_rand_score

    from .features import InstructionMasker, examples_from_prompts, instruction_gradient_features, lora_dimension
    from .projection import PROJECTION_KINDS, ProjectionSpec, make_projector

    torch.manual_seed(seed)
    path = _backbone(model)
    peft, tok = _feature_model(path, rank, targets, seed)
    texts, labels = realistic_instructions(n, seed)
    examples = examples_from_prompts(InstructionMasker(tok), texts)
    pad = tok.pad_token_id or 0
    snap = _adam_snapshot(peft, examples, pad)
    dim = lora_dimension(peft, "default")
    specs = {kind: ProjectionSpec(dim=dim, d_proj=d_proj, seed=seed, kind=kind) for kind in PROJECTION_KINDS}
    default_kind = ProjectionSpec(dim=dim).kind
    lengths = [len(e.input_ids) for e in examples]
    content = [sum(e.loss_mask) for e in examples]

    _floor_pass(peft, examples[:batch_size], pad, batch_size)  # warm-up (allocator, kernels)
    floor_s = _floor_pass(peft, examples, pad, batch_size)
    feats, batched_s, projection_s = {}, {}, {}
    for kind, spec in specs.items():
        feats[kind], batched_s[kind] = _timed(instruction_gradient_features, peft, [snap], examples, spec,
                                              batch_size=batch_size, pad_token_id=pad)
        probe = torch.randn(n, dim)
        _, projection_s[kind] = _timed(make_projector(spec).project, probe)
        del probe
    naive, naive_measured_s = _naive_features(peft, snap, examples[:naive_examples], specs["rademacher"], pad)
    naive_s = naive_measured_s / naive_examples * n
    agree = torch.nn.functional.cosine_similarity(naive, feats["rademacher"][:naive_examples], dim=1).min().item()

    # The unprojected gradients are n x 2.4M: keep only coordinates with the same geometry.
    exact = _isometric_coordinates(_exact_adam_gradients(peft, snap, examples, pad, batch_size))
    ks = sorted({k for k in cluster_ks if 2 <= k <= n // 2})
    exact_labels = {k: _clusters(exact, k, seed) for k in ks}
    kind_labels = {kind: {k: _clusters(f, k, seed) for k in ks} for kind, f in feats.items()}
    per_kind = {
        kind: {
            "batched_s": round(batched_s[kind], 2), "projection_s": round(projection_s[kind], 3),
            "projection_share": round(projection_s[kind] / batched_s[kind], 3),
            "speedup_vs_naive": round(naive_s / batched_s[kind], 2),
            "ratio_to_floor": round(batched_s[kind] / floor_s, 3),
            "distortion_vs_exact": _distortion(exact, feats[kind]),
            "ari_vs_exact": {str(k): round(adjusted_rand_score(exact_labels[k], kind_labels[kind][k]), 4) for k in ks},
        }
        for kind in specs
    }
    per_kind["countsketch"]["ari_vs_rademacher"] = {
        str(k): round(adjusted_rand_score(kind_labels["rademacher"][k], kind_labels["countsketch"][k]), 4) for k in ks}
    d = per_kind[default_kind]
    return {
        "naive_s": round(naive_s, 2), "batched_s": d["batched_s"], "floor_s": round(floor_s, 2),
        "projection_s": d["projection_s"], "speedup_vs_naive": d["speedup_vs_naive"],
        "ratio_to_floor": d["ratio_to_floor"], "projection_share": d["projection_share"],
        "default_projection": default_kind, "projections": per_kind,
        "naive_vs_batched_min_cosine": round(agree, 6),
        "ari_exact_vs_source": {str(k): round(adjusted_rand_score(labels, exact_labels[k]), 4) for k in ks},
        "setup": {
            "model": path, "n_instructions": n, "batch_size": batch_size, "d_proj": d_proj, "lora_rank": rank,
            "target_modules": targets, "lora_params": dim, "tokens_mean": round(sum(lengths) / n, 1),
            "content_tokens_mean": round(sum(content) / n, 1), "sources": sorted(set(labels)),
            "naive_projection": "rademacher",
            "naive_measured_examples": naive_examples, "naive_measured_s": round(naive_measured_s, 2),
            "naive_s_note": "naive_s = naive_measured_s / naive_measured_examples * n_instructions",
            "threads": torch.get_num_threads(), "cluster_ks": ks,
            "clustering": "GradientClusterer (BIRCH), no balancing rounds, on unit features",
        },
    }


# ----------------------------------------------------------------------------------------------
# bench inference
# ----------------------------------------------------------------------------------------------


def synthetic_bundle(model_path: str, out_dir: str, n_experts: int = 4, rank: int = 8, targets: str = "all-linear",
                     d_proj: int = 8192, n_epochs: int = 2, projection_kind: str = "countsketch", seed: int = 0) -> str:
    """A bundle with random (small) adapters, Adam state and centroids on a real backbone: what
    the speed benchmarks need without training (cost does not depend on the values)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .features import lora_dimension
    from .modeling import ELREAForCausalLM
    from .projection import ProjectionSpec
    from .testing import random_epoch_snapshots

    tok = AutoTokenizer.from_pretrained(model_path)
    backbone = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft = get_peft_model(backbone, _lora_config(rank, targets), adapter_name="base")
    names = ["base"] + [f"expert_{c}" for c in range(n_experts)]
    for name in names[1:]:
        peft.add_adapter(name, _lora_config(rank, targets))
    for i, name in enumerate(names):
        _randomize_lora(peft, name, seed + i)
    g = torch.Generator().manual_seed(seed)
    snaps = random_epoch_snapshots(peft, "base", n_epochs, g, lr=1e-4, m_scale=1e-4, v_scale=1e-8, steps_per_epoch=50)
    centroids = torch.nn.functional.normalize(torch.randn(n_experts, d_proj, generator=g), dim=1)
    spec = ProjectionSpec(dim=lora_dimension(peft, "base"), d_proj=d_proj, seed=seed, kind=projection_kind)
    ensemble = ELREAForCausalLM.from_parts(peft, tok, centroids, snaps, base_model_name_or_path=model_path,
                                           expert_names=names[1:], projection=spec, cluster_sizes=[1] * n_experts)
    ensemble.save_pretrained(out_dir)
    return out_dir


class _StepClock:
    """A logits processor that only records when each decoding step's logits are ready."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores

    def mean_step(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return sum(gaps) / len(gaps) if gaps else float("nan")


def inference_prompts(tokenizer, n: int, prompt_tokens: int, seed: int = 0) -> list[str]:
    """``n`` user messages of about ``prompt_tokens`` tokens once chat-templated (shared data
    instructions, extended with further instructions when too short)."""
    texts, _ = realistic_instructions(4 * n, seed)
    rng = random.Random(seed)
    empty = tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=False)
    overhead = len(tokenizer(empty, add_special_tokens=False)["input_ids"])
    budget = max(1, prompt_tokens - overhead)
    out = []
    for i in range(n):
        ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        while len(ids) < budget:
            ids += tokenizer(" " + rng.choice(texts), add_special_tokens=False)["input_ids"]
        out.append(tokenizer.decode(ids[:budget], skip_special_tokens=True).strip())
    return out


def _encode(tok, prompts: Sequence[str]):
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _generate_timed(model, tok, prompts, batch_size: int, new_tokens: int, **kwargs) -> dict:
    from transformers import LogitsProcessorList

    steps, total = [], 0.0
    for b in range(0, len(prompts), batch_size):
        enc = _encode(tok, prompts[b:b + batch_size])
        clock = _StepClock()
        t0 = time.perf_counter()
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tok.pad_token_id, logits_processor=LogitsProcessorList([clock]), **kwargs)
        total += time.perf_counter() - t0
        steps.append(clock.mean_step())
    return {"generate_s": total, "decode_step_s": sum(steps) / len(steps)}


def _phase_base_inference(bundle: str, prompts: list[str], batch_size: int, new_tokens: int) -> dict:
    """M + Q_base alone: a plain PEFT model, as a user without ELREA would run it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config import ELREAConfig

    cfg = ELREAConfig.from_pretrained(bundle)
    tok = AutoTokenizer.from_pretrained(bundle)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.base_model_name_or_path),
                                      os.path.join(bundle, "base")).eval()
    _generate_timed(model, tok, prompts[:batch_size], batch_size, 2)  # warm-up
    out = _generate_timed(model, tok, prompts, batch_size, new_tokens)
    return {"base_s": out["generate_s"], "decode_step_base_s": out["decode_step_s"]}


def _phase_elrea_inference(bundle: str, prompts: list[str], batch_size: int, new_tokens: int,
                           top_k: int | None = None, with_floor: bool = False) -> dict:
    import elrea_hf  # noqa: F401  (registers the auto classes)
    from transformers import AutoModelForCausalLM

    from .features import load_lora_state, lora_state

    model = AutoModelForCausalLM.from_pretrained(bundle)
    model.routing_config.top_k = top_k
    tok = model.tokenizer
    model.route(prompts[:1])  # warm-up
    routing_s, weights = 0.0, []
    for b in range(0, len(prompts), batch_size):
        w, dt = _timed(model.route, prompts[b:b + batch_size], batch_size=batch_size)
        routing_s += dt
        weights.append(w)
    weights = torch.cat(weights)
    _generate_timed(model, tok, prompts[:batch_size], batch_size, 2, routing_weights=weights[:batch_size])
    gen = {"generate_s": 0.0, "steps": []}
    for b in range(0, len(prompts), batch_size):
        out = _generate_timed(model, tok, prompts[b:b + batch_size], batch_size, new_tokens,
                              routing_weights=weights[b:b + batch_size])
        gen["generate_s"] += out["generate_s"]
        gen["steps"].append(out["decode_step_s"])
    result = {"routing_s": routing_s, "generate_s": gen["generate_s"], "total_s": routing_s + gen["generate_s"],
              "decode_step_s": sum(gen["steps"]) / len(gen["steps"]),
              "rows_per_prompt": float((weights != 0).sum(1).float().mean())}
    if with_floor:
        # Floor of routing: one plain forward+backward of the same prompts per stored epoch, in the
        # same batches as route() forms.
        from .features import InstructionExample

        peft, adapter = model.peft_model, model.config.feature_adapter
        examples = [InstructionExample(ids, model.masker.mask(ids)) for ids in map(model.masker.render, prompts)]
        saved = lora_state(peft, adapter)
        peft.set_adapter(adapter)
        seconds = 0.0
        for snap in model.snapshots:
            load_lora_state(peft, adapter, snap.weights)
            for b in range(0, len(examples), batch_size):
                seconds += _floor_pass(peft, examples[b:b + batch_size], tok.pad_token_id or 0, batch_size,
                                       max_batch_tokens=model.config.routing_max_batch_tokens, adapter=adapter)
        result["routing_floor_s"] = seconds
        load_lora_state(peft, adapter, saved)
    return result


def bench_inference(model: str | None = None, n_prompts: int = 8, batch_size: int = 4, prompt_tokens: int = 200,
                    new_tokens: int = 20, n_experts: int = 4, rank: int = 8, targets: str = "all-linear",
                    d_proj: int = 8192, projection_kind: str = "countsketch", seed: int = 0,
                    work_dir: str | None = None) -> dict:
    from transformers import AutoTokenizer

    path = _backbone(model)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = inference_prompts(tok, n_prompts, prompt_tokens, seed)
    lengths = [len(_encode(tok, [p])["input_ids"][0]) for p in prompts]
    results = {}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        kinds = [projection_kind] if projection_kind != "both" else ["countsketch", "rademacher"]
        for kind in kinds:
            bundle = os.path.join(tmp, f"bundle-{kind}")
            synthetic_bundle(path, bundle, n_experts=n_experts, rank=rank, targets=targets, d_proj=d_proj,
                             projection_kind=kind, seed=seed)
            if not results:
                results["base"] = _in_fresh_process("_phase_base_inference", bundle=bundle, prompts=prompts,
                                                     batch_size=batch_size, new_tokens=new_tokens)
                results["elrea"] = _in_fresh_process("_phase_elrea_inference", bundle=bundle, prompts=prompts,
                                                      batch_size=batch_size, new_tokens=new_tokens, with_floor=True)
                results["elrea_top2"] = _in_fresh_process("_phase_elrea_inference", bundle=bundle, prompts=prompts,
                                                           batch_size=batch_size, new_tokens=new_tokens, top_k=2)
            else:  # the other projection kind: routing cost only
                results[f"elrea_{kind}"] = _in_fresh_process("_phase_elrea_inference", bundle=bundle, prompts=prompts,
                                                             batch_size=batch_size, new_tokens=1)
    base, elrea, top2 = results["base"], results["elrea"], results["elrea_top2"]
    out = {
        "base_s": round(base["base_s"], 3), "elrea_s": round(elrea["total_s"], 3), "elrea_top2_s": round(top2["total_s"], 3),
        "routing_s": round(elrea["routing_s"], 3), "routing_floor_s": round(elrea["routing_floor_s"], 3),
        "routing_ratio_to_floor": round(elrea["routing_s"] / elrea["routing_floor_s"], 3),
        "elrea_generate_s": round(elrea["generate_s"], 3), "elrea_top2_generate_s": round(top2["generate_s"], 3),
        "decode_step_base_s": round(base["decode_step_base_s"], 4), "decode_step_elrea_s": round(elrea["decode_step_s"], 4),
        "decode_step_elrea_top2_s": round(top2["decode_step_s"], 4),
        "decode_step_ratio": round(elrea["decode_step_s"] / base["decode_step_base_s"], 3),
        "base_peak_mem_gib": base["peak_mem_gib"], "elrea_peak_mem_gib": elrea["peak_mem_gib"],
        "elrea_top2_peak_mem_gib": top2["peak_mem_gib"],
        "time_ratio": round(elrea["total_s"] / base["base_s"], 3), "time_ratio_top2": round(top2["total_s"] / base["base_s"], 3),
        "generate_ratio": round(elrea["generate_s"] / base["base_s"], 3),
        "memory_ratio": round(elrea["peak_mem_gib"] / base["peak_mem_gib"], 3),
        "rows_per_prompt": {"elrea": elrea["rows_per_prompt"], "elrea_top2": top2["rows_per_prompt"]},
        "setup": {"model": path, "n_prompts": n_prompts, "batch_size": batch_size, "prompt_tokens_mean":
                  round(sum(lengths) / len(lengths), 1), "new_tokens": new_tokens, "n_experts": n_experts,
                  "lora_rank": rank, "target_modules": targets, "d_proj": d_proj, "projection": projection_kind,
                  "gradient_epochs": 2, "threads": torch.get_num_threads(),
                  "memory": "peak RSS of a fresh process running only that phase (backbone load included)"},
    }
    for k, v in results.items():
        if k.startswith("elrea_") and k != "elrea_top2":
            out[f"routing_s_{k[6:]}"] = round(v["routing_s"], 3)
    return out


# ----------------------------------------------------------------------------------------------
# bench efficiency (paper Table 5)
# ----------------------------------------------------------------------------------------------

_LOREM = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore "
          "et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip ex "
          "ea commodo consequat duis aute irure in reprehenderit voluptate velit esse cillum fugiat nulla pariatur "
          "excepteur sint occaecat cupidatat non proident sunt culpa qui officia deserunt mollit anim id est "
          "laborum").split()


def lorem_dataset(n: int, words: int, seed: int):
    """The paper's toy data: ``words`` random lorem-ipsum words in both instruction and answer."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = [{"prompt": [{"role": "user", "content": " ".join(rng.choices(_LOREM, k=words))}],
             "completion": [{"role": "assistant", "content": " ".join(rng.choices(_LOREM, k=words))}],
             "task": "lorem"} for _ in range(n)]
    return Dataset.from_list(rows)


class _TimedCallback:
    """Wraps ELREAGradientCallback's epoch-end work in a stopwatch."""

    @staticmethod
    def make(**kwargs):
        from .callback import ELREAGradientCallback

        class Timed(ELREAGradientCallback):
            seconds = 0.0

            def on_epoch_end(self, *a, **k):
                t0 = time.perf_counter()
                try:
                    return super().on_epoch_end(*a, **k)
                finally:
                    Timed.seconds += time.perf_counter() - t0

            def on_train_end(self, *a, **k):
                t0 = time.perf_counter()
                try:
                    return super().on_train_end(*a, **k)
                finally:
                    Timed.seconds += time.perf_counter() - t0

        return Timed(**kwargs)


def _sft_config(out: str, epochs: float, batch_size: int, lr: float, seed: int):
    from trl import SFTConfig

    return SFTConfig(output_dir=out, use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
                     gradient_checkpointing=False, optim="adamw_torch", learning_rate=lr, lr_scheduler_type="linear",
                     num_train_epochs=epochs, per_device_train_batch_size=batch_size, max_length=512,
                     logging_steps=50, save_strategy="no", report_to=[], seed=seed, dataloader_num_workers=0,
                     disable_tqdm=True)


def _phase_finetune(model_path: str, work: str, n_train: int, words: int, epochs: int, batch_size: int,
                    n_experts: int, rank: int, targets: str, d_proj: int, projection_kind: str, seed: int) -> dict:
    """Base fine-tuning with the gradient callback (its time kept apart), the floor of the training
    features, clustering and the experts; writes the bundle to ``work/bundle``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from .builder import ELREABuilder
    from .callback import prompt_examples_from_tokenized
    from .clustering import GradientClusterer
    from .features import InstructionMasker

    tok = AutoTokenizer.from_pretrained(model_path)
    data = lorem_dataset(n_train, words, seed)
    callback = _TimedCallback.make(d_proj=d_proj, projection_seed=seed, projection_kind=projection_kind,
                                   batch_size=batch_size, output_dir=os.path.join(work, "elrea"))
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_path),
                         args=_sft_config(os.path.join(work, "run"), epochs, batch_size, 2e-4, seed),
                         train_dataset=data, processing_class=tok, peft_config=_lora_config(rank, targets),
                         callbacks=[callback])
    _, train_total = _timed(trainer.train)
    features_s = type(callback).seconds
    examples = prompt_examples_from_tokenized(trainer.train_dataset, InstructionMasker(tok))
    prompt_tokens = sum(len(e.input_ids) for e in examples) / len(examples)
    full_tokens = sum(len(x) for x in trainer.train_dataset["input_ids"]) / len(examples)
    # Floor of the training features: plain forward+backward over all instructions, once per epoch.
    floor_s = _floor_pass(trainer.model, examples, tok.pad_token_id or 0, batch_size, repeats=len(callback.snapshots()))
    builder = ELREABuilder.from_trainer(
        trainer, callback, base_model_name_or_path=model_path, expert_learning_rate=2e-5,
        clusterer=GradientClusterer(initial_clusters=n_experts, max_balance_rounds=0, random_state=seed),
        work_dir=os.path.join(work, "experts"))
    _, clustering_s = _timed(builder.cluster)
    _, experts_s = _timed(builder.train_experts)
    _, bundle_s = _timed(builder.build, os.path.join(work, "bundle"), overwrite=True)
    return {"base_finetune_s": train_total - features_s, "train_features_s": features_s,
            "train_features_floor_s": floor_s, "clustering_s": clustering_s, "experts_finetune_s": experts_s,
            "bundle_write_s": bundle_s, "cluster_sizes": builder.report_["sizes"],
            "prompt_tokens_mean": round(prompt_tokens, 1), "example_tokens_mean": round(full_tokens, 1)}


def _phase_test_features(bundle: str, prompts: list[str], batch_size: int) -> dict:
    import elrea_hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bundle)
    _, seconds = _timed(model.route, prompts, batch_size=batch_size)
    return {"test_features_s": seconds}


def bench_efficiency(model: str | None = None, n_train: int = 96, n_test: int = 16, words: int = 20, epochs: int = 3,
                     batch_size: int = 4, new_tokens: int = 20, n_experts: int = 4, rank: int = 8,
                     targets: str = "all-linear", d_proj: int = 8192, projection_kind: str = "countsketch",
                     seed: int = 0, work_dir: str | None = None) -> dict:
    path = _backbone(model)
    test = lorem_dataset(n_test, words, seed + 1)
    prompts = [p[-1]["content"] for p in test["prompt"]]
    with tempfile.TemporaryDirectory(dir=work_dir) as work:
        ft = _in_fresh_process("_phase_finetune", model_path=path, work=work, n_train=n_train, words=words,
                               epochs=epochs, batch_size=batch_size, n_experts=n_experts, rank=rank, targets=targets,
                               d_proj=d_proj, projection_kind=projection_kind, seed=seed)
        bundle = os.path.join(work, "bundle")
        test_feats = _in_fresh_process("_phase_test_features", bundle=bundle, prompts=prompts, batch_size=batch_size)
        base = _in_fresh_process("_phase_base_inference", bundle=bundle, prompts=prompts, batch_size=batch_size,
                                 new_tokens=new_tokens)
        elrea = _in_fresh_process("_phase_elrea_inference", bundle=bundle, prompts=prompts, batch_size=batch_size,
                                  new_tokens=new_tokens)
    elrea_total = ft["base_finetune_s"] + ft["train_features_s"] + ft["clustering_s"] + ft["experts_finetune_s"] \
        + test_feats["test_features_s"]
    out = {
        "base_finetune_s": round(ft["base_finetune_s"], 2), "train_features_s": round(ft["train_features_s"], 2),
        "train_features_floor_s": round(ft["train_features_floor_s"], 2),
        "test_features_s": round(test_feats["test_features_s"], 2), "clustering_s": round(ft["clustering_s"], 3),
        "experts_finetune_s": round(ft["experts_finetune_s"], 2), "elrea_finetune_total_s": round(elrea_total, 2),
        "base_infer_s": round(base["base_s"], 2), "elrea_infer_s": round(elrea["generate_s"], 2),
        "elrea_infer_with_routing_s": round(elrea["total_s"], 2),
        "finetune_peak_mem_gib": ft["peak_mem_gib"], "test_features_peak_mem_gib": test_feats["peak_mem_gib"],
        "base_peak_mem_gib": base["peak_mem_gib"], "elrea_peak_mem_gib": elrea["peak_mem_gib"],
        "finetune_ratio": round(elrea_total / ft["base_finetune_s"], 3),
        "infer_ratio": round(elrea["generate_s"] / base["base_s"], 3),
        "memory_ratio": round(elrea["peak_mem_gib"] / base["peak_mem_gib"], 3),
        "train_features_ratio_to_floor": round(ft["train_features_s"] / ft["train_features_floor_s"], 3),
        "experts_ratio_to_base": round(ft["experts_finetune_s"] / ft["base_finetune_s"], 3),
        "clustering_share_of_total": round(ft["clustering_s"] / elrea_total, 5),
        "paper": {"finetune_ratio": 2.33, "infer_ratio": 2.3, "memory_ratio": 2.4},
        "setup": {"model": path, "n_train": n_train, "n_test": n_test, "words_per_text": words, "epochs": epochs,
                  "batch_size": batch_size, "new_tokens": new_tokens, "n_experts": n_experts, "lora_rank": rank,
                  "target_modules": targets, "d_proj": d_proj, "projection": projection_kind,
                  "cluster_sizes": ft["cluster_sizes"], "prompt_tokens_mean": ft["prompt_tokens_mean"],
                  "example_tokens_mean": ft["example_tokens_mean"], "threads": torch.get_num_threads(),
                  "scale": f"{n_train}/{n_test} samples of {words} words vs the paper's 2000/400 of 60 words",
                  "memory": "peak RSS of a fresh process running only that phase (backbone load included)"},
    }
    return out


def efficiency_markdown(r: dict) -> str:
    rows = [
        ("Fine-tuning base adapter Q_base", r["base_finetune_s"], r["finetune_peak_mem_gib"], r["base_finetune_s"],
         r["finetune_peak_mem_gib"]),
        ("Training gradient features", "–", "–", r["train_features_s"], r["finetune_peak_mem_gib"]),
        ("  (floor: plain fwd+bwd of the instructions, every epoch)", "–", "–", r["train_features_floor_s"], ""),
        ("Test gradient features", "–", "–", r["test_features_s"], r["test_features_peak_mem_gib"]),
        ("Clustering", "–", "–", r["clustering_s"], ""),
        ("Fine-tuning experts on clusters", "–", "–", r["experts_finetune_s"], r["finetune_peak_mem_gib"]),
        ("Fine-tuning total", r["base_finetune_s"], "–", r["elrea_finetune_total_s"], "–"),
        ("Inference", r["base_infer_s"], r["base_peak_mem_gib"], r["elrea_infer_s"], r["elrea_peak_mem_gib"]),
    ]
    lines = ["| step | M + Q_base time (s) | memory (GiB) | ELREA time (s) | memory (GiB) |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    s = r["setup"]
    lines += ["", f"Ratios (ELREA / base): fine-tuning {r['finetune_ratio']} (paper 2.33), inference "
              f"{r['infer_ratio']} (paper 2.3), memory {r['memory_ratio']} (paper 2.4). Against their floors: "
              f"training features {r['train_features_ratio_to_floor']}x a plain forward+backward, experts "
              f"{r['experts_ratio_to_base']}x the base fine-tuning, clustering {100 * r['clustering_share_of_total']:.3f}% "
              "of the total.", "",
              "Where the fine-tuning ratio comes from, each row as a multiple of the base fine-tuning: "
              + ", ".join(f"{name} {r[key] / r['base_finetune_s']:.2f}" for name, key in (
                  ("training features", "train_features_s"), ("their floor", "train_features_floor_s"),
                  ("test features", "test_features_s"), ("clustering", "clustering_s"),
                  ("experts", "experts_finetune_s")))
              + f" (total {r['finetune_ratio']} = 1 + the rows but the floor).", "", f"Scale: {s['scale']}; {s['epochs']} epochs, batch {s['batch_size']}, "
              f"C={s['n_experts']}, rank {s['lora_rank']} ({s['target_modules']}), {s['new_tokens']} new tokens, "
              f"projection {s['projection']} d_proj={s['d_proj']}, {s['threads']} CPU threads. Memory: {s['memory']}."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def add_parsers(sub) -> None:
    """Register ``features``, ``inference`` and ``efficiency`` under ``elrea-hf bench``."""
    f = sub.add_parser("features", help="gradient-feature extraction: naive loop vs batched vs floor")
    f.add_argument("--n", type=int, default=128, help="instructions")
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--naive-examples", type=int, default=4, help="examples the naive loop is timed on")
    _common(f)
    f.set_defaults(bench=lambda a: _write(a.output, bench_features(
        a.model, a.n, a.batch_size, a.d_proj, a.lora_r, a.target_modules, a.naive_examples, a.seed)))
    i = sub.add_parser("inference", help="base adapter vs ELREA inference, routing included")
    i.add_argument("--n-prompts", type=int, default=8)
    i.add_argument("--batch-size", type=int, default=4)
    i.add_argument("--prompt-tokens", type=int, default=200)
    i.add_argument("--new-tokens", type=int, default=20)
    i.add_argument("--experts", type=int, default=4)
    i.add_argument("--projection", default="both", choices=["countsketch", "rademacher", "both"],
                   help="projection of the synthetic bundle; 'both' also times routing with the dense one")
    _common(i)
    i.set_defaults(bench=lambda a: _write(a.output, bench_inference(
        a.model, a.n_prompts, a.batch_size, a.prompt_tokens, a.new_tokens, a.experts, a.lora_r, a.target_modules,
        a.d_proj, a.projection, a.seed)))
    e = sub.add_parser("efficiency", help="the paper's Table 5 protocol, scaled to this machine")
    e.add_argument("--n-train", type=int, default=96)
    e.add_argument("--n-test", type=int, default=16)
    e.add_argument("--words", type=int, default=20, help="lorem-ipsum words per instruction and per answer")
    e.add_argument("--epochs", type=int, default=3)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--new-tokens", type=int, default=20)
    e.add_argument("--experts", type=int, default=4)
    e.add_argument("--projection", default="countsketch", choices=["countsketch", "rademacher"],
                   help="projection of the gradient features (default: the library's)")
    _common(e)

    def run_efficiency(a):
        r = bench_efficiency(a.model, a.n_train, a.n_test, a.words, a.epochs, a.batch_size, a.new_tokens, a.experts,
                             a.lora_r, a.target_modules, a.d_proj, a.projection, a.seed)
        _write(a.output, r, efficiency_markdown(r))

    e.set_defaults(bench=run_efficiency)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="JSON file for the figures")
    p.add_argument("--model", default=None, help="backbone (default: SmolLM2-135M-Instruct, offline)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--target-modules", default="all-linear")
    p.add_argument("--d-proj", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
