"""``elrea-hf`` command line: ``demo`` (the whole pipeline on the embedded default), ``build`` and
``eval`` (accuracy of a bundle)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# glibc returns large freed buffers to the OS every step, which costs CPU training ~30% in page
# faults (library-facts); these settings only take effect at process start, hence the re-exec.
_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}


def _reexec_with_malloc_settings(argv):
    if all(os.environ.get(k) == v for k, v in _MALLOC_ENV.items()) or os.environ.get("ELREA_HF_NO_REEXEC"):
        return
    os.environ.update(_MALLOC_ENV)
    os.execv(sys.executable, [sys.executable, "-m", "elrea_hf.cli", *argv])


def _sft_config(output_dir, args):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir, use_cpu=not _has_cuda(), bf16=False, fp16=False, gradient_checkpointing=False,
        optim="adamw_torch", learning_rate=args.lr, lr_scheduler_type="linear", num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, max_length=512, logging_steps=10, save_strategy="no",
        report_to=[], seed=args.seed, dataloader_num_workers=0,
    )


def _has_cuda():
    import torch

    return torch.cuda.is_available()


def _lora_config(args):
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=args.target_modules.split(","))


def _add_training_args(p, n_train, n_test):
    p.add_argument("--model", default=None, help="backbone id or path (default: SmolLM2-135M-Instruct, offline)")
    p.add_argument("--n-train", type=int, default=n_train, help="training examples per skill")
    p.add_argument("--n-test", type=int, default=n_test, help="held-out test prompts per skill")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--lr", type=float, default=5e-4, help="base adapter learning rate")
    p.add_argument("--expert-lr", type=float, default=2e-4, help="expert learning rate")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--target-modules", default="q_proj,v_proj")
    p.add_argument("--d-proj", type=int, default=8192)
    p.add_argument("--projection", default="countsketch", choices=["countsketch", "rademacher"],
                   help="random projection of the gradients (rademacher: the paper's dense one)")
    p.add_argument("--clusters", type=int, default=5, help="initial BIRCH clusters (balancing may add more)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


def _build(args, out_dir):
    from . import ELREAGradientCallback, default_backbone
    from .builder import ELREABuilder
    from .clustering import GradientClusterer
    from .data import skill_mixture

    model = args.model or default_backbone()
    train = skill_mixture("train", n=args.n_train, seed=args.seed)
    builder = ELREABuilder.from_model(
        model, train, _lora_config(args), _sft_config(os.path.join(out_dir, "run"), args),
        callback=ELREAGradientCallback(d_proj=args.d_proj, projection_seed=args.seed, projection_kind=args.projection),
        expert_learning_rate=args.expert_lr,
        clusterer=GradientClusterer(initial_clusters=args.clusters, random_state=args.seed),
    )
    ensemble = builder.build(os.path.join(out_dir, "bundle"), overwrite=args.overwrite)
    return builder, ensemble


def cmd_build(args):
    t0 = time.time()
    builder, _ = _build(args, args.output_dir)
    from .clustering import format_cluster_report

    print(format_cluster_report(builder.report_))
    print(f"bundle written to {os.path.join(args.output_dir, 'bundle')} in {time.time() - t0:.0f} s")


def cmd_demo(args):
    import torch

    from .clustering import format_cluster_report
    from .data import check_answer, skill_mixture
    from .evaluation import accuracy_by_task, greedy_generate, paired_comparison, score

    torch.manual_seed(args.seed)
    t0 = time.time()
    out_dir = os.path.abspath(args.output_dir)
    builder, ensemble = _build(args, out_dir)
    t_build = time.time() - t0
    test = skill_mixture("test", n=args.n_test, seed=args.seed)
    prompts, answers, tasks = test["prompt"], test["answer"], test["task"]
    tok = ensemble.tokenizer
    peft = ensemble.peft_model
    peft.set_adapter("base")
    base_pred = greedy_generate(peft, tok, prompts, max_new_tokens=8, desc="base adapter")
    weights = torch.cat([ensemble.route(prompts[i : i + 64]) for i in range(0, len(prompts), 64)])
    elrea_pred = greedy_generate(ensemble, tok, prompts, max_new_tokens=8, routing_weights=weights,
                                 desc="ELREA ensemble")
    base_ok = score(base_pred, answers, tasks, check_answer)
    elrea_ok = score(elrea_pred, answers, tasks, check_answer)
    base_acc, elrea_acc = accuracy_by_task(base_ok, tasks), accuracy_by_task(elrea_ok, tasks)
    paired = paired_comparison(base_ok, elrea_ok)
    results = {
        "accuracy": {"base": base_acc["micro_avg"], "elrea": elrea_acc["micro_avg"]},
        "per_task": {"base": base_acc["per_task"], "elrea": elrea_acc["per_task"]},
        "paired_elrea_minus_base": paired, "n_test": len(prompts),
        "clusters": builder.report_["sizes"], "cluster_report": builder.report_,
        "mean_routing_weights": weights.mean(0).tolist(),
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "seconds": {"build": round(t_build, 1), "total": round(time.time() - t0, 1)},
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print("\n" + format_cluster_report(builder.report_))
    print(f"\n{'task':<18}{'base':>8}{'ELREA':>8}")
    for t in base_acc["per_task"]:
        print(f"{t:<18}{base_acc['per_task'][t]:>8.3f}{elrea_acc['per_task'][t]:>8.3f}")
    print(f"{'micro average':<18}{base_acc['micro_avg']:>8.3f}{elrea_acc['micro_avg']:>8.3f}   (n = {len(prompts)})")
    verdict = "a significant difference" if paired["significant"] else "no significant difference"
    print(f"ELREA - base: {paired['diff']:+.3f}, 95% CI [{paired['ci95'][0]:+.3f}, {paired['ci95'][1]:+.3f}] "
          f"({paired['wins']} wins, {paired['losses']} losses): {verdict}")
    print(f"\noutputs in {out_dir}: bundle/ and results.json ({time.time() - t0:.0f} s)")


def cmd_eval(args):
    from .evaluation import evaluate_bundle, format_accuracy_table

    results = evaluate_bundle(args.bundle, args.data, method=args.method, n=args.n, seed=args.seed,
                              batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    print(format_accuracy_table(results))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"results written to {args.output}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="elrea-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="whole pipeline on the embedded skill mixture, then base vs ELREA accuracy")
    demo.add_argument("--output-dir", default="elrea-demo")
    _add_training_args(demo, n_train=30, n_test=10)
    demo.set_defaults(func=cmd_demo)
    build = sub.add_parser("build", help="train the base adapter and experts and write a bundle")
    build.add_argument("--output-dir", default="elrea-build")
    _add_training_args(build, n_train=100, n_test=0)
    build.set_defaults(func=cmd_build)
    evaluate = sub.add_parser("eval", help="greedy-generation accuracy of a bundle, per category and micro-averaged")
    evaluate.add_argument("bundle", help="bundle folder or Hub id")
    evaluate.add_argument("--data", required=True,
                          help="'mixture', 'math-combined', a shared/data file name (gsm8k_test, bbh_shared) or a JSONL path")
    evaluate.add_argument("--method", choices=("elrea", "base"), default="elrea",
                          help="the routed ensemble, or the bundle's base adapter only")
    evaluate.add_argument("--n", type=int, default=None, help="at most this many examples")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--max-new-tokens", type=int, default=None,
                          help="default: 16 for short answers, 512 for math solutions")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the example draw")
    evaluate.add_argument("--output", default=None, help="write all results (and every generation) to this JSON file")
    evaluate.set_defaults(func=cmd_eval)
    bench = sub.add_parser("bench", help="benchmarks that print figures (see elrea_hf.bench_perf)")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True)
    from .bench_perf import add_parsers as add_perf_benchmarks

    add_perf_benchmarks(bench_sub)
    from .bench_quality import add_parser as add_quality_benchmark

    add_quality_benchmark(bench_sub)
    bench.set_defaults(func=lambda a: a.bench(a))
    args = parser.parse_args(argv)
    _reexec_with_malloc_settings(argv)
    if getattr(args, "output_dir", None) and os.path.exists(os.path.join(args.output_dir, "bundle")) \
            and os.listdir(os.path.join(args.output_dir, "bundle")) and not args.overwrite:
        parser.error(f"{args.output_dir}/bundle exists; pass --overwrite or another --output-dir")
    args.func(args)


if __name__ == "__main__":
    main()
