"""Per-example gradients of every training step of a Hugging Face ``Trainer``.

::

    from bergson import GradientCollectorCallback, prepare_for_gradient_collection

    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                      callbacks=[GradientCollectorCallback("runs/grads")])
    prepare_for_gradient_collection(trainer)
    trainer.train()

While the trainer trains, :class:`~bergson.collect.hooks.GradientCollector` hooks on the
trainer's own forward and backward passes project every row's gradient; there is no extra
forward or backward pass. Each epoch ``k`` becomes an ordinary gradient store
``path/epoch_{k}`` (what ``bergson build`` writes), whose row ``i`` is row ``i`` of the
trainer's ``train_dataset``, plus ``path/epoch_{k}/order.parquet`` with the columns ``row``,
``step``, ``epoch``, ``micro_batch`` and ``normalized``: when each row was trained on.

What a row's vector is: the gradient of the row's summed next-token cross-entropy (over its
label tokens, the ``loss_reduction="sum"`` of ``bergson build``) at the weights of the step
that trained on it, before that step's update (the weights of ``checkpoint-{step}``),
normalized by the optimizer state the update used, then projected. The trainer's loss is
some multiple c of that sum (a mean over the tokens of the accumulated batch, divided by the
accumulation steps, scaled by a loss scaler, ... depending on versions and options). c is
not assumed but measured for every row of every micro-batch, from the gradient that reaches
the output layer's logits: for the summed cross-entropy S it is softmax(z) - onehot(y) at
label positions, so the actual gradient G = c dS/dz gives c = <G, dS/dz> / |dS/dz|^2, taken
at a few label positions per row; the same positions check that G really is a multiple of
dS/dz (a loss with other terms is refused). The hooked vectors are divided by c.

Normalization (``normalize=True``): before each optimizer step, normalizers are built from
the live ``trainer.optimizer`` by :func:`~bergson.transforms.optimizer_state.normalizers_from_optimizer`,
the conversion ``bergson build --optimizer_state`` uses (AdamW: ``exp_avg_sq`` with bias
correction; Adafactor: its factors). The default ``normalizer_form="rank_one"`` fits Adam's
second moments with a rank-one (Adafactor) estimate, which keeps the cheap projected path;
``"adam"`` divides elementwise, which forms every row's full gradient per module (much
slower). Before the optimizer has state (the first step) vectors are stored unnormalized:
``normalized`` is False for those rows in the order file and the steps are listed in the
manifest's ``plan.unnormalized_steps``. Each store's ``normalizers.safetensors`` (and its
manifest's ``normalizer``) is the optimizer state at the end of the epoch, after its last
update: ``bergson query`` applies it to query gradients, and a query store for
``bergson score --index`` must be built with the same normalizers.

Rows the epoch never trained on (``dataloader_drop_last``, a run stopped early) keep a zero
vector with ``num_tokens`` 0 and loss 0 and are missing from the order file; a row trained on
twice in one epoch is an error. ``num_tokens`` is the row's attention-mask length (its padded
length when the batch has no mask); ``loss`` its summed cross-entropy.

Data parallel training (DDP: ``torchrun`` or ``accelerate launch`` of the training script,
one process per device) is supported: every rank collects the rows its own batches hold, and at
the end of each epoch sends them to rank 0, which writes the epoch store (its ``order.parquet``
lists every rank's micro-batches, step by step). accelerate's ``even_batches`` (on by default)
fills the last step's batches with rows from the start of the epoch, so those rows are trained on
twice; they keep the vector of their first step, both steps are in ``order.parquet`` and the
manifest's ``plan.repeated_rows`` counts them (``accelerator_config={"even_batches": False}``
avoids the repeats). Only rank 0 needs to see the output directory.

Not supported (a :class:`~bergson.errors.BergsonError` says so): DeepSpeed, FSDP and
DataParallel (several GPUs in one process), packed or padding-free batches, label smoothing, a custom ``compute_loss_func``, losses with terms other than the
labels' cross-entropy, labels that are not per position, encoder-decoder models, gradient
checkpointing, ``torch_compile``, iterable datasets, and resuming from a checkpoint. The
vectors equal ``bergson build``'s only when the model has no active dropout (the trainer's
forward pass drops units; a warning says so).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import deque
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from .. import distributed
from ..collect.hooks import GradientCollector
from ..config import IndexConfig
from ..data import TokenizedDocs
from ..errors import BergsonError
from ..models import find_tracked_modules
from ..runs.documents import context_size
from ..runs.manifests import make_manifest
from ..store import Manifest
from ..store.manifest import MANIFEST
from ..transforms.normalizers import Normalizer
from ..transforms.optimizer_state import NORMALIZER_FORMS, normalizers_from_optimizer
from .epoch_store import ORDER_FILE, EpochStore
from .loss_scale import MicroBatch, next_token_targets

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Checks


def _check_trainer(trainer: Any) -> None:
    """Refuse trainer set-ups whose per-row gradients the callback cannot recover."""
    args = trainer.args
    if args.n_gpu > 1:
        raise BergsonError(
            f"GradientCollectorCallback: the trainer drives {args.n_gpu} GPUs from one process (DataParallel), "
            "whose replicas' gradients cannot be told apart; launch one process per GPU (torchrun or "
            "accelerate launch) for data parallel training, or set CUDA_VISIBLE_DEVICES to one GPU"
        )
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        raise BergsonError(
            "GradientCollectorCallback: DeepSpeed and FSDP training are not supported (they shard the "
            "layers the hooks read); use plain data parallel training (DDP) or one process"
        )
    processes = getattr(getattr(trainer, "accelerator", None), "num_processes", 1)
    if max(args.world_size, processes) != distributed.world_size():
        raise BergsonError(
            f"GradientCollectorCallback: the trainer runs {max(args.world_size, processes)} processes but "
            f"this process's torch.distributed group has {distributed.world_size()}; start every process "
            "with torchrun or accelerate launch"
        )
    if getattr(args, "label_smoothing_factor", 0):
        raise BergsonError(
            f"GradientCollectorCallback: label_smoothing_factor={args.label_smoothing_factor}: label smoothing "
            "adds a term to the loss, so the trainer's gradients are not those of the labels' cross-entropy "
            "that a gradient store holds; set label_smoothing_factor=0"
        )
    collator = getattr(trainer, "data_collator", None)
    if (
        getattr(args, "packing", False)
        or getattr(args, "padding_free", False)
        or type(collator).__name__ == "DataCollatorWithFlattening"
    ):
        raise BergsonError(
            "GradientCollectorCallback: packed (or padding-free) batches put several dataset rows in one "
            "sequence, so per-row gradients cannot be separated; train with packing=False and padding_free=False"
        )
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise BergsonError(
            "GradientCollectorCallback: a custom compute_loss_func is not supported (the loss must be the "
            "model's own causal-LM loss computed from the labels it receives)"
        )
    if getattr(args, "gradient_checkpointing", False):
        raise BergsonError(
            "GradientCollectorCallback: gradient_checkpointing reruns layers during backward, which the "
            "gradient hooks do not support; set gradient_checkpointing=False"
        )
    if getattr(args, "torch_compile", False):
        raise BergsonError(
            "GradientCollectorCallback: torch_compile is not supported; set torch_compile=False"
        )
    config = getattr(trainer.model, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        raise BergsonError(
            "GradientCollectorCallback: models that transform their output layer's logits "
            "(final_logit_softcapping) are not supported"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise BergsonError(
            "GradientCollectorCallback: encoder-decoder models are not supported; it needs a causal LM "
            "whose labels are its input positions"
        )
    dataset = trainer.train_dataset
    if dataset is None:
        raise BergsonError("GradientCollectorCallback: the trainer has no train_dataset")
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise BergsonError(
            "GradientCollectorCallback: the train_dataset is iterable (it has no length), so its rows have "
            "no index to store them under; use a map-style dataset (a datasets.Dataset or a list)"
        )


def _dropout_modules(model: nn.Module) -> list[str]:
    """Names of dropout layers and config options that are active in training mode."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    config = getattr(model, "config", None)
    for key, value in (vars(config) if config is not None else {}).items():
        if "classifier" in key or "summary" in key:  # heads of other tasks
            continue
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float) and value > 0:
            names.append(f"config.{key}")
    return names


# ---------------------------------------------------------------------------------------------
# Which dataset rows each batch holds


_RECORDING: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    """A subclass of a batch sampler class that appends every batch it yields to a queue."""
    rec = _RECORDING.get(cls)
    if rec is None:

        def __iter__(self: Any) -> Any:
            for batch in cls.__iter__(self):  # type: ignore[attr-defined]
                queue = getattr(self, "_bergson_batches", None)
                if queue is not None:
                    queue.append(list(batch))
                yield batch

        rec = type(cls.__name__, (cls,), {"__iter__": __iter__, "_bergson_recording": True})
        rec.__module__ = cls.__module__
        _RECORDING[cls] = rec
    return rec


def _record_batches(dataloader: Any, queue: deque[list[int]] | None) -> Any:
    """Make the batch sampler of a (possibly accelerate-prepared) dataloader report its batches.

    The sampler runs in the main process whatever the number of workers, and batches come out of
    the dataloader in the order the sampler made them; accelerate iterates one batch ahead and the
    trainer prefetches a step's micro-batches, so batches are matched first in, first out. The
    sampler object keeps its class (seen through ``isinstance``) and its state.
    """
    base = getattr(dataloader, "base_dataloader", dataloader)
    if isinstance(getattr(base, "dataset", None), torch.utils.data.IterableDataset):
        raise BergsonError(
            "GradientCollectorCallback: the train dataloader reads an iterable dataset, whose rows have no "
            "index; use a map-style dataset"
        )
    sampler = getattr(base, "batch_sampler", None)
    if sampler is None:
        raise BergsonError(
            "GradientCollectorCallback: the train dataloader has no batch sampler, so the dataset rows of "
            "each batch cannot be known"
        )
    if not getattr(type(sampler), "_bergson_recording", False):
        sampler.__class__ = _recording_class(type(sampler))
    sampler._bergson_batches = queue
    return sampler


# ---------------------------------------------------------------------------------------------
# The callback


class GradientCollectorCallback(TrainerCallback):
    """Store the projected per-example gradients of every training step, one store per epoch.

    Args:
        path: output directory; epoch ``k`` goes to ``path/epoch_{k}``.
        track_order: write ``path/epoch_{k}/order.parquet`` (row, step, epoch, micro_batch,
            normalized) in the order rows were trained on.
        projection_dim: as ``bergson build --projection_dim`` (0: full gradients).
        projection_seed: as ``bergson build --projection_seed``.
        include_bias: as ``bergson build --include_bias``.
        modules: as ``bergson build --modules`` (glob patterns of module names; default every
            supported layer).
        normalize: divide by the optimizer's second moments at each step (see the module notes).
        normalizer_form: ``"rank_one"`` (default: Adafactor-style fit, cheap projected path),
            ``"adam"`` (elementwise; forms full per-row gradients) or ``"auto"`` (the
            optimizer's own form: elementwise for AdamW).
        save_dtype: ``"auto"`` (float16 for projected vectors unless an epoch has values beyond
            its range, which makes that store float32; float32 for full gradients), ``"float16"``
            (an epoch with values beyond its range fails) or ``"float32"``.
        shard_size: rows per shard file of each epoch store.
        model_name: the model name recorded in the manifests (default: the name the model was
            loaded from, ``config._name_or_path``); stores compared by ``bergson score
            --index`` must agree on it.
        overwrite: replace epoch stores already under ``path`` instead of refusing.

    Call :func:`prepare_for_gradient_collection` on the trainer before ``trainer.train()``.
    ``stores`` lists the epoch stores written so far.
    """

    def __init__(
        self,
        path: str | Path,
        track_order: bool = True,
        projection_dim: int = 16,
        projection_seed: int = 0,
        include_bias: bool = False,
        modules: Sequence[str] | None = None,
        normalize: bool = True,
        normalizer_form: str = "rank_one",
        save_dtype: str = "auto",
        shard_size: int = 4096,
        model_name: str | None = None,
        overwrite: bool = False,
    ):
        if normalizer_form not in NORMALIZER_FORMS:
            raise BergsonError(
                f"GradientCollectorCallback: normalizer_form={normalizer_form!r}; choose one of "
                f"{', '.join(NORMALIZER_FORMS)}"
            )
        if save_dtype not in ("auto", "float16", "float32"):
            raise BergsonError(
                f"GradientCollectorCallback: save_dtype={save_dtype!r}; choose auto, float16 or float32"
            )
        if projection_dim < 0:
            raise BergsonError(
                f"GradientCollectorCallback: projection_dim={projection_dim}; must be 0 (full gradients) or positive"
            )
        if shard_size < 1:
            raise BergsonError(f"GradientCollectorCallback: shard_size={shard_size}; must be at least 1")
        self.path = Path(path)
        self.track_order = track_order
        self.projection_dim = projection_dim
        self.projection_seed = projection_seed
        self.include_bias = include_bias
        self.modules = list(modules) if modules else []
        self.normalize = normalize
        self.normalizer_form = normalizer_form
        self.save_dtype = save_dtype
        self.shard_size = shard_size
        self.model_name = model_name
        self.overwrite = overwrite
        self.stores: list[Path] = []
        self._trainer: Any = None
        self._batches: deque[list[int]] = deque()
        self._sampler: Any = None
        self._handles: list[Any] = []
        self._tracked: dict[str, nn.Module] = {}
        self._columns: dict[str, tuple[int, int]] = {}
        self._cfg: IndexConfig | None = None
        self._num_rows = 0
        self._max_tokens = 2048
        self._collector: GradientCollector | None = None
        self._pending: MicroBatch | None = None
        self._epoch: EpochStore | None = None
        self._epochs_started = 0
        self._step = 0
        self._micro = 0
        self._normalized = False
        self._seconds = 0.0
        self._epoch_seconds = 0.0

    # ------------------------------------------------------------------ set-up
    def _index_config(self, model: nn.Module) -> IndexConfig:
        name = self.model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        return IndexConfig(
            model=str(name) or type(model).__name__,
            run_path=str(self.path),
            projection_dim=self.projection_dim,
            projection_seed=self.projection_seed,
            include_bias=self.include_bias,
            modules=list(self.modules),
            loss_reduction="sum",
            save_dtype=cast(Any, self.save_dtype),
            shard_size=self.shard_size,
            normalizer_form=cast(Any, self.normalizer_form),
        )

    def _manifest(self, model: nn.Module, normalizers: dict[str, Normalizer] | None = None) -> Manifest:
        assert self._cfg is not None
        empty = TokenizedDocs([], np.zeros(0, np.int64))
        manifest = make_manifest(self._cfg, model, self._tracked, empty, self._max_tokens, normalizers)
        dataset = self._trainer.train_dataset if self._trainer is not None else None
        manifest.num_rows = self._num_rows
        manifest.data = {
            "dataset": "",
            "source": "transformers.Trainer train_dataset",
            "dataset_class": type(dataset).__name__,
            "fingerprint": getattr(dataset, "_fingerprint", None),
            "num_documents": self._num_rows,
            "max_tokens": self._max_tokens,
        }
        return manifest

    def _prepare_directory(self) -> None:
        root = self.path
        if root.exists() and not root.is_dir():
            raise BergsonError(f"GradientCollectorCallback: {root} is a file; choose a directory")
        existing = sorted(p for p in root.glob("epoch_*") if p.is_dir()) if root.is_dir() else []
        if existing and not self.overwrite:
            raise BergsonError(
                f"GradientCollectorCallback: {root} already holds {existing[0].name}; pass overwrite=True to "
                "replace its epoch stores, or choose another path"
            )
        for p in existing:
            if not (p / MANIFEST).is_file() and any(p.iterdir()):
                raise BergsonError(f"GradientCollectorCallback: {p} is not a bergson store; not replacing it")
            shutil.rmtree(p)
        root.mkdir(parents=True, exist_ok=True)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self._trainer
        if trainer is None:
            raise BergsonError(
                "GradientCollectorCallback: call bergson.prepare_for_gradient_collection(trainer) before "
                "trainer.train()"
            )
        _check_trainer(trainer)
        if state.global_step > 0:
            raise BergsonError(
                "GradientCollectorCallback: resuming from a checkpoint is not supported (the epoch stores "
                "would miss the rows trained before it); train from the start"
            )
        self._teardown()
        model: nn.Module = trainer.model
        self._tracked = find_tracked_modules(model, self.modules)
        self._cfg = self._index_config(model)
        self._num_rows = len(trainer.train_dataset)
        self._max_tokens = context_size(model) or 2048
        layout = self._manifest(model).modules
        self._columns = {m.name: (m.offset, m.offset + m.dim) for m in layout}
        probe = GradientCollector(
            model, self._tracked, projection_dim=self.projection_dim, include_bias=self.include_bias
        )
        if probe.dims != {m.name: m.dim for m in layout}:
            raise BergsonError(
                "GradientCollectorCallback: the collector's columns disagree with the store layout"
            )
        distributed.control_group()  # every rank, before any rank-0-only step
        distributed.on_rank_zero(self._prepare_directory, f"preparing {self.path}")
        dataloader = kwargs.get("train_dataloader")
        if dataloader is None:
            raise BergsonError("GradientCollectorCallback: the trainer did not pass its train dataloader")
        self._sampler = _record_batches(dataloader, self._batches)
        output_layer = getattr(model, "get_output_embeddings", None)
        head = output_layer() if callable(output_layer) else None
        if not isinstance(head, nn.Module):
            raise BergsonError(
                "GradientCollectorCallback: the model has no output layer (get_output_embeddings()); it needs "
                "a causal LM"
            )
        self._handles = [
            model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True),
            head.register_forward_hook(self._on_logits),
        ]
        dropout = _dropout_modules(model)
        if dropout:
            logger.warning(
                "the model has active dropout (%s): stored vectors are the gradients of the trainer's "
                "dropped-out forward passes, not those `bergson build` computes without dropout",
                ", ".join(dropout[:3]) + (", ..." if len(dropout) > 3 else ""),
            )
        self._epochs_started = 0
        self.stores = []
        self._seconds = self._epoch_seconds = 0.0
        if distributed.rank() == 0:
            logger.info(
                "collecting gradients of %d modules (%d columns per row) for %d rows into %s%s",
                len(self._tracked),
                sum(b - a for a, b in self._columns.values()),
                self._num_rows,
                self.path,
                f" on {distributed.world_size()} ranks" if distributed.world_size() > 1 else "",
            )

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish_epoch(state)
        epoch = self._epochs_started
        self._epochs_started += 1
        self._batches.clear()
        root = self.path / f"epoch_{epoch}"
        self._epoch = EpochStore(
            root,
            self._manifest(self._trainer.model),
            self._num_rows,
            epoch,
            self.shard_size,
            auto_dtype=self.save_dtype == "auto",
        )

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_step()
        start = time.perf_counter()
        normalizers = self._normalizers() if self.normalize else None
        if self.normalize and normalizers is None and state.global_step > 0:
            self._no_optimizer_state(state.global_step)
        self._step = int(state.global_step)
        self._micro = 0
        self._normalized = normalizers is not None
        self._collector = GradientCollector(
            self._trainer.model,
            self._tracked,
            projection_dim=self.projection_dim,
            seed=self.projection_seed,
            include_bias=self.include_bias,
            normalizers=normalizers,
            closure=self._closure,
        ).__enter__()
        self._seconds += time.perf_counter() - start

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish_micro_batch()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_step()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_step()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish_epoch(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish_epoch(state)
        self._teardown()
        logger.info("gradient collection took %.1f s of the training run", self._seconds)

    # ------------------------------------------------------------------ steps
    def _normalizers(self) -> dict[str, Normalizer] | None:
        return normalizers_from_optimizer(
            self._trainer.optimizer,
            self._tracked,
            form=self.normalizer_form,
            include_bias=self.include_bias,
            source="the trainer's optimizer",
        )

    def _no_optimizer_state(self, step: int) -> None:
        opt = self._trainer.optimizer
        inner = getattr(opt, "optimizer", opt)
        if getattr(self._trainer.accelerator, "scaler", None) is not None:
            logger.warning(
                "step %d: the optimizer has no state yet (skipped steps?); vectors are unnormalized", step
            )
            return
        raise BergsonError(
            f"GradientCollectorCallback: normalize=True, but the trainer's optimizer ({type(inner).__name__}) "
            f"keeps no second-moment estimates after {step} steps; use AdamW or Adafactor, or pass normalize=False"
        )

    def _close_step(self) -> None:
        self._finish_micro_batch()
        if self._collector is not None:
            self._collector.__exit__(None, None, None)
            self._collector = None

    def _on_model_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._collector is None or not torch.is_grad_enabled() or not module.training:
            return
        start = time.perf_counter()
        if self._pending is not None:
            raise BergsonError(
                "GradientCollectorCallback: a second training forward pass began before the previous "
                "micro-batch's backward pass ended; only one forward and backward per micro-batch is supported"
            )
        labels = kwargs.get("labels")
        if not isinstance(labels, torch.Tensor):
            raise BergsonError(
                "GradientCollectorCallback: the model was called without labels; the training batches need "
                "a 'labels' tensor (one label per input position, -100 where there is no loss)"
            )
        for key in ("shift_labels", "cu_seq_lens_q", "cu_seqlens_q", "seq_idx"):
            if key in kwargs:
                raise BergsonError(
                    f"GradientCollectorCallback: the batch carries {key!r}, a sign of packed or padding-free "
                    "batches, whose rows cannot be separated; pad each row on its own"
                )
        position_ids = kwargs.get("position_ids")
        mask = kwargs.get("attention_mask")
        if isinstance(position_ids, torch.Tensor) and position_ids.ndim == 2:
            restart = position_ids.diff(dim=1) < 0
            if isinstance(mask, torch.Tensor) and mask.shape == position_ids.shape:
                restart &= (mask[:, 1:] != 0) & (mask[:, :-1] != 0)  # padding may hold any position
        else:
            restart = None
        if restart is not None and bool(restart.any()):
            raise BergsonError(
                "GradientCollectorCallback: position_ids restart inside a row, a sign of packed batches, "
                "whose rows cannot be separated; train with packing=False"
            )
        input_ids = kwargs.get("input_ids")
        if labels.ndim != 2 or (isinstance(input_ids, torch.Tensor) and labels.shape != input_ids.shape):
            raise BergsonError(
                f"GradientCollectorCallback: labels of shape {tuple(labels.shape)} are not one label per input "
                "position; it needs a causal LM's per-token labels"
            )
        if not self._batches:
            raise BergsonError(
                "GradientCollectorCallback: a training batch arrived that the train dataloader's sampler did "
                "not hand out, so its dataset rows are unknown (a custom get_train_dataloader or iterator?)"
            )
        try:
            rows = np.asarray(self._batches.popleft(), dtype=np.int64)
        except (TypeError, ValueError) as e:
            raise BergsonError("GradientCollectorCallback: the sampler's indices are not row numbers") from e
        if len(rows) != labels.shape[0]:
            raise BergsonError(
                f"GradientCollectorCallback: the sampler handed out {len(rows)} rows but the batch has "
                f"{labels.shape[0]}; the data collator must keep one sequence per dataset row, in order"
            )
        if isinstance(mask, torch.Tensor) and mask.shape == labels.shape:
            num_tokens = mask.sum(1).cpu().numpy().astype(np.int64)
        else:
            num_tokens = np.full(len(rows), labels.shape[1], np.int64)
        total = sum(b - a for a, b in self._columns.values())
        device = labels.device
        dtype = torch.float64 if next(module.parameters()).dtype == torch.float64 else torch.float32
        self._pending = MicroBatch(
            rows=rows,
            step=self._step,
            index=self._micro,
            normalized=self._normalized,
            buffer=torch.zeros(len(rows), total, dtype=dtype, device=device),
            targets=next_token_targets(labels.detach()),
            num_tokens=num_tokens,
            inputs=input_ids.detach() if isinstance(input_ids, torch.Tensor) else None,
        )
        self._micro += 1
        self._seconds += time.perf_counter() - start

    def _on_logits(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        mb = self._pending
        if mb is None or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return
        if mb.forward_done:
            raise BergsonError("GradientCollectorCallback: the output layer ran twice in one forward pass")
        start = time.perf_counter()
        mb.probe_forward(output)
        if not output.requires_grad:
            output.requires_grad_(True)
        output.register_hook(partial(self._on_logits_grad, mb))
        self._seconds += time.perf_counter() - start

    def _on_logits_grad(self, mb: MicroBatch, grad: torch.Tensor) -> None:
        start = time.perf_counter()
        mb.probe_backward(grad)
        self._seconds += time.perf_counter() - start

    def _closure(self, name: str, vec: torch.Tensor) -> None:
        mb = self._pending
        if mb is None:
            raise BergsonError(
                "GradientCollectorCallback: a backward pass ran outside a training micro-batch"
            )
        a, b = self._columns[name]
        mb.buffer[:, a:b] = vec

    def _finish_micro_batch(self) -> None:
        mb = self._pending
        if mb is None:
            return
        start = time.perf_counter()
        self._pending = None
        assert self._epoch is not None
        if not mb.forward_done or mb.has_targets is None:
            raise BergsonError(
                "GradientCollectorCallback: the model's output layer did not run in the forward pass, so the "
                "loss scale cannot be measured"
            )
        if mb.scale is None or mb.residual is None:
            if bool(mb.has_targets.any()):
                raise BergsonError(
                    "GradientCollectorCallback: no gradient reached the model's logits in this micro-batch "
                    "(the loss does not come from the logits, or backward did not run)"
                )
            scale = torch.zeros(len(mb.rows), dtype=torch.float64, device=mb.buffer.device)
            residual = torch.zeros_like(scale)
        else:
            scale, residual = mb.scale, mb.residual
        tol = 1e-3 if mb.grad_dtype in (None, torch.float32, torch.float64) else 3e-2
        worst = int(residual.argmax())
        if float(residual[worst]) > tol:
            raise BergsonError(
                f"GradientCollectorCallback: the gradient reaching the logits of dataset row {int(mb.rows[worst])} "
                f"is not a multiple of its summed next-token cross-entropy (relative difference "
                f"{float(residual[worst]):.2g}): the trainer's loss has other terms (label smoothing, a z-loss, "
                "per-token weights, a custom compute_loss) or the model rescales its output layer's logits; only "
                "the plain causal-LM loss of the labels is supported"
            )
        finite = torch.isfinite(scale) & torch.isfinite(mb.buffer).all(1)
        usable = mb.has_targets & (scale != 0) & finite
        if bool((mb.has_targets & ~finite).any()):
            logger.warning(
                "step %d: non-finite gradients (a loss-scaler overflow; the trainer skips this step); rows %s "
                "get zero vectors",
                mb.step,
                mb.rows[(mb.has_targets & ~finite).cpu().numpy()].tolist(),
            )
        elif bool((mb.has_targets & (scale == 0)).any()):
            logger.warning(
                "step %d: some rows have labels but no weight in the trainer's loss; zero vectors", mb.step
            )
        safe = torch.where(usable, scale, torch.ones_like(scale))
        vectors = torch.where(
            usable[:, None], mb.buffer.double() / safe[:, None], torch.zeros((), dtype=torch.float64)
        )
        self._epoch.approximate += mb.approximate
        loss = torch.zeros_like(scale) if mb.loss is None else mb.loss.to(scale.device)
        loss = torch.where(usable, loss, torch.zeros_like(loss))
        self._epoch.add(
            mb.rows,
            vectors.cpu().numpy(),
            mb.num_tokens,
            loss.float().cpu().numpy(),
            mb.step,
            mb.index,
            mb.normalized,
        )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "step %d micro-batch %d: rows %s, loss scale %s",
                mb.step,
                mb.index,
                mb.rows.tolist(),
                scale.tolist(),
            )
        self._seconds += time.perf_counter() - start

    # ------------------------------------------------------------------ epochs
    def _finish_epoch(self, state: Any) -> None:
        self._close_step()
        store = self._epoch
        if store is None:
            return
        self._epoch = None
        start = time.perf_counter()
        store.merge_ranks()
        normalizers = self._normalizers() if self.normalize else None
        info = self._manifest(self._trainer.model, normalizers).normalizer if normalizers else None
        seen = int(store.seen.sum())
        plan = {
            "source": "transformers.Trainer (bergson GradientCollectorCallback)",
            "epoch": store.epoch,
            "steps": sorted(store.steps),
            "rows_trained": seen,
            "rows_not_trained": len(store.seen) - seen,
            "normalize": self.normalize,
            "normalizer_form": self.normalizer_form if self.normalize else None,
            "row_normalizers": (
                "each row: the optimizer state before its step's update; normalizers.safetensors: the state "
                "at the end of the epoch"
                if self.normalize
                else None
            ),
            "unnormalized_steps": sorted(store.unnormalized) if self.normalize else [],
            "order_file": ORDER_FILE if self.track_order else None,
            "approximate_loss_tokens": store.approximate,
            "shard_size": self.shard_size,
            "ranks": distributed.world_size(),
            "repeated_rows": store.repeated_rows(),
        }
        try:
            distributed.on_rank_zero(
                lambda: store.close(plan, normalizers, info, self.track_order), f"writing {store.root}"
            )
        finally:
            store.discard_buffer()
        self.stores.append(store.root)
        self._seconds += time.perf_counter() - start
        self._epoch_seconds += time.perf_counter() - start
        if distributed.rank() != 0:
            return
        if seen < len(store.seen):
            logger.warning(
                "epoch %d: %d of %d rows were not trained on; they keep zero vectors (num_tokens 0)",
                store.epoch,
                len(store.seen) - seen,
                len(store.seen),
            )
        if store.approximate:
            logger.warning(
                "epoch %d: the loss column is approximate for %d tokens (probabilities too small to recover "
                "from the gradient); the vectors are exact",
                store.epoch,
                store.approximate,
            )
        logger.info("epoch %d: gradients of %d rows written to %s", store.epoch, seen, store.root)

    def _teardown(self) -> None:
        self._close_step()
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._epoch is not None:  # an epoch that never ended (training failed)
            self._epoch.discard_buffer()
            self._epoch = None
        self._batches.clear()
        if self._sampler is not None:
            self._sampler._bergson_batches = None
            self._sampler = None


def prepare_for_gradient_collection(
    trainer: Any, callback: GradientCollectorCallback | None = None
) -> GradientCollectorCallback:
    """Attach the trainer's :class:`GradientCollectorCallback` to the trainer and check its set-up.

    ``trainer`` is a ``transformers.Trainer`` (or a subclass such as TRL's ``SFTTrainer``) that
    already has the callback among its callbacks, or that gets ``callback`` added. Raises a
    :class:`~bergson.errors.BergsonError` naming the cause for set-ups the callback cannot
    support (see :mod:`bergson.integrations.trainer`). Returns the callback.
    """
    handler = getattr(trainer, "callback_handler", None)
    if handler is None or not hasattr(trainer, "args"):
        raise BergsonError(
            f"prepare_for_gradient_collection: expected a transformers.Trainer, got {type(trainer).__name__}"
        )
    found = [cb for cb in handler.callbacks if isinstance(cb, GradientCollectorCallback)]
    if callback is not None and callback not in found:
        trainer.add_callback(callback)
        found.append(callback)
    if not found:
        raise BergsonError(
            "prepare_for_gradient_collection: the trainer has no GradientCollectorCallback; pass "
            "callbacks=[GradientCollectorCallback(path)] to the Trainer, or the callback to this function"
        )
    if len(found) > 1:
        raise BergsonError(
            "prepare_for_gradient_collection: the trainer has more than one GradientCollectorCallback"
        )
    _check_trainer(trainer)
    found[0]._trainer = trainer
    return found[0]
