"""``ELREABuilder``: gradient features -> clusters -> one expert adapter per cluster -> bundle (§3.3).

Two ways in:

* ``ELREABuilder.from_trainer(trainer, callback)`` after the user's own ``trainer.train()`` with an
  :class:`~elrea_hf.ELREAGradientCallback` (the two-line drop-in);
* ``ELREABuilder.from_model(model_id, dataset, lora_config, sft_config)`` which trains the base
  adapter itself first.

``build(output_dir)`` then clusters, trains the experts with TRL's ``SFTTrainer`` and the user's own
``SFTConfig`` (only learning rate, epochs and output folder overridden), and writes the bundle
atomically. Finished experts are kept in a work folder, so a killed build resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging

from .callback import (
    ELREAGradientCallback,
    prepared_example_positions,
    prompt_examples_from_tokenized,
    prompt_fingerprint,
)
from .clustering import GradientClusterer, cluster_report, format_cluster_report
from .bundle import save_adapter
from .feature_store import FeatureStore
from .features import InstructionMasker, lora_state
from .routing import RoutingConfig, cluster_centroids

logger = logging.get_logger(__name__)

LABEL_COLUMNS = ("task", "source", "category")


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _broadcast_from_main(obj):
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class ELREABuilder:
    """Clusters the training examples by gradient features and trains one expert per cluster.

    Args:
        model: the ``PeftModel`` holding the trained base adapter (``adapter_name``).
        tokenizer: its tokenizer (saved into the bundle; its chat template renders prompts).
        train_dataset: the data set the base adapter was trained on, as prepared by ``SFTTrainer``
            (rows in the order of the features).
        sft_config: the ``SFTConfig`` of the base run; experts reuse it with ``learning_rate``,
            ``num_train_epochs`` and ``output_dir`` overridden.
        callback: the finished :class:`ELREAGradientCallback` (features and Adam snapshots).
        expert_learning_rate: paper default 2e-5.
        expert_epochs: default: the base run's number of epochs.
        clusterer: a :class:`GradientClusterer` (default: paper settings, seeded with the run's seed).
        routing: top-k / minimum weight settings stored in the bundle.
        work_dir: where finished experts are kept between runs (default ``<callback dir>/experts``).
    """

    def __init__(self, model, tokenizer, train_dataset, sft_config, callback: ELREAGradientCallback, *,
                 base_model_name_or_path: str | None = None, adapter_name: str | None = None,
                 expert_learning_rate: float = 2e-5, expert_epochs: float | None = None,
                 clusterer: GradientClusterer | None = None, routing: RoutingConfig | dict | None = None,
                 work_dir: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.train_dataset = train_dataset
        self.sft_config = sft_config
        self.callback = callback
        self.adapter_name = adapter_name or callback.adapter_name or "default"
        self.base_model_name_or_path = base_model_name_or_path or _base_model_path(model, self.adapter_name)
        self.expert_learning_rate = expert_learning_rate
        self.expert_epochs = expert_epochs if expert_epochs is not None else sft_config.num_train_epochs
        self.clusterer = clusterer or GradientClusterer(random_state=sft_config.seed)
        self.routing = routing if isinstance(routing, RoutingConfig) else RoutingConfig.from_dict(routing or {})
        self.work_dir = work_dir or os.path.join(callback.output_dir, "experts")
        self.labels_: np.ndarray | None = None
        self.report_: dict | None = None
        self.features, self.meta = self._checked_features()

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_trainer(cls, trainer, callback: ELREAGradientCallback, **kwargs) -> "ELREABuilder":
        """The drop-in path: after ``trainer.train()`` with ``callbacks=[callback]``."""
        return cls(trainer.model, trainer.processing_class, trainer.train_dataset, trainer.args, callback, **kwargs)

    @classmethod
    def from_model(cls, model_name_or_path: str, train_dataset, lora_config, sft_config, *,
                   callback: ELREAGradientCallback | None = None, model_kwargs: dict | None = None,
                   **kwargs) -> "ELREABuilder":
        """Train the base adapter with the gradient callback, then return the builder."""
        from transformers import AutoTokenizer
        from trl import SFTTrainer

        check_prompt_completion(train_dataset)
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, **(model_kwargs or {}))
        callback = callback or ELREAGradientCallback()
        trainer = SFTTrainer(model=model, args=sft_config, train_dataset=train_dataset, processing_class=tokenizer,
                             peft_config=lora_config, callbacks=[callback])
        if len(trainer.train_dataset) != len(train_dataset):
            raise ValueError(f"SFTTrainer dropped {len(train_dataset) - len(trainer.train_dataset)} examples "
                             f"(prompt longer than max_length={sft_config.max_length}?); fix the data or max_length")
        trainer.train()
        return cls.from_trainer(trainer, callback, base_model_name_or_path=model_name_or_path, **kwargs)

    # ------------------------------------------------------------------------------------------
    def _checked_features(self):
        path = self.callback.features_path
        if not FeatureStore.exists(path):
            raise FileNotFoundError(f"no ELREA features at {path}: train with ELREAGradientCallback first")
        store = FeatureStore(path)
        meta, n = store.meta, len(self.train_dataset)
        positions, _ = prepared_example_positions(self.train_dataset, self.sft_config)
        dropped = meta.get("dropped_examples") or []
        if store.n != n:
            raise ValueError(
                f"the features in {path} describe {store.n} examples but the training data set has {n}"
                + (f" (SFTTrainer dropped data-set positions {dropped[:20]} before the features were computed)"
                   if dropped else "")
                + "; features and data must come from the same run (pass the trainer's prepared train_dataset)"
            )
        index = store.example_index.tolist()
        if index != positions:
            first = next(i for i, (a, b) in enumerate(zip(index, positions)) if a != b)
            raise ValueError(
                f"the features in {path} do not align with the training data set: feature row {first} is data-set "
                f"example {index[first]}, the data set's row {first} is example {positions[first]}; features and "
                "data must come from the same run, in the same order"
            )
        masker = InstructionMasker(self.tokenizer, mode=meta.get("instruction_tokens", "user_content"))
        fingerprint = prompt_fingerprint(prompt_examples_from_tokenized(self.train_dataset, masker, positions))
        if meta.get("prompt_fingerprint") not in (None, fingerprint):
            raise ValueError(f"the features in {path} were computed on different prompts (or another order) "
                             "than this training data set")
        if dropped:
            logger.warning(f"ELREA: data-set positions {dropped[:20]}{' ...' if len(dropped) > 20 else ''} were "
                           "dropped by SFTTrainer's preparation; they are in no cluster and train no expert")
        return store.features(), meta

    def cluster(self) -> np.ndarray:
        """Fit the clusterer on the features; returns labels and fills ``report_``."""
        labels = self.clusterer.fit_predict(self.features.numpy())
        # Every process must train the same experts: take the main process's clustering.
        labels, report = _broadcast_from_main((np.asarray(labels), getattr(self.clusterer, "report_", {})))
        columns = {c: list(self.train_dataset[c]) for c in LABEL_COLUMNS if c in self.train_dataset.column_names}
        self.report_ = {**cluster_report(labels, **columns), "clusterer": report}
        self.labels_ = np.asarray(labels)
        logger.info("ELREA clusters:\n" + format_cluster_report(self.report_))
        return self.labels_

    def _expert_args(self, c: int, run_dir: str):
        return dataclasses.replace(self.sft_config, output_dir=run_dir, learning_rate=self.expert_learning_rate,
                                   num_train_epochs=self.expert_epochs, save_strategy="no", report_to=[],
                                   push_to_hub=False, hub_model_id=None, run_name=f"elrea-expert-{c}")

    def _expert_dir(self, c: int) -> str:
        return os.path.join(self.work_dir, f"expert_{c}")

    def train_experts(self) -> list[str]:
        """Train one expert per cluster from the base adapter's final weights (skipping finished ones)."""
        from trl import SFTTrainer

        if self.labels_ is None:
            self.cluster()
        os.makedirs(self.work_dir, exist_ok=True)
        base_weights = lora_state(self.model, self.adapter_name)
        lora_config = self.model.peft_config[self.adapter_name]
        n_clusters = int(self.labels_.max()) + 1
        dirs = []
        for c in range(n_clusters):
            members = np.flatnonzero(self.labels_ == c).tolist()
            target = self._expert_dir(c)
            dirs.append(target)
            if _expert_done(target, members):
                logger.info(f"ELREA expert {c + 1}/{n_clusters}: already trained, reusing {target}")
                continue
            logger.info(f"ELREA expert {c + 1}/{n_clusters}: training on {len(members)} examples")
            name = f"elrea_expert_{c}"
            self.model.add_adapter(name, lora_config)
            from .features import load_lora_state

            load_lora_state(self.model, name, base_weights)
            self.model.set_adapter(name)
            try:
                trainer = SFTTrainer(model=self.model, args=self._expert_args(c, os.path.join(self.work_dir, "runs", str(c))),
                                     train_dataset=self.train_dataset.select(members), processing_class=self.tokenizer)
                trainer.train()
                if _is_main_process():
                    save_adapter(self.model, name, target, {"cluster": c, "members": members})
                _barrier()
            finally:
                self.model.set_adapter(self.adapter_name)
                self.model.delete_adapter(name)
        return dirs

    def build(self, output_dir: str, overwrite: bool = False, model_card: bool = True):
        """Cluster, train the experts, write the bundle to ``output_dir`` and return the ensemble."""
        from .bundle import atomic_directory
        from .modeling import ELREAForCausalLM

        if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
            raise FileExistsError(f"{output_dir} exists and is not empty; pass overwrite=True to replace it")
        dirs = self.train_experts()
        features = self.features
        centroids = cluster_centroids(features, torch.as_tensor(self.labels_), len(dirs))
        base_dir = os.path.join(self.work_dir, "base")
        if _is_main_process():
            save_adapter(self.model, self.adapter_name, base_dir, {})
        _barrier()
        from peft import PeftModel

        backbone = AutoModelForCausalLM.from_pretrained(self.base_model_name_or_path)
        peft = PeftModel.from_pretrained(backbone, base_dir, adapter_name="base")
        for c, d in enumerate(dirs):
            peft.load_adapter(d, adapter_name=f"expert_{c}")
        from .projection import ProjectionSpec

        ensemble = ELREAForCausalLM.from_parts(
            peft, self.tokenizer, centroids, self.callback.snapshots(),
            base_model_name_or_path=self.base_model_name_or_path, expert_names=[f"expert_{c}" for c in range(len(dirs))],
            routing=self.routing, instruction_tokens=self.meta.get("instruction_tokens", "user_content"),
            cluster_sizes=self.report_["sizes"], projection=ProjectionSpec.from_dict(self.meta["projection"]),
        )
        if model_card:
            ensemble.model_card = render_model_card(self, ensemble)
        if _is_main_process():
            with atomic_directory(output_dir, overwrite=overwrite) as tmp:
                ensemble.write_bundle(tmp)
                with open(os.path.join(tmp, "cluster_report.json"), "w") as f:
                    json.dump(self.report_, f, indent=1, default=_jsonable)
        _barrier()
        return ensemble


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _base_model_path(model, adapter_name: str) -> str:
    cfg = getattr(model, "peft_config", {}).get(adapter_name)
    path = getattr(cfg, "base_model_name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not path:
        raise ValueError("cannot tell which base model was trained; pass base_model_name_or_path=...")
    return path


def _expert_done(folder: str, members: Sequence[int]) -> bool:
    info = os.path.join(folder, "elrea_expert.json")
    if not os.path.isfile(info) or not os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
        return False
    with open(info) as f:
        return json.load(f).get("members") == list(members)


def check_prompt_completion(dataset) -> None:
    """Refuse data sets without a prompt/completion split, naming the offending example."""
    missing = {"prompt", "completion"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"ELREA needs a prompt/completion data set; missing columns {sorted(missing)} "
                         f"(has {dataset.column_names})")
    for i, row in enumerate(dataset.select_columns(["prompt", "completion"])):
        for col in ("prompt", "completion"):
            v = row[col]
            empty = not v or (isinstance(v, list) and not any(str(m.get("content", "")).strip() for m in v)) or \
                (isinstance(v, str) and not v.strip())
            if empty:
                raise ValueError(f"example {i} has an empty {col!r}")


def render_model_card(builder: ELREABuilder, ensemble) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    from . import __version__

    template = os.path.join(os.path.dirname(__file__), "model_card_template.md")
    report = builder.report_ or {}
    clusters = report.get("clusters") or []
    rows = "\n".join(f"| {i} | {size} | {_composition(clusters, i)} |" for i, size in enumerate(report.get("sizes", [])))
    args = builder.sft_config
    card = ModelCard.from_template(
        ModelCardData(library_name="elrea-hf", base_model=builder.base_model_name_or_path, tags=["elrea", "lora", "peft", "trl"]),
        template_path=template,
        base_model=builder.base_model_name_or_path, n_examples=len(builder.train_dataset),
        n_experts=len(report.get("sizes", [])), cluster_rows=rows or "| - | - | - |",
        base_lr=args.learning_rate, base_epochs=args.num_train_epochs, expert_lr=builder.expert_learning_rate,
        expert_epochs=builder.expert_epochs, batch_size=args.per_device_train_batch_size,
        lora=json.dumps(builder.model.peft_config[builder.adapter_name].to_dict(), default=str, sort_keys=True)[:600],
        d_proj=builder.meta["projection"]["d_proj"], projection_kind=builder.meta["projection"].get("kind", "rademacher"),
        instruction_tokens=builder.meta.get("instruction_tokens"),
        routing=json.dumps(builder.routing.to_dict()), version=__version__,
    )
    return str(card)


def _composition(clusters, i) -> str:
    if i >= len(clusters):
        return ""
    comp = clusters[i].get("composition", {}) if isinstance(clusters[i], dict) else {}
    parts = []
    for col, counts in comp.items():
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:4]
        parts.append(f"{col}: " + ", ".join(f"{k} {v}" for k, v in top))
    return "; ".join(parts)
