"""Instruction-gradient features (paper §3.2, eq 5-7).

An example (or a prompt at inference) is described by the gradient of the loss on its *user
content* tokens with respect to the LoRA weights, normalised by Adam's state at the end of each
training epoch, randomly projected, averaged over epochs and L2-normalised.

The pieces, in the order they run:

* :class:`InstructionMasker` decides which prompt tokens carry loss (the documented rule below);
* :func:`lora_per_sample_gradients` gets every example's LoRA gradient from *one* batched
  forward/backward (hooks capture each LoRA matrix's input and output-gradient; the per-example
  weight gradient is their outer product summed over positions);
* :func:`adam_normalize` applies eq 5 with an :class:`EpochSnapshot` of the optimizer;
* :func:`instruction_gradient_features` strings them together for any number of examples and
  projects (eq 6) and averages (eq 7).

Gradients are flattened over the LoRA A/B weights in sorted order of their canonical names
(``model.layers.0.self_attn.q_proj.lora_A.weight``: the PEFT name with the ``base_model.model.``
prefix and the adapter name removed), so snapshots and features do not depend on adapter names.

User-content rule (used for training examples, routed prompts and raw ``input_ids`` alike).
With a chat template, the tokenizer renders a probe conversation with a sentinel user message.
The text after the sentinel is the *generation suffix* (end of the user turn + generation prompt);
the *user opener* is the common tail of the text before the sentinel with and without an explicit
system message. In a rendered prompt, the user content is the text between the last user opener
and the generation suffix at its very end, i.e. the last user message. Text that shows neither
marker, nor any special token the template writes, is plain text, whose tokens are all content;
a templated prompt missing either marker raises :class:`InstructionMaskError`. ``mode="all_prompt"`` puts every prompt token in the loss.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging

from .projection import ProjectionSpec, make_projector

logger = logging.get_logger(__name__)

INSTRUCTION_MODES = ("user_content", "all_prompt")
_SENTINEL = "ELREASENTINELXQ"
_PEFT_PREFIX = "base_model.model."


class InstructionMaskError(ValueError):
    """The user-content span of a prompt cannot be located."""


# ----------------------------------------------------------------------------------------------
# Which tokens carry the instruction loss
# ----------------------------------------------------------------------------------------------


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n :]


class InstructionMasker:
    """Builds prompt token ids and their instruction (loss) masks for one tokenizer."""

    def __init__(self, tokenizer, mode: str = "user_content"):
        if mode not in INSTRUCTION_MODES:
            raise ValueError(f"instruction mode must be one of {INSTRUCTION_MODES}, got {mode!r}")
        self.tokenizer = tokenizer
        self.mode = mode
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.opener = self.suffix = None
        if self.has_template:
            user = [{"role": "user", "content": _SENTINEL}]
            plain = self._render_text(user)
            with_system = self._render_text([{"role": "system", "content": "S"}] + user)
            if plain.count(_SENTINEL) != 1 or with_system.count(_SENTINEL) != 1:
                raise InstructionMaskError("the chat template does not place the user message verbatim")
            before, self.suffix = plain.split(_SENTINEL)
            self.opener = _common_suffix(before, with_system.split(_SENTINEL)[0])
            # Special tokens the template writes (and plain tokenisation does not add) mark a prompt as templated.
            plain_specials = set(tokenizer.convert_ids_to_tokens(tokenizer("x", add_special_tokens=True)["input_ids"]))
            self.template_tokens = [t for t in tokenizer.all_special_tokens if t in plain and t not in plain_specials]
            if not self.opener or not self.suffix:
                raise InstructionMaskError(
                    "cannot derive the user-turn markers from the chat template; "
                    "pass instruction masks explicitly or use mode='all_prompt'"
                )

    def _render_text(self, messages) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def render(self, prompt) -> list[int]:
        """Token ids of a prompt exactly as at inference: a list of chat messages, or a string
        (a user message when the tokenizer has a chat template, verbatim text otherwise)."""
        if isinstance(prompt, str):
            if not self.has_template:
                return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            prompt = [{"role": "user", "content": prompt}]
        if not self.has_template:
            raise InstructionMaskError("chat messages given but the tokenizer has no chat template")
        text = self._render_text(list(prompt))
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def content_char_span(self, text: str) -> tuple[int, int]:
        """Character span of the user content in a rendered prompt (see the module docstring)."""
        if not self.has_template:
            return 0, len(text)
        ends_templated = text.endswith(self.suffix)
        opener_at = text.rfind(self.opener, 0, len(text) - len(self.suffix) if ends_templated else None)
        templated = ends_templated or opener_at >= 0 or any(t in text for t in self.template_tokens)
        if not templated:
            return 0, len(text)  # plain text: every token is content
        if not ends_templated:
            raise InstructionMaskError(
                f"prompt does not end with the chat template's generation prompt {self.suffix!r}; "
                "render prompts with add_generation_prompt=True or pass an instruction mask"
            )
        if opener_at < 0:
            raise InstructionMaskError(f"no user turn (marker {self.opener!r}) found in the prompt")
        start, end = opener_at + len(self.opener), len(text) - len(self.suffix)
        if end <= start:
            raise InstructionMaskError("the prompt's user message is empty")
        return start, end

    def _token_ends(self, ids: Sequence[int], text: str) -> list[tuple[int, int]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == list(ids):
            return [tuple(o) for o in enc["offset_mapping"]]
        # Ids that do not re-tokenise identically: character ends by incremental decoding.
        offsets, prev = [], 0
        for i in range(len(ids)):
            end = len(self._decode(ids[: i + 1]))
            offsets.append((prev, end))
            prev = end
        return offsets

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def mask(self, prompt_ids: Sequence[int]) -> list[int]:
        """1 for prompt tokens that carry the instruction loss, 0 elsewhere.

        Position 0 never carries loss (nothing predicts it)."""
        n = len(prompt_ids)
        if n == 0:
            raise InstructionMaskError("empty prompt")
        if self.mode == "all_prompt":
            out = [1] * n
        else:
            text = self._decode(prompt_ids)
            start, end = self.content_char_span(text)
            out = [int(s < end and e > start and e > s) for s, e in self._token_ends(prompt_ids, text)]
        out[0] = 0
        if not any(out):
            raise InstructionMaskError("the prompt has no instruction token after the first position")
        return out


# ----------------------------------------------------------------------------------------------
# Optimizer state at the end of an epoch
# ----------------------------------------------------------------------------------------------


@dataclass
class EpochSnapshot:
    """LoRA weights and Adam state at the end of one epoch, keyed by canonical parameter name.

    ``lr`` is the mean learning rate over the epoch's optimizer steps (eta_e in eq 5)."""

    epoch: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weights: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: dict[str, float] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False)  # the file it was loaded from

    @property
    def names(self) -> list[str]:
        return sorted(self.weights)

    def _describe(self) -> str:
        return f"gradient state {self.source}" if self.source else f"the gradient state of epoch {self.epoch}"

    def check_matches(self, modules: dict[str, torch.nn.Module], adapter_name: str = "default") -> None:
        """Refuse a snapshot of another model or adapter shape (or with non-finite values), naming the
        file and the first offending parameter, before any tensor arithmetic would fail obscurely."""
        where = self._describe()
        missing, extra = sorted(set(modules) - set(self.weights)), sorted(set(self.weights) - set(modules))
        if missing or extra:
            raise ValueError(
                f"{where} does not match adapter {adapter_name!r}: it names {len(self.weights)} LoRA weights, the "
                f"adapter has {len(modules)} (missing e.g. {missing[:2]}, unexpected e.g. {extra[:2]}); it was "
                "written for another model or LoRA configuration"
            )
        for name, module in modules.items():
            want = tuple(module.weight.shape)
            for kind, tensors in (("weight", self.weights), ("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                got = tuple(tensors[name].shape)
                if got != want:
                    raise ValueError(
                        f"{where} does not match adapter {adapter_name!r}: {kind} of {name} has shape {got} there, "
                        f"{want} in the model (another LoRA rank or model?)"
                    )
                if not torch.isfinite(tensors[name]).all():
                    raise ValueError(f"{where} has non-finite values in {kind} of {name}")

    def save(self, path: str) -> None:
        tensors = {}
        for name in self.names:
            tensors[f"weight::{name}"] = self.weights[name].detach().float().contiguous().cpu()
            tensors[f"exp_avg::{name}"] = self.exp_avg[name].detach().float().contiguous().cpu()
            tensors[f"exp_avg_sq::{name}"] = self.exp_avg_sq[name].detach().float().contiguous().cpu()
            tensors[f"step::{name}"] = torch.tensor(float(self.step[name]))
        meta = {"format": "elrea-gradient-state-v1", "epoch": self.epoch, "lr": self.lr,
                "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}
        save_file(tensors, path, metadata={"elrea": json.dumps(meta)})

    @classmethod
    def load(cls, path: str) -> "EpochSnapshot":
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {})["elrea"])
            tensors = load_file(path)
        except Exception as err:  # noqa: BLE001 - any parse error means a bad file
            raise OSError(f"cannot read gradient state {path}: {err}") from err
        groups: dict[str, dict] = {"weight": {}, "exp_avg": {}, "exp_avg_sq": {}, "step": {}}
        for key, value in tensors.items():
            kind, _, name = key.partition("::")
            if kind not in groups:
                raise OSError(f"unexpected tensor {key!r} in gradient state {path}")
            groups[kind][name] = float(value) if kind == "step" else value
        if not (set(groups["weight"]) == set(groups["exp_avg"]) == set(groups["exp_avg_sq"]) == set(groups["step"])):
            raise OSError(f"gradient state {path} is incomplete: weights and Adam moments name different parameters")
        return cls(epoch=int(meta["epoch"]), lr=float(meta["lr"]), beta1=float(meta["beta1"]),
                   beta2=float(meta["beta2"]), eps=float(meta["eps"]), weights=groups["weight"],
                   exp_avg=groups["exp_avg"], exp_avg_sq=groups["exp_avg_sq"], step=groups["step"],
                   source=str(path))


# ----------------------------------------------------------------------------------------------
# LoRA parameters of one adapter
# ----------------------------------------------------------------------------------------------


def _canonical(module_name: str) -> str:
    return module_name[len(_PEFT_PREFIX):] if module_name.startswith(_PEFT_PREFIX) else module_name


def lora_modules(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.nn.Linear]:
    """Canonical weight name -> the ``nn.Linear`` holding a LoRA A or B matrix of ``adapter_name``,
    in sorted name order (the flattening order of gradients and projections)."""
    found: dict[str, torch.nn.Linear] = {}
    for name, module in model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        if not isinstance(lora_A, torch.nn.ModuleDict) or adapter_name not in lora_A:
            continue
        if adapter_name in getattr(module, "lora_magnitude_vector", {}):
            raise NotImplementedError("ELREA gradient features support plain LoRA, not DoRA")
        if getattr(module, "lora_bias", {}).get(adapter_name, False):
            raise NotImplementedError("ELREA gradient features do not support lora_bias=True")
        for part in ("lora_A", "lora_B"):
            sub = getattr(module, part)[adapter_name]
            if not isinstance(sub, torch.nn.Linear):
                raise NotImplementedError(f"{name}.{part} is a {type(sub).__name__}; only Linear LoRA is supported")
            found[f"{_canonical(name)}.{part}.weight"] = sub
    if not found:
        raise ValueError(f"the model has no LoRA adapter named {adapter_name!r}")
    return dict(sorted(found.items()))


def lora_state(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in lora_modules(model, adapter_name).items()}


def load_lora_state(model: torch.nn.Module, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
    modules = lora_modules(model, adapter_name)
    if set(modules) != set(state):
        missing, extra = sorted(set(modules) - set(state)), sorted(set(state) - set(modules))
        raise ValueError(f"LoRA weights do not match the adapter: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, module in modules.items():
            if module.weight.shape != state[name].shape:
                raise ValueError(f"shape mismatch for {name}: model {tuple(module.weight.shape)}, "
                                 f"state {tuple(state[name].shape)}")
            module.weight.copy_(state[name].to(module.weight.dtype))


def lora_dimension(model: torch.nn.Module, adapter_name: str) -> int:
    return sum(m.weight.numel() for m in lora_modules(model, adapter_name).values())


# ----------------------------------------------------------------------------------------------
# Per-example gradients from one batched backward pass
# ----------------------------------------------------------------------------------------------


class _LoraGradientCollector:
    """Forward hooks on an adapter's LoRA A/B linears that, for every call, keep the call's input
    and register a tensor hook on its output; during the backward pass that hook turns the output
    gradient into the per-example weight gradient ``sum_t g_t x_t^T`` and drops the input, so no
    more than one layer's activations and output gradients are held at once.

    Tensor hooks on outputs fire on every path (module backward hooks do not; see library-facts)."""

    def __init__(self, modules: dict[str, torch.nn.Linear]):
        self.grads: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {n: 0 for n in modules}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name):
        def hook(module, inputs, output):
            self.calls[name] += 1
            if not output.requires_grad:
                return
            held = [inputs[0].detach()]

            def on_grad(grad):
                x = held.pop()
                b = x.shape[0]
                g = torch.einsum("bto,bti->boi", grad.float().reshape(b, -1, grad.shape[-1]),
                                 x.float().reshape(b, -1, x.shape[-1]))
                self.grads[name] = self.grads[name] + g if name in self.grads else g

            output.register_hook(on_grad)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def instruction_losses(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-example mean of -log P(x_t | x_<t) over positions t with ``loss_mask[t] == 1``."""
    # Only the instruction positions go through log_softmax: the [B, T, vocab] float copies and
    # their gradients would otherwise dominate memory on long prompts.
    rows, cols = loss_mask[:, 1:].nonzero(as_tuple=True)
    logp = torch.log_softmax(logits[rows, cols].float(), dim=-1).gather(-1, input_ids[rows, cols + 1, None])[:, 0]
    totals = torch.zeros(input_ids.shape[0], dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)
    counts = loss_mask[:, 1:].sum(1).clamp_min(1).to(logp.dtype)
    return -totals / counts


def lora_per_sample_gradients(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    adapter_name: str = "default",
    modules: dict[str, torch.nn.Linear] | None = None,
) -> torch.Tensor:
    """Gradient of each example's instruction loss w.r.t. the adapter's LoRA weights, [B, D].

    One forward and one backward for the whole batch. Runs in eval mode (no dropout) with
    ``torch.autograd.grad`` so that no ``.grad`` buffer is touched: calling it during training does
    not change the training run. ``modules`` (from :func:`lora_modules`) saves the module walk when
    called batch after batch."""
    modules = lora_modules(model, adapter_name) if modules is None else modules
    was_training = model.training
    saved_flags = {n: m.weight.requires_grad for n, m in modules.items()}
    collector = _LoraGradientCollector(modules)
    try:
        model.eval()
        for m in modules.values():
            m.weight.requires_grad_(True)
        with torch.enable_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            loss = instruction_losses(logits, input_ids, loss_mask).sum()
            unused = [n for n, c in collector.calls.items() if not c]
            if unused:
                raise RuntimeError(f"LoRA layer {unused[0]} was not used in the forward pass")
            del logits
            # Asking for the LoRA weights' (batch-summed) gradients makes the backward pass reach
            # every LoRA output, where the collector's hooks take the per-example gradients.
            torch.autograd.grad(loss, [m.weight for m in modules.values()], allow_unused=True)
        batch = input_ids.shape[0]
        parts = []
        for name, m in modules.items():
            g = collector.grads.get(name)
            parts.append(torch.zeros(batch, m.weight.numel()) if g is None else g.reshape(batch, -1))
        return torch.cat(parts, dim=1)
    finally:
        collector.remove()
        for n, m in modules.items():
            m.weight.requires_grad_(saved_flags[n])
        model.train(was_training)


def adam_normalize(grads: torch.Tensor, snapshot: EpochSnapshot, names: Sequence[str], shapes) -> torch.Tensor:
    """Eq 5: the update Adam would take from this gradient with the epoch's state, times eta_e."""
    b1, b2 = snapshot.beta1, snapshot.beta2
    out = torch.empty_like(grads)
    col = 0
    for name, numel in zip(names, shapes):
        g = grads[:, col : col + numel]
        m = snapshot.exp_avg[name].reshape(1, -1).to(g)
        v = snapshot.exp_avg_sq[name].reshape(1, -1).to(g)
        t = snapshot.step[name]
        m_hat = (b1 * m + (1 - b1) * g) / (1 - b1**t)
        v_hat = (b2 * v + (1 - b2) * g * g) / (1 - b2**t)
        out[:, col : col + numel] = snapshot.lr * m_hat / (v_hat.sqrt() + snapshot.eps)
        col += numel
    return out


# ----------------------------------------------------------------------------------------------
# Features for many examples
# ----------------------------------------------------------------------------------------------


@dataclass
class InstructionExample:
    """Prompt token ids and their instruction (loss) mask, as built by :class:`InstructionMasker`."""

    input_ids: list[int]
    loss_mask: list[int]


def _pad_batch(examples: Sequence[InstructionExample], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), width), dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        att[i, :n] = 1
        mask[i, :n] = torch.tensor(e.loss_mask)
    return ids.to(device), att.to(device), mask.to(device)


def _length_sorted_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None) -> list[list[int]]:
    """Positions grouped into batches of similar length (less padding), each of at most
    ``batch_size`` rows and, when given, at most ``max_batch_tokens`` padded tokens (a single longer
    example still gets its own batch). The token budget bounds the activation memory of the
    backward pass whatever the prompt lengths."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        batch = batches[-1] if batches else None
        fits = (batch is not None and len(batch) < batch_size
                and (max_batch_tokens is None or (len(batch) + 1) * lengths[i] <= max_batch_tokens))
        if fits:
            batch.append(i)
        else:
            batches.append([i])
    return batches


def _chunk_rows(dim: int, budget_bytes: int = 1 << 30) -> int:
    return max(8, budget_bytes // (4 * dim))


def _check_setup(model, snapshots, projection: ProjectionSpec, adapter_name: str):
    if not snapshots:
        raise ValueError("at least one epoch snapshot is needed")
    modules = lora_modules(model, adapter_name)
    for snap in snapshots:
        snap.check_matches(modules, adapter_name)
    names = list(modules)
    numels = [modules[n].weight.numel() for n in names]
    if projection.dim != sum(numels):
        raise ValueError(f"projection expects gradients of dimension {projection.dim}, adapter {adapter_name!r} "
                         f"has {sum(numels)} LoRA parameters (features of another adapter shape?)")
    return names, numels


def iter_instruction_gradient_features(
    model: torch.nn.Module,
    snapshots: Sequence[EpochSnapshot],
    examples: Sequence[InstructionExample],
    projection: ProjectionSpec,
    *,
    adapter_name: str = "default",
    batch_size: int = 8,
    normalize: bool = True,
    pad_token_id: int = 0,
    progress_desc: str | None = None,
    example_ids: Sequence | None = None,
    max_batch_tokens: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`instruction_gradient_features` one chunk of rows at a time: yields ``(start, features)``
    with ``features`` the rows ``start ... start + len(features)``, so that a caller can write them out
    without holding all N x d_proj features."""
    names, numels = _check_setup(model, snapshots, projection, adapter_name)
    modules = lora_modules(model, adapter_name)
    if example_ids is not None and len(example_ids) != len(examples):
        raise ValueError(f"{len(example_ids)} example ids given for {len(examples)} examples")
    ids = list(range(len(examples))) if example_ids is None else list(example_ids)
    dim = sum(numels)
    projector = make_projector(projection)
    device = next(model.parameters()).device
    original = lora_state(model, adapter_name)
    chunk = _chunk_rows(dim)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(examples) * len(snapshots), desc=progress_desc, disable=progress_desc is None
               or logging.is_progress_bar_enabled() is False, leave=False)
    try:
        for c0 in range(0, len(examples), chunk):
            part = examples[c0 : c0 + chunk]
            acc = torch.zeros(len(part), dim)
            for snap in snapshots:
                load_lora_state(model, adapter_name, snap.weights)
                bad: list = []
                # Rows go back to their own positions after the length-sorted batches.
                for rows in _length_sorted_batches([len(e.input_ids) for e in part], batch_size, max_batch_tokens):
                    batch_ids, att, mask = _pad_batch([part[i] for i in rows], pad_token_id, device)
                    grads = lora_per_sample_gradients(model, batch_ids, att, mask, adapter_name, modules).cpu()
                    finite = torch.isfinite(grads).all(dim=1)
                    bad += [ids[c0 + rows[int(i)]] for i in (~finite).nonzero().flatten()]
                    acc[rows] += adam_normalize(grads, snap, names, numels)
                    bar.update(len(rows))
                if bad:
                    raise ValueError(
                        f"non-finite (NaN/inf) instruction gradient for example(s) {bad[:20]}"
                        f"{' ...' if len(bad) > 20 else ''} with the adapter weights of epoch {snap.epoch}; "
                        "check these examples' tokens and the model's numerics (fp16 overflow?)"
                    )
            acc /= len(snapshots)
            feats = projector.project(acc)
            if normalize:
                feats = normalize_rows(feats, example_ids=ids[c0 : c0 + len(part)])
            yield c0, feats
    finally:
        load_lora_state(model, adapter_name, original)
        bar.close()


def instruction_gradient_features(
    model: torch.nn.Module,
    snapshots: Sequence[EpochSnapshot],
    examples: Sequence[InstructionExample],
    projection: ProjectionSpec,
    *,
    adapter_name: str = "default",
    batch_size: int = 8,
    normalize: bool = True,
    pad_token_id: int = 0,
    progress_desc: str | None = None,
    example_ids: Sequence | None = None,
    max_batch_tokens: int | None = None,
) -> torch.Tensor:
    """Projected, Adam-normalised instruction gradients of ``examples`` (eq 5-7), [N, d_proj].

    For every snapshot the adapter's weights are temporarily replaced by the snapshot's, the
    per-example gradients computed in batches, normalised with that epoch's Adam state and averaged
    over snapshots; the average is projected (projection is linear, so this equals the mean of the
    per-epoch projections) and, with ``normalize``, L2-normalised (eq 7). The adapter's own weights
    are restored afterwards. Vectors are projected in large chunks because generating the
    projection matrix is the fixed cost of a call.

    Batches hold at most ``batch_size`` examples and, with ``max_batch_tokens``, at most that many
    padded tokens. Snapshots of another model or adapter shape are refused before any work (naming the file and
    parameter); a non-finite per-example gradient raises ``ValueError`` naming the examples by
    ``example_ids`` (default: their positions in ``examples``).
    """
    features = torch.empty(len(examples), projection.d_proj)
    for start, chunk in iter_instruction_gradient_features(
        model, snapshots, examples, projection, adapter_name=adapter_name, batch_size=batch_size,
        normalize=normalize, pad_token_id=pad_token_id, progress_desc=progress_desc, example_ids=example_ids,
        max_batch_tokens=max_batch_tokens,
    ):
        features[start : start + len(chunk)] = chunk
    return features


def normalize_rows(x: torch.Tensor, example_ids: Sequence | None = None) -> torch.Tensor:
    """Rows divided by their L2 norm; a zero row raises ``ValueError`` naming its example."""
    norms = x.norm(dim=1, keepdim=True)
    zero = (norms.squeeze(1) == 0).nonzero().flatten().tolist()
    if zero:
        names = [example_ids[i] for i in zero] if example_ids is not None else zero
        raise ValueError(f"example(s) {names[:20]} have an all-zero gradient feature (no instruction loss?)")
    return x / norms


def examples_from_prompts(masker: InstructionMasker, prompts: Sequence) -> list[InstructionExample]:
    out = []
    for i, p in enumerate(prompts):
        ids = masker.render(p)
        try:
            out.append(InstructionExample(ids, masker.mask(ids)))
        except InstructionMaskError as err:
            raise InstructionMaskError(f"prompt {i}: {err}") from err
    return out


__all__ = [
    "EpochSnapshot", "InstructionExample", "InstructionMasker", "InstructionMaskError", "adam_normalize",
    "examples_from_prompts", "instruction_gradient_features", "iter_instruction_gradient_features",
    "lora_dimension", "lora_modules", "lora_per_sample_gradients", "lora_state", "load_lora_state",
    "normalize_rows",
]
