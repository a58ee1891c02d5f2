"""Model backends: how an inner step is taken, how attention is called, where it runs.

    backend = get("triton_step")
    phi = backend.sgd_step(params, x, y, lr, Curvature())      # FULL: every second-order term
    loss, accuracy = backend.query_metrics(phi, x, y)
    device = device_for(config)        # where a RunConfig runs here, or ConfigError

| name         | inner step                                  | attention              |
|--------------|---------------------------------------------|------------------------|
| reference    | torch.func.grad of the model                | PyTorch ops            |
| triton_fused | torch.func.grad of the model                | fused Triton kernels   |
| triton_step  | one fused Triton kernel per step, its       | (inside the step); the |
|              | backward one Hessian-vector-product kernel  | plain forward: fused   |
|              | (phase12.fused_step)                        |                        |

In float32 all three compute the same numbers, to its rounding. triton_step's kernels
compute in float32 whatever the dtype, so in the half dtypes and under torch.autocast it
is the more precise (README, "Shapes and precision: the robustness map").

Each backend (a class per row: Backend, FusedAttentionBackend, FusedStepBackend) says what
it cannot run here (`cannot_run`: `unavailable` on the device, or beyond its `limit`),
where it is not the best choice though it can run (`unsuited`, read in FASTEST_FIRST
order for a run that names no backend), and whether FULL's curvature ablations run on it
(`ablation_switches`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from kernels import BackendUnavailable, check_backend
from phase12.config import PARAMS, ConfigError, Curvature, Mode, RunConfig, resolve_device
from phase12.model import Params, apply, cross_entropy, loss


def scaled(value: torch.Tensor, scale: float) -> torch.Tensor:
    """`scale` times a loss whose gradient is taken (RunConfig.loss_scale). A scale of 1
    (every run not computing in float16) adds no op: in an inner step a multiply would be
    one more op in its forward, backward and, in FULL, double backward (with a copy of
    the scalar to the device)."""
    return value if scale == 1.0 else scale * value


_support_grad = torch.func.grad(
    lambda params, x, y, attention_backend, attention_curvature, scale: scaled(
        loss(params, x, y, attention_backend, attention_curvature), scale
    )
)


@dataclass(frozen=True)
class Backend:
    """Inner steps by torch.func.grad of the model; attention through `attention`
    (kernels.attention's backend name)."""

    name: str
    attention: str
    # FULL's curvature ablations (phase12.config.ABLATIONS) run on this backend.
    ablation_switches: ClassVar[bool] = True

    def sgd_step(
        self,
        params: Params,
        x: torch.Tensor,
        y: torch.Tensor,
        lr: float,
        curvature: Curvature,
        loss_scale: float = 1.0,
    ) -> Params:
        """params - lr * grad of the support loss on (x (n, T, D), y (n,)), differentiable
        w.r.t. params with the second-order terms `curvature` keeps: the gradients of
        `curvature.detached` are constants, attention's own second derivative is
        `curvature.attention`'s. The gradient is taken of `loss_scale` times the loss and
        divided by it after (float16 compute: keeps small gradients out of its subnormals)."""
        grads = _support_grad(params, x, y, self.attention, curvature.attention, loss_scale)
        grads = {n: g.detach() if n in curvature.detached else g for n, g in grads.items()}
        return {
            name: torch.add(p, grads[name], alpha=-lr / loss_scale) for name, p in params.items()
        }

    def query_metrics(
        self, params: Params, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy, accuracy) on (x (n, T, D), y (n,)); the loss is
        differentiable w.r.t. params to any order."""
        logits = apply(params, x, self.attention)
        accuracy = (logits.argmax(-1) == y).to(logits.dtype).mean()
        return cross_entropy(logits, y), accuracy

    def cannot_run(self, config: RunConfig, device: torch.device) -> str | None:
        """Why `config` cannot run on `device` with this backend; None if it can: the
        backend is not available there, or `config` is beyond its limits (`limit`)."""
        return self.unavailable(device) or self.limit(config, device)

    def unavailable(self, device: torch.device) -> str | None:
        """Why this backend cannot run on `device` at all (no Triton, no GPU and no
        interpreter); None if it can."""
        try:
            check_backend(self.attention, device)
        except BackendUnavailable as e:
            return str(e)
        return None

    def limit(self, config: RunConfig, device: torch.device) -> str | None:
        """The limit of this backend's kernels that `config` exceeds on a device of
        `device`'s type (a width, a size, an ablation it has no switch for), naming the
        backends that can run it; None if it is within them."""
        if config.ablation != "none" and not self.ablation_switches:
            have = [b.name for b in BACKENDS.values() if b.ablation_switches]
            return (
                f"its kernels have no switch for ablation {config.ablation} "
                f"(use {' or '.join(have)})"
            )
        return None

    def unsuited(self, config: RunConfig) -> str | None:
        """Why this backend, even where it can run `config`, would not serve a run that
        names no backend best (it computes otherwise than the run asks, or is slower
        than a backend after it in FASTEST_FIRST); None if it would."""
        return None


class FusedAttentionBackend(Backend):
    """Inner steps by torch.func.grad of the model, attention through the fused Triton
    kernels (forward, backward and double backward, with the curvature switches)."""

    def limit(self, config, device):
        from kernels.launch import MAX_HEAD_DIM

        if reason := super().limit(config, device):
            return reason
        if config.dim > MAX_HEAD_DIM:
            return (
                f"its attention kernels take head dims up to {MAX_HEAD_DIM}; got D = "
                f"{config.dim} (use reference)"
            )
        return None

    def unsuited(self, config):
        if config.cuda_graph == "off":  # docs/benchmarks.md, "Twenty-fourth session"
            return (
                "eager (cuda_graph off), Python's launches of its kernels make it slower "
                "than reference"
            )
        if config.dtype == "float64":
            return "in float64 it is not known to be faster than reference"
        return None


def _autocast_operand(x: torch.Tensor) -> torch.dtype | None:
    """torch.autocast's dtype where it is on for x's device (autocast_* runs), else None."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class FusedStepBackend(Backend):
    """Inner steps and their backward as fused Triton kernels of the whole model.

    `attention` (triton_fused) names the kernels.attention backend of the same model's
    plain forward; `unavailable` reads it, as this backend needs what those kernels need
    (Triton). The fused kernels have no ablation switches: phase12.probes measures this
    backend's curvature shares on the reference backend, which runs the same model.

    The kernels compute in float32 whatever the parameters' dtype. Under torch.autocast
    they round what they read to autocast's dtype first (phase12.fused_step.launch). The
    loss scale is not applied inside them: the inner gradient never leaves float32 (the
    kernel writes W - lr dL/dW), and the query loss's gradients are kept in float32, so
    scaling by a power of two and back would change nothing. The outer step's scale
    still reaches the backward kernels through the incoming gradients."""

    ablation_switches = False  # its Hessian-vector-product kernel keeps every term

    def sgd_step(self, params, x, y, lr, curvature, loss_scale=1.0):
        from phase12.fused_step import sgd_step  # imports Triton: only when used

        if curvature.attention != "exact" or curvature.detached not in (set(), set(PARAMS)):
            raise ValueError(f"{self.name} takes FULL or FO inner steps only; got {curvature}")
        second_order = not curvature.detached
        return sgd_step(params, x, y, lr, second_order=second_order, operand=_autocast_operand(x))

    def query_metrics(self, params, x, y):
        from phase12.fused_step import query_metrics

        return query_metrics(params, x, y, _autocast_operand(x))

    def unsuited(self, config):
        if config.dtype != "float32":
            return f"its kernels compute in float32, not in {config.dtype}"
        return None

    def limit(self, config, device):
        if reason := super().limit(config, device):
            return reason
        if config.dtype == "float64" and device.type == "cuda":
            return "float64 runs only in Triton's interpreter on the CPU; use float32 on CUDA"
        from phase12.fused_step import check_shapes

        try:
            for examples in (config.shots, config.queries):
                check_shapes(examples, config.seq_len, config.dim, config.num_classes)
        except ValueError as e:
            return str(e)
        return None


BACKENDS = {
    b.name: b
    for b in (
        Backend("reference", attention="reference"),
        FusedAttentionBackend("triton_fused", attention="triton_fused"),
        FusedStepBackend("triton_step", attention="triton_fused"),
    )
}
NAMES = tuple(BACKENDS)
# On CUDA, fastest first where each computes what a run asks for (Backend.unsuited).
FASTEST_FIRST = ("triton_step", "triton_fused", "reference")


def get(name: str) -> Backend:
    """The backend called `name`; ConfigError for an unknown name."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"backend {name!r} is unknown; choose one of {', '.join(NAMES)}", "backend"
        ) from None


def device_for(config: RunConfig, seeds: int = 1) -> torch.device:
    """The device `config` runs on here, as one of `seeds` runs batched together (phase12.
    train.run_experiments). Raises ConfigError when it cannot run here: no CUDA, a CUDA
    graph asked for without CUDA, a backend that cannot run on the device or hold the
    sizes."""
    device = resolve_device(config.device)
    if config.cuda_graph == "on" and device.type != "cuda":
        raise ConfigError("cuda_graph 'on' needs a CUDA device; use off or auto", "cuda_graph")
    reason = get(config.backend).cannot_run(config, device)
    if reason is not None:
        raise ConfigError(f"backend {config.backend} cannot run here: {reason}", "backend")
    _check_memory(config, device, seeds)
    return device


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"  # whole GiB would print a need beyond a size as equal


def _check_memory(config: RunConfig, device: torch.device, seeds: int = 1) -> None:
    """Refuse sizes whose inputs alone cannot fit (a lower bound, not an estimate), for
    `seeds` runs batched together: on the device, one meta-batch of task tensors and the
    parameters' copies every run holds (the meta-parameters, their gradient and Adam's two
    moments; each task's adapted parameters, which FULL keeps for every inner step); the
    per-step history on the host."""
    itemsize = config.torch_dtype.itemsize
    examples = config.meta_batch * (config.shots + config.queries)
    tasks = seeds * examples * config.seq_len * config.dim * itemsize
    d, c = config.dim, config.num_classes
    copies = 4 + config.meta_batch * (config.inner_steps if config.mode == Mode.FULL else 1)
    params = seeds * copies * (3 * d * d + c * d + c) * itemsize
    who = "this run needs" if seeds == 1 else f"these {seeds} runs, one seed batch, need"
    alone = "" if seeds == 1 else " (or --no-batch-seeds)"
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if tasks + params > memory:
        raise ConfigError(
            f"{who} at least {_gib(tasks + params)} on the {device.type} ({_gib(tasks)} of "
            f"task tensors, {_gib(params)} for {copies} copies of the parameters), which has "
            f"{_gib(memory)}: make meta_batch, dim, num_classes, seq_len or k smaller{alone}"
        )
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    history = seeds * config.outer_steps * 5 * 8 * 2  # device history and its float64 copy
    if history > host:
        raise ConfigError(
            f"outer_steps {config.outer_steps} needs {_gib(history)} of per-step history "
            f"for {seeds} seed(s); the host has {_gib(host)}{alone}",
            "outer_steps",
        )
