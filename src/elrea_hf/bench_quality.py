"""``elrea-hf bench quality``: ELREA against the paper's baselines on the same held-out prompts.

Stages (each cached in ``--work-dir`` and reused when the command is run again with the same
settings): the ELREA bundle (base adapter, gradient features, clusters, experts), the continued base,
the random-cluster experts, the instruction-embedding experts, the LoRA-ensemble members, the test
routing weights and every method's predictions. Outputs: ``FILE.json`` (per-task accuracy, micro
average, n, paired differences vs ``base`` and ``base_continued`` with 95% bootstrap intervals,
cluster report, setup, seconds per stage), ``FILE.md`` (a table like the paper's Table 1),
``FILE.routing.png`` (mean routing weight per cluster by task, Figure 2) and
``FILE.clusters.png`` (cluster composition by task, Figure 4).

Default sizes (6 skills, 50 train and 50 test prompts per skill, 2 epochs, 8 new tokens) are chosen
to finish in about 75 minutes on 2 CPU cores; see ``estimate_cost``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

DEFAULT_BENCH_SKILLS = ("addition", "uppercase", "first_letters", "word_count", "compare", "unit_conversion")
ALL_METHODS = ("base", "base_continued", "uniform", "random_cluster", "moe_routing", "moe_merging",
               "moe_merging_uniform", "instruction_embedding", "lora_ensembles", "self_consistency", "elrea",
               "elrea_topk")


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``quality`` to the ``bench`` sub-parsers ``sub``; sets ``func=run`` on the namespace."""
    p = sub.add_parser("quality", help="ELREA vs the paper's baselines on the same held-out prompts")
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="results JSON; .md and .png files are written next to it")
    p.add_argument("--work-dir", default=None, help="cache of trained stages (default: <output stem>.work)")
    p.add_argument("--data", choices=["mixture", "math-combined"], default="mixture")
    p.add_argument("--skills", default=",".join(DEFAULT_BENCH_SKILLS), help="mixture skills, comma separated")
    p.add_argument("--n-train", type=int, default=50, help="training examples per skill (per source for math)")
    p.add_argument("--n-test", type=int, default=50, help="test prompts per skill (per source for math)")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--lr", type=float, default=5e-4, help="base adapter learning rate")
    p.add_argument("--expert-lr", type=float, default=2e-4, help="expert (and continued-base) learning rate")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--target-modules", default="q_proj,v_proj")
    p.add_argument("--d-proj", type=int, default=8192)
    p.add_argument("--clusters", type=int, default=5, help="initial BIRCH clusters")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 8 (mixture), 256 (math)")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--n-ensemble", type=int, default=3, help="extra independently trained adapters (lora_ensembles)")
    p.add_argument("--n-samples", type=int, default=5, help="self-consistency samples")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma separated subset of " + ",".join(ALL_METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)  # tests: a tiny backbone folder
    p.add_argument("--embedding-model", default=None, help=argparse.SUPPRESS)


def main(argv=None) -> dict:
    """Standalone entry point: ``python -m elrea_hf.bench_quality --output FILE.json ...``."""
    p = argparse.ArgumentParser(prog="elrea-hf bench quality", description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    return run(p.parse_args(argv))


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _sft_config(output_dir, args, lr, seed=None):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir, use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
        gradient_checkpointing=False, optim="adamw_torch", learning_rate=lr, lr_scheduler_type="linear",
        num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        max_length=1024 if args.data == "math-combined" else 512, logging_steps=10, save_strategy="no",
        report_to=[], seed=args.seed if seed is None else seed, dataloader_num_workers=0,
        disable_tqdm=not sys.stderr.isatty(),
    )


def _lora_config(args):
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=args.target_modules.split(","))


def _data(args):
    from .data import math_combined, skill_mixture

    if args.data == "math-combined":
        return (math_combined("train", n_per_source=args.n_train, seed=args.seed),
                math_combined("test", n_per_source=args.n_test, seed=args.seed))
    skills = [s for s in args.skills.split(",") if s]
    return (skill_mixture("train", n=args.n_train, seed=args.seed, skills=skills),
            skill_mixture("test", n=args.n_test, seed=args.seed, skills=skills))


def _checker(args):
    """``check(task, prediction, answer)``: the mixture's skill checkers, or for math the last
    ``\\boxed{}`` / final-number answer with numeric normalisation (``evaluation``)."""
    if args.data == "mixture":
        from .data import check_answer

        return check_answer
    from .evaluation import math_answers_match

    return lambda task, pred, ans: math_answers_match(pred, ans)


def _score(preds, test, check, whole_text: bool):
    """Exact match per prompt: the first line of the output for the mixture's short answers, the
    whole output for math (its answer comes at the end of a solution)."""
    from .evaluation import first_line

    return [bool(check(t, p if whole_text else first_line(p), a))
            for p, a, t in zip(preds, test["answer"], test["task"])]


class _Stages:
    """Seconds per stage; a stage's result file records its first run's time when reused."""

    def __init__(self, work_dir):
        self.work_dir = work_dir
        self.times: dict[str, dict] = {}
        os.makedirs(work_dir, exist_ok=True)
        self._path = os.path.join(work_dir, "stage_times.json")
        self._saved = json.load(open(self._path)) if os.path.isfile(self._path) else {}

    def run(self, name, fn, done: bool = False):
        t0 = time.time()
        out = fn()
        dt = time.time() - t0
        reused = done or (dt < 1.0 and name in self._saved)
        self.times[name] = {"seconds": round(dt, 1), "reused": bool(reused)}
        if reused and name in self._saved:
            self.times[name]["first_run_seconds"] = self._saved[name]
        else:
            self._saved[name] = round(dt, 1)
            with open(self._path, "w") as f:
                json.dump(self._saved, f, indent=1)
        logger.warning(f"bench stage {name}: {dt:.0f} s{' (reused)' if reused else ''}")
        return out


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached_predictions(work_dir, name, key, fn):
    path = os.path.join(work_dir, "predictions", f"{name}.json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            return saved["predictions"]
    preds = fn()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"key": key, "predictions": preds}, f)
    os.replace(path + ".tmp", path)
    return preds


def _cached_tensor(path, key, fn):
    """A tensor (or flat dict of tensors) computed once and kept as safetensors (never pickle)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if os.path.isfile(path):
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") == key:
            tensors = load_file(path)
            return tensors["value"] if meta.get("single") == "1" else tensors
    value = fn()
    single = isinstance(value, torch.Tensor)
    tensors = {"value": value} if single else value
    save_file({k: v.contiguous() for k, v in tensors.items()}, path + ".tmp",
              metadata={"key": key, "single": "1" if single else "0"})
    os.replace(path + ".tmp", path)
    return value


def _elrea_stage(args, model, train, work):
    """Build (or reuse) the ELREA bundle; returns (ensemble, labels, report)."""
    from . import ELREAGradientCallback, ELREAForCausalLM
    from .builder import ELREABuilder
    from .clustering import GradientClusterer

    bundle = os.path.join(work, "bundle")
    meta_path = os.path.join(work, "elrea_labels.json")
    if os.path.isfile(os.path.join(bundle, "config.json")) and os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        return ELREAForCausalLM.from_pretrained(bundle, base_model_name_or_path=model), \
            np.asarray(meta["labels"]), meta["report"]
    builder = ELREABuilder.from_model(
        model, train, _lora_config(args), _sft_config(os.path.join(work, "run"), args, args.lr),
        callback=ELREAGradientCallback(d_proj=args.d_proj, projection_seed=args.seed),
        expert_learning_rate=args.expert_lr,
        clusterer=GradientClusterer(initial_clusters=args.clusters, random_state=args.seed),
    )
    ensemble = builder.build(bundle, overwrite=True)
    from .builder import _jsonable

    with open(meta_path, "w") as f:
        json.dump({"labels": builder.labels_.tolist(), "report": builder.report_}, f, default=_jsonable)
    return ensemble, builder.labels_, json.loads(json.dumps(builder.report_, default=_jsonable))


def _embedding_clusters(args, train, test, work):
    from .baselines import instruction_embeddings
    from .clustering import GradientClusterer
    from .routing import cluster_centroids

    path = os.path.join(work, "instruction_embedding.safetensors")
    key = _fingerprint([train["prompt"], test["prompt"], args.clusters, args.seed, args.embedding_model])

    def compute():
        emb_train = instruction_embeddings(train["prompt"], args.embedding_model)
        emb_test = instruction_embeddings(test["prompt"], args.embedding_model)
        labels = GradientClusterer(initial_clusters=args.clusters, random_state=args.seed).fit_predict(emb_train.numpy())
        labels = torch.as_tensor(np.asarray(labels))
        cents = cluster_centroids(emb_train, labels, int(labels.max()) + 1)
        return {"labels": labels, "centroids": cents, "test": emb_test}

    return _cached_tensor(path, key, compute)


# ----------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------
def run(args) -> dict:
    from . import default_backbone
    from .baselines import (
        load_adapters,
        logit_ensemble,
        predict_layer_mixture,
        predict_logit_ensemble,
        predict_self_consistency,
        predict_single_adapter,
        random_cluster_labels,
        top_k_weights,
        train_adapter,
        train_adapters_for_labels,
        uniform_weights,
    )
    from .clustering import cluster_report
    from .evaluation import accuracy_by_task, paired_comparison
    from .routing import routing_weights

    t_start = time.time()
    torch.manual_seed(args.seed)
    if args.max_new_tokens is None:
        args.max_new_tokens = 256 if args.data == "math-combined" else 8
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
    output = os.path.abspath(args.output)
    stem = output[:-5] if output.endswith(".json") else output
    work = os.path.abspath(args.work_dir or stem + ".work")
    stages = _Stages(work)
    model = args.model or default_backbone()
    train, test = stages.run("data", lambda: _data(args))
    prompts, tasks = list(test["prompt"]), list(test["task"])
    check = _checker(args)
    gen = dict(max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size)
    pkey = _fingerprint([prompts, args.max_new_tokens, model])

    ensemble, labels, report = stages.run("elrea_build", lambda: _elrea_stage(args, model, train, work),
                                          done=os.path.isfile(os.path.join(work, "elrea_labels.json")))
    tok = ensemble.tokenizer
    n_experts = len(ensemble.adapter_names) - 1
    base_dir = os.path.join(work, "bundle", "base")

    def route():
        return torch.cat([ensemble.route(prompts[i : i + 32]) for i in range(0, len(prompts), 32)])

    weights = stages.run("elrea_routing", lambda: _cached_tensor(os.path.join(work, "elrea_routing.safetensors"),
                                                                 pkey, route))
    expert_cfg = _sft_config(os.path.join(work, "runs"), args, args.expert_lr)
    preds: dict[str, list[str]] = {}

    def cached(name, fn):
        preds[name] = stages.run(f"predict_{name}", lambda: _cached_predictions(work, name, pkey, fn))

    # --- methods on the ELREA bundle's adapters ------------------------------------------------
    peft = ensemble.peft_model
    if "base" in methods:
        cached("base", lambda: predict_single_adapter(peft, tok, prompts, "base", desc="base", **gen))
    if "self_consistency" in methods:
        cached("self_consistency", lambda: predict_self_consistency(
            peft, tok, prompts, "base", n_samples=args.n_samples, seed=args.seed, desc="self-consistency",
            max_new_tokens=args.max_new_tokens, batch_size=max(1, args.eval_batch_size // 2)))
    if "elrea" in methods:
        cached("elrea", lambda: predict_logit_ensemble(ensemble, prompts, weights, desc="ELREA", **gen))
    if "elrea_topk" in methods:
        for k in sorted({1, 2, max(1, n_experts // 2)}):
            if k < n_experts:
                cached(f"elrea_top{k}", lambda k=k: predict_logit_ensemble(
                    ensemble, prompts, top_k_weights(weights, k), desc=f"ELREA top-{k}", **gen))
    if "uniform" in methods:
        cached("uniform", lambda: predict_logit_ensemble(ensemble, prompts, uniform_weights(len(prompts), n_experts + 1),
                                                         desc="uniform", **gen))
    if "moe_routing" in methods:
        cached("moe_routing", lambda: predict_layer_mixture(peft, tok, prompts, ensemble.adapter_names, weights,
                                                            mode="route", desc="MoE routing", **gen))
    if "moe_merging" in methods:
        cached("moe_merging", lambda: predict_layer_mixture(peft, tok, prompts, ensemble.adapter_names, weights,
                                                            mode="merge", desc="MoE merging", **gen))
    if "moe_merging_uniform" in methods:
        cached("moe_merging_uniform", lambda: predict_layer_mixture(
            peft, tok, prompts, ensemble.adapter_names, uniform_weights(len(prompts), n_experts + 1),
            mode="merge", desc="MoE merging (uniform)", **gen))
    ensemble_meta = {"adapter_names": ensemble.adapter_names}
    del ensemble, peft

    # --- methods that train more adapters --------------------------------------------------------
    def with_adapters(adapters, fn):
        pm = load_adapters(model, adapters)
        try:
            return fn(pm)
        finally:
            del pm

    if "base_continued" in methods:
        d = stages.run("train_base_continued", lambda: train_adapter(
            model, train, expert_cfg, os.path.join(work, "base_continued"), init_adapter=base_dir))
        cached("base_continued", lambda: with_adapters({"cont": d}, lambda pm: predict_single_adapter(
            pm, tok, prompts, "cont", desc="base continued", **gen)))

    def expert_ensemble(name, dirs, w):
        names = ["base"] + [f"expert_{c}" for c in range(len(dirs))]

        def fn(pm):
            return predict_logit_ensemble(logit_ensemble(pm, tok, names, model), prompts, w, desc=name, **gen)

        cached(name, lambda: with_adapters(dict(zip(names, [base_dir, *dirs])), fn))

    random_labels = None
    if "random_cluster" in methods:
        random_labels = random_cluster_labels(np.bincount(labels, minlength=n_experts), seed=args.seed)
        dirs = stages.run("train_random_cluster", lambda: train_adapters_for_labels(
            model, base_dir, train, random_labels, expert_cfg, os.path.join(work, "random_cluster")))
        expert_ensemble("random_cluster", dirs, uniform_weights(len(prompts), len(dirs) + 1))

    emb_report = None
    if "instruction_embedding" in methods:
        emb = stages.run("embed_cluster", lambda: _embedding_clusters(args, train, test, work))
        emb_labels = emb["labels"].numpy()
        emb_report = cluster_report(emb_labels, task=list(train["task"]))
        dirs = stages.run("train_instruction_embedding", lambda: train_adapters_for_labels(
            model, base_dir, train, emb_labels, expert_cfg, os.path.join(work, "instruction_embedding")))
        wb, we = routing_weights(emb["test"], emb["centroids"])
        expert_ensemble("instruction_embedding", dirs, torch.cat([wb[:, None], we], dim=1))

    if "lora_ensembles" in methods:
        members = []
        for j in range(1, args.n_ensemble + 1):
            members.append(stages.run(f"train_lora_ensemble_{j}", lambda j=j: train_adapter(
                model, train, _sft_config(os.path.join(work, "runs"), args, args.lr, seed=args.seed + j),
                os.path.join(work, "lora_ensemble", f"seed_{args.seed + j}"), lora_config=_lora_config(args))))
        names = ["base"] + [f"seed_{args.seed + j}" for j in range(1, args.n_ensemble + 1)]
        cached("lora_ensembles", lambda: with_adapters(dict(zip(names, [base_dir, *members])), lambda pm:
               predict_logit_ensemble(logit_ensemble(pm, tok, names, model), prompts,
                                      uniform_weights(len(prompts), len(names), 1 / len(names)),
                                      desc="LoRA ensembles", **gen)))

    # --- scoring --------------------------------------------------------------------------------
    correct = {m: _score(p, test, check, args.data == "math-combined") for m, p in preds.items()}
    results = {"methods": {}, "paired": {}}
    for m, ok in correct.items():
        results["methods"][m] = accuracy_by_task(ok, tasks)
    for ref in ("base", "base_continued"):
        if ref in correct:
            results["paired"][f"vs_{ref}"] = {m: paired_comparison(correct[ref], ok, seed=args.seed)
                                              for m, ok in correct.items() if m != ref}
    task_names = sorted(set(tasks))
    w_by_task = {t: weights[[i for i, x in enumerate(tasks) if x == t]].mean(0).tolist() for t in task_names}
    results["routing"] = {"adapter_names": ensemble_meta["adapter_names"], "mean_weight_by_task": w_by_task,
                          "top_expert_by_task": {t: int(np.argmax(v[1:])) for t, v in w_by_task.items()}}
    results["cluster_report"] = report
    if emb_report is not None:
        results["instruction_embedding_cluster_report"] = emb_report
    results["setup"] = {
        "model": model, "data": args.data, "n_train": len(train), "n_test": len(prompts),
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "n_experts": n_experts, "cluster_sizes": [int(s) for s in np.bincount(labels)],
        "torch_threads": torch.get_num_threads(), "stages": stages.times,
        "total_seconds": round(time.time() - t_start, 1),
        "notes": "uniform/random_cluster: all weights 1 (argmax-equivalent to averaging); lora_ensembles: "
                 "average of base + seeds; moe_*: lambda = w / sum(w) (eq 11); elrea_top<k>: not renormalised.",
    }
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(markdown_table(results))
    try:
        plot_routing(w_by_task, ensemble_meta["adapter_names"], stem + ".routing.png")
        plot_composition(report, stem + ".clusters.png")
    except ImportError:
        logger.warning("matplotlib is not installed: no figures (pip install 'elrea-hf[plots]')")
    print(markdown_table(results))
    return results


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------
def markdown_table(results: dict) -> str:
    """Accuracy (%) per task and micro average per method, with the paired difference vs base and vs
    the compute-matched base (95% bootstrap CI, wins/losses), like the paper's Table 1."""
    methods = results["methods"]
    tasks = sorted({t for m in methods.values() for t in m["per_task"]})
    head = ["method", *tasks, "avg", "n", "vs base", "vs base_continued"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        cells = [name] + [f"{100 * m['per_task'].get(t, float('nan')):.1f}" for t in tasks]
        cells += [f"**{100 * m['micro_avg']:.1f}**", str(m["n"])]
        for ref in ("vs_base", "vs_base_continued"):
            pc = results.get("paired", {}).get(ref, {}).get(name)
            cells.append("-" if pc is None else
                         f"{100 * pc['diff']:+.1f} [{100 * pc['ci95'][0]:+.1f}, {100 * pc['ci95'][1]:+.1f}] "
                         f"{pc['wins']}W/{pc['losses']}L")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Accuracy in %; differences are paired on the same prompts with a 95% bootstrap interval "
                 "(W/L: prompts only the method / only the reference got right). An interval containing 0 "
                 "is no difference.")
    return "\n".join(lines) + "\n"


def plot_routing(weights_by_task: dict, adapter_names, path: str) -> None:
    """Figure 2: the average routing weight of each adapter (base + clusters) by test task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(weights_by_task)
    mat = np.asarray([weights_by_task[t] for t in tasks])
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * mat.shape[1], 1 + 0.45 * len(tasks)))
    im = ax.imshow(mat, cmap="viridis", aspect="auto")
    ax.set_xticks(range(mat.shape[1]), ["base" if n == "base" else n.replace("expert_", "C") for n in adapter_names])
    ax.set_yticks(range(len(tasks)), tasks)
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if mat[i, j] < mat.max() / 2 else "black")
    ax.set_xlabel("adapter")
    ax.set_title("mean routing weight by test task")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_composition(report: dict, path: str) -> None:
    """Figure 4: share of each cluster's training examples by task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clusters = report["clusters"]
    tasks = sorted({t for c in clusters for t in c["composition"].get("task", {})})
    mat = np.asarray([[c["composition"].get("task", {}).get(t, 0) / max(c["size"], 1) for c in clusters]
                      for t in tasks])
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * len(clusters), 1 + 0.45 * len(tasks)))
    im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(clusters)), [f"C{c['cluster']}\n(n={c['size']})" for c in clusters])
    ax.set_yticks(range(len(tasks)), tasks)
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            if mat[i, j] > 0:
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if mat[i, j] > 0.5 else "black")
    ax.set_title("cluster composition by task (training data)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def estimate_cost(n_train: int, n_test: int, epochs: float, n_experts: int = 6, n_ensemble: int = 3,
                  step_s: float = 3.0, batch: int = 8, feature_s: float = 0.39, decode_single_s: float = 0.08,
                  decode_ensemble_s: float = 0.5) -> dict:
    """Rough seconds per stage on 2 CPU cores (design §10 costs, 8 new tokens)."""
    unit = n_train * epochs / batch * step_s
    ens = decode_ensemble_s * (n_experts + 1) / 6
    cost = {"train_base": unit, "features": n_train * epochs * feature_s, "train_experts": unit,
            "train_base_continued": unit, "train_random_cluster": unit, "train_instruction_embedding": unit,
            "train_lora_ensembles": n_ensemble * unit, "routing_test": n_test * epochs * feature_s,
            "decode_single(base,cont,moe x3)": 5 * 2 * decode_single_s * n_test,
            "decode_ensembles(elrea,top-k x3,uniform,random,embed)": 7 * ens * n_test,
            "decode_lora_ensembles": decode_ensemble_s * (n_ensemble + 1) / 6 * n_test,
            "decode_self_consistency": 0.7 * decode_ensemble_s * n_test}
    cost["total"] = sum(cost.values())
    return {k: round(v) for k, v in cost.items()}


if __name__ == "__main__":
    main()
