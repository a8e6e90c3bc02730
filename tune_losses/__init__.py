"""tune-losses: memory-efficient losses for training and distilling large-vocabulary language models.

Public API only; see the README for the map of modules.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("tune-losses")
except PackageNotFoundError:  # a source tree on the import path, not installed
    __version__ = "0.0.0+unknown"

from tune_losses.accounting import (
    LossSum,
    all_reduce_token_count,
    count_step_tokens,
    count_valid_tokens,
    megatron_loss_func,
    normalize,
)
from tune_losses.alignment import (
    DPOLoss,
    KLEstimate,
    KTOOptions,
    KTOOutput,
    LinearPolicyLoss,
    LinearPreferenceLoss,
    PolicyOptions,
    PolicyOutput,
    PreferenceOptions,
    PreferenceOutput,
    Reference,
    RSOLoss,
    linear_kto_loss,
    linear_policy_loss,
    linear_preference_loss,
)

# A divergence registered in its own file (tune_losses/divergences/) has its torchtune-style classes
# made by chunked_output; they are exported here without a line per class.
from tune_losses.chunked_output import KD_LOSS_CLASSES as _KD_LOSS_CLASSES  # noqa: E402
from tune_losses.chunked_output import (
    CEWithChunkedOutputLoss,
    DivergenceWithChunkedOutputLoss,
    ForwardKLLoss,
    ForwardKLWithChunkedOutputLoss,
    JSDLoss,
    JSDWithChunkedOutputLoss,
    ReverseKLLoss,
    ReverseKLWithChunkedOutputLoss,
    SymmetricKLLoss,
    SymmetricKLWithChunkedOutputLoss,
    TVDLoss,
    TVDWithChunkedOutputLoss,
)
from tune_losses.chunking import split_like, split_tokens
from tune_losses.fused import (
    FusedOutput,
    LinearCrossEntropyLoss,
    LinearDistillationLoss,
    linear_cross_entropy,
    linear_distillation_loss,
    linear_kd_loss,
    linear_log_probs,
)
from tune_losses.fused.sparse import linear_sparse_distillation_loss, linear_sparse_kd_loss
from tune_losses.fused.sparse_module import SparseDistillationLoss
from tune_losses.heads import OutputProjection, configure_model_for_loss, output_projection, set_output_mode
from tune_losses.options import (
    CEOptions,
    DistillationOptions,
    ExecutionOptions,
    KDOptions,
    SparseDistillationOptions,
    SparseKDOptions,
    VocabParallelOptions,
)

globals().update(_KD_LOSS_CLASSES)

__all__ = [
    "__version__",
    # chunked-output losses (torchtune API)
    "CEWithChunkedOutputLoss",
    "ForwardKLWithChunkedOutputLoss",
    "ReverseKLWithChunkedOutputLoss",
    "SymmetricKLWithChunkedOutputLoss",
    "JSDWithChunkedOutputLoss",
    "TVDWithChunkedOutputLoss",
    "ForwardKLLoss",
    "ReverseKLLoss",
    "SymmetricKLLoss",
    "JSDLoss",
    "TVDLoss",
    "DivergenceWithChunkedOutputLoss",
    # fused linear losses
    "linear_cross_entropy",
    "linear_kd_loss",
    "linear_distillation_loss",
    "linear_log_probs",
    "linear_sparse_kd_loss",
    "linear_sparse_distillation_loss",
    "FusedOutput",
    "LinearCrossEntropyLoss",
    "LinearDistillationLoss",
    "SparseDistillationLoss",
    # model side
    "OutputProjection",
    "output_projection",
    "set_output_mode",
    "configure_model_for_loss",
    "split_tokens",
    "split_like",
    # accounting
    "LossSum",
    "normalize",
    "count_valid_tokens",
    "count_step_tokens",
    "all_reduce_token_count",
    "megatron_loss_func",
    # alignment (DPO family, GRPO family, torchtune's DPO losses)
    "linear_preference_loss",
    "linear_kto_loss",
    "linear_policy_loss",
    "PreferenceOutput",
    "KTOOutput",
    "PolicyOutput",
    "DPOLoss",
    "RSOLoss",
    "LinearPreferenceLoss",
    "LinearPolicyLoss",
    "Reference",
    "KLEstimate",
    # options
    "CEOptions",
    "KDOptions",
    "DistillationOptions",
    "SparseKDOptions",
    "SparseDistillationOptions",
    "ExecutionOptions",
    "VocabParallelOptions",
    "PreferenceOptions",
    "KTOOptions",
    "PolicyOptions",
]
__all__ += [name for name in _KD_LOSS_CLASSES if name not in __all__]
