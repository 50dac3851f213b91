"""``bergson unroll``'s options (its own module: :mod:`.commands` is at its size limit)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import BergsonError
from .data import share_tokenizer
from .options import DataConfig, ModelOptions, RunOptions, TrainingConfig


@dataclass
class UnrollConfig(ModelOptions, RunOptions):
    """Options of ``bergson unroll``: MAGIC's reverse pass through a training run, approximated at the
    final state (its weights and AdamW's moments) with the exact Gauss-Newton of a few documents in a
    Krylov subspace of each query."""

    data: DataConfig = field(default_factory=DataConfig)
    """The training documents, in the order and with the recipe (--training.*) that trained --model."""

    query: DataConfig = field(default_factory=DataConfig)
    """The query documents whose loss after training is attributed."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    """The recipe that trained --model: its batch order (seed, batch size, epochs) and learning rates
    are followed step by step (a `bergson magic` YAML holds it)."""

    optimizer_state: str = ""
    """AdamW's state after the last training step (a torch.optim state dict; default MODEL/optimizer.pt,
    as `bergson magic` writes to RUN/model and the Hugging Face Trainer to checkpoint-N/)."""

    query_mode: Literal["aggregate", "individual"] = "aggregate"
    """aggregate: one score column for the mean query loss; individual: a column per query."""

    krylov_steps: int = 16
    """Gauss-Newton products per score column (Lanczos steps): the dimension of the subspace in which
    the query's response through the run is computed (with --krylov_space shared, block steps)."""

    krylov_space: Literal["per_column", "shared"] = "per_column"
    """per_column: each score column's own Krylov space (its scores do not depend on the other columns);
    shared: one space grown from all columns' queries at once (each column then has --krylov_steps times
    the number of columns dimensions for the same products)."""

    curvature_docs: int = 16
    """Training documents (drawn with --curvature_seed) whose mean token loss's Gauss-Newton stands for
    every step's; the cost of each product grows with them."""

    curvature_seed: int = 0
    """Seed of the draw of --curvature_docs."""

    top_k: int = 10
    """Training documents printed per score column."""

    def optimizer_state_file(self) -> Path:
        """--optimizer_state, or optimizer.pt beside --model's weights."""
        return Path(self.optimizer_state or Path(self.model) / "optimizer.pt")

    def _check(self) -> None:
        if self.data.reward_column or self.query.reward_column:
            raise BergsonError(
                "--reward_column: bergson unroll follows a supervised fine-tune's AdamW steps; advantage-weighted "
                "(GRPO) losses are not modelled, drop the option"
            )
        self.data._check()
        self.query._check("--query.")
        share_tokenizer(self.data, self.query)
        check_adamw(self.training)


def check_adamw(training: TrainingConfig) -> None:
    """Refuse a recipe ``bergson unroll`` cannot linearise (it follows AdamW's updates alone)."""
    if training.optimizer != "adamw":
        raise BergsonError(
            f"--training.optimizer {training.optimizer}: bergson unroll linearises AdamW; use bergson magic for SGD"
        )
