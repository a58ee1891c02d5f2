"""The `triton_step` backend: an inner SGD step of the Phase 12 model as one fused
Triton kernel and its backward as a Hessian-vector-product kernel.

    triton_kernels   the two kernels (the gradient and the HVP written out by hand)
    launch           their launchers: shapes, limits (check_shapes), block sizes
    functions        the autograd.Functions and sgd_step / query_loss on parameter dicts

Importing this package imports Triton.
"""

from phase12.fused_step.functions import PARAM_NAMES, query_loss, sgd_step
from phase12.fused_step.launch import check_shapes

__all__ = ["PARAM_NAMES", "check_shapes", "query_loss", "sgd_step"]
