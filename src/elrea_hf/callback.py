"""``ELREAGradientCallback``: collects ELREA's gradient features while a TRL/transformers run trains
the base adapter, with no other change to the user's script.

At the end of every epoch it saves the LoRA weights and Adam state (``gradient_state/``) and the
epoch's projected, Adam-normalised instruction gradients of every training example
(``epoch_features/epoch_<e>/``); after the last epoch it writes their normalised average
(``features/``, eq 7), each as a chunked feature store (:mod:`elrea_hf.feature_store`). The extra pass runs in eval mode through ``torch.autograd.grad``,
so it touches neither ``.grad`` nor any random state: training is bitwise the same with and without
the callback. Epochs already on disk are reused (after checking they belong to this run) after
``resume_from_checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from .feature_store import STORAGE_DTYPES, FeatureStore, FeatureWriter, average_feature_stores
from .features import (
    EpochSnapshot,
    InstructionExample,
    InstructionMasker,
    InstructionMaskError,
    instruction_gradient_features,
    lora_dimension,
    lora_modules,
)
from .projection import ProjectionSpec

logger = logging.get_logger(__name__)

FEATURES_DIR = "features"
STATE_FILE = "elrea_callback_state.json"


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist()[1] > 1:
        torch.distributed.barrier()


def _active_adapter(model) -> str:
    name = getattr(model, "active_adapter", "default")
    return name[0] if isinstance(name, (list, tuple)) else name


def prepared_example_positions(dataset, args=None) -> tuple[list[int], int]:
    """Position in the user's original data set of every row of a data set prepared by ``SFTTrainer``,
    and the original data set's size.

    TRL's preparation (1.16) maps every example one to one (which flattens any selection the user
    made) and then, when it truncates to ``max_length``, drops the examples left with no completion
    token (all labels -100) through ``Dataset.filter``. That leaves an indices mapping into the
    unfiltered table, kept by the trainer's column removal and composed by ``shuffle_dataset``: it
    gives the original positions. Without it (nothing dropped, or ``skip_prepare_dataset``) row
    ``i`` is example ``i``."""
    n = len(dataset)
    skipped = bool((getattr(args, "dataset_kwargs", None) or {}).get("skip_prepare_dataset"))
    indices = getattr(dataset, "_indices", None)
    if skipped or indices is None:
        return list(range(n)), n
    return [int(i) for i in indices.column(0).to_pylist()], int(dataset.data.num_rows)


def _dropped_ids(dataset, dropped: list[int], id_column: str | None) -> list | None:
    """The ``id_column`` values of dropped rows, when the column reached the prepared data set."""
    table = getattr(dataset, "data", None)
    if not dropped or not id_column or table is None or id_column not in table.column_names:
        return None
    return table.column(id_column).take(dropped).to_pylist()


def prompt_examples_from_tokenized(dataset, masker: InstructionMasker,
                                   example_ids: list | None = None) -> list[InstructionExample]:
    """Instruction examples from a TRL-prepared data set (``input_ids`` + ``labels``).

    The prompt of an example is its ``input_ids`` up to the first label that is not -100, which
    is how TRL marks the completion (library-facts); its mask follows the user-content rule.
    Errors name examples by ``example_ids`` (default: row numbers)."""
    columns = set(dataset.column_names)
    if not {"input_ids", "labels"} <= columns:
        raise ValueError(
            "ELREAGradientCallback needs a prompt/completion data set prepared by SFTTrainer "
            f"(columns 'input_ids' and 'labels'); the training data has {sorted(columns)}"
        )
    examples = []
    for i, row in enumerate(dataset.select_columns(["input_ids", "labels"])):
        name = i if example_ids is None else example_ids[i]
        labels = row["labels"]
        start = next((t for t, lab in enumerate(labels) if lab != -100), None)
        if not start:
            raise ValueError(
                f"example {name} has no prompt tokens before its completion (every token carries loss); ELREA "
                "needs a prompt/completion data set (columns 'prompt' and 'completion', plain strings or chat "
                "messages) trained with completion_only_loss, not a plain 'text' or 'messages' data set"
            )
        ids = list(row["input_ids"][:start])
        try:
            examples.append(InstructionExample(ids, masker.mask(ids)))
        except InstructionMaskError as err:
            raise InstructionMaskError(f"training example {name}: {err}") from err
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

    What it writes under ``output_dir``::

        gradient_state/epoch_<e>.safetensors   LoRA weights + Adam state at the end of epoch e
        epoch_features/epoch_<e>/              epoch e's projected instruction gradients (a feature store)
        features/                              their normalised epoch average (eq 7, a feature store)
        elrea_callback_state.json              learning rates per step and the run's settings

    Feature stores (:mod:`elrea_hf.feature_store`) are safetensors part files of
    ``features_part_size`` rows plus a JSON index, written and averaged one part at a time, so the
    N x d_proj features are never all in memory. Rows follow the prepared training data set; their
    ``example_index`` is each row's position in the data set given to ``SFTTrainer``, so examples
    that TRL dropped (prompt filling ``max_length``) are visible as missing positions, and are also
    listed in a warning and in the features' metadata (``dropped_examples``).

    Under ``torchrun``/``accelerate launch`` every process computes the features of its share of
    the parts; the main process gathers and writes them.

    Args:
        output_dir: where snapshots and features go (default ``<TrainingArguments.output_dir>/elrea``).
        d_proj: projection dimension (eq 6; paper default 8192).
        projection_seed: seed of the random projection.
        instruction_tokens: ``"user_content"`` (default: only the user message's content carries
            loss) or ``"all_prompt"`` (every prompt token, template and system prompt included).
        batch_size: examples per forward/backward of the feature pass.
        compute_features: if False only the snapshots are stored (features can be computed later
            by the builder).
        projection_kind: ``"countsketch"`` (default: sparse, one multiply-add per gradient
            coordinate) or ``"rademacher"`` (dense, the paper's; costs about as much as the
            forward+backward pass itself; see :mod:`elrea_hf.projection` for the measured trade-off).
        feature_dtype: storage dtype of the features: ``"float32"`` (default), or ``"float16"`` /
            ``"bfloat16"`` for half the disk and memory (rows are stored as unit direction + float32
            norm, so precision does not depend on the features' scale).
        features_part_size: rows per feature part file; the main process holds at most this many
            rows per process at once.
        example_id_column: column naming the dropped examples in the warning, when it reaches the
            prepared data set (``remove_unused_columns=False``); positions are always reported.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        d_proj: int = 8192,
        projection_seed: int = 0,
        instruction_tokens: str = "user_content",
        batch_size: int = 8,
        compute_features: bool = True,
        projection_kind: str = "countsketch",
        feature_dtype: str = "float32",
        features_part_size: int = 2048,
        example_id_column: str | None = "id",
    ):
        if feature_dtype not in STORAGE_DTYPES:
            raise ValueError(f"feature_dtype must be one of {sorted(STORAGE_DTYPES)}, got {feature_dtype!r}")
        if features_part_size < 1:
            raise ValueError(f"features_part_size must be positive, got {features_part_size}")
        self.output_dir = output_dir
        self.d_proj = d_proj
        self.projection_seed = projection_seed
        self.instruction_tokens = instruction_tokens
        self.batch_size = batch_size
        self.compute_features = compute_features
        self.projection_kind = projection_kind
        self.feature_dtype = feature_dtype
        self.features_part_size = features_part_size
        self.example_id_column = example_id_column
        self._lrs: list[_EpochLR] = []
        self._examples: list[InstructionExample] | None = None
        self._done: list[int] = []
        self.positions: list[int] | None = None
        self.n_source_examples: int | None = None
        self.dropped_examples: list[int] = []
        self.projection: ProjectionSpec | None = None
        self.adapter_name: str | None = None
        self.tokenizer = None
        self.fingerprint: str | None = None

    # -- paths and results ---------------------------------------------------------------------
    def snapshot_path(self, epoch: int) -> str:
        return os.path.join(self.output_dir, "gradient_state", f"epoch_{epoch}.safetensors")

    def epoch_features_path(self, epoch: int) -> str:
        """The feature store (folder) of one epoch."""
        return os.path.join(self.output_dir, "epoch_features", f"epoch_{epoch}")

    @property
    def features_path(self) -> str:
        """The feature store (folder) of the finished run (eq 7)."""
        return os.path.join(self.output_dir, FEATURES_DIR)

    def completed_epochs(self) -> list[int]:
        folder = os.path.join(self.output_dir, "gradient_state")
        if not os.path.isdir(folder):
            return []
        return sorted(int(f[6:-12]) for f in os.listdir(folder) if f.startswith("epoch_") and f.endswith(".safetensors"))

    def snapshots(self) -> list[EpochSnapshot]:
        return [EpochSnapshot.load(self.snapshot_path(e)) for e in self.completed_epochs()]

    def feature_store(self) -> FeatureStore:
        """The finished run's features on disk: ``load(start, stop)`` for a slice, ``iter_parts()``."""
        return FeatureStore(self.features_path)

    def features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, d_proj] float32, data-set positions [N]) of the finished run (eq 7)."""
        store = self.feature_store()
        return store.features(), store.example_index

    def features_metadata(self) -> dict:
        return self.feature_store().meta

    # -- hooks ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None, **kw):
        if getattr(args, "packing", False):
            raise ValueError("ELREAGradientCallback needs one example per training row; packing=True merges "
                             "examples (their prompt boundaries are lost). Train the base adapter without packing")
        rank, _ = _dist()
        self.output_dir = self.output_dir or os.path.join(args.output_dir, "elrea")
        os.makedirs(self.output_dir, exist_ok=True)
        self.adapter_name = _active_adapter(model)
        lora_modules(model, self.adapter_name)  # fails early without a LoRA adapter
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if self.tokenizer is None:
            raise ValueError("ELREAGradientCallback needs the trainer's tokenizer (processing_class)")
        self.projection = ProjectionSpec(dim=lora_dimension(model, self.adapter_name), d_proj=self.d_proj,
                                         seed=self.projection_seed, kind=self.projection_kind)
        dataset = train_dataloader.dataset
        self.positions, self.n_source_examples = prepared_example_positions(dataset, args)
        masker = InstructionMasker(self.tokenizer, mode=self.instruction_tokens)
        self._examples = prompt_examples_from_tokenized(dataset, masker, self.positions)
        self.fingerprint = prompt_fingerprint(self._examples)
        self.dropped_examples = sorted(set(range(self.n_source_examples)) - set(self.positions))
        if self.dropped_examples and rank == 0:
            ids = _dropped_ids(dataset, self.dropped_examples, self.example_id_column)
            logger.warning(
                f"SFTTrainer dropped {len(self.dropped_examples)} of {self.n_source_examples} training examples "
                f"(no completion token left within max_length={getattr(args, 'max_length', None)}): data-set "
                f"positions {self.dropped_examples}" + (f", {self.example_id_column} {ids}" if ids else "") +
                ". They get no ELREA features and no expert; the features' example_index lists the positions "
                "they cover. Raise max_length or shorten those prompts to keep them."
            )
        self._done = self._reusable_epochs(state, model)
        _barrier()
        self._lrs = [r for r in self._load_lr_log() if r.step <= state.global_step]

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        # The lr of the step just taken: the scheduler steps after this hook.
        self._lrs.append(_EpochLR(len(self._done), state.global_step + 1, float(optimizer.param_groups[0]["lr"])))

    def on_save(self, args, state, control, **kw):
        if _dist()[0] == 0:
            self._write_state()

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
            self._write_state()
        if self.compute_features:
            self._epoch_features(model, snapshot, epoch)
        self._done.append(epoch)

    def on_train_end(self, args, state, control, model=None, **kw):
        if not self.compute_features:
            return
        rank, _ = _dist()
        # Epochs reused from an interrupted run whose feature pass did not finish.
        missing = _broadcast([e for e in self._done if not FeatureStore.exists(self.epoch_features_path(e))])
        for e in missing:
            self._epoch_features(model, EpochSnapshot.load(self.snapshot_path(e)), e)
        if rank == 0:
            stores = [FeatureStore(self.epoch_features_path(e)) for e in self._done]
            writer = FeatureWriter(self.features_path, self.d_proj, self.feature_dtype,
                                   {"epochs": list(self._done), **self._settings()})
            store = average_feature_stores(stores, writer)
            logger.info(f"ELREA features of {store.n} examples over epochs {self._done} written to {self.features_path}")
        _barrier()

    # -- internals -----------------------------------------------------------------------------
    def _settings(self) -> dict:
        return {"projection": self.projection.to_dict(), "instruction_tokens": self.instruction_tokens,
                "adapter_name": self.adapter_name, "prompt_fingerprint": self.fingerprint,
                "n_source_examples": self.n_source_examples, "dropped_examples": self.dropped_examples}

    def _write_state(self):
        path = os.path.join(self.output_dir, STATE_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump({"lrs": [r.__dict__ for r in self._lrs], **self._settings()}, f, indent=1)
        os.replace(path + ".tmp", path)

    def _load_lr_log(self) -> list[_EpochLR]:
        path = os.path.join(self.output_dir, STATE_FILE)
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [_EpochLR(**r) for r in json.load(f)["lrs"]]

    def _check_settings(self, path: str, saved: dict) -> None:
        for key in _MUST_MATCH:
            if key in saved and saved[key] != self._settings()[key]:
                raise ValueError(
                    f"{path} was written by a run with other ELREA settings ({key}: {saved[key]!r}, this run: "
                    f"{self._settings()[key]!r}); resume the matching run or use another output_dir"
                )

    def _reusable_epochs(self, state, model) -> list[int]:
        """Epochs whose snapshot (and features) a resumed run keeps; checks they belong to this run.

        A fresh run (``global_step == 0``) removes ELREA files left in ``output_dir`` by an earlier run;
        a resumed one keeps the epochs finished at its checkpoint, refusing files of another model,
        adapter shape, projection or data set, and removes later (stale) epochs."""
        rank, _ = _dist()
        on_disk = self.completed_epochs()
        finished = 0 if state.global_step == 0 else int(state.epoch + 1e-6)
        keep, stale = [e for e in on_disk if e < finished], [e for e in on_disk if e >= finished]
        if finished:
            state_path = os.path.join(self.output_dir, STATE_FILE)
            modules = lora_modules(model, self.adapter_name)
            for e in keep:
                EpochSnapshot.load(self.snapshot_path(e)).check_matches(modules, self.adapter_name)
            if os.path.exists(state_path):
                with open(state_path) as f:
                    self._check_settings(state_path, json.load(f))
            for e in keep:
                if FeatureStore.exists(self.epoch_features_path(e)):
                    self._check_settings(self.epoch_features_path(e), FeatureStore(self.epoch_features_path(e)).meta)
            if keep != list(range(finished)):
                raise ValueError(
                    f"resuming after epoch {finished - 1}, but {self.output_dir} holds the gradient state of epochs "
                    f"{keep} only; ELREA averages every epoch (eq 7): resume with the callback's output_dir of the "
                    "interrupted run, or train from scratch"
                )
        leftovers = [self.snapshot_path(e) for e in stale] + [self.epoch_features_path(e) for e in stale]
        leftovers += [self.features_path] + ([os.path.join(self.output_dir, STATE_FILE)] if not finished else [])
        leftovers = [p for p in leftovers if os.path.exists(p)]
        if rank == 0 and leftovers:
            if stale or not finished:
                logger.warning(f"ELREAGradientCallback: removing ELREA files of an earlier run in {self.output_dir} "
                               f"(epochs {stale})")
            for p in leftovers:
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        return keep

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
        """One epoch's features, written part by part. Parts are dealt round-robin to the processes;
        each round the main process gathers one part per process and writes it."""
        rank, world = _dist()
        n, size = len(self._examples), self.features_part_size
        parts = [(a, min(a + size, n)) for a in range(0, n, size)]
        writer = None
        if rank == 0:
            writer = FeatureWriter(self.epoch_features_path(epoch), self.d_proj, self.feature_dtype,
                                   {"epoch": epoch, **self._settings()})
        for first in range(0, len(parts), world):
            result = error = None
            if first + rank < len(parts):
                a, b = parts[first + rank]
                try:
                    result = a, instruction_gradient_features(
                        model, [snapshot], self._examples[a:b], self.projection, adapter_name=self.adapter_name,
                        batch_size=self.batch_size, normalize=False, pad_token_id=self.tokenizer.pad_token_id or 0,
                        example_ids=self.positions[a:b],
                        progress_desc=f"ELREA features, epoch {epoch}" if rank == 0 else None,
                    )
                except ValueError as err:
                    if world == 1:
                        raise
                    error = f"process {rank}: {err}"
            gathered = _gather_to_main((result, error))
            errors = _broadcast([e for _, e in gathered if e] if rank == 0 else None)
            if errors:
                raise ValueError("; ".join(errors))
            if rank == 0:
                for res, _ in gathered:
                    if res is not None:
                        a, feats = res
                        writer.write_part(a, feats, self.positions[a : a + len(feats)])
        if rank == 0:
            writer.finish(n)
        _barrier()


_MUST_MATCH = ("projection", "instruction_tokens", "prompt_fingerprint")


def _gather_to_main(obj) -> list | None:
    """``[obj of process 0, obj of process 1, ...]`` on the main process, None elsewhere."""
    rank, world = _dist()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def _broadcast(obj):
    """The main process's ``obj`` on every process."""
    if _dist()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
