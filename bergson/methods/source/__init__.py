"""SOURCE (Bae et al. 2024, approximate unrolled differentiation): its maths (:mod:`.maths`), the
segments of a training run (:mod:`.segments`) and the ``bergson source`` command (:mod:`.command`)."""

from .command import adam_preconditioner, curvature_scale, plan, source
from .maths import (
    UNROLLS,
    Curvature,
    adam_step_preconditioner,
    step_functions,
    unroll_segment,
    unrolled_queries,
)
from .segments import Segment, explicit_segments, stage_schedule, trainer_segments

__all__ = [
    "UNROLLS",
    "Curvature",
    "Segment",
    "adam_preconditioner",
    "adam_step_preconditioner",
    "curvature_scale",
    "explicit_segments",
    "plan",
    "source",
    "stage_schedule",
    "step_functions",
    "trainer_segments",
    "unroll_segment",
    "unrolled_queries",
]
