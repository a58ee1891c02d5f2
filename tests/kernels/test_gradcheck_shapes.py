"""kernels.gradcheck, the risk check of the fused op, reaches the one-query kernels."""

import torch

import kernels.gradcheck as gradcheck


class _WrongForOneQuery(torch.autograd.Function):
    """softmax(q k^T / sqrt(D)) v whose backward is off by 2x for one query only."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return _attention(q, k, v)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            grads = torch.autograd.grad(_attention(q, k, v), (q, k, v), do, create_graph=True)
        return tuple(2 * g for g in grads) if q.shape[-2] == 1 else grads


def _attention(q, k, v):
    return torch.softmax(q @ k.mT / q.shape[-1] ** 0.5, -1) @ v


def test_a_wrong_gradient_of_one_query_fails_the_check(monkeypatch):
    def fused(q, k, v, causal):
        assert not (causal and q.shape[-2] == 1)
        return _WrongForOneQuery.apply(q, k, v) if not causal else _attention(q, k, v)

    monkeypatch.setattr(gradcheck, "fused_attention", fused)
    assert not gradcheck.check("cpu")
    monkeypatch.setattr(gradcheck, "fused_attention", lambda q, k, v, causal: _attention(q, k, v))
    assert gradcheck.check("cpu")  # the same shapes pass with a right gradient
