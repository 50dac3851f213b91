"""MAGIC: exact attribution by differentiating the query loss through a whole training run.

Every training token carries a weight w (all ones). A step's loss is

    L_t(θ, w) = Σ_{tokens k of the step} w_k ℓ_k(θ) / Σ_k w_k

(the Hugging Face Trainer's mean over the step's loss tokens; with w ∈ {0, 1} it is exactly the
loss of the same batches without the zero-weight tokens). The optimizer update (AdamW or SGD
with momentum, a learning-rate schedule, clipping, accumulation) makes the training state
s = (θ, optimizer moments) a differentiable function s_{t+1} = f_t(s_t, w), and the query
loss Q(θ_T) a function of w. A token's score is −∂Q/∂w_k (positive: training on it lowers the
query loss, the orientation of every bergson score); a document's is the sum over its tokens
(the derivative with respect to one weight shared by all of them), so removing a set of
documents changes the query loss by about the sum of their scores.

The reverse pass runs backwards over the steps with the cotangent λ_t = ∂Q/∂s_t:
λ_t = λ_{t+1} ∂f_t/∂s_t and ∂Q/∂w += λ_{t+1} ∂f_t/∂w, each a double backward through the
gradient of L_t (create_graph) and through the update. It needs s_t for every t, replayed
from the checkpoints the forward pass saved (every step, every ~√T steps, or O(log T) of them).

Attention runs the math SDPA kernel (double-backward safe, and the same kernel in the forward
and reverse passes, so replayed states equal the trained ones). Dropout is off (the model stays
in eval mode) so that replay is deterministic.

The package, one idea a module:

* :mod:`.recipe`: the recipe as maths (data order, schedule, clipping, the optimizer update);
* :mod:`.replay`: training as a differentiable function of the token weights;
* :mod:`.reverse`: checkpoints and the reverse pass (the metagradients);
* :mod:`.training_state`: the training state as files (``optimizer.pt`` next to the weights,
  a Trainer-style ``trainer_state.json`` and ``checkpoint-<step>/`` directories);
* :mod:`.command`: ``bergson magic`` (options, run directory, scores store).
"""

from .command import CONFIG_FILE, check_options, check_precision, load_recipe, magic, prepare, query_columns
from .recipe import State, learning_rate, optimizer_update, plan_steps
from .replay import Replay, TokenWeights, query_gradient, query_losses, use_double_backward_attention
from .reverse import MagicRun, ReverseResult, checkpoint_steps
from .training_state import optimizer_state_dict, save_training_state, trainer_state

__all__ = [
    "CONFIG_FILE",
    "MagicRun",
    "Replay",
    "ReverseResult",
    "State",
    "TokenWeights",
    "check_options",
    "check_precision",
    "checkpoint_steps",
    "learning_rate",
    "load_recipe",
    "magic",
    "optimizer_state_dict",
    "optimizer_update",
    "plan_steps",
    "prepare",
    "query_columns",
    "query_gradient",
    "query_losses",
    "save_training_state",
    "trainer_state",
    "use_double_backward_attention",
]
