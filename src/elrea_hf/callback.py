"""``ELREAGradientCallback``: collects ELREA's gradient features while a TRL/transformers run trains
the base adapter, with no other change to the user's script.

At the end of every epoch it saves the LoRA weights and Adam state (``gradient_state/``) and the
epoch's projected, Adam-normalised instruction gradients of every training example
(``features/epoch_<e>.safetensors``); after the last epoch it writes their normalised average
(``features.safetensors``, eq 7). The extra pass runs in eval mode through ``torch.autograd.grad``,
so it touches neither ``.grad`` nor any random state: training is bitwise the same with and without
the callback. Epochs already on disk are reused after ``resume_from_checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from .features import (
    EpochSnapshot,
    InstructionExample,
    InstructionMasker,
    InstructionMaskError,
    instruction_gradient_features,
    load_features,
    lora_dimension,
    lora_modules,
    normalize_rows,
    save_features,
)
from .projection import ProjectionSpec

logger = logging.get_logger(__name__)

FEATURES_FILE = "features.safetensors"
STATE_FILE = "elrea_callback_state.json"


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _active_adapter(model) -> str:
    name = getattr(model, "active_adapter", "default")
    return name[0] if isinstance(name, (list, tuple)) else name


def prompt_examples_from_tokenized(dataset, masker: InstructionMasker) -> list[InstructionExample]:
    """Instruction examples from a TRL-prepared data set (``input_ids`` + ``labels``).

    The prompt of an example is its ``input_ids`` up to the first label that is not -100, which
    is how TRL marks the completion (library-facts); its mask follows the user-content rule."""
    columns = set(dataset.column_names)
    if not {"input_ids", "labels"} <= columns:
        raise ValueError(
            "ELREAGradientCallback needs a prompt/completion data set prepared by SFTTrainer "
            f"(columns 'input_ids' and 'labels'); the training data has {sorted(columns)}"
        )
    examples = []
    for i, row in enumerate(dataset.select_columns(["input_ids", "labels"])):
        labels = row["labels"]
        start = next((t for t, lab in enumerate(labels) if lab != -100), None)
        if not start:
            raise ValueError(
                f"example {i} has no prompt tokens before its completion; ELREA needs a prompt/completion "
                "data set (columns 'prompt' and 'completion') with completion_only_loss=True"
            )
        ids = list(row["input_ids"][:start])
        try:
            examples.append(InstructionExample(ids, masker.mask(ids)))
        except InstructionMaskError as err:
            raise InstructionMaskError(f"training example {i}: {err}") from err
    return examples


def prompt_fingerprint(examples: list[InstructionExample]) -> str:
    """Hash of every example's prompt ids and mask, in order: ties features to a data set."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input_ids, e.loss_mask]).encode())
    return h.hexdigest()


@dataclass
class _EpochLR:
    epoch: int
    step: int
    lr: float


class ELREAGradientCallback(TrainerCallback):
    """Adds ELREA's gradient features to any ``Trainer``/``SFTTrainer`` training a LoRA adapter with
    an Adam-family optimizer.

    Args:
        output_dir: where snapshots and features go (default ``<TrainingArguments.output_dir>/elrea``).
        d_proj: projection dimension (eq 6; paper default 8192).
        projection_seed: seed of the Rademacher projection.
        instruction_tokens: ``"user_content"`` (default: only the user message's content carries
            loss) or ``"all_prompt"`` (every prompt token, template and system prompt included).
        batch_size: examples per forward/backward of the feature pass.
        compute_features: if False only the snapshots are stored (features can be computed later
            by the builder).
    """

    def __init__(
        self,
        output_dir: str | None = None,
        d_proj: int = 8192,
        projection_seed: int = 0,
        instruction_tokens: str = "user_content",
        batch_size: int = 8,
        compute_features: bool = True,
    ):
        self.output_dir = output_dir
        self.d_proj = d_proj
        self.projection_seed = projection_seed
        self.instruction_tokens = instruction_tokens
        self.batch_size = batch_size
        self.compute_features = compute_features
        self._lrs: list[_EpochLR] = []
        self._examples: list[InstructionExample] | None = None
        self.projection: ProjectionSpec | None = None
        self.adapter_name: str | None = None
        self.tokenizer = None
        self.fingerprint: str | None = None

    # -- paths ---------------------------------------------------------------------------------
    def snapshot_path(self, epoch: int) -> str:
        return os.path.join(self.output_dir, "gradient_state", f"epoch_{epoch}.safetensors")

    def epoch_features_path(self, epoch: int) -> str:
        return os.path.join(self.output_dir, "features", f"epoch_{epoch}.safetensors")

    @property
    def features_path(self) -> str:
        return os.path.join(self.output_dir, FEATURES_FILE)

    def completed_epochs(self) -> list[int]:
        folder = os.path.join(self.output_dir, "gradient_state")
        if not os.path.isdir(folder):
            return []
        return sorted(int(f[6:-12]) for f in os.listdir(folder) if f.startswith("epoch_") and f.endswith(".safetensors"))

    def snapshots(self) -> list[EpochSnapshot]:
        return [EpochSnapshot.load(self.snapshot_path(e)) for e in self.completed_epochs()]

    def features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, d_proj], example positions [N]) of the finished run (eq 7)."""
        feats, index, _ = load_features(self.features_path)
        return feats, index

    def features_metadata(self) -> dict:
        return load_features(self.features_path)[2]

    # -- hooks ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None, **kw):
        self.output_dir = self.output_dir or os.path.join(args.output_dir, "elrea")
        os.makedirs(self.output_dir, exist_ok=True)
        self.adapter_name = _active_adapter(model)
        lora_modules(model, self.adapter_name)  # fails early without a LoRA adapter
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if self.tokenizer is None:
            raise ValueError("ELREAGradientCallback needs the trainer's tokenizer (processing_class)")
        self.projection = ProjectionSpec(dim=lora_dimension(model, self.adapter_name), d_proj=self.d_proj,
                                         seed=self.projection_seed)
        masker = InstructionMasker(self.tokenizer, mode=self.instruction_tokens)
        self._examples = prompt_examples_from_tokenized(train_dataloader.dataset, masker)
        self.fingerprint = prompt_fingerprint(self._examples)
        self._lrs = [r for r in self._load_lr_log() if r.step <= state.global_step]

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        # The lr of the step just taken: the scheduler steps after this hook.
        self._lrs.append(_EpochLR(len(self.completed_epochs()), state.global_step + 1,
                                  float(optimizer.param_groups[0]["lr"])))

    def on_save(self, args, state, control, **kw):
        if _dist()[0] == 0:
            self._write_json(STATE_FILE, {"lrs": [r.__dict__ for r in self._lrs], **self._settings()})

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kw):
        epoch = int(round(state.epoch)) - 1
        rank, _ = _dist()
        lrs = [r.lr for r in self._lrs if r.epoch == epoch]
        if not lrs:
            raise RuntimeError(f"no optimizer step was recorded in epoch {epoch}")
        snapshot = self._snapshot(model, optimizer, epoch, sum(lrs) / len(lrs))
        if rank == 0:
            os.makedirs(os.path.dirname(self.snapshot_path(epoch)), exist_ok=True)
            tmp = self.snapshot_path(epoch) + ".tmp"
            snapshot.save(tmp)
            os.replace(tmp, self.snapshot_path(epoch))
            self._write_json(STATE_FILE, {"lrs": [r.__dict__ for r in self._lrs], **self._settings()})
        if self.compute_features:
            self._epoch_features(model, snapshot, epoch)

    def on_train_end(self, args, state, control, **kw):
        if not self.compute_features or _dist()[0] != 0:
            return
        epochs = self.completed_epochs()
        per_epoch = [load_features(self.epoch_features_path(e)) for e in epochs]
        mean = torch.stack([f for f, _, _ in per_epoch]).mean(0)
        save_features(self.features_path, normalize_rows(mean), per_epoch[0][1].tolist(),
                      {"epochs": epochs, **self._settings()})
        logger.info(f"ELREA features of {mean.shape[0]} examples over epochs {epochs} written to {self.features_path}")

    # -- internals -----------------------------------------------------------------------------
    def _settings(self) -> dict:
        return {"projection": self.projection.to_dict(), "instruction_tokens": self.instruction_tokens,
                "adapter_name": self.adapter_name, "prompt_fingerprint": self.fingerprint}

    def _write_json(self, name, obj):
        path = os.path.join(self.output_dir, name)
        with open(path + ".tmp", "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(path + ".tmp", path)

    def _load_lr_log(self) -> list[_EpochLR]:
        path = os.path.join(self.output_dir, STATE_FILE)
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [_EpochLR(**r) for r in json.load(f)["lrs"]]

    def _snapshot(self, model, optimizer, epoch: int, lr: float) -> EpochSnapshot:
        modules = lora_modules(model, self.adapter_name)
        state = optimizer.state
        weights, m, v, step = {}, {}, {}, {}
        betas = eps = None
        for name, module in modules.items():
            p = module.weight
            if p not in state or "exp_avg" not in state[p]:
                raise ValueError(
                    f"ELREA needs an Adam-family optimizer state for {name}; found keys "
                    f"{sorted(state[p]) if p in state else 'none'} (use optim='adamw_torch')"
                )
            group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
            betas, eps = group["betas"], group["eps"]
            weights[name] = p.detach().float().cpu().clone()
            m[name] = state[p]["exp_avg"].detach().float().cpu().clone()
            v[name] = state[p]["exp_avg_sq"].detach().float().cpu().clone()
            step[name] = float(state[p]["step"])
        return EpochSnapshot(epoch=epoch, lr=lr, beta1=float(betas[0]), beta2=float(betas[1]), eps=float(eps),
                             weights=weights, exp_avg=m, exp_avg_sq=v, step=step)

    def _epoch_features(self, model, snapshot: EpochSnapshot, epoch: int) -> None:
        path = self.epoch_features_path(epoch)
        if os.path.exists(path):
            return
        rank, world = _dist()
        mine = list(range(rank, len(self._examples), world))
        feats = instruction_gradient_features(
            model, [snapshot], [self._examples[i] for i in mine], self.projection,
            adapter_name=self.adapter_name, batch_size=self.batch_size, normalize=False,
            pad_token_id=self.tokenizer.pad_token_id or 0, progress_desc=f"ELREA features, epoch {epoch}",
        )
        if world > 1:
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, (mine, feats))
            order = torch.tensor([i for idx, _ in gathered for i in idx])
            feats = torch.cat([f for _, f in gathered])[order.argsort()]
            mine = sorted(order.tolist())
        if rank == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_features(path, feats, mine, {"epoch": epoch, **self._settings()})
        if world > 1:
            torch.distributed.barrier()
