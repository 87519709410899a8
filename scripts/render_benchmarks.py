"""Render docs/benchmarks.md from the JSON files the benchmarks wrote into docs/benchmarks/.

    .venv/bin/python scripts/render_benchmarks.py
"""

from __future__ import annotations

import json
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _load(name):
    path = DOCS / "benchmarks" / name
    return json.loads(path.read_text()) if path.is_file() else None


def features(r) -> str:
    s, kinds, default = r["setup"], r["projections"], r["default_projection"]
    names = {"rademacher": "dense Rademacher", "countsketch": "CountSketch"}
    ks = [str(k) for k in s["cluster_ks"]]
    lines = [
        f"{s['n_instructions']} instructions from {', '.join(s['sources'])} ({s['tokens_mean']} tokens on average once "
        f"chat-templated, {s['content_tokens_mean']} of them user content), rank-{s['lora_rank']} LoRA on "
        f"{s['target_modules']} ({s['lora_params']:,} parameters), d_proj = {s['d_proj']}, batch {s['batch_size']}, "
        f"{s['threads']} threads.", "",
        "| | seconds | x floor | speed-up vs naive | of which projection |", "|---|---|---|---|---|",
        f"| naive LESS-style loop (per example: autograd, dense projection) ¹ "
        f"| {r['naive_s']} | {r['naive_s'] / r['floor_s']:.1f} | 1 | |",
    ]
    for kind, k in kinds.items():
        tag = " (default)" if kind == default else ""
        lines.append(f"| batched extractor, {names[kind]}{tag} | {k['batched_s']} | {k['ratio_to_floor']} | "
                     f"{k['speedup_vs_naive']} | {k['projection_s']} s ({k['projection_share']:.0%}) |")
    lines += [
        f"| floor: plain forward+backward of the same batches | {r['floor_s']} | 1 | | |", "",
        f"¹ timed on {s['naive_measured_examples']} examples ({s['naive_measured_s']} s) and scaled to "
        f"{s['n_instructions']}.", "",
        "Projection quality on these real features: cosines between all pairs of unit features, and clustering "
        f"agreement (adjusted Rand index, {s['clustering']}) with k clusters, each against the unprojected "
        "Adam-normalised gradients:", "",
        "| projection | mean abs cosine error | max abs cosine error | " + " | ".join(f"ARI k={k}" for k in ks) + " |",
        "|---|---|---|" + "---|" * len(ks),
    ]
    for kind, k in kinds.items():
        d = k["distortion_vs_exact"]
        lines.append(f"| {names[kind]} | {d['mean_abs_cos_error']} | {d['max_abs_cos_error']} | "
                     + " | ".join(str(k["ari_vs_exact"][c]) for c in ks) + " |")
    cs = kinds["countsketch"]["ari_vs_rademacher"]
    lines += ["", "CountSketch vs dense clusters, ARI: " + ", ".join(f"k={c}: {cs[c]}" for c in ks) + ". "
              "Unprojected clusters vs the instructions' source data set, ARI: "
              + ", ".join(f"k={c}: {r['ari_exact_vs_source'][c]}" for c in ks) + ".", "",
              f"Naive and batched features agree to cosine {r['naive_vs_batched_min_cosine']} (min over the timed examples)."]
    return "\n".join(lines)


def inference(r) -> str:
    s = r["setup"]
    rows = [
        ("base adapter alone (plain PEFT)", r["base_s"], "", r["decode_step_base_s"], r["base_peak_mem_gib"]),
        ("ELREA, all experts", r["elrea_s"], r["routing_s"], r["decode_step_elrea_s"], r["elrea_peak_mem_gib"]),
        ("ELREA, top-2", r["elrea_top2_s"], "(same)", r["decode_step_elrea_top2_s"], r["elrea_top2_peak_mem_gib"]),
    ]
    lines = [f"{s['n_prompts']} prompts of {s['prompt_tokens_mean']} tokens, batch {s['batch_size']}, {s['new_tokens']} new "
             f"tokens, C = {s['n_experts']}, rank {s['lora_rank']} on {s['target_modules']}, {s['gradient_epochs']} stored "
             f"epochs, " + ("CountSketch projection (routing also timed with the dense one)" if s['projection'] == "both"
                            else f"projection {s['projection']}") + ".", "",
             "| | total s | routing s | decode step s | peak memory GiB |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    lines += ["", f"- routing {r['routing_s']} s vs its floor {r['routing_floor_s']} s (plain forward+backward of the "
              f"same prompts per stored epoch): {r['routing_ratio_to_floor']}x; with the dense projection routing takes "
              f"{r.get('routing_s_rademacher', 'n/a')} s.",
              f"- decode step ELREA / base: {r['decode_step_ratio']}; whole-run time ratio {r['time_ratio']} (top-2 "
              f"{r['time_ratio_top2']}), generation alone {r['generate_ratio']}; memory ratio {r['memory_ratio']}.",
              f"- generation runs every prompt on {r['rows_per_prompt']['elrea']:g} rows (top-2: "
              f"{r['rows_per_prompt']['elrea_top2']:g}), so its prompt pass (prefill) costs that many times the base "
              "adapter's; on a CPU the prefill dominates 20 new tokens, hence a generation ratio above the decode-step "
              "ratio."]
    return "\n".join(lines)


def main() -> None:
    parts = ["# Measured figures", "",
             "Measured on the reference machine (2 CPU cores, 24 GiB, no GPU) with SmolLM2-135M-Instruct, the offline "
             "default backbone; each benchmark's figures side by side in one run (raw JSON in `docs/benchmarks/`). "
             "Timings on a shared 2-core machine move by up to 2x between runs: compare the ratios within a run.", ""]
    for title, name, fn in (("Gradient features: `elrea-hf bench features`", "features.json", features),
                            ("Inference: `elrea-hf bench inference`", "inference.json", inference)):
        r = _load(name)
        if r is not None:
            parts += [f"## {title}", "", fn(r), ""]
    for title, name in (("Efficiency, paper Table 5 protocol: `elrea-hf bench efficiency`", "efficiency.md"),
                        ("Quality: `elrea-hf bench quality`", "quality.md"),
                        ("Quality on real data, reduced: `elrea-hf bench quality --data math-combined`",
                         "math_reduced.md")):
        path = DOCS / "benchmarks" / name
        if path.is_file():
            parts += [f"## {title}", "", path.read_text().strip(), ""]
    (DOCS / "benchmarks.md").write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
