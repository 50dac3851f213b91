"""The Attributor: open a gradient store and find the training rows behind a query."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..collect.hooks import GradientCollector
from ..core.experts import named_trackables
from ..core.layout import (
    ModuleLayout,
    base_model_prefix,
    heads_of,
    layout_modules,
    match_store_names,
    module_blocks,
)
from ..errors import BergsonError
from ..store import GradientStore, load_gradients
from ..transforms.normalizers import NORMALIZERS_FILE, Normalizer, load_normalizers
from ..transforms.preconditioners import carried, plan_powers, resolve_preconditioner
from .exact import column_segments, exact_topk, select_store_modules, store_prefix

logger = logging.getLogger(__name__)


@dataclass
class TraceResult:
    """Filled when a ``trace`` block exits: the top-k rows per query example.

    ``scores`` [Q, k] are gradient inner products (cosines with unit_norm): positive means
    training on the row lowers the query's loss. ``indices`` are store rows; ``row_ids``
    the dataset rows they hold.
    """

    scores: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    row_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    query_vectors: torch.Tensor | None = None


def match_modules(
    store_names: Sequence[str], module: nn.Module, prefix: str | None = None
) -> dict[str, nn.Module]:
    """Map the store's module names to submodules of ``module``: the model the store was built
    from, or a part of it (``model.base_model``); ``prefix`` is where the store's model had its
    base model (:func:`bergson.core.layout.match_store_names`). Store names with no counterpart
    in ``module`` are left out."""
    named = named_trackables(module)
    found = match_store_names(store_names, prefix, [n for n in named if n], base_model_prefix(module))
    return {s: named[n] for s, n in found.items()}


class Attributor:
    """Search a gradient store for the training rows that explain a query.

    ``Attributor(path)`` opens the store read-only. ``search(vectors, k)`` takes query
    vectors made like the store's rows; ``trace(module, k)`` collects them from a forward
    and backward pass run inside the block, with the store's own projection, seed,
    modules and normalizers. Query vectors are given without preconditioning: with
    ``preconditioner_path`` (or a preconditioner the store carries) the Attributor applies
    H^-1 to them itself (H^-1/2 with ``unit_norm``). ``unit_norm`` scores by cosine; ``reverse`` returns the most
    negative scores (opponents); ``modules`` restricts the search to some modules (names or globs,
    spelled from the whole model or from its base model, as the original package did).
    With ``faiss_cfg`` the search goes through a FAISS index built beside the store. With
    ``int8_rerank=F`` the exact search scans int8 copies of the rows and re-scores the ``k * F``
    best candidates exactly (see :func:`bergson.search.exact_topk`; approximate, faster at many
    queries); with ``int8_prefilter`` it scans them with proven bounds on every score and
    re-scores only the rows that could be in the top-k (exact, faster at many queries).

    ``trace(model.base_model, k)`` and ``trace(model, k)`` find the same modules; the traced
    module must hold every module the search covers, or the trace is an error naming those it
    lacks (a store built with ``--include_output_head`` holds the output head, which
    ``model.base_model`` does not).
    """

    def __init__(
        self,
        index_path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        unit_norm: bool = False,
        faiss_cfg: Any = None,
        modules: Sequence[str] | None = None,
        preconditioner_path: str | Path | None = None,
        int8_rerank: int = 0,
        int8_prefilter: bool = False,
    ):
        for flag, on in (("--int8_rerank", int8_rerank), ("--int8_prefilter", int8_prefilter)):
            if on and faiss_cfg is not None:
                raise BergsonError(
                    f"{flag} speeds up the exact search only; with --search faiss the index decides the "
                    "candidates: drop one of the two"
                )
        if int8_rerank and int8_prefilter:
            raise BergsonError(
                "--int8_prefilter and --int8_rerank exclude each other: --int8_prefilter returns the exact "
                "top-k, --int8_rerank an approximate one; pass one of them"
            )
        self.int8_rerank = int8_rerank
        self.int8_prefilter = int8_prefilter
        self.store: GradientStore = load_gradients(index_path)
        manifest = self.store.manifest
        if manifest.kind == "scores":
            raise BergsonError(f"{index_path} is a scores store; the Attributor needs a gradient store")
        self.device = torch.device(device)
        self.dtype = dtype
        self.unit_norm = unit_norm
        self.faiss_cfg = faiss_cfg
        self.modules = select_store_modules(self.store, modules) if modules else list(self.store.modules)
        norm_path = Path(index_path) / NORMALIZERS_FILE
        self.normalizers: dict[str, Normalizer] = load_normalizers(norm_path) if norm_path.is_file() else {}
        if manifest.normalizer and not self.normalizers:
            raise BergsonError(
                f"{index_path}: the manifest names a normalizer but {NORMALIZERS_FILE} is missing"
            )
        self._faiss: Any = None
        self.preconditioner = resolve_preconditioner(
            str(preconditioner_path) if preconditioner_path else None, [("--index", self.store)]
        )
        self.query_power = 0.0
        if self.preconditioner is not None:
            extra_t, self.query_power = plan_powers(carried(manifest), 0.0, unit_norm)
            if extra_t:
                raise BergsonError(
                    f"cosine scores with a preconditioner need H^-1/2 on both sides, but the index {index_path} "
                    "carries none: rebuild it with --preconditioner_path, or drop --unit_norm "
                    "(the query then gets H^-1)"
                )

    @property
    def manifest(self):
        return self.store.manifest

    # ------------------------------------------------------------------ search
    def search(
        self,
        queries: torch.Tensor | np.ndarray | Mapping[str, torch.Tensor],
        k: int,
        *,
        reverse: bool = False,
        modules: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores, store row indices) for query vectors [Q, dim] or {module: [Q, dim]}."""
        mods = select_store_modules(self.store, modules) if modules else self.modules
        q = self.prepare(queries, mods)
        if self.faiss_cfg is not None:
            scores, idx = self._faiss_search(q.numpy(), k, reverse, mods)
        else:
            restrict = None if mods == list(self.store.modules) else mods
            scores, idx = exact_topk(
                self.store,
                q.numpy(),
                k,
                unit_norm=self.unit_norm,
                reverse=reverse,
                modules=restrict,
                int8_rerank=self.int8_rerank,
                int8_prefilter=self.int8_prefilter,
            )
        return torch.from_numpy(scores).to(self.device), torch.from_numpy(idx).to(self.device)

    def prepare(
        self, queries: torch.Tensor | np.ndarray | Mapping[str, torch.Tensor], mods: Sequence[str]
    ) -> torch.Tensor:
        """Query vectors of modules ``mods`` as the search compares them: float32 [Q, dim] on the
        CPU, with the preconditioner power the query side needs (linear, so it applies to
        per-token query vectors alike)."""
        if isinstance(queries, Mapping):
            missing = [m for m in mods if m not in queries]
            if missing:
                raise BergsonError(f"query vectors lack modules {missing}")
            q = torch.cat(
                [torch.as_tensor(queries[m]).reshape(len(queries[m]), -1).float().cpu() for m in mods], 1
            )
        else:
            q = torch.as_tensor(np.array(queries, np.float32) if isinstance(queries, np.ndarray) else queries)
            q = q.float().cpu()
        if self.preconditioner is not None and self.query_power:
            layout, offset = [], 0
            for name in mods:
                dim = self.manifest.module(name).dim
                layout.append(ModuleLayout(name, "", [], False, offset, dim))
                offset += dim
            q = self.preconditioner.apply(q.double(), self.query_power, layout).float()
        return q

    def explain(
        self,
        query: torch.Tensor | np.ndarray,
        index: int,
        *,
        query_tokens: torch.Tensor | np.ndarray | None = None,
        modules: Sequence[str] | None = None,
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Split one query's score against store row ``index`` over tokens.

        Returns (training-token scores [num_tokens] when the store holds token rows, query-token
        scores [T_q] when ``query_tokens`` [T_q, dim] are given); each sums to the score the
        search reports for the pair (the cosine, with ``unit_norm``).
        """
        mods = select_store_modules(self.store, modules) if modules else self.modules
        segments, _ = column_segments(self.store, mods)
        q = self.prepare(torch.as_tensor(query).reshape(1, -1), mods)[0].double().numpy()
        doc = np.concatenate([np.asarray(self.store.all[int(index)], np.float64)[a:b] for a, b in segments])
        scale = 1.0
        if self.unit_norm:
            scale = 1.0 / max(float(np.linalg.norm(q) * np.linalg.norm(doc)), np.finfo(np.float64).tiny)
        doc_scores = None
        if self.store.has_tokens:
            rows = np.asarray(self.store.token_rows(int(index)), np.float64)
            doc_scores = np.concatenate([rows[:, a:b] for a, b in segments], 1) @ q * scale
        query_scores = None
        if query_tokens is not None:
            qt = self.prepare(torch.as_tensor(query_tokens), mods).double().numpy()
            query_scores = qt @ doc * scale
        return doc_scores, query_scores

    def _faiss_search(
        self, q: np.ndarray, k: int, reverse: bool, mods: list[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        from .faiss_index import load_or_build_index

        if mods != list(self.store.modules):
            raise BergsonError(
                f"FAISS search covers every module of the store, but the query covers {len(mods)} of "
                f"{len(self.store.modules)}; trace the whole model, or use exact search"
            )
        if self._faiss is None:
            self._faiss = load_or_build_index(self.store, self.faiss_cfg, unit_norm=self.unit_norm)
        return self._faiss.search(q, k, reverse=reverse)

    # ------------------------------------------------------------------ trace
    def collector_for(self, module: nn.Module) -> GradientCollector:
        """A GradientCollector that makes vectors the way the store's rows were made. The traced
        module must hold every module the search covers; a part of the model that lacks some
        (``model.base_model`` against a store built with ``--include_output_head``) is an error,
        never a search over fewer modules."""
        kind = self.manifest.projection.get("kind")
        if kind not in ("none", "gaussian_two_sided"):
            raise BergsonError(
                f"{self.store.root}: its rows were projected with another library's matrices ({kind}), "
                "which a query cannot reproduce; search it with vectors made the same way (Attributor.search), "
                "or rebuild it with bergson build"
            )
        if self.store.is_legacy and not all(lay.shape for lay in self.manifest.modules):
            raise BergsonError(
                f"{self.store.root}: a store of the original bergson package records no module shapes; "
                "convert it once with `bergson convert OLD NEW --model MODEL`, then trace against NEW"
            )
        layouts = {layout.name: layout for layout in self.manifest.modules}
        # column block -> its modules (an aggregated experts block: every expert's view)
        wanted = list(dict.fromkeys(m for n in self.modules for m in layout_modules(layouts[n])))
        found = match_modules(wanted, module, store_prefix(self.manifest))
        missing = [m for m in wanted if m not in found]
        if missing:
            raise BergsonError(self._uncovered(module, missing, len(wanted)))
        heads = {m: c for m, c in heads_of(self.manifest.modules).items() if m in found}
        include_bias = bool(self.manifest.projection["include_bias"])
        aggregate = any(layout.experts for layout in self.manifest.modules)
        for name, sub in found.items():
            blocks = module_blocks(name, sub, include_bias, heads.get(name), aggregate)
            for block in blocks:
                expected = layouts[block.col].shape if block.col in layouts else None
                shape = list(block.shape)
                if block.column is not None and expected:  # one expert's rows of the stacked block
                    shape[0] = expected[0]
                if expected is None or shape != list(expected):
                    raise BergsonError(
                        f"module {name}: block {block.name} of shape {list(block.shape)} in the traced "
                        f"model, {expected} in the store"
                    )
        proj = self.manifest.projection
        return GradientCollector(
            module,
            found,
            projection_dim=int(proj["dim"]),
            seed=int(proj["seed"]),
            include_bias=include_bias,
            normalizers={n: v for n, v in self.normalizers.items() if n in found},
            heads=heads,
            aggregate_experts=aggregate,
        )

    def _uncovered(self, module: nn.Module, missing: list[str], total: int) -> str:
        head = self.manifest.model.get("output_head") or {}
        in_head = [m for m in missing if m in (head.get("tracked") or [])]
        listed = f"{missing[:4]}{' ...' if len(missing) > 4 else ''}"
        if in_head:
            what = f"{listed}: the output head, outside base_model, which the store tracks (built with --include_output_head)"
            fix = "trace the whole model (attr.trace(model, k)), or rebuild the store without --include_output_head"
        else:
            what = listed
            fix = "trace the model the store was built from (attr.trace(model, k), not a part of it)"
        return (
            f"the traced {type(module).__name__} does not hold {len(missing)} of the {total} store modules "
            f"the search covers, so its scores would leave them out: {what}. Fix: {fix}; or search only the "
            "modules it holds with Attributor(..., modules=[...]) (exact search)"
        )

    @contextmanager
    def trace(self, module: nn.Module, k: int, *, reverse: bool = False) -> Iterator[TraceResult]:
        """Collect query gradients of the backward pass run inside the block, then search.

        The loss backpropagated inside the block should be a sum (or mean) of per-example
        losses; each example of the batch becomes one query.
        """
        collector = self.collector_for(module)
        result = TraceResult()
        with collector:
            yield result
        grads = collector.gradients
        if not grads:
            raise BergsonError("no gradients were collected inside trace(); run a backward pass in the block")
        names = [n for n in self.modules if n in grads]
        vectors = torch.cat([grads[n].float() for n in names], 1)
        result.query_vectors = vectors
        result.scores, result.indices = self.search(vectors, k, reverse=reverse, modules=names)
        result.row_ids = self.store.rows["row_id"][result.indices.cpu().numpy()]
