"""Preconditioners: per-module second moments of gradient vectors, and their inverse powers.

A preconditioner H is fitted, per module, as the second moment of the (normalized,
projected) per-document gradient vectors of some dataset:

    H = (1/N) sum_n v_n v_nᵀ      (rows whose vector is all zero are not counted)

It is eigendecomposed in float64, H = Q diag(λ) Qᵀ, and applied as a matrix power

    H^a = Q diag((λ + δ)^a) Qᵀ

with damping δ either absolute or relative to the mean eigenvalue (δ = damping * mean λ).
Scores use H⁻¹ between a query and a training vector: qᵀ H⁻¹ g. For cosine scores the
two halves H^{-1/2} go on each side before normalizing, cos(H^{-1/2} q, H^{-1/2} g).

The mixed ("task-specific") preconditioner of TrackStar (Chang et al. 2024) blends the
second moments of a query set Q and a training set T:

    H = w Q + (1 - w) T,   with w chosen so that   w μ_k(Q) = (1 - w) μ_1(T)

where μ_1(T) is the largest training eigenvalue and μ_k(Q) the k-th largest query
eigenvalue: exactly the top k query components then outweigh every training direction,
so they, and not the rest of the spectrum, are down-weighted.

On disk a preconditioner is a directory with ``preconditioner.safetensors`` (per module:
``second_moment``, ``eigenvalues``, ``eigenvectors``) and ``preconditioner.json`` (written
last, atomically: its presence marks the directory complete).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.files import atomic_write_bytes
from ..core.layout import ModuleLayout, check_layouts
from ..core.sinks import Sink
from ..errors import BergsonError

TENSORS_FILE = "preconditioner.safetensors"
META_FILE = "preconditioner.json"
PART_GLOB = "preconditioner-*-of-*.safetensors"
"""The part files of a sharded fit (:func:`part_file`)."""
DAMPING_MODES = ("relative", "absolute")


class StatisticsSink(Sink):
    """A collection-loop sink that accumulates each module's second moment sum_n v vᵀ.

    Sums are kept in float32 (on ``device``) and turned into means once, at the end
    (:meth:`second_moments`). Rows whose vector is all zero (documents without a loss
    token) are not counted.
    """

    def __init__(self, dims: Mapping[str, int], device: torch.device | str = "cpu"):
        self.dims = dict(dims)
        self.device = torch.device(device)
        self.sums = {n: torch.zeros(d, d, dtype=torch.float32, device=self.device) for n, d in dims.items()}
        self.count = 0

    def write(self, row_ids, vectors, num_tokens, losses, tokens=None) -> None:  # types: Sink.write
        v = torch.from_numpy(np.array(vectors, np.float32)).to(self.device)
        v = v[v.abs().amax(1) > 0]
        self.count += len(v)
        start = 0
        for name, dim in self.dims.items():
            block = v[:, start : start + dim]
            self.sums[name].addmm_(block.T, block)
            start += dim

    def all_reduce(self) -> None:
        """Sum the sums and counts of every rank (torch.distributed), so that each rank holds the
        totals; nothing happens in a single process."""
        from ..distributed import all_reduce_sum, world_size

        if world_size() == 1:
            return
        for s in self.sums.values():
            all_reduce_sum(s)
        count = torch.tensor([self.count], dtype=torch.int64, device=self.device)
        self.count = int(all_reduce_sum(count).item())

    def reduce_to_owners(self, owners: Mapping[str, int]) -> None:
        """Sum each module's sums onto the rank that owns it (:func:`shard_owners`) and drop the
        others' copies, so that each rank keeps only its own modules; the counts are summed on
        every rank."""
        from ..distributed import all_reduce_sum, rank, reduce_sum

        me = rank()
        for name in list(self.sums):
            reduce_sum(self.sums[name], owners[name])
            if owners[name] != me:
                del self.sums[name]
        count = torch.tensor([self.count], dtype=torch.int64, device=self.device)
        self.count = int(all_reduce_sum(count).item())

    def second_moments(self) -> dict[str, torch.Tensor]:
        """Mean outer products, float64 on the CPU."""
        if self.count == 0:
            raise BergsonError("no rows with a loss token were seen; the second moment is undefined")
        return {n: s.double().cpu() / self.count for n, s in self.sums.items()}

    def preconditioner(
        self,
        layout: dict[str, Any],
        damping: float,
        damping_mode: str,
        source: dict[str, Any] | None = None,
    ) -> Preconditioner:
        """The :class:`Preconditioner` of these second moments (vectors in the space ``layout``)."""
        return Preconditioner(
            self.second_moments(),
            num_rows=self.count,
            layout=layout,
            damping=damping,
            damping_mode=damping_mode,
            source=source or {},
        )


def shard_owners(dims: Mapping[str, int], ranks: int) -> dict[str, int]:
    """Which rank owns each module's block: largest blocks first, each to the rank holding the
    fewest numbers so far (ties: the lowest rank), so every rank holds about 1/ranks of them."""
    load = [0] * ranks
    owners: dict[str, int] = {}
    for name in sorted(dims, key=lambda n: (-dims[n], n)):
        r = min(range(ranks), key=lambda k: (load[k], k))
        owners[name] = r
        load[r] += dims[name] ** 2
    return {n: owners[n] for n in dims}


def part_file(rank: int, ranks: int) -> str:
    """The file holding one rank's blocks of a sharded preconditioner."""
    return f"preconditioner-{rank:05d}-of-{ranks:05d}.safetensors"


def layout_of(manifest: Any) -> dict[str, Any]:
    """The part of a store manifest that fixes the space its vectors live in."""
    return {
        "model": {"name": manifest.model.get("name")},
        "projection": manifest.projection,
        "normalizer": manifest.normalizer,
        "modules": [asdict(m) for m in manifest.modules],
    }


@dataclass
class Preconditioner:
    """Per-module second moments with their float64 eigendecompositions.

    ``layout`` records the vector space (model, projection, normalizer, module blocks)
    the statistics were collected in; it is checked against every store it meets.
    """

    second_moments: dict[str, torch.Tensor]
    num_rows: int
    layout: dict[str, Any]
    damping: float = 0.1
    damping_mode: str = "relative"
    source: dict[str, Any] = field(default_factory=dict)
    mixing: dict[str, Any] | None = None
    eigenvalues: dict[str, torch.Tensor] = field(default_factory=dict)
    eigenvectors: dict[str, torch.Tensor] = field(default_factory=dict)
    owned: list[str] | None = None
    """Set by :func:`load_owned`: this rank's modules of a sharded fit (the only blocks it holds);
    :meth:`transform` then multiplies those columns and sums the ranks' results."""
    whole_sha256: str | None = None
    """The whole fit's :meth:`identity`, when only some of its blocks are held."""
    sharding: dict[str, Any] | None = None
    """How :func:`load_owned` spread the blocks (workers, blocks per rank), for the manifest."""

    def __post_init__(self) -> None:
        if self.damping_mode not in DAMPING_MODES:
            raise BergsonError(
                f"--damping_mode {self.damping_mode!r}: choose one of {', '.join(DAMPING_MODES)}"
            )
        if not self.damping >= 0:
            raise BergsonError(f"--damping {self.damping}: must be >= 0")
        for name, m in self.second_moments.items():
            if name not in self.eigenvalues:
                m = m.double()
                lam, vecs = torch.linalg.eigh((m + m.T) / 2)
                # eigh returns ascending eigenvalues; round-off can make tiny ones negative
                self.eigenvalues[name] = lam.clamp(min=0)
                self.eigenvectors[name] = vecs

    # ------------------------------------------------------------------ math
    @property
    def modules(self) -> list[str]:
        return list(self.second_moments)

    def delta(self, name: str) -> float:
        """The damping added to every eigenvalue of module ``name``."""
        if self.damping_mode == "absolute":
            return self.damping
        return self.damping * float(self.eigenvalues[name].mean())

    def matrix(self, name: str, power: float) -> torch.Tensor:
        """(H + δI)^power in float64. Directions with λ + δ = 0 get 0 (pseudo-inverse)."""
        lam = self.eigenvalues[name] + self.delta(name)
        q = self.eigenvectors[name]
        scale = torch.where(lam > 0, lam.clamp(min=torch.finfo(lam.dtype).tiny) ** power, 0.0)
        return (q * scale) @ q.T

    def apply(self, vectors: torch.Tensor, power: float, modules: Sequence[ModuleLayout]) -> torch.Tensor:
        """Multiply each module block of row vectors [N, D] by (H + δI)^power (a new tensor).

        ``modules`` gives where each module's columns lie (a store manifest's layout).
        """
        return vectors if power == 0 else self.transform(power, modules)(vectors)

    def transform(
        self, power: float, modules: Sequence[ModuleLayout]
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function applying :meth:`apply`, its matrices computed once and kept per device and dtype
        (it runs on every batch of the collection loop)."""
        missing = [m.name for m in modules if m.name not in self.second_moments]
        if missing and self.owned is None:  # a sharded fit's other blocks: checked by load_owned
            raise BergsonError(f"the preconditioner has no statistics for module {missing[0]}")
        mine = [m for m in modules if m.name in self.second_moments]
        mats = {m.name: self.matrix(m.name, power) for m in mine}
        cache: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

        def fn(vectors: torch.Tensor) -> torch.Tensor:
            key = (vectors.device, vectors.dtype)
            if key not in cache:
                cache[key] = {n: m.to(vectors.device, vectors.dtype) for n, m in mats.items()}
            out = torch.empty_like(vectors) if self.owned is None else torch.zeros_like(vectors)
            for m in mine:  # each matrix is symmetric
                out[:, m.offset : m.offset + m.dim] = (
                    vectors[:, m.offset : m.offset + m.dim] @ cache[key][m.name]
                )
            if self.owned is not None:  # every other block is another rank's: sum the ranks' columns
                import torch.distributed as dist

                from ..distributed.group import control_group

                summed = out.cpu()
                dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=control_group())
                out = summed.to(vectors.device)
            return out

        return fn

    # ------------------------------------------------------------------ identity and checks
    def identity(self) -> str:
        """A hash of the statistics and the damping: equal hashes apply the same matrices."""
        if self.whole_sha256:
            return self.whole_sha256
        h = hashlib.sha256()
        h.update(json.dumps([self.damping, self.damping_mode, self.num_rows]).encode())
        for name in sorted(self.second_moments):
            h.update(name.encode())
            h.update(self.second_moments[name].double().numpy().tobytes())
        return h.hexdigest()

    def check(self, manifest: Any, where: str, what: str = "the preconditioner") -> None:
        """Fail, naming the field, if ``manifest``'s vectors are not in this preconditioner's space."""
        check_layouts(self.layout, layout_of(manifest), what, where)

    def info(self, power: float) -> dict[str, Any]:
        """The entry a store manifest records when its vectors carry H^power."""
        return {
            "sha256": self.identity(),
            "power": power,
            "damping": self.damping,
            "damping_mode": self.damping_mode,
            "num_rows": self.num_rows,
            "mixed": self.mixing is not None,
            **({"applied_sharded": self.sharding} if self.sharding else {}),
        }

    # ------------------------------------------------------------------ disk
    def save(self, path: str | Path, dtype: torch.dtype = torch.float64) -> Path:
        """Write the directory (tensors first, then the JSON that marks it complete). With a
        ``dtype`` narrower than float64 the statistics are rounded to it, here and on disk, so
        this object and the one loaded back apply the same matrices (and share one sha256)."""
        root = Path(path)
        for stale in root.glob(PART_GLOB):
            stale.unlink()  # the parts of an earlier sharded fit
        self.save_tensors(root / TENSORS_FILE, dtype)
        self.save_meta(root, self.identity())
        return root

    def save_tensors(self, path: Path, dtype: torch.dtype = torch.float64) -> None:
        """Write this object's blocks (all of them, or a rank's share) to one safetensors file."""
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for name in self.second_moments:
            for kind, values in (
                ("second_moment", self.second_moments),
                ("eigenvalues", self.eigenvalues),
                ("eigenvectors", self.eigenvectors),
            ):
                stored = values[name].to(dtype).contiguous()
                tensors[f"{name}/{kind}"] = stored
                values[name] = stored.double()
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)

    def save_meta(
        self,
        root: Path,
        sha256: str,
        modules: list[str] | None = None,
        shards: dict[str, list[str]] | None = None,
        **extra: Any,
    ) -> None:
        """Write the JSON that marks the directory complete (last). A sharded fit's rank 0 passes
        every module, the part file of each (``shards``) and the hash of the whole."""
        meta = {
            "kind": "preconditioner",
            "modules": modules or self.modules,
            "num_rows": self.num_rows,
            "damping": self.damping,
            "damping_mode": self.damping_mode,
            "layout": self.layout,
            "source": self.source,
            "mixing": self.mixing,
            "sha256": sha256,
            **({"shards": shards} if shards else {}),
            **extra,
        }
        atomic_write_bytes(root / META_FILE, json.dumps(meta, indent=2).encode())


def _shards(root: Path) -> dict[str, list[str]]:
    try:
        return json.loads((root / META_FILE).read_text()).get("shards") or {}
    except (OSError, json.JSONDecodeError):
        return {}


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` holds a sharded fit (part files listed in its JSON)."""
    return bool(_shards(Path(path)))


def is_complete(path: str | Path) -> bool:
    root = Path(path)
    if not (root / META_FILE).is_file():
        return False
    shards = _shards(root)
    if shards:
        return all((root / f).is_file() for f in shards)
    return (root / TENSORS_FILE).is_file()


def sharded_identity(root: Path, shards: Mapping[str, list[str]], head: Preconditioner) -> str:
    """:meth:`Preconditioner.identity` of a sharded fit, read from its part files one module at a
    time (the same hash as the unsharded fit's)."""
    from safetensors import safe_open

    h = hashlib.sha256()
    h.update(json.dumps([head.damping, head.damping_mode, head.num_rows]).encode())
    where = {n: f for f, names in shards.items() for n in names}
    for name in sorted(where):
        with safe_open(str(root / where[name]), framework="pt") as f:
            h.update(name.encode())
            h.update(f.get_tensor(f"{name}/second_moment").double().numpy().tobytes())
    return h.hexdigest()


def load_preconditioner(
    path: str | Path, option: str = "--preconditioner_path", modules: Sequence[str] | None = None
) -> Preconditioner:
    """Read a preconditioner directory written by :meth:`Preconditioner.save` (or by a sharded
    fit: its part files); ``modules`` reads only those blocks."""
    from safetensors import safe_open

    root = Path(path)
    if not is_complete(root):
        raise BergsonError(
            f"{option} {path}: not a complete preconditioner directory (needs {META_FILE} and {TENSORS_FILE} "
            "or the part files its JSON lists); fit one with `bergson preconditioner`"
        )
    try:
        meta = json.loads((root / META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise BergsonError(f"{option} {path}: {META_FILE} is corrupt ({e}); fit it again") from e
    names = list(meta["modules"]) if modules is None else [n for n in meta["modules"] if n in set(modules)]
    files = meta.get("shards") or {TENSORS_FILE: meta["modules"]}
    tensors: dict[str, torch.Tensor] = {}
    for file, held in files.items():
        wanted = [n for n in held if n in set(names)]
        if not wanted:
            continue
        with safe_open(str(root / file), framework="pt") as f:
            # stored float64 or float32; the maths is float64 either way
            for n in wanted:
                for kind in ("second_moment", "eigenvalues", "eigenvectors"):
                    tensors[f"{n}/{kind}"] = f.get_tensor(f"{n}/{kind}").double()
    return Preconditioner(
        second_moments={n: tensors[f"{n}/second_moment"] for n in names},
        num_rows=int(meta["num_rows"]),
        layout=meta["layout"],
        damping=float(meta["damping"]),
        damping_mode=meta["damping_mode"],
        source=meta.get("source") or {},
        mixing=meta.get("mixing"),
        eigenvalues={n: tensors[f"{n}/eigenvalues"] for n in names},
        eigenvectors={n: tensors[f"{n}/eigenvectors"] for n in names},
    )


def load_owned(path: str | Path, modules: Sequence[ModuleLayout], option: str) -> Preconditioner | None:
    """With several workers and a sharded fit at ``path`` (``--shard_preconditioners``): only this
    rank's blocks of it, the modules :func:`shard_owners` gives this rank among the current workers
    (whatever number of workers made the fit), for a transform whose ranks each multiply their own
    columns and sum (:meth:`Preconditioner.transform`; collective: every rank applies it at the same
    point). None with one process or an unsharded fit: load it whole."""
    from ..distributed import rank, world_size

    root = Path(path)
    if world_size() == 1 or not is_complete(root):
        return None
    meta = json.loads((root / META_FILE).read_text())
    if not meta.get("shards"):
        return None
    missing = [m.name for m in modules if m.name not in set(meta["modules"])]
    if missing:
        raise BergsonError(f"{option} {path}: the preconditioner has no statistics for module {missing[0]}")
    owners = shard_owners({m.name: m.dim for m in modules}, world_size())
    mine = [n for n, r in owners.items() if r == rank()]
    pre = load_preconditioner(root, option, modules=mine)
    pre.owned, pre.whole_sha256 = mine, meta["sha256"]
    pre.sharding = {
        "ranks": world_size(),
        "blocks_per_rank": [sum(r == k for r in owners.values()) for k in range(world_size())],
    }
    return pre


# ---------------------------------------------------------------------- fitting


def second_moments_of_store(
    store: Any, device: torch.device | str = "cpu"
) -> tuple[dict[str, torch.Tensor], int]:
    """Second moments of the vectors of a gradient store (read block by block)."""
    manifest = store.manifest
    sink = StatisticsSink({m.name: m.dim for m in manifest.modules}, device)
    for start, block in store.blocks():
        sink.write(np.arange(start, start + len(block)), block, np.zeros(len(block)), np.zeros(len(block)))
    return sink.second_moments(), sink.count


def mixing_weight(train: torch.Tensor, query: torch.Tensor, components: int) -> tuple[float, int]:
    """TrackStar's weight w with w μ_k(query) = (1 - w) μ_1(train), and the k used.

    ``train`` and ``query`` are ascending eigenvalues. k is ``components`` clipped to the
    number of query eigenvalues above 1e-12 of the largest (the query moment's numerical
    rank: a handful of queries has only that many components to down-weight).
    """
    if components < 1:
        raise BergsonError(f"--downweight_components {components}: must be at least 1")
    top_train = float(train.max())
    desc = torch.flip(query, [0])
    rank = int((desc > 1e-12 * float(desc[0])).sum()) if float(desc[0]) > 0 else 0
    if rank == 0 or top_train <= 0:
        raise BergsonError("cannot mix preconditioners: one of the second moments is zero")
    k = min(components, rank)
    mu_k = float(desc[k - 1])
    return top_train / (top_train + mu_k), k


def mix_preconditioners(train: Preconditioner, query: Preconditioner, components: int) -> Preconditioner:
    """TrackStar's task-specific mixture w Q + (1 - w) T, with w set per module by :func:`mixing_weight`."""
    check_layouts(
        train.layout, query.layout, "the training-set preconditioner", "the query-set preconditioner"
    )
    moments, weights, used = {}, {}, {}
    for name in train.modules:
        w, k = mixing_weight(train.eigenvalues[name], query.eigenvalues[name], components)
        moments[name] = (
            w * query.second_moments[name].double() + (1 - w) * train.second_moments[name].double()
        )
        weights[name], used[name] = w, k
    return Preconditioner(
        second_moments=moments,
        num_rows=train.num_rows + query.num_rows,
        layout=train.layout,
        damping=train.damping,
        damping_mode=train.damping_mode,
        source={"train": train.source, "query": query.source},
        mixing={
            "train_sha256": train.identity(),
            "query_sha256": query.identity(),
            "components": components,
            "components_used": used,
            "weights": weights,
        },
    )


# ---------------------------------------------------------------------- planning


def plan_powers(train_power: float, query_power: float, unit_normalize: bool) -> tuple[float, float]:
    """The powers of H still to apply to (training, query) vectors.

    Vectors may already carry a power of H (``train_power``, ``query_power``, from their
    store's manifest). Dot-product scores need the two sides to carry H⁻¹ between them;
    cosine scores need H^{-1/2} on each side before normalizing. So a preconditioner is
    applied exactly once whatever the stores already carry.
    """
    if unit_normalize:
        return -0.5 - train_power, -0.5 - query_power
    return 0.0, -1.0 - train_power - query_power


def carried(manifest: Any) -> float:
    """The power of H a store's vectors already carry (0 without a preconditioner)."""
    return float(manifest.preconditioner["power"]) if manifest.preconditioner else 0.0


STORE_DIR = "preconditioner"
"""Subdirectory of a store holding the preconditioner its vectors carry."""


def fixed_preconditioner(
    stores: Sequence[tuple[str, Any]], unit_normalize: bool = False
) -> dict[str, Any] | None:
    """The manifest entry of an EK-FAC inverse Fisher that one of ``stores`` carries
    (``bergson ekfac --projected_queries``), or None.

    Such vectors already hold (F + δI)⁻¹ q in projected space, where no preconditioner
    object exists to apply again or halve: they are scored as they are, by dot product.
    """
    for name, store in stores:
        info = store.manifest.preconditioner
        if not info or info.get("kind") != "ekfac":
            continue
        if unit_normalize:
            raise BergsonError(
                f"{name} holds EK-FAC preconditioned queries (H^-1 q), which only make sense with "
                "dot-product scores: drop --unit_normalize"
            )
        return info
    return None


def resolve_preconditioner(path: str | None, stores: Sequence[tuple[str, Any]]) -> Preconditioner | None:
    """The one preconditioner of a computation: given by ``path`` and/or carried by ``stores``.

    ``stores`` are (option name, GradientStore) pairs. Every preconditioner found must be
    the same one (same statistics and damping), and every store must live in its space.
    A store with EK-FAC preconditioned queries (see :func:`fixed_preconditioner`) needs
    none: giving or carrying another one as well is an error, else None is returned.
    """
    if fixed_preconditioner(stores) is not None:
        others = [
            name
            for name, s in stores
            if s.manifest.preconditioner and fixed_preconditioner([(name, s)]) is None
        ]
        if path or others:
            raise BergsonError(
                f"{(others or ['--preconditioner_path'])[0]}: a preconditioner on top of EK-FAC "
                "preconditioned queries would apply the inverse curvature twice; score against a "
                "store built without --preconditioner_path and do not pass one"
            )
        return None
    found: list[tuple[str, Preconditioner]] = []
    if path:
        found.append(("--preconditioner_path", load_preconditioner(path)))
    for name, store in stores:
        if store.manifest.preconditioner:
            found.append((name, load_preconditioner(Path(store.root) / STORE_DIR, option=name)))
    if not found:
        return None
    first_name, first = found[0]
    for name, other in found[1:]:
        if other.identity() != first.identity():
            raise BergsonError(
                f"{name} carries a different preconditioner than {first_name}; "
                "use the same preconditioner on both sides (or rebuild without one)"
            )
    for name, store in stores:
        first.check(store.manifest, name, first_name)
    return first
