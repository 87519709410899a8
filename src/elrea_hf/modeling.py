"""``ELREAForCausalLM``: the base adapter and C expert adapters decoding as one causal LM (§3.4).

Every decoding step runs *one* forward over B x (C+1) rows: each prompt row is repeated once per
adapter and PEFT's mixed-adapter batching (``adapter_names=[...]``) applies each adapter's LoRA to
its rows only, so the backbone's matmuls and the KV cache are shared by all adapters. The logits
are combined with the prompt's routing weights (eq 9-10):
``w_base * logits_base + sum_c w_c * logits_c``. Because the result is an ordinary
``CausalLMOutputWithPast``, greedy search, sampling, stopping criteria, streamers and
log-likelihood scoring work as on any causal LM.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

from . import __version__
from .batched_lora import BatchedLoraRows
from .bundle import (
    GRADIENT_STATE_DIR,
    ROUTING_FILE,
    BundleError,
    atomic_directory,
    check_adapter_dir,
    gradient_state_paths,
    load_routing,
    pickle_files,
    save_routing,
)
from .config import ELREAConfig
from .features import (
    EpochSnapshot,
    InstructionExample,
    InstructionMasker,
    InstructionMaskError,
    instruction_gradient_features,
)
from .projection import ProjectionSpec
from .routing import RoutingConfig, routing_weights

logger = logging.get_logger(__name__)

REMOTE_CODE_MODULE = "elrea_auto"
_REMOTE_CODE = (
    '"""ELREA bundle classes for trust_remote_code=True: they come from the installed elrea-hf package\n'
    '(pip install elrea-hf); this file only re-exports them."""\n'
    "from elrea_hf.config import ELREAConfig  # noqa: F401\n"
    "from elrea_hf.modeling import ELREAForCausalLM  # noqa: F401\n"
)
_BACKBONE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
                  "num_key_value_heads", "intermediate_size")
_SAFE_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt", "*.jinja", "*.model"]


def _backbone_summary(cfg) -> dict:
    d = cfg if isinstance(cfg, dict) else cfg.to_dict()
    return {k: d.get(k) for k in _BACKBONE_KEYS if k in d}


class ELREAForCausalLM(PreTrainedModel, GenerationMixin):
    """An ELREA ensemble loaded like any causal LM.

    Build one with :meth:`from_pretrained` (a bundle folder or Hub id) or, from in-memory parts,
    with :meth:`from_parts`. ``route`` gives the routing weights of prompts; ``generate`` and
    ``forward`` use them.
    """

    config_class = ELREAConfig
    base_model_prefix = "elrea"
    main_input_name = "input_ids"
    _supports_cache_class = True
    _no_split_modules: list = []

    def __init__(self, config: ELREAConfig, peft_model: PeftModel | None = None, tokenizer=None,
                 centroids: torch.Tensor | None = None, snapshots: Sequence[EpochSnapshot] | None = None):
        super().__init__(config)
        if peft_model is None:
            raise ValueError("ELREAForCausalLM is built by from_pretrained(bundle) or from_parts(...)")
        self.peft_model = peft_model
        self.tokenizer = tokenizer
        self.register_buffer("centroids", centroids.float(), persistent=False)
        self.snapshots = list(snapshots or [])
        self.routing_config = RoutingConfig.from_dict(config.routing or {})
        self.model_card: str | None = None
        backbone = peft_model.get_base_model()
        self.generation_config = GenerationConfig.from_dict(backbone.generation_config.to_dict())
        self._masker: InstructionMasker | None = None
        peft_model.eval()

    # ------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, peft_model: PeftModel, tokenizer, centroids: torch.Tensor,
                   snapshots: Sequence[EpochSnapshot], *, base_model_name_or_path: str,
                   feature_adapter: str = "base", expert_names: Sequence[str] | None = None,
                   routing: RoutingConfig | dict | None = None, instruction_tokens: str = "user_content",
                   cluster_sizes: Sequence[int] | None = None, projection: ProjectionSpec | None = None,
                   ) -> "ELREAForCausalLM":
        """Assemble an ensemble from a PeftModel holding ``feature_adapter`` and the experts."""
        experts = list(expert_names) if expert_names is not None else sorted(
            n for n in peft_model.peft_config if n != feature_adapter)
        if centroids.shape[0] != len(experts):
            raise ValueError(f"{centroids.shape[0]} centroids for {len(experts)} experts")
        routing = routing if isinstance(routing, RoutingConfig) else RoutingConfig.from_dict(routing or {})
        if projection is None:
            from .features import lora_dimension

            projection = ProjectionSpec(dim=lora_dimension(peft_model, feature_adapter), d_proj=centroids.shape[1])
        config = ELREAConfig(
            base_model_name_or_path=base_model_name_or_path,
            backbone_config=peft_model.get_base_model().config.to_dict(),
            adapter_names=[feature_adapter] + experts, feature_adapter=feature_adapter,
            routing=routing.to_dict(), projection=projection.to_dict(), instruction_tokens=instruction_tokens,
            gradient_epochs=[s.epoch for s in snapshots], cluster_sizes=list(cluster_sizes or []),
            elrea_version=__version__,
        )
        return cls(config, peft_model=peft_model, tokenizer=tokenizer, centroids=centroids, snapshots=snapshots)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config: ELREAConfig | None = None,
                        base_model_name_or_path: str | None = None, revision: str | None = None,
                        token=None, cache_dir=None, local_files_only: bool = False, **kwargs):
        """Load a bundle from a folder or the Hub.

        ``dtype``, ``device_map``, ``quantization_config`` and other backbone loading options are
        passed to ``AutoModelForCausalLM.from_pretrained`` of the backbone;
        ``base_model_name_or_path`` overrides where the backbone is read from."""
        bundle = str(pretrained_model_name_or_path)
        if not os.path.isdir(bundle):
            from huggingface_hub import snapshot_download

            bundle = snapshot_download(bundle, revision=revision, token=token, cache_dir=cache_dir,
                                       local_files_only=local_files_only, allow_patterns=_SAFE_DOWNLOAD_PATTERNS)
        unsafe = pickle_files(bundle)
        if unsafe:
            logger.warning(f"ignoring pickle-format files in the bundle (never loaded): {unsafe}")
        for k in ("trust_remote_code", "_from_auto", "_commit_hash", "adapter_kwargs", "subfolder",
                  "force_download", "proxies", "use_safetensors", "weights_only", "code_revision"):
            kwargs.pop(k, None)
        if config is None or not isinstance(config, ELREAConfig):
            if not os.path.isfile(os.path.join(bundle, "config.json")):
                raise BundleError(f"bundle file {os.path.join(bundle, 'config.json')} is missing")
            config = ELREAConfig.from_pretrained(bundle)
        backbone_path = base_model_name_or_path or config.base_model_name_or_path
        if not backbone_path:
            raise ValueError("the bundle names no base model; pass base_model_name_or_path=...")
        backbone = AutoModelForCausalLM.from_pretrained(backbone_path, revision=config.base_model_revision
                                                        if base_model_name_or_path is None else None, **kwargs)
        want, got = _backbone_summary(config.backbone_config or {}), _backbone_summary(backbone.config)
        diff = {k: (want[k], got.get(k)) for k in want if want[k] != got.get(k)}
        if diff:
            raise ValueError(f"the bundle was built on a different backbone than {backbone_path}: "
                             f"(bundle, loaded) differ in {diff}")
        names = list(config.adapter_names or [])
        if config.feature_adapter not in names:
            raise BundleError(f"config.json lists no feature adapter {config.feature_adapter!r} in {names}")
        peft_model = None
        for name in names:
            folder = check_adapter_dir(bundle, name)
            try:
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(backbone, folder, adapter_name=name, is_trainable=False)
                else:
                    peft_model.load_adapter(folder, adapter_name=name, is_trainable=False)
            except RuntimeError as err:
                raise ValueError(f"adapter {folder} does not fit the backbone {backbone_path}: {err}") from err
        centroids = load_routing(bundle)
        snapshots = []
        for path in gradient_state_paths(bundle, list(config.gradient_epochs or [])):
            if not os.path.isfile(path):
                raise BundleError(f"bundle file {path} is missing")
            try:
                snapshots.append(EpochSnapshot.load(path))
            except OSError as err:
                raise BundleError(f"bundle file {path} is corrupted: {err}") from err
        if not snapshots:
            raise BundleError(f"the bundle {bundle} has no gradient state (config.gradient_epochs is empty)")
        tokenizer = AutoTokenizer.from_pretrained(bundle)
        model = cls(config, peft_model=peft_model, tokenizer=tokenizer, centroids=centroids, snapshots=snapshots)
        readme = os.path.join(bundle, "README.md")
        if os.path.isfile(readme):
            with open(readme, encoding="utf-8") as f:
                model.model_card = f.read()
        if os.path.isfile(os.path.join(bundle, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(bundle)
        return model

    # ------------------------------------------------------------------------------------------
    # saving and sharing
    # ------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, is_main_process: bool = True, push_to_hub: bool = False,
                        overwrite: bool = True, model_card: str | None = None, **kwargs) -> None:
        """Write the bundle (atomically: a temporary folder renamed into place when complete)."""
        if not is_main_process:
            return
        if push_to_hub:
            raise ValueError("use model.push_to_hub(repo_id) to upload a bundle")
        with atomic_directory(save_directory, overwrite=overwrite) as tmp:
            self.write_bundle(tmp, model_card=model_card)

    def write_bundle(self, folder: str, model_card: str | None = None) -> None:
        self.config.architectures = [type(self).__name__]
        # trust_remote_code=True users: auto_map points at a three-line module that imports the
        # installed elrea_hf (no package source is copied into the bundle).
        self.config.auto_map = {"AutoConfig": f"{REMOTE_CODE_MODULE}.ELREAConfig",
                                "AutoModelForCausalLM": f"{REMOTE_CODE_MODULE}.ELREAForCausalLM"}
        self.config.save_pretrained(folder)
        with open(os.path.join(folder, f"{REMOTE_CODE_MODULE}.py"), "w", encoding="utf-8") as f:
            f.write(_REMOTE_CODE)
        self.generation_config.save_pretrained(folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        save_routing(os.path.join(folder, ROUTING_FILE), self.centroids)
        os.makedirs(os.path.join(folder, GRADIENT_STATE_DIR), exist_ok=True)
        for snap, path in zip(self.snapshots, gradient_state_paths(folder, [s.epoch for s in self.snapshots])):
            snap.save(path)
        names = list(self.config.adapter_names)
        # PEFT writes every adapter not named "default" to <folder>/<name>/.
        self.peft_model.save_pretrained(folder, selected_adapters=names, safe_serialization=True)
        for name in names:
            if not os.path.isfile(os.path.join(folder, name, "adapter_model.safetensors")):
                raise BundleError(f"PEFT did not write adapter {name!r} to {folder}/{name}")
        card = model_card if model_card is not None else self.model_card
        if card:
            with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
                f.write(card)

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload ELREA bundle", private: bool | None = None,
                    token=None, revision: str | None = None, create_pr: bool = False, **kwargs):
        """Upload every bundle file (model card included) in one commit."""
        import tempfile

        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "bundle")
            self.save_pretrained(folder)
            operations = [
                CommitOperationAdd(path_in_repo=os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"),
                                   path_or_fileobj=os.path.join(root, f))
                for root, _, files in sorted(os.walk(folder)) for f in sorted(files)
            ]
            return api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message,
                                     revision=revision, create_pr=create_pr)

    # ------------------------------------------------------------------------------------------
    # routing
    # ------------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.config.adapter_names)

    @property
    def masker(self) -> InstructionMasker:
        if self._masker is None:
            if self.tokenizer is None:
                raise ValueError("routing needs the bundle's tokenizer")
            self._masker = InstructionMasker(self.tokenizer, mode=self.config.instruction_tokens)
        return self._masker

    def _examples_from_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                           instruction_mask: torch.Tensor | None) -> list[InstructionExample]:
        examples = []
        for i in range(input_ids.shape[0]):
            keep = attention_mask[i].bool() if attention_mask is not None else torch.ones_like(input_ids[i], dtype=torch.bool)
            ids = input_ids[i][keep].tolist()
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            if instruction_mask is not None:
                mask = instruction_mask[i][keep].tolist()
                mask[0] = 0
                if not any(mask):
                    raise InstructionMaskError(f"prompt {i}: the instruction mask selects no token after the first")
            else:
                try:
                    mask = self.masker.mask(ids)
                except InstructionMaskError as err:
                    raise InstructionMaskError(
                        f"prompt {i}: {err}. Pass chat messages to route()/generate(), or an instruction_mask"
                    ) from err
            examples.append(InstructionExample(ids, mask))
        return examples

    def _check_length(self, examples: Sequence[InstructionExample]) -> None:
        limit = getattr(self.config.get_text_config(), "max_position_embeddings", None)
        for i, ex in enumerate(examples):
            if limit is not None and len(ex.input_ids) > limit:
                raise ValueError(f"prompt {i} has {len(ex.input_ids)} tokens, more than the model's context of {limit}")

    def route(self, prompts=None, *, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
              instruction_mask: torch.Tensor | None = None, batch_size: int = 8,
              max_batch_tokens: int | None = None) -> torch.Tensor:
        """Routing weights [B, 1 + C] (column 0 the base adapter, then experts in config order).

        ``prompts`` is a list of chat-message lists or strings (rendered with the bundle's chat
        template); alternatively ``input_ids`` (left or right padded, with ``attention_mask``) whose
        user content is recovered by the documented rule, or given as ``instruction_mask``.
        Gradients are taken in batches of at most ``batch_size`` prompts and ``max_batch_tokens``
        padded tokens (default ``config.routing_max_batch_tokens``); the weights do not depend on
        the batching."""
        if prompts is not None:
            if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], dict)):
                prompts = [prompts]
            examples = []
            for i, p in enumerate(prompts):
                if isinstance(p, str) and not p.strip():
                    raise ValueError(f"prompt {i} is empty")
                ids = self.masker.render(p)
                try:
                    examples.append(InstructionExample(ids, self.masker.mask(ids)))
                except InstructionMaskError as err:
                    raise InstructionMaskError(f"prompt {i}: {err}") from err
        elif input_ids is not None:
            examples = self._examples_from_ids(input_ids, attention_mask, instruction_mask)
        else:
            raise ValueError("route() needs prompts or input_ids")
        self._check_length(examples)
        features = instruction_gradient_features(
            self.peft_model, self.snapshots, examples, ProjectionSpec.from_dict(self.config.projection),
            adapter_name=self.config.feature_adapter, batch_size=batch_size,
            max_batch_tokens=max_batch_tokens if max_batch_tokens is not None else self.config.routing_max_batch_tokens,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer is not None else 0,
        )
        w_base, w_experts = routing_weights(features.to(self.centroids.device), self.centroids,
                                            top_k=self.routing_config.top_k,
                                            min_weight=self.routing_config.min_weight,
                                            renormalize=self.routing_config.renormalize)
        weights = torch.cat([w_base[:, None], w_experts], dim=1)
        logger.debug(f"ELREA routing weights (base, experts...): {weights.tolist()}")
        return weights

    # ------------------------------------------------------------------------------------------
    # forward and generation
    # ------------------------------------------------------------------------------------------
    def _lora_rows(self) -> BatchedLoraRows:
        """Stacked adapter weights for the per-row LoRA of :meth:`forward` (rebuilt if an adapter
        weight changed; while :meth:`generate` holds its hooks, the same object)."""
        cached = getattr(self, "_lora_rows_cache", None)
        if cached is not None and cached.active:
            return cached
        if cached is None or cached.adapter_names != self.adapter_names or cached.built_for != cached.version():
            cached = BatchedLoraRows(self.peft_model, self.adapter_names)
            cached.built_for = cached.version()
            self._lora_rows_cache = cached
        return cached

    def get_input_embeddings(self):
        return self.peft_model.get_input_embeddings()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                routing_weights: torch.Tensor | None = None, instruction_mask: torch.Tensor | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Weighted-sum logits of all adapters (eq 10).

        ``routing_weights`` [B, 1 + C] come from :meth:`route`; when absent they are computed from
        ``input_ids`` (which must then be chat-templated prompts, or come with ``instruction_mask``)."""
        if input_ids is None:
            raise ValueError("ELREAForCausalLM needs input_ids (inputs_embeds are not supported)")
        batch = input_ids.shape[0]
        if routing_weights is None:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("routing_weights are required when continuing from a cache")
            routing_weights = self.route(input_ids=input_ids, attention_mask=attention_mask,
                                         instruction_mask=instruction_mask)
        n_adapters = len(self.adapter_names)
        if routing_weights.shape != (batch, n_adapters):
            if routing_weights.shape[1] == n_adapters and batch % routing_weights.shape[0] == 0:
                routing_weights = routing_weights.repeat_interleave(batch // routing_weights.shape[0], dim=0)
            else:
                raise ValueError(f"routing_weights must have shape ({batch}, {n_adapters}), "
                                 f"got {tuple(routing_weights.shape)}")

        prompt_of, adapter_of = _row_layout(routing_weights)

        def rows(t):
            return None if t is None else t[prompt_of.to(t.device)]

        if self.peft_model.training:  # .eval() walks every module: not at every decoding step
            self.peft_model.eval()
        with self._lora_rows().apply(adapter_of):
            out = self.peft_model(
                input_ids=rows(input_ids), attention_mask=rows(attention_mask), position_ids=rows(position_ids),
                cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs,
            )
        logits = out.logits.float()
        w = routing_weights.to(logits.device, logits.dtype)[prompt_of, adapter_of]
        combined = torch.zeros((batch, *logits.shape[1:]), device=logits.device, dtype=logits.dtype)
        combined.index_add_(0, prompt_of.to(logits.device), logits * w.view(-1, *([1] * (logits.dim() - 1))))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                combined[:, :-1].reshape(-1, combined.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=combined, past_key_values=out.past_key_values)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 routing_weights: torch.Tensor | None = None, instruction_mask: torch.Tensor | None = None,
                 return_routing_weights: bool = False, **kwargs):
        """``GenerationMixin.generate`` on the weighted ensemble.

        Routing weights are computed once per prompt (with gradients enabled) before decoding.
        With ``return_routing_weights=True`` returns ``(output, weights)``. Beam search is not
        supported (the per-adapter cache rows cannot be reordered by beam index)."""
        gen_cfg = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("num_beams", getattr(gen_cfg, "num_beams", 1)) not in (None, 1):
            raise NotImplementedError("ELREAForCausalLM does not support beam search (num_beams > 1); "
                                      "use greedy decoding or sampling")
        if input_ids is None:
            raise ValueError("generate() needs input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if routing_weights is None:
            with torch.enable_grad():
                routing_weights = self.route(input_ids=input_ids, attention_mask=attention_mask,
                                             instruction_mask=instruction_mask)
        else:
            self._check_length(self._examples_from_ids(input_ids, attention_mask, torch.ones_like(input_ids)))
        # Adapters are disabled and the per-row LoRA hooks registered once for all decoding steps.
        rows = self._lora_rows()
        self.peft_model.eval()
        with rows.apply(_row_layout(routing_weights)[1]):
            out = super().generate(input_ids=input_ids, attention_mask=attention_mask,
                                   routing_weights=routing_weights.to(input_ids.device), **kwargs)
        return (out, routing_weights) if return_routing_weights else out


def _row_layout(routing_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_of, adapter_of)`` of the forward rows: one row per (prompt, adapter) pair with a
    non-zero weight, so that top-k / min-weight routing saves the work of the dropped experts. The
    weights are fixed for a whole generate call, so the layout (and the KV cache built on it) is
    the same at every step."""
    keep = routing_weights.detach().cpu() != 0
    keep[keep.sum(1) == 0, 0] = True  # a prompt with every weight 0 still needs a row
    return keep.nonzero(as_tuple=True)


def register_auto_classes() -> None:
    """Make ``AutoConfig``/``AutoModelForCausalLM.from_pretrained(bundle)`` return ELREA classes."""
    from transformers import AutoConfig

    try:
        AutoConfig.register("elrea", ELREAConfig)
    except ValueError:
        pass
    try:
        AutoModelForCausalLM.register(ELREAConfig, ELREAForCausalLM)
    except ValueError:
        pass
