"""The retrieve-then-rescore cascade: an expensive method scores only the candidates of a cheap one.

``bergson score RUN --candidates EARLIER --top_k K --method ekfac|kfac|trackstar [its options]``
(or :func:`cascade` with a :class:`~bergson.config.cascade.CascadeEkfacConfig` or
:class:`~bergson.config.cascade.CascadeTrackstarConfig`):

1. **Candidates.** Each query's ``K`` best rows of an earlier scores store (any command's: score,
   ekfac, trackstar, trak, magic, an earlier cascade's rescored rows) or of a ``bergson query
   --output`` file. Their **union over the queries** is rescored: the expensive pass costs one
   gradient per row, and every query's score of that row comes with it, so rescoring the union costs
   what rescoring each query's own candidates would, and a row that one query proposed gets its exact
   score for every other query too.
2. **Rescoring.** The method runs as its own command does (``bergson ekfac``: the curvature and the
   query products from the *whole* corpus; ``bergson trackstar``: the statistics from its
   ``--stats_documents`` sample), and its scoring pass runs on the candidate rows alone
   (``docs.select(rows)``): those rows' scores equal the full method's.

The result is an ordinary scores store over every row of ``--dataset`` (so that ``bergson report``,
``validate`` and the readers line up with the dataset). Rows outside the candidates hold
:data:`UNSCORED` (-1e30, never a score: a store never holds NaN or inf), so they rank
last; the manifest's ``score.cascade`` records the first stage (the candidates' source and what
made it), ``top_k``, the rescoring method, the rescored row ids and that value.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config.cascade import CascadeEkfacConfig, CascadeTrackstarConfig, cascade_config_class
from ..config.options import validate_options
from ..errors import BergsonError

logger = logging.getLogger(__name__)

UNSCORED = float(np.float32(-1e30))
"""What a cascade's store holds for the rows it did not rescore: -1e30 (exactly a float32), far below
any score and still finite (a store never holds NaN or inf), so such rows rank last."""

HIT_SUFFIXES = (".jsonl", ".csv", ".parquet")


@dataclass
class Candidates:
    """The first stage's proposals: the rows to rescore and where they came from."""

    rows: np.ndarray
    """Dataset rows to rescore, sorted, each once (the union over the queries)."""
    per_query: list[np.ndarray]
    """Each query's (or the one aggregated column's) top rows, best first."""
    info: dict[str, Any] = field(default_factory=dict)


def _store_of(path: Path) -> Any | None:
    from ..store import load_gradients

    for root in (path, path / "scores"):
        try:
            return load_gradients(root)
        except BergsonError:
            continue
    return None


def _read_hits(path: Path) -> dict[str, np.ndarray]:
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".jsonl":
            table = pajson.read_json(path)
        elif path.suffix == ".csv":
            table = pacsv.read_csv(path)
        else:
            table = pq.read_table(path)
    except Exception as e:  # pyarrow's many error types: a damaged or foreign file
        raise BergsonError(f"--candidates {path}: cannot read it as query results ({e})") from e
    missing = [c for c in ("query", "rank", "row_id") if c not in table.column_names]
    if missing:
        raise BergsonError(
            f"--candidates {path}: no {', '.join(missing)} column; give the file `bergson query --output` "
            "wrote, or a scores store"
        )
    return {c: np.asarray(table.column(c).to_numpy(), np.int64) for c in ("query", "rank", "row_id")}


def _check_queries(count: int, num_queries: int | None, what: str, path: Path) -> None:
    if num_queries is not None and count not in (1, num_queries):
        raise BergsonError(
            f"--candidates {path}: {count} {what} for {num_queries} queries of --query.dataset; give the "
            "candidates of these queries (one per query, or one aggregated column)"
        )


def select_candidates(
    source: str | Path, k: int, num_rows: int, num_queries: int | None = None, fingerprint: str | None = None
) -> Candidates:
    """Each query's ``k`` best rows of ``source`` (a scores store, the run directory holding one as
    ``scores/``, or a ``bergson query --output`` file) among ``num_rows`` dataset rows, best first
    (ties: the lower row, as :func:`bergson.store.scores.top_rows`). Rows an earlier cascade did not
    rescore are never candidates. ``fingerprint``: the dataset's tokens' sha256, compared with the
    store's."""
    if k < 1:
        raise BergsonError(f"--top_k {k}: the candidates per query must be at least 1")
    path = Path(source)
    if not str(source) or not path.exists():
        raise BergsonError(
            f"--candidates {source!r}: no such file or directory; give a scores store or query results"
        )
    info: dict[str, Any] = {"candidates": str(path), "top_k": k}
    per_query: list[np.ndarray] = []
    if path.is_file():
        if path.suffix not in HIT_SUFFIXES:
            raise BergsonError(
                f"--candidates {path}: a {path.suffix or 'suffixless'} file; give a scores store or the "
                f"results of `bergson query --output` ({', '.join(HIT_SUFFIXES)})"
            )
        hits = _read_hits(path)
        bad = hits["row_id"][(hits["row_id"] < 0) | (hits["row_id"] >= num_rows)]
        if len(bad):
            raise BergsonError(
                f"--candidates {path}: row {int(bad[0])} is not a row of --dataset ({num_rows} rows); the "
                "results must come from a store of this dataset"
            )
        queries = np.unique(hits["query"])
        _check_queries(len(queries), num_queries, "queries", path)
        for q in queries:
            mine = hits["query"] == q
            order = np.argsort(hits["rank"][mine], kind="stable")
            rows = hits["row_id"][mine][order]
            per_query.append(rows[np.sort(np.unique(rows, return_index=True)[1])][:k])
        info.update(source="query results", queries=len(queries))
    else:
        store = _store_of(path)
        if store is None or store.manifest.kind != "scores":
            raise BergsonError(
                f"--candidates {path}: not a scores store (nor a run directory holding scores/)"
            )
        if len(store) != num_rows:
            raise BergsonError(
                f"--candidates {store.root}: {len(store)} rows, and --dataset has {num_rows}; the candidates "
                "must score the rows of this dataset"
            )
        scores = np.asarray(store["scores"], np.float32)
        _check_queries(scores.shape[1], num_queries, "score columns", path)
        theirs = store.manifest.data.get("tokens_sha256")
        if fingerprint and theirs and theirs != fingerprint:
            logger.warning(
                "--candidates %s: its rows were tokenized differently from --dataset's (another tokenizer, "
                "max_length or dataset of the same length); the row numbers are taken as they are",
                store.root,
            )
            info["tokens_differ"] = True
        row_ids = np.asarray(store.rows["row_id"], np.int64)
        for c in range(scores.shape[1]):
            order = np.argsort(-scores[:, c], kind="stable")
            order = order[scores[order, c] > UNSCORED]  # an earlier cascade's unscored rows
            per_query.append(row_ids[order[:k]])
        made = store.manifest.score or {}
        info.update(
            source="scores store",
            store=str(store.root),
            columns=scores.shape[1],
            made_by={key: made[key] for key in ("kind", "method", "mode", "orientation") if key in made},
        )
    short = [i for i, rows in enumerate(per_query) if len(rows) < k]
    if short:
        logger.warning(
            "--candidates %s: %d of %d queries have fewer than --top_k %d candidates (as few as %d); all of "
            "theirs are rescored",
            path, len(short), len(per_query), k, min(len(per_query[i]) for i in short),
        )  # fmt: skip
        info["short_queries"] = short
    rows = np.unique(np.concatenate(per_query)) if per_query else np.empty(0, np.int64)
    if not len(rows):
        raise BergsonError(f"--candidates {path}: it proposes no row to rescore")
    return Candidates(rows.astype(np.int64), per_query, info)


class Rescore:
    """The hook the rescoring commands call (:func:`bergson.methods.ekfac.ekfac`,
    :func:`bergson.methods.trackstar.trackstar`): which rows to score, and the full store made of
    their scores."""

    def __init__(self, cfg: Any, method: str, num_queries: int | None):
        self.cfg, self.method, self.num_queries = cfg, method, num_queries
        self.candidates: Candidates | None = None
        self.num_rows = 0

    @property
    def rows(self) -> np.ndarray:
        assert self.candidates is not None, "select() first"
        return self.candidates.rows

    def select(self, docs: Any) -> np.ndarray:
        """Choose the candidate rows of ``docs`` (the tokenized --dataset) and say how many."""
        from ..runs.documents import tokens_fingerprint

        self.num_rows = len(docs)
        self.candidates = select_candidates(
            self.cfg.candidates, self.cfg.top_k, len(docs), self.num_queries, tokens_fingerprint(docs)
        )
        m = len(self.rows)
        logger.info(
            "cascade: rescoring %d of %d rows (%.1f%%) with %s: the union of %d queries' top %d in %s",
            m, len(docs), 100 * m / max(len(docs), 1), self.method, len(self.candidates.per_query),
            self.cfg.top_k, self.cfg.candidates,
        )  # fmt: skip
        return self.rows

    @property
    def info(self) -> dict[str, Any]:
        """The manifest's record of both stages (``score.cascade``)."""
        assert self.candidates is not None
        return {
            **self.candidates.info,
            "selection": "the union over the queries of each query's top_k rows",
            "method": self.method,
            **({"ihvp": self.cfg.ihvp} if isinstance(self.cfg, CascadeEkfacConfig) else {}),
            "rows": self.num_rows,
            "rescored_rows": len(self.rows),
            "rescored_row_ids": self.rows.tolist(),
            "unscored_value": UNSCORED,
            "unscored": "rows outside rescored_row_ids were not scored and hold unscored_value (they rank last)",
        }

    def full(self, part: np.ndarray, fill: float = UNSCORED) -> np.ndarray:
        """A [rows, ...] array holding ``part`` (the candidates' rows, in order) and ``fill`` elsewhere."""
        out = np.full((self.num_rows, *part.shape[1:]), fill, dtype=np.float64)
        out[self.rows] = part
        return out

    def expand(self, result: Any) -> Any:
        """EK-FAC's scores of the candidate rows as the whole dataset's (per-module shares: NaN outside)."""
        from .ekfac.scoring import Scores

        per_module = {name: self.full(v, np.nan) for name, v in result.per_module.items()}
        return Scores(self.full(result.total), per_module, None)

    def score_store(self, scfg: Any, model: Any, docs: Any, max_tokens: int, pad: int | None) -> None:
        """TrackStar's scoring pass on the candidate rows, written as the whole dataset's store at
        ``scfg.run_path`` (the candidates' own store, beside it, is removed once copied)."""
        from ..runs.documents import tokens_fingerprint
        from ..scoring import score_documents
        from ..store import load_gradients
        from ..store.scores import save_score_matrix

        target = Path(scfg.run_path)
        part_path = target.with_name(target.name + "_candidates")
        part = score_documents(
            replace(scfg, run_path=str(part_path), overwrite=True),
            model,
            docs.select(self.rows),
            max_tokens,
            load_gradients(scfg.query_path),
            pad,
        )
        assert part is not None  # one process
        manifest = part.manifest
        data = {**manifest.data, "num_documents": len(docs), "tokens_sha256": tokens_fingerprint(docs)}
        save_score_matrix(
            target,
            self.full(np.asarray(part["scores"], np.float64)),
            replace(manifest, num_rows=len(docs), data=data),
            {**(manifest.score or {}), "cascade": self.info},
            overwrite=True,
        )
        shutil.rmtree(part_path)


def cascade_config(method: str, **options: Any) -> CascadeEkfacConfig | CascadeTrackstarConfig:
    """The cascade's config for ``method`` (ekfac, kfac or trackstar) with ``options`` (those of
    ``bergson ekfac`` or ``bergson trackstar``, plus ``candidates`` and ``top_k``); another method
    is refused with the reason."""
    cls = cascade_config_class(method)
    return cls(**({"method": method} if method in ("ekfac", "kfac") else {}), **options)


def cascade(cfg: CascadeEkfacConfig | CascadeTrackstarConfig) -> Any:
    """Rescore the top ``cfg.top_k`` candidates per query of ``cfg.candidates`` with the config's
    method; returns the scores store (every row of the dataset; the others hold :data:`UNSCORED`)."""
    from ..data import load_data

    if not isinstance(cfg, (CascadeEkfacConfig, CascadeTrackstarConfig)):
        raise BergsonError(
            f"cascade: a {type(cfg).__name__}; give the config of cascade_config(method, ...) "
            "(CascadeEkfacConfig or CascadeTrackstarConfig)"
        )
    validate_options(cfg)  # --top_k below 1 fails here, before anything is loaded
    if not cfg.candidates:
        raise BergsonError("--candidates is required: the scores store or query results to rescore")
    if cfg.nproc_per_node > 1:
        raise BergsonError(
            "--nproc_per_node with --candidates: the cascade rescores a few rows in one process; drop it"
        )
    if cfg.per_token:
        raise BergsonError(
            "--per_token with --candidates: the rows it does not rescore have no tokens' shares; drop it, "
            "or run the method itself on the rows you want explained token by token"
        )
    method = cfg.method  # ekfac or kfac (EK-FAC's options), trackstar (TrackStar's)
    num_queries = None if cfg.query.chunk_length else len(load_data(cfg.query, option="--query.dataset"))
    rescore = Rescore(cfg, method, num_queries)
    if isinstance(cfg, CascadeTrackstarConfig):
        from .trackstar import trackstar

        return trackstar(cfg, rescore=rescore)
    from .ekfac import ekfac

    return ekfac(cfg, rescore=rescore)
