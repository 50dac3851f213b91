"""The Trainer callback: :class:`GradientCollectorCallback` and
:func:`prepare_for_gradient_collection`, which links it to its trainer.

The callback follows the trainer's events: at the start of training it checks the set-up
(:mod:`~bergson.integrations.checks`), lays out the store's columns and attaches a
:class:`~bergson.integrations.recording.BatchRecorder`; every epoch gets an
:class:`~bergson.integrations.epoch_store.EpochStore`; every optimizer step a
:class:`~bergson.collect.hooks.GradientCollector` with the optimizer's normalizers of that
step; every finished micro-batch adds its rows, divided by their loss scale, to the epoch.
What the stores hold is described in :mod:`bergson.integrations`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
from torch import nn
from transformers import TrainerCallback

from .. import distributed
from ..collect.hooks import Closure, GradientCollector
from ..config import IndexConfig
from ..data import TokenizedDocs
from ..errors import BergsonError
from ..models import announce_coverage, find_tracked_modules
from ..runs.documents import context_size
from ..runs.manifests import make_manifest
from ..store import Manifest
from ..transforms.normalizers import Normalizer
from ..transforms.optimizer_state import normalizers_from_optimizer
from .checks import callback_error, check_options, check_trainer, dropout_modules
from .epoch_store import EpochStore, prepare_directory
from .recording import BatchRecorder, Stopwatch

logger = logging.getLogger(__name__)


class GradientCollectorCallback(TrainerCallback):
    """Store the projected per-example gradients of every training step, one store per epoch.

    Args:
        path: output directory; epoch ``k`` goes to ``path/epoch_{k}``.
        track_order: write ``path/epoch_{k}/order.parquet`` (row, step, epoch, micro_batch,
            normalized) in the order rows were trained on.
        projection_dim: as ``bergson build --projection_dim`` (0: full gradients).
        projection_seed: as ``bergson build --projection_seed``.
        include_bias: as ``bergson build --include_bias``.
        modules: as ``bergson build --modules`` (glob patterns of module names; default the
            supported layers inside ``model.base_model``).
        include_output_head: as ``bergson build --include_output_head`` (also track the output
            head; not possible with TRL's fused LM-head loss, which never calls it).
        track_experts: as ``bergson build --track_experts`` (also track fused MoE experts, one
            block per expert, and routers).
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
        include_output_head: bool = False,
        track_experts: bool = False,
        normalize: bool = True,
        normalizer_form: str = "rank_one",
        save_dtype: str = "auto",
        shard_size: int = 4096,
        model_name: str | None = None,
        overwrite: bool = False,
    ):
        check_options(path, projection_dim, normalizer_form, save_dtype, shard_size)
        self.path = Path(path)
        self.track_order = track_order
        self.projection_dim = projection_dim
        self.projection_seed = projection_seed
        self.include_bias = include_bias
        self.modules = list(modules) if modules else []
        self.include_output_head = include_output_head
        self.track_experts = track_experts
        self.normalize = normalize
        self.normalizer_form = normalizer_form
        self.save_dtype = save_dtype
        self.shard_size = shard_size
        self.model_name = model_name
        self.overwrite = overwrite
        self.stores: list[Path] = []
        self._trainer: Any = None
        self._watch = Stopwatch()
        """Seconds the callback took of the training run."""
        self._epoch_watch = Stopwatch()
        """Seconds spent writing epoch stores."""
        self._recorder = BatchRecorder(self._watch)
        self._tracked: dict[str, nn.Module] = {}
        self._cfg: IndexConfig | None = None
        self._num_rows = 0
        self._max_tokens = 2048
        self._collector: GradientCollector | None = None
        self._epoch: EpochStore | None = None
        self._epochs_started = 0

    @classmethod
    def of(cls, trainer: Any) -> GradientCollectorCallback:
        """The trainer's callback (the one :func:`prepare_for_gradient_collection` checked)."""
        found = _attached(trainer)
        if len(found) != 1:
            raise BergsonError(
                f"GradientCollectorCallback.of: the trainer has {len(found)} GradientCollectorCallbacks; "
                "give it exactly one (callbacks=[GradientCollectorCallback(path)])"
            )
        return found[0]

    @property
    def _seconds(self) -> float:
        return self._watch.seconds

    @property
    def _epoch_seconds(self) -> float:
        return self._epoch_watch.seconds

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
            include_output_head=self.include_output_head,
            track_experts=self.track_experts,
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

    def _collector_for(
        self,
        model: nn.Module,
        normalizers: dict[str, Normalizer] | None = None,
        closure: Closure | None = None,
    ) -> GradientCollector:
        """A gradient collector on the tracked modules with the callback's projection."""
        return GradientCollector(
            model,
            self._tracked,
            projection_dim=self.projection_dim,
            seed=self.projection_seed,
            include_bias=self.include_bias,
            normalizers=normalizers,
            closure=closure,
        )

    def _columns(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """Each tracked module's columns of a row's vector, as the store lays them out."""
        layout = self._manifest(model).modules
        if self._collector_for(model).dims != {m.name: m.dim for m in layout}:
            raise callback_error("the collector's columns disagree with the store layout")
        return {m.name: (m.offset, m.offset + m.dim) for m in layout}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self._trainer
        if trainer is None:
            raise callback_error(
                "call bergson.prepare_for_gradient_collection(trainer) before trainer.train()"
            )
        check_trainer(trainer)
        if state.global_step > 0:
            raise callback_error(
                "resuming from a checkpoint is not supported (the epoch stores would miss the rows trained "
                "before it); train from the start (resume_from_checkpoint=None)"
            )
        self._teardown()
        model: nn.Module = trainer.model
        self._tracked = find_tracked_modules(
            model,
            self.modules,
            include_output_head=self.include_output_head,
            track_experts=self.track_experts,
        )
        self._cfg = self._index_config(model)
        self._num_rows = len(trainer.train_dataset)
        self._max_tokens = context_size(model) or 2048
        columns = self._columns(model)
        distributed.control_group()  # every rank, before any rank-0-only step
        distributed.on_rank_zero(
            lambda: prepare_directory(self.path, self.overwrite), f"preparing {self.path}"
        )
        dataloader = kwargs.get("train_dataloader")
        if dataloader is None:
            raise callback_error(
                "the trainer did not pass its train dataloader to the callback's on_train_begin; use a "
                "transformers.Trainer whose train() does"
            )
        self._recorder.attach(model, dataloader, columns, self._tracked)
        dropout = dropout_modules(model)
        if dropout:
            logger.warning(
                "the model has active dropout (%s): stored vectors are the gradients of the trainer's "
                "dropped-out forward passes, not those `bergson build` computes without dropout",
                ", ".join(dropout[:3]) + (", ..." if len(dropout) > 3 else ""),
            )
        self._epochs_started = 0
        self.stores = []
        self._watch.seconds = self._epoch_watch.seconds = 0.0
        if distributed.rank() == 0:
            announce_coverage(self._manifest(model).model)
            logger.info(
                "collecting gradients of %d modules (%d columns per row) for %d rows into %s%s",
                len(self._tracked),
                self._recorder.width,
                self._num_rows,
                self.path,
                f" on {distributed.world_size()} ranks" if distributed.world_size() > 1 else "",
            )

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish_epoch()
        epoch = self._epochs_started
        self._epochs_started += 1
        self._recorder.batches.clear()
        self._epoch = EpochStore(
            self.path / f"epoch_{epoch}",
            self._manifest(self._trainer.model),
            self._num_rows,
            epoch,
            self.shard_size,
            auto_dtype=self.save_dtype == "auto",
        )

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_step()
        with self._watch:
            normalizers = self._normalizers() if self.normalize else None
            if self.normalize and normalizers is None and state.global_step > 0:
                self._no_optimizer_state(state.global_step)
            model = self._trainer.model
            self._collector = self._collector_for(model, normalizers, self._recorder.closure).__enter__()
            self._recorder.open_step(int(state.global_step), normalized=normalizers is not None)

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish_micro_batch()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_step()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_step()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish_epoch()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish_epoch()
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
        raise callback_error(
            f"normalize=True, but the trainer's optimizer ({type(inner).__name__}) keeps no second-moment "
            f"estimates after {step} steps; use AdamW or Adafactor, or pass normalize=False"
        )

    def _close_step(self) -> None:
        self._finish_micro_batch()
        self._recorder.close_step()
        if self._collector is not None:
            self._collector.__exit__(None, None, None)
            self._collector = None

    def _finish_micro_batch(self) -> None:
        mb = self._recorder.take()
        if mb is None:
            return
        with self._watch:
            assert self._epoch is not None
            vectors, loss = mb.unscaled()
            self._epoch.approximate += mb.approximate
            self._epoch.add(mb.rows, vectors, mb.num_tokens, loss, mb.step, mb.index, mb.normalized)

    # ------------------------------------------------------------------ epochs
    def _finish_epoch(self) -> None:
        self._close_step()
        store = self._epoch
        if store is None:
            return
        self._epoch = None
        with self._watch, self._epoch_watch:
            store.merge_ranks()
            normalizers = self._normalizers() if self.normalize else None
            info = self._manifest(self._trainer.model, normalizers).normalizer if normalizers else None
            plan = store.plan(self.normalize, self.normalizer_form, self.track_order)
            try:
                distributed.on_rank_zero(
                    lambda: store.close(plan, normalizers, info, self.track_order), f"writing {store.root}"
                )
            finally:
                store.discard_buffer()
            self.stores.append(store.root)
        if distributed.rank() != 0:
            return
        seen, rows = int(store.seen.sum()), len(store.seen)
        if seen < rows:
            logger.warning(
                "epoch %d: %d of %d rows were not trained on; they keep zero vectors (num_tokens 0)",
                store.epoch,
                rows - seen,
                rows,
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
        self._recorder.detach()
        if self._epoch is not None:  # an epoch that never ended (training failed)
            self._epoch.discard_buffer()
            self._epoch = None


def _attached(trainer: Any) -> list[GradientCollectorCallback]:
    """The trainer's GradientCollectorCallbacks, in the order of its callbacks."""
    handler = getattr(trainer, "callback_handler", None)
    return [cb for cb in getattr(handler, "callbacks", []) if isinstance(cb, GradientCollectorCallback)]


def prepare_for_gradient_collection(trainer: Any, callback: GradientCollectorCallback | None = None) -> Any:
    """Attach the trainer's :class:`GradientCollectorCallback` to the trainer and check its set-up.

    ``trainer`` is a ``transformers.Trainer`` (or a subclass such as TRL's ``SFTTrainer``) that
    already has the callback among its callbacks, or that gets ``callback`` added. Raises a
    :class:`~bergson.errors.BergsonError` naming the cause for set-ups the callback cannot
    support (see :mod:`bergson.integrations`). Returns the trainer, as the original package's
    ``trainer = prepare_for_gradient_collection(trainer)`` expects (the callback is
    ``GradientCollectorCallback.of(trainer)``).
    """
    handler = getattr(trainer, "callback_handler", None)
    if handler is None or not hasattr(trainer, "args"):
        raise BergsonError(
            f"prepare_for_gradient_collection: expected a transformers.Trainer, got {type(trainer).__name__}; "
            "pass the Trainer (or a subclass such as TRL's SFTTrainer) that trains the model"
        )
    found = _attached(trainer)
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
            "prepare_for_gradient_collection: the trainer has more than one GradientCollectorCallback; "
            "keep one in its callbacks"
        )
    check_trainer(trainer)
    found[0]._trainer = trainer
    return trainer
