"""Reference log-probs of a preference dataset, once, through the fused LM head (no logits).

For a custom DPO loop with a frozen reference::

    ref = fastdpo.precompute_reference(ref_model, examples, batch_size=16,
                                       max_length=1024)   # the trainer's max_length (TRL's default)
    train_data = ref.add_to(train_data)       # columns ref_chosen_logps / ref_rejected_logps

``examples`` is any iterable (a list, a ``datasets.Dataset``, a generator) of mappings with
three token-id sequences (lists of ints or 1-D integer tensors), the columns of a dataset that
TRL's ``DPOTrainer`` has tokenised:

* ``prompt_ids``: the prompt (may be empty);
* ``chosen_ids`` / ``rejected_ids``: the completions (not empty), without the prompt.

Each batch runs ``prompt + chosen`` and ``prompt + rejected`` (right-padded, attention-masked)
through the model's decoder only, then :func:`fastdpo.linear_sequence_logps` over the completion
tokens: the sum of ``log p(token | everything before it)``, as TRL's ``ref_chosen_logps``. A
completion token at position 0 (empty prompt) has no context and is not scored, as in TRL.

With a PEFT model the reference is usually the model without its adapter: call it under
``with model.disable_adapter():``. Imports only torch and fastdpo (no TRL, no ``datasets``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .. import _validate
from ..linear import linear_sequence_logps
from .hf import decoder_of, head_of, lm_head_inputs

__all__ = ["precompute_reference", "ReferenceLogps", "has_reference_columns", "StoredReference",
           "COLUMNS", "KEYS"]

KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")
COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # TRL's names


@dataclass(frozen=True)
class ReferenceLogps:
    """Per-example reference log-probs, ``(N,)`` CPU tensors in the order of the examples."""

    chosen: torch.Tensor
    rejected: torch.Tensor

    def columns(self) -> dict:
        """``{"ref_chosen_logps": [...], "ref_rejected_logps": [...]}`` as Python floats."""
        return {COLUMNS[0]: self.chosen.tolist(), COLUMNS[1]: self.rejected.tolist()}

    def add_to(self, dataset):
        """``dataset`` (a ``datasets.Dataset`` of the same examples) with the two columns added."""
        if not callable(getattr(dataset, "add_column", None)):
            raise TypeError(f"dataset must be a datasets.Dataset (with add_column), got "
                            f"{type(dataset).__name__}; use .columns() for other containers")
        if len(dataset) != len(self.chosen):
            raise ValueError(f"dataset has {len(dataset)} rows but the reference log-probs are "
                             f"for {len(self.chosen)} examples")
        present = [c for c in COLUMNS if c in dataset.column_names]
        if present:
            raise ValueError(f"dataset already has the column(s) {present}")
        for name, values in self.columns().items():
            dataset = dataset.add_column(name, values)
        return dataset


def has_reference_columns(dataset) -> bool:
    """Whether ``dataset`` already carries both reference columns (checked: both or neither,
    every value a finite number), so a trainer can load them instead of recomputing. A
    streaming dataset (no length) is never read through: False."""
    if not hasattr(dataset, "__len__"):
        return False
    names = getattr(dataset, "column_names", None) or ()
    present = [c for c in COLUMNS if c in names]
    if not present:
        return False
    if len(present) == 1:
        missing = next(c for c in COLUMNS if c not in present)
        raise ValueError(f"dataset has the column {present[0]!r} but not {missing!r}: both "
                         f"reference columns or neither")
    # read as Python numbers whatever format the dataset is set to (numpy / torch / arrow
    # give their own scalar types; TRL stores the columns as float32)
    plain = getattr(dataset, "with_format", None)
    plain = plain(None) if callable(plain) else dataset
    for c in COLUMNS:
        values = list(plain[c])
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise TypeError(f"dataset column {c!r} must hold one number per example")
        if values and not torch.isfinite(torch.tensor(values, dtype=torch.float64)).all():
            raise ValueError(f"dataset column {c!r} holds a NaN or infinite log-prob")
    return True


class StoredReference:
    """Mixin placed before ``trl.DPOTrainer`` in a subclass's bases: a dataset that already
    carries both reference columns is used as is, at init and in ``evaluate(eval_dataset=...)``.
    TRL would recompute them (and then refuse the duplicated columns); after a training step
    without ``ref_model`` (full fine-tuning) it refuses any dataset given to ``evaluate``, since
    the reference is gone, though one with the columns needs no reference."""

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if has_reference_columns(dataset):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        splits = eval_dataset if isinstance(eval_dataset, dict) else {None: eval_dataset}
        if (eval_dataset is None or isinstance(eval_dataset, str) or not self.precompute_ref_logps
                or not all(has_reference_columns(d) for d in splits.values())):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        # TRL's evaluate is its check, the tokenisation and the precompute (not needed here):
        # tokenise as it does, then run the evaluation loop of the class after TRL's
        mro = type(self).__mro__
        loop = super(mro[mro.index(StoredReference) + 1], self).evaluate
        metrics = {}
        for name, ds in splits.items():
            ds = self._prepare_dataset(ds, self.processing_class, self.args, name or "eval")
            prefix = metric_key_prefix if name is None else f"{metric_key_prefix}_{name}"
            metrics.update(loop(eval_dataset=ds, ignore_keys=ignore_keys, metric_key_prefix=prefix))
        return metrics


def _ids(example, key: str, index: int, vocab: int) -> torch.Tensor:
    v = example[key]
    try:  # no dtype= here: it would truncate float "ids" silently
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(list(v))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{key} of example {index} must be a sequence of token ids, got "
                        f"{type(v).__name__}") from exc
    if t.numel() == 0:
        t = t.reshape(0).long()  # an empty list has no dtype of its own
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{key} of example {index} must hold integer token ids, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{key} of example {index} must be one sequence of token ids (1-D), "
                         f"got shape {tuple(t.shape)}")
    if t.numel() and not (0 <= int(t.min()) and int(t.max()) < vocab):
        raise ValueError(f"{key} of example {index} has token ids outside [0, {vocab})")
    if key != "prompt_ids" and t.numel() == 0:
        raise ValueError(f"{key} of example {index} is empty: a completion needs a token")
    return t.long().cpu()


def _example(example, index: int, vocab: int):
    if not isinstance(example, Mapping):
        raise TypeError(f"examples must yield mappings with keys {', '.join(KEYS)}; example "
                        f"{index} is a {type(example).__name__}")
    missing = [k for k in KEYS if k not in example]
    if missing:
        raise ValueError(f"example {index} has no {', '.join(missing)} (examples need "
                         f"{', '.join(KEYS)})")
    return tuple(_ids(example, k, index, vocab) for k in KEYS)


def _batch_logps(model, batch, device, backend, cut: slice):
    """Sequence log-probs of one batch of examples: ``(chosen (k,), rejected (k,))``; each
    prompt + completion is cut to ``cut`` first, as TRL's collator does with ``max_length``."""
    pairs = [(p, c) for p, c, _ in batch] + [(p, r) for p, _, r in batch]  # [chosen; rejected]
    seqs = [(torch.cat([p, c])[cut], torch.cat([torch.zeros(len(p), dtype=torch.bool),
                                                torch.ones(len(c), dtype=torch.bool)])[cut])
            for p, c in pairs]
    T = max(len(s) for s, _ in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)  # right padding: never attended to
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for j, (s, scored) in enumerate(seqs):
        ids[j, :len(s)] = s
        mask[j, :len(s)] = 1
        labels[j, :len(s)] = s.masked_fill(~scored, -100)
    head = lm_head_inputs(model, input_ids=ids.to(device), attention_mask=mask.to(device))
    w = head.weight
    seq = linear_sequence_logps(head.hidden.to(w.device), w, labels.to(w.device), shift=True,
                                backend=backend, **head.kwargs())
    return seq.cpu().chunk(2)  # one host copy per batch: this is not a training step


def _input_device(model) -> torch.device:
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(model.parameters()).device


def _vocab(model) -> int:
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    n = getattr(emb, "num_embeddings", None)
    return int(n) if n is not None else int(head_of(model).weight.shape[0])


def precompute_reference(model, examples, *, batch_size: int = 8, backend: str = "auto",
                         max_length=None, truncation_mode: str = "keep_start") -> ReferenceLogps:
    """Reference log-probs of every example (module docstring for the format), under no_grad,
    with ``model`` in eval mode (no dropout; each submodule's mode is restored afterwards).

    ``max_length`` / ``truncation_mode``: cut each prompt + completion to its first
    (``"keep_start"``) or last (``"keep_end"``) ``max_length`` tokens, as TRL's collator does.
    For columns a trainer will load, pass its config's values (``DPOConfig.max_length`` is
    1024 by default): its policy scores the cut sequences, so uncut columns would not match.

    Returns a :class:`ReferenceLogps` (``.chosen``, ``.rejected``: ``(N,)`` CPU tensors, fp32,
    fp64 for an fp64 model); ``.add_to(dataset)`` stores them as TRL's dataset columns.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM), got "
                        f"{type(model).__name__}")
    decoder_of(model), head_of(model)  # TypeError naming what is missing, before any work
    batch_size = _validate.check_int("batch_size", batch_size, minimum=1)
    _validate.check_choice("backend", backend, _validate.BACKEND_CHOICES)
    _validate.check_choice("truncation_mode", truncation_mode, ("keep_start", "keep_end"))
    cut = slice(None)
    if max_length is not None:
        n = _validate.check_int("max_length", max_length, minimum=1)
        cut = slice(None, n) if truncation_mode == "keep_start" else slice(-n, None)
    if isinstance(examples, (Mapping, str, bytes, torch.Tensor)) or not isinstance(
            examples, Iterable):
        raise TypeError(f"examples must be an iterable of examples (mappings with "
                        f"{', '.join(KEYS)}), got {type(examples).__name__}")
    vocab, device = _vocab(model), _input_device(model)
    modes = [(m, m.training) for m in model.modules()]
    chosen, rejected, batch = [], [], []
    try:
        model.eval()
        with torch.no_grad():
            for i, ex in enumerate(examples):
                batch.append(_example(ex, i, vocab))
                if len(batch) == batch_size:
                    c, r = _batch_logps(model, batch, device, backend, cut)
                    chosen.append(c), rejected.append(r)
                    batch = []
            if batch:
                c, r = _batch_logps(model, batch, device, backend, cut)
                chosen.append(c), rejected.append(r)
    finally:
        for m, training in modes:
            m.training = training
    if not chosen:
        empty = torch.empty(0, dtype=torch.float32)
        return ReferenceLogps(empty, empty.clone())
    return ReferenceLogps(torch.cat(chosen), torch.cat(rejected))
