"""One epoch's gradient store, filled in training order and written in dataset order, and the
output directory that holds the epoch stores ``epoch_{k}``."""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import distributed
from ..core.files import atomic_write_bytes
from ..data import plan_shards
from ..store import Manifest, StoreWriter
from ..store.manifest import MANIFEST
from ..transforms.normalizers import NORMALIZERS_FILE, Normalizer, save_normalizers
from .checks import callback_error

logger = logging.getLogger(__name__)

ORDER_FILE = "order.parquet"
"""Per epoch store: the rows in the order they were trained on, with their step."""
_BUFFER_FILE = ".collecting.npy"


def prepare_directory(root: Path, overwrite: bool) -> None:
    """Create the output directory; with ``overwrite`` remove the epoch stores already in it,
    without it refuse to write over them."""
    if root.exists() and not root.is_dir():
        raise callback_error(f"path {root} is a file; choose a directory")
    existing = sorted(p for p in root.glob("epoch_*") if p.is_dir()) if root.is_dir() else []
    if existing and not overwrite:
        raise callback_error(
            f"{root} already holds {existing[0].name}; pass overwrite=True to replace its epoch stores, or "
            "choose another path"
        )
    for p in existing:
        if not (p / MANIFEST).is_file() and any(p.iterdir()):
            raise callback_error(f"{p} is not a bergson store; not replacing it (choose another path)")
        shutil.rmtree(p)
    root.mkdir(parents=True, exist_ok=True)


class EpochStore:
    """Rows arrive in training order; they are kept in a memory-mapped float32 buffer in dataset
    order and written as an ordinary store (shards of ``shard_size`` rows) when the epoch ends.

    Under data parallel training (several ranks), every rank keeps the rows it trained on
    (rank 0 in the store directory, the others in a local temporary directory); at the end of
    the epoch :meth:`merge_ranks` sends them to rank 0, which alone writes the store.

    With ``auto_dtype`` a float16 store becomes float32 when a value exceeds float16's range
    (normalized gradients early in training can: Adam's second moments are still tiny for rarely
    seen tokens), rather than failing the training run."""

    def __init__(
        self, root: Path, manifest: Manifest, num_rows: int, epoch: int, shard_size: int, auto_dtype: bool
    ):
        self.root = root
        self.epoch = epoch
        self.shard_size = shard_size
        self.auto_dtype = auto_dtype
        self.writer = distributed.on_rank_zero(lambda: StoreWriter(root, manifest), f"preparing {root}")
        self._scratch = None if self.writer is not None else Path(tempfile.mkdtemp(prefix="bergson-epoch-"))
        self.largest = 0.0
        self.vectors = np.lib.format.open_memmap(
            (self._scratch or root) / _BUFFER_FILE,
            mode="w+",
            dtype=np.float32,
            shape=(num_rows, manifest.total_dim),
        )
        self.counts = np.zeros(num_rows, np.int64)  # times each row was trained on, over all ranks
        self.num_tokens = np.zeros(num_rows, np.int64)
        self.loss = np.zeros(num_rows, np.float32)
        self.seen = np.zeros(num_rows, bool)
        self.order: list[tuple[np.ndarray, int, int, bool]] = []
        self.approximate = 0
        self.unnormalized: set[int] = set()
        self.steps: set[int] = set()

    def add(
        self,
        rows: np.ndarray,
        vectors: np.ndarray,
        num_tokens: np.ndarray,
        loss: np.ndarray,
        step: int,
        micro_batch: int,
        normalized: bool,
    ) -> None:
        bad = rows[(rows < 0) | (rows >= len(self.seen))]
        if len(bad):
            raise callback_error(
                f"the sampler gave row {int(bad[0])}, outside the train_dataset's {len(self.seen)} rows"
            )
        unique, counts = np.unique(rows, return_counts=True)
        twice = np.concatenate([unique[counts > 1], rows[self.seen[rows]]])
        if len(twice):
            raise callback_error(
                f"dataset row {int(twice[0])} was trained on twice in epoch "
                f"{self.epoch}; a store holds one vector per row, so every row may be used at most once per "
                "epoch (samplers that repeat rows are not supported)"
            )
        cast_vectors = vectors.astype(np.float32)
        finite = np.isfinite(vectors).all(
            1
        )  # the others: a skipped overflow step, zeroed and listed by the writer
        if not np.isfinite(cast_vectors[finite]).all():
            raise callback_error(
                f"gradient values of dataset rows {rows[finite][:5].tolist()} exceed the float32 range"
            )
        if finite.any():
            self.largest = max(self.largest, float(np.abs(cast_vectors[finite]).max(initial=0.0)))
        self.vectors[rows] = cast_vectors
        self.num_tokens[rows] = num_tokens
        self.loss[rows] = loss
        self.seen[rows] = True
        self.counts[rows] += 1
        self.order.append((rows, step, micro_batch, normalized))
        self.steps.add(step)
        if not normalized:
            self.unnormalized.add(step)

    def merge_ranks(self) -> None:
        """Send every rank's rows to rank 0 (collective; nothing happens in one process).

        A row that several ranks trained on keeps the vector of its first step. accelerate's
        ``even_batches`` fills the epoch's last batches with rows from its start, so such a row
        was trained on once in its own turn and again as padding in the last step;
        :meth:`close` refuses any other repetition."""
        world = distributed.world_size()
        if world == 1:
            return
        summary = distributed.all_gather_objects((self.order, self.approximate))
        mine = np.flatnonzero(self.seen)
        chunk = max(1, (64 << 20) // (4 * max(1, self.vectors.shape[1])))
        if distributed.rank() != 0:
            for part in (mine, self.num_tokens[mine], self.loss[mine]):
                distributed.send_array(part, 0)
            for a in range(0, len(mine), chunk):
                distributed.send_array(self.vectors[mine[a : a + chunk]], 0)
            self.order = []
            return
        entries = sorted(
            (step, micro, r, rows, z)
            for r, (order, _) in enumerate(summary)
            for rows, step, micro, z in order
        )
        owner = np.full(len(self.seen), -1, np.int64)  # the rank of each row's first step
        self.counts[:] = 0
        for _, _, r, rows, _ in entries:
            owner[rows[owner[rows] < 0]] = r
            self.counts[rows] += 1
        for src in range(1, world):
            rows, tokens, losses = (distributed.recv_array(src) for _ in range(3))
            keep = owner[rows] == src
            self.num_tokens[rows[keep]] = tokens[keep]
            self.loss[rows[keep]] = losses[keep]
            for a in range(0, len(rows), chunk):
                vectors = distributed.recv_array(src)
                part = keep[a : a + chunk]
                self.vectors[rows[a : a + chunk][part]] = vectors[part]
                sent = np.abs(vectors[part])
                self.largest = max(self.largest, float(sent[np.isfinite(sent)].max(initial=0.0)))
        self.seen = self.counts > 0
        self.order = [(rows, step, micro, z) for step, micro, _, rows, z in entries]
        self.steps = {step for _, step, _, _ in self.order}
        self.unnormalized = {step for _, step, _, z in self.order if not z}
        self.approximate = sum(n for _, n in summary)

    def plan(self, normalize: bool, normalizer_form: str, track_order: bool) -> dict[str, Any]:
        """The manifest's ``plan``: how the epoch's vectors were made (after :meth:`merge_ranks`)."""
        seen = int(self.seen.sum())
        return {
            "source": "transformers.Trainer (bergson GradientCollectorCallback)",
            "epoch": self.epoch,
            "steps": sorted(self.steps),
            "rows_trained": seen,
            "rows_not_trained": len(self.seen) - seen,
            "normalize": normalize,
            "normalizer_form": normalizer_form if normalize else None,
            "row_normalizers": (
                "each row: the optimizer state before its step's update; normalizers.safetensors: the state "
                "at the end of the epoch"
                if normalize
                else None
            ),
            "unnormalized_steps": sorted(self.unnormalized) if normalize else [],
            "order_file": ORDER_FILE if track_order else None,
            "approximate_loss_tokens": self.approximate,
            "shard_size": self.shard_size,
            "ranks": distributed.world_size(),
            "repeated_rows": self.repeated_rows(),
        }

    def repeated_rows(self) -> int:
        """How many rows were trained on more than once (by several ranks)."""
        return int((self.counts > 1).sum())

    def _check_repeats(self) -> None:
        if not self.repeated_rows():
            return
        last = max(self.steps)
        first: dict[int, int] = {}
        for rows, step, _, _ in self.order:
            for row in rows[self.counts[rows] > 1].tolist():
                if row not in first:
                    first[row] = step
                elif step != last:
                    raise callback_error(
                        f"dataset row {row} was trained on in steps {first[row]} and "
                        f"{step} of epoch {self.epoch}; a store holds one vector per row, so every row may be used "
                        "at most once per epoch (samplers that repeat rows are not supported)"
                    )
        logger.warning(
            "epoch %d: %d rows were trained on again in the last step, to fill every rank's batch "
            "(accelerate's even_batches); they keep the vector of their first step",
            self.epoch,
            self.repeated_rows(),
        )

    def close(
        self,
        plan: dict[str, Any],
        normalizers: dict[str, Normalizer] | None,
        normalizer_info: dict[str, Any] | None,
        write_order: bool,
    ) -> None:
        assert self.writer is not None, "only rank 0 writes the store"
        self._check_repeats()
        manifest = self.writer.manifest
        if manifest.dtype == "float16" and self.largest > float(np.finfo(np.float16).max):
            if not self.auto_dtype:
                raise callback_error(
                    f"epoch {self.epoch} has gradient values up to {self.largest:.3g}, "
                    "beyond the float16 range; pass save_dtype='float32' (or 'auto')"
                )
            logger.warning(
                "epoch %d: gradient values up to %.3g exceed the float16 range; this store is float32",
                self.epoch,
                self.largest,
            )
            manifest.dtype = "float32"
        shards = plan_shards(len(self.seen), self.shard_size)
        for i, rows in enumerate(shards):
            self.writer.begin_shard(i, rows)
            self.writer.write(
                np.arange(rows.start, rows.stop),
                np.asarray(self.vectors[rows.start : rows.stop]),
                self.num_tokens[rows.start : rows.stop],
                self.loss[rows.start : rows.stop],
            )
            self.writer.end_shard(i)
        if normalizers:
            save_normalizers(self.root / NORMALIZERS_FILE, normalizers)
        if write_order:
            atomic_write_bytes(self.root / ORDER_FILE, self.order_bytes())
        self.writer.manifest.normalizer = normalizer_info
        self.writer.manifest.plan = plan
        self.writer.finalize(len(shards))
        self.discard_buffer()

    def order_bytes(self) -> bytes:
        n = [len(r) for r, *_ in self.order]
        rows = np.concatenate([r for r, *_ in self.order]) if self.order else np.zeros(0, np.int64)
        table = pa.table(
            {
                "row": pa.array(rows, pa.int64()),
                "step": pa.array(np.repeat([s for _, s, _, _ in self.order], n).astype(np.int64), pa.int64()),
                "epoch": pa.array(np.full(len(rows), self.epoch, np.int64), pa.int64()),
                "micro_batch": pa.array(
                    np.repeat([m for _, _, m, _ in self.order], n).astype(np.int64), pa.int64()
                ),
                "normalized": pa.array(np.repeat([z for *_, z in self.order], n).astype(bool), pa.bool_()),
            }
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()

    def discard_buffer(self) -> None:
        """Close and delete the row buffer (again: nothing)."""
        vectors = self.__dict__.pop("vectors", None)
        mm = getattr(vectors, "_mmap", None)
        del vectors
        if mm is not None:
            mm.close()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
        else:
            (self.root / _BUFFER_FILE).unlink(missing_ok=True)
