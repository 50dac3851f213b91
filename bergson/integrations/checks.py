"""What the Trainer callback supports, and the error for everything else.

Each check raises a :class:`~bergson.errors.BergsonError` whose message names the trainer
argument, callback option or batch field at fault and what to do instead: the callback's
options (:func:`check_options`), the trainer's set-up (:func:`check_trainer`), the model
(:func:`output_layer`, :func:`dropout_modules`) and every training batch (:func:`check_batch`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..errors import BergsonError
from ..transforms.optimizer_state import NORMALIZER_FORMS

SAVE_DTYPES = ("auto", "float16", "float32")

_REFUSED_ARGUMENTS = {
    "label_smoothing_factor": (
        "label smoothing adds a term to the loss, so the trainer's gradients are not those of the "
        "labels' cross-entropy that a gradient store holds; set label_smoothing_factor=0"
    ),
    "torch_compile": "torch_compile is not supported; set torch_compile=False",
}
"""Trainer arguments the callback refuses when they are set, with the reason and the fix."""

_REFUSED_MODEL_CONFIG = {
    "final_logit_softcapping": (
        "models that transform their output layer's logits (final_logit_softcapping) are not supported; "
        "use a model whose config has no final_logit_softcapping"
    ),
    "is_encoder_decoder": (
        "encoder-decoder models are not supported; it needs a causal LM whose labels are its input positions"
    ),
}
"""Model config fields the callback refuses when they are set."""

_PACKED_BATCH_KEYS = ("shift_labels", "cu_seq_lens_q", "cu_seqlens_q", "seq_idx")
"""Model inputs that only packed or padding-free batches carry."""


def callback_error(message: str) -> BergsonError:
    """The error for a set-up the callback cannot support, its message prefixed with the callback."""
    return BergsonError(f"GradientCollectorCallback: {message}")


def check_options(
    path: Any, projection_dim: int, normalizer_form: str, save_dtype: str, shard_size: int
) -> None:
    """Refuse option values of :class:`~bergson.integrations.callback.GradientCollectorCallback`
    that have no meaning."""
    if not isinstance(path, (str, os.PathLike)):
        raise callback_error(f"path={path!r}; pass the output directory (a str or a pathlib.Path)")
    if normalizer_form not in NORMALIZER_FORMS:
        raise callback_error(
            f"normalizer_form={normalizer_form!r}; choose one of {', '.join(NORMALIZER_FORMS)}"
        )
    if save_dtype not in SAVE_DTYPES:
        raise callback_error(f"save_dtype={save_dtype!r}; choose one of {', '.join(SAVE_DTYPES)}")
    if projection_dim < 0:
        raise callback_error(f"projection_dim={projection_dim}; must be 0 (full gradients) or positive")
    if shard_size < 1:
        raise callback_error(f"shard_size={shard_size}; must be at least 1")


def check_trainer(trainer: Any) -> None:
    """Refuse trainer set-ups whose per-row gradients the callback cannot recover."""
    args = trainer.args
    if args.n_gpu > 1:
        raise callback_error(
            f"the trainer drives {args.n_gpu} GPUs from one process (DataParallel), whose replicas' gradients "
            "cannot be told apart; launch one process per GPU (torchrun or accelerate launch) for data "
            "parallel training, or set CUDA_VISIBLE_DEVICES to one GPU"
        )
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        raise callback_error(
            "DeepSpeed and FSDP training are not supported (they shard the layers the hooks read); use plain "
            "data parallel training (DDP) or one process"
        )
    processes = max(args.world_size, getattr(getattr(trainer, "accelerator", None), "num_processes", 1))
    if processes != distributed.world_size():
        raise callback_error(
            f"the trainer runs {processes} processes but this process's torch.distributed group has "
            f"{distributed.world_size()}; start every process with torchrun or accelerate launch"
        )
    for name, why in _REFUSED_ARGUMENTS.items():
        value = getattr(args, name, None)
        if value:
            raise callback_error(f"{name}={value}: {why}")
    collator = getattr(trainer, "data_collator", None)
    if (
        getattr(args, "packing", False)
        or getattr(args, "padding_free", False)
        or type(collator).__name__ == "DataCollatorWithFlattening"
    ):
        raise callback_error(
            "packed (or padding-free) batches put several dataset rows in one sequence, so per-row gradients "
            "cannot be separated; train with packing=False and padding_free=False"
        )
    loss_type = getattr(args, "loss_type", None)
    if loss_type not in (None, "nll", "chunked_nll"):
        raise callback_error(
            f"loss_type={loss_type!r}: the loss must be the labels' summed next-token cross-entropy up to one "
            "factor per row, which TRL's other losses (DFT weighs each token by its probability) are not; set "
            "loss_type='nll'"
        )
    if getattr(trainer, "aux_loss_enabled", False):
        raise callback_error(
            "the trainer adds a mixture-of-experts router loss (router_aux_loss_coef), whose gradients are not "
            "those of the labels' cross-entropy; set router_aux_loss_coef=0"
        )
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise callback_error(
            "a custom compute_loss_func is not supported (the loss must be the model's own causal-LM loss "
            "computed from the labels it receives); pass compute_loss_func=None"
        )
    config = getattr(trainer.model, "config", None)
    for name, why in _REFUSED_MODEL_CONFIG.items():
        if getattr(config, name, None):
            raise callback_error(why)
    dataset = trainer.train_dataset
    if dataset is None:
        raise callback_error("the trainer has no train_dataset; pass train_dataset= to the Trainer")
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise callback_error(
            "the train_dataset is iterable (it has no length), so its rows have no index to store them under; "
            "use a map-style dataset (a datasets.Dataset or a list)"
        )


def output_layer(model: nn.Module) -> nn.Module:
    """The layer that computes the model's logits (``get_output_embeddings()``)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        raise callback_error("the model has no output layer (get_output_embeddings()); it needs a causal LM")
    return head


def dropout_modules(model: nn.Module) -> list[str]:
    """Names of dropout layers and config options that are active in training mode."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    config = getattr(model, "config", None)
    for key, value in (vars(config) if config is not None else {}).items():
        if "classifier" in key or "summary" in key:  # heads of other tasks
            continue
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float) and value > 0:
            names.append(f"config.{key}")
    return names


def check_batch(kwargs: dict[str, Any]) -> torch.Tensor:
    """The labels of a training forward pass's keyword arguments, once the batch is known to hold
    one unpacked row per sequence with one label per input position."""
    labels = kwargs.get("labels")
    if not isinstance(labels, torch.Tensor):
        raise callback_error(
            "the model was called without labels; the training batches need a 'labels' tensor (one label per "
            "input position, -100 where there is no loss)"
        )
    for key in _PACKED_BATCH_KEYS:
        if key in kwargs:
            raise callback_error(
                f"the batch carries {key!r}, a sign of packed or padding-free batches, whose rows cannot be "
                "separated; pad each row on its own"
            )
    position_ids = kwargs.get("position_ids")
    mask = kwargs.get("attention_mask")
    if isinstance(position_ids, torch.Tensor) and position_ids.ndim == 2:
        restart = position_ids.diff(dim=1) < 0
        if isinstance(mask, torch.Tensor) and mask.shape == position_ids.shape:
            restart &= (mask[:, 1:] != 0) & (mask[:, :-1] != 0)  # padding may hold any position
        if bool(restart.any()):
            raise callback_error(
                "position_ids restart inside a row, a sign of packed batches, whose rows cannot be separated; "
                "train with packing=False"
            )
    input_ids = kwargs.get("input_ids")
    if labels.ndim != 2 or (isinstance(input_ids, torch.Tensor) and labels.shape != input_ids.shape):
        raise callback_error(
            f"labels of shape {tuple(labels.shape)} are not one label per input position; it needs a causal "
            "LM's per-token labels"
        )
    return labels
