"""The `triton_step` backend: an inner SGD step of the Phase 12 model as fused Triton
kernels, and its backward as a fused Hessian-vector product.

    operands         how the kernels read their inputs (masked loads, autocast rounding)
    task_kernels     the gradient and the HVP written out by hand, one program per task
    example_kernels  the same, one program per example, and the weight-gradient sums
    launch           the launchers: shapes, limits (check_shapes), block sizes, which
                     kernel set runs (by the number of examples)
    functions        the autograd.Functions and sgd_step / query_metrics on parameter dicts

Importing this package imports Triton.
"""

from phase12.fused_step.functions import query_metrics, sgd_step
from phase12.fused_step.launch import check_shapes

__all__ = ["check_shapes", "query_metrics", "sgd_step"]
