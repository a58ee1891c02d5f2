"""The fused Triton attention against the PyTorch-ops reference, on the CPU interpreter.

Every check draws fresh random inputs. float64 runs the real kernels (tl.dot works in
float64 in the interpreter), so first, second and third order are compared to ~1e-12.
"""

import pytest
import torch
from torch.func import grad, jvp, vmap

from kernels import attention, fused_attention
from kernels.reference import (
    attention_backward_reference,
    attention_double_backward_reference,
    attention_logsumexp_reference,
    attention_reference,
)

pytestmark = pytest.mark.usefixtures("interpreter")

F64 = torch.float64
# (N, M, D, Dv, causal): N != M, N = 1, tails that are not a multiple of the 16-wide
# interpreter tiles, Dv != D, causal on and off.
SHAPES = [
    (1, 32, 16, 16, False),
    (1, 5, 8, 8, True),
    (5, 7, 8, 12, True),
    (19, 33, 16, 16, False),
    (33, 19, 8, 4, True),
    (17, 17, 16, 16, True),
]


def qkv(n, m, d, dv, lead=(2, 1), dtype=F64, grad=True):
    q = torch.randn(*lead, n, d, dtype=dtype)
    k = torch.randn(*lead, m, d, dtype=dtype)
    v = torch.randn(*lead, m, dv, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def rel_err(a, b):
    """Relative error, absolute where the reference is (near) zero (N = 1 causal: dq = 0)."""
    return ((a - b).norm() / b.norm().clamp_min(1.0)).item()


def assert_all_close(xs, ys, tol):
    for x, y in zip(xs, ys, strict=True):
        assert rel_err(x, y) < tol


def check_three_orders(n, m, d, dv, causal):
    """Forward, backward and double backward (all four gradients: q, k, v and dO) of the
    fused op equal the reference."""
    q, k, v = qkv(n, m, d, dv)
    out = fused_attention(q, k, v, causal)
    ref = attention_reference(q, k, v, causal)
    assert rel_err(out, ref) < 1e-12

    do = torch.randn_like(ref).requires_grad_()
    g = torch.autograd.grad(out, (q, k, v), do, create_graph=True)
    g_ref = torch.autograd.grad(ref, (q, k, v), do, create_graph=True)
    assert_all_close(g, g_ref, 1e-12)

    us = [torch.randn_like(t) for t in g]
    h = torch.autograd.grad(g, (q, k, v, do), us)
    h_ref = torch.autograd.grad(g_ref, (q, k, v, do), us)
    assert_all_close(h, h_ref, 1e-11)


@pytest.mark.parametrize("n,m,d,dv,causal", SHAPES)
def test_forward_backward_double_backward_match_reference(n, m, d, dv, causal):
    check_three_orders(n, m, d, dv, causal)


@pytest.fixture(params=["row", "tiled"])
def one_query_path(request, monkeypatch):
    """N = 1 runs on the one-query kernels; 'tiled' forces the flash-style kernels."""
    from kernels import launch

    if request.param == "tiled":
        monkeypatch.setattr(launch, "uses_row_kernels", lambda n: False)
    return request.param


@pytest.mark.parametrize(
    "m,d,dv,causal", [(32, 16, 16, False), (7, 8, 12, True), (33, 16, 8, False), (40, 8, 8, True)]
)
def test_one_query_kernels_and_tiled_kernels_match_reference(one_query_path, m, d, dv, causal):
    from kernels import launch

    assert launch.uses_row_kernels(1) == (one_query_path == "row")
    check_three_orders(1, m, d, dv, causal)


@pytest.mark.parametrize("n,m,d,dv,causal", [(1, 9, 8, 8, False), (7, 5, 8, 16, True)])
def test_double_backward_kernels_give_all_four_gradients(n, m, d, dv, causal):
    """The Function chain alone (no reference): gq, gk, gv and gdO against the math note."""
    from kernels.fused import FusedAttention, FusedAttentionBackward

    q, k, v = qkv(n, m, d, dv)
    do, uq, uk, uv = (torch.randn_like(t) for t in (torch.empty(2, 1, n, dv, dtype=F64), q, k, v))
    do.requires_grad_()
    o, lse = FusedAttention.apply(q, k, v, causal, 0.3, "ieee", "exact", "triton")
    assert rel_err(lse, attention_logsumexp_reference(q, k, causal, 0.3)) < 1e-13
    args = causal, 0.3, "ieee", "exact", "triton"
    dq, dk, dv_ = FusedAttentionBackward.apply(q, k, v, o, lse, do, *args)
    assert_all_close((dq, dk, dv_), attention_backward_reference(q, k, v, do, causal, 0.3), 1e-12)
    got = torch.autograd.grad((dq, dk, dv_), (q, k, v, do), (uq, uk, uv))
    want = attention_double_backward_reference(q, k, v, do, uq, uk, uv, causal, 0.3)
    assert_all_close(got, want, 1e-11)


@pytest.mark.parametrize("n", [2, 1])  # N = 1: the one-query kernels
def test_gradcheck_and_gradgradcheck(n):
    q, k, v = qkv(n, 3, 3, 2, lead=(1, 1))
    for causal in (False, True):
        fn = lambda q, k, v: fused_attention(q, k, v, causal)  # noqa: B023
        assert torch.autograd.gradcheck(fn, (q, k, v))
        assert torch.autograd.gradgradcheck(fn, (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_float32_matches_float64_reference_in_three_orders(causal, monkeypatch):
    """float32 runs the kernels' base-2 exponents (float64 keeps e^x): forward, backward
    and double backward against the float64 reference, on 16 x 32 tiles with tails."""
    from kernels import launch

    monkeypatch.setattr(launch, "launch_config", lambda *_: launch.LaunchConfig(16, 32, 1, 1))
    q, k, v = qkv(37, 45, 16, 16, dtype=torch.float32)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = fused_attention(q, k, v, causal, float32_precision="ieee")
    ref = attention_reference(q64, k64, v64, causal)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-5
    do = torch.randn_like(ref)
    g = torch.autograd.grad(out, (q, k, v), do.float(), create_graph=True)
    g_ref = torch.autograd.grad(ref, (q64, k64, v64), do, create_graph=True)
    assert_all_close(g, g_ref, 1e-5)
    us = [torch.randn_like(t) for t in g_ref]
    h = torch.autograd.grad(g, (q, k, v), [u.float() for u in us])
    h_ref = torch.autograd.grad(g_ref, (q64, k64, v64), us)
    assert_all_close(h, h_ref, 1e-5)


def test_float32_precision_reaches_every_pass_under_vmap(monkeypatch):
    """The chosen dot precision is handed to every launcher: forward, backward and
    double backward, through the vmap rules; an unknown one is refused."""
    from kernels import launch

    seen = []
    for name in ("attention_forward", "attention_backward", "attention_double_backward"):
        original = getattr(launch, name)

        def recorded(*a, _original=original, _name=name, **kw):
            seen.append((_name, a[-1]))
            return _original(*a, **kw)

        monkeypatch.setattr(launch, name, recorded)
    q, k, v = qkv(4, 7, 8, 8, lead=(3, 2), dtype=torch.float32, grad=False)

    def second_order(attn):
        loss = lambda q, k, v: attn(q, k, v).square().sum()  # noqa: E731
        return vmap(grad(lambda q, k, v: grad(loss, argnums=(0, 1, 2))(q, k, v)[0].sum()))

    fused = lambda q, k, v: fused_attention(q, k, v, float32_precision="ieee")  # noqa: E731
    got = second_order(fused)(q, k, v)
    want = second_order(attention_reference)(q.double(), k.double(), v.double())
    assert rel_err(got.double(), want) < 1e-4
    assert {name for name, _ in seen} == {
        "attention_forward",
        "attention_backward",
        "attention_double_backward",
    }
    assert {precision for _, precision in seen} == {"ieee"}
    seen.clear()
    attention(q, k, v, backend="triton_fused", float32_precision="ieee")
    assert seen == [("attention_forward", "ieee")]
    with pytest.raises(ValueError, match="float32_precision must be one of"):
        fused_attention(q, k, v, float32_precision="fp32")


def test_non_contiguous_inputs():
    q, k, v = qkv(6, 9, 8, 8, lead=(3, 2))
    qt, kt, vt = (t.transpose(0, 1) for t in (q, k, v))  # (2, 3, ., .), not contiguous
    assert not qt.is_contiguous()
    out = fused_attention(qt, kt, vt, False, 0.7)
    assert rel_err(out, attention_reference(qt, kt, vt, False, 0.7)) < 1e-12
    do = torch.randn_like(out)
    assert_all_close(
        torch.autograd.grad(out, (q, k, v), do),
        torch.autograd.grad(attention_reference(qt, kt, vt, False, 0.7), (q, k, v), do),
        1e-12,
    )


def _key_layouts(m, d, lead=(3, 2)):
    """(name, leaves, k, v, read in place) for layouts of K and V: the two halves of one
    K|V projection, K and V of different strides and a batch broadcast from one example
    are read in place; a transposed batch (no single batch stride) and keys whose columns
    are not adjacent are copied."""
    kv = torch.randn(*lead, m, 2 * d, dtype=F64, requires_grad=True)
    yield "kv halves", [kv], *kv.chunk(2, dim=-1), True
    kq, v = (torch.randn(*lead, m, w, dtype=F64, requires_grad=True) for w in (3 * d, d))
    yield "k a third, v its own", [kq, v], kq[..., d : 2 * d], v, True  # strides apart
    kt, vt = (torch.randn(lead[1], lead[0], m, d, dtype=F64, requires_grad=True) for _ in "kv")
    yield "transposed batch", [kt, vt], kt.transpose(0, 1), vt.transpose(0, 1), False
    k1, v1 = (torch.randn(1, 1, m, d, dtype=F64, requires_grad=True) for _ in "kv")
    yield "broadcast batch", [k1, v1], k1.expand(*lead, m, d), v1.expand(*lead, m, d), True
    kc, vc = (torch.randn(*lead, d, m, dtype=F64, requires_grad=True) for _ in "kv")
    yield "columns apart", [kc, vc], kc.mT, vc.mT, False


@pytest.mark.parametrize("causal", [False, True])
def test_one_query_kernels_read_strided_keys_in_place(causal, monkeypatch):
    """K and V views reach the one-query kernels without a copy where their columns are
    adjacent; every layout gives the reference's three orders."""
    from kernels import launch

    seen = []
    for name in (
        "attention_fwd_row_kernel",
        "attention_bwd_row_kernel",
        "attention_dbwd_row_kernel",
    ):
        kernel = getattr(launch, name)

        class Recorded:
            def __getitem__(self, grid, _kernel=kernel):
                def run(*args, **kwargs):
                    seen.append((args[1].data_ptr(), args[2].data_ptr()))
                    return _kernel[grid](*args, **kwargs)

                return run

        monkeypatch.setattr(launch, name, Recorded())
    m, d = 19, 8
    for layout, leaves, k, v, in_place in _key_layouts(m, d):
        q = torch.randn(3, 2, 1, d, dtype=F64, requires_grad=True)
        seen.clear()
        out = fused_attention(q, k, v, causal)
        ref = attention_reference(q, k, v, causal)
        assert rel_err(out, ref) < 1e-12, layout
        do = torch.randn_like(ref).requires_grad_()
        g = torch.autograd.grad(out, (q, *leaves), do, create_graph=True)
        g_ref = torch.autograd.grad(ref, (q, *leaves), do, create_graph=True)
        assert_all_close(g, g_ref, 1e-12)
        us = [torch.randn_like(t) for t in g]
        assert_all_close(
            torch.autograd.grad(g, (q, *leaves, do), us),
            torch.autograd.grad(g_ref, (q, *leaves, do), us),
            1e-11,
        )
        assert len(seen) == 3, layout
        assert all((p == (k.data_ptr(), v.data_ptr())) == in_place for p in seen), layout


def _loss(backend):
    def loss(q, k, v):
        return attention(q, k, v, backend=backend, causal=True).sin().sum()

    return loss


def test_torch_func_grad_of_grad():
    q, k, v = qkv(5, 6, 8, 8, grad=False)

    def outer(backend):
        inner = grad(_loss(backend), argnums=(0, 1, 2))
        return grad(
            lambda q, k, v: sum(g.square().sum() for g in inner(q, k, v)), argnums=(0, 1, 2)
        )(q, k, v)

    assert_all_close(outer("triton_fused"), outer("reference"), 1e-11)


def test_vmap_of_grad_and_single_launch(monkeypatch):
    from kernels import launch

    q, k, v = qkv(4, 7, 8, 8, lead=(3, 2), grad=False)  # vmapped over the leading 3
    g = lambda b: vmap(grad(_loss(b), argnums=(0, 1, 2)))(q, k, v)
    want = g("reference")

    calls = {"fwd": 0, "bwd": 0}
    for name, key in (("attention_forward", "fwd"), ("attention_backward", "bwd")):
        original = getattr(launch, name)

        def counted(*a, _original=original, _key=key):
            calls[_key] += 1
            return _original(*a)

        monkeypatch.setattr(launch, name, counted)
    assert_all_close(g("triton_fused"), want, 1e-12)
    assert calls == {"fwd": 1, "bwd": 1}  # the vmapped dim is folded into one launch


def test_vmap_with_unbatched_operand_and_nested_vmap():
    q, k, v = qkv(4, 7, 8, 8, lead=(3, 2), grad=False)
    k0 = k[0]
    f = lambda b: vmap(lambda q, v: attention(q, k0, v, backend=b))(q, v)
    assert rel_err(f("triton_fused"), f("reference")) < 1e-12
    f2 = lambda b: vmap(vmap(lambda q, k, v: attention(q, k, v, backend=b)))(q, k, v)
    assert rel_err(f2("triton_fused"), f2("reference")) < 1e-12


def test_vmap_of_grad_of_grad():
    q, k, v = qkv(3, 5, 8, 8, lead=(2, 1), grad=False)

    def hess_diag(backend):
        inner = grad(_loss(backend), argnums=1)
        return vmap(grad(lambda q, k, v: inner(q, k, v).square().sum(), argnums=(0, 1, 2)))(q, k, v)

    assert_all_close(hess_diag("triton_fused"), hess_diag("reference"), 1e-11)


def test_third_order_is_exact():
    q, k, v = qkv(3, 4, 8, 8, grad=False)

    def third(backend):
        f = _loss(backend)
        g1 = lambda q, k, v: grad(f, argnums=1)(q, k, v).square().sum()
        g2 = lambda q, k, v: grad(g1, argnums=0)(q, k, v).cos().sum()
        return grad(g2, argnums=(0, 1, 2))(q, k, v)

    assert_all_close(third("triton_fused"), third("reference"), 1e-10)


def test_forward_mode_jvp_and_forward_over_reverse():
    q, k, v = qkv(4, 6, 8, 8, grad=False)
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    for fn in (
        lambda b: jvp(lambda *a: attention(*a, backend=b), (q, k, v), tangents)[1],
        # Hessian-vector product: forward-mode over reverse-mode.
        lambda b: jvp(grad(_loss(b), argnums=(0, 1, 2)), (q, k, v), tangents)[1],
    ):
        got, want = fn("triton_fused"), fn("reference")
        if isinstance(got, tuple):
            assert_all_close(got, want, 1e-11)
        else:
            assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize(
    "shapes,dtypes,message",
    [
        (((1, 2, 200), (1, 2, 200), (1, 2, 200)), None, "head dims"),
        (((1, 2, 8), (1, 3, 8), (1, 4, 8)), None, "shape mismatch"),
        (((2, 2, 8), (1, 3, 8), (1, 3, 8)), None, "identical leading"),
        (((1, 2, 8), (1, 3, 8), (1, 3, 8)), (F64, torch.float32, F64), "dtype"),
        (((1, 2, 8), (1, 3, 8), (1, 3, 8)), (torch.int64,) * 3, "dtype"),
    ],
)
def test_unsupported_inputs_are_refused(shapes, dtypes, message):
    dtypes = dtypes or (F64,) * 3
    tensors = [torch.ones(s, dtype=dt) for s, dt in zip(shapes, dtypes, strict=True)]
    with pytest.raises(ValueError, match=message):
        fused_attention(*tensors)


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from kernels import BackendUnavailable

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv(2, 3, 8, 8)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        fused_attention(q, k, v)


@pytest.mark.parametrize("kind", ["fwd", "bwd", "dbwd"])
def test_compiled_tiles_fit_the_problem_and_the_dtype(kind, monkeypatch):
    """The GPU tile table (not used by the interpreter): clamped to small problems,
    narrower for float32 (either precision) and for 128-wide heads than for bf16 at D = 64."""
    from kernels import launch

    monkeypatch.setattr(launch, "interpreter_enabled", lambda: False)
    operands = [(torch.bfloat16, "tf32x3"), (torch.float16, "tf32x3")]
    operands += [(torch.float32, "tf32x3"), (torch.float32, "ieee")]
    for dtype, precision in operands:
        for d in (16, 64, 128):
            big = launch.launch_config(kind, 4096, 4096, d, dtype, precision)
            small = launch.launch_config(kind, 20, 9, d, dtype, precision)
            assert big.block_n * big.block_m >= small.block_n * small.block_m
            assert small.block_n <= 32 and small.block_m <= 16
            wide = launch.launch_config(kind, 4096, 4096, 128, dtype, precision)
            assert wide.block_n * wide.block_m <= big.block_n * big.block_m
    bf16 = launch.launch_config(kind, 4096, 4096, 64, torch.bfloat16)
    for precision in ("tf32x3", "ieee"):
        fp32 = launch.launch_config(kind, 4096, 4096, 64, torch.float32, precision)
        assert fp32.block_n * fp32.block_m <= bf16.block_n * bf16.block_m
        # The launchers' meta-parameters follow the precision: its dots and its tiles.
        q = torch.empty(2, 4096, 128)
        meta = launch._meta(q, q, launch._tile(q, q, kind, precision, None), False, precision)
        tile = launch._TILES[kind, precision, True]
        assert (meta["PRECISION"], meta["BLOCK_N"], meta["BLOCK_M"]) == (
            precision,
            tile.block_n,
            tile.block_m,
        )


def _gpu_tile_shapes() -> list[tuple[int, int]]:
    from kernels import launch

    return sorted({(t.block_n, t.block_m) for t in launch._TILES.values()})


@pytest.mark.parametrize("atomic_rows", [False, True], ids=["row_pass", "atomic_rows"])
@pytest.mark.parametrize("block_n,block_m", _gpu_tile_shapes())
def test_every_gpu_tile_shape_is_exact(block_n, block_m, atomic_rows, monkeypatch):
    """The GPU tile shapes (the interpreter otherwise runs 16 x 16) in both structures of
    the backward passes (row-side gradients by a row pass or by atomics), with tails in
    both directions and causal masking, in float64. Warps and stages do not exist here."""
    from kernels import launch

    tile = launch.LaunchConfig(block_n, block_m, 1, 1, atomic_rows=atomic_rows)
    monkeypatch.setattr(launch, "launch_config", lambda *_: tile)
    check_three_orders(block_n + 5, block_m + 3, 8, 4, causal=True)
    check_three_orders(block_n // 2 + 1, 2 * block_m + 1, 8, 8, causal=False)
    # Tile multiples (one loop of each pair empty) and, causal, keys past every query.
    check_three_orders(2 * block_n, 2 * block_m, 8, 4, causal=False)
    check_three_orders(block_n // 2 + 1, 2 * block_m + 1, 8, 4, causal=True)


@pytest.mark.parametrize("atomic_rows", [False, True], ids=["row_pass", "atomic_rows"])
def test_every_launch_passes_exactly_the_kernels_parameters(atomic_rows, monkeypatch):
    """The interpreter ignores a keyword its kernel does not take, where a GPU launch
    refuses it: every launch (tiled in both structures, and one-query) passes each of the
    kernel's parameters once, and nothing else but launch options."""
    from kernels import launch

    class Checked:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                names = self.kernel.arg_names
                keywords = set(kwargs) - {"num_warps", "num_stages"}
                assert keywords <= set(names), f"{self.kernel.fn.__name__}: {keywords - set(names)}"
                assert sorted(names[: len(args)] + sorted(keywords)) == sorted(names)
                return self.kernel[grid](*args, **kwargs)

            return run

    for name in dir(launch):
        if name.endswith("_kernel"):
            monkeypatch.setattr(launch, name, Checked(getattr(launch, name)))
    tile = launch.LaunchConfig(16, 16, 1, 1, atomic_rows=atomic_rows)
    monkeypatch.setattr(launch, "launch_config", lambda *_: tile)
    for n in (1, 9):
        check_three_orders(n, 7, 8, 4, causal=False)


def test_the_reference_computes_half_inputs_in_float32_under_autocast_too():
    q, k, v = (torch.randn(2, n, 8, dtype=torch.bfloat16) for n in (1, 9, 9))
    plain = attention(q, k, v, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = attention(q, k, v, backend="reference")
    assert autocast.dtype == torch.bfloat16 and torch.equal(autocast, plain)


@pytest.mark.parametrize("scale", [8**-0.5, 0.125, 1 / 3, 7.3e-3, 2.0**-60 * 3**0.5])
def test_the_scale_reaches_kernels_as_an_exact_float32_pair(scale):
    """Triton passes Python floats to kernels as float32 (the interpreter does not, so
    the GPU test test_float64_uses_the_exact_scale checks the kernels' side): the
    launchers pass (hi, lo), hi a float32 and hi + lo the scale to 2^-48 even with lo
    rounded to float32."""
    from kernels.launch import _scale_parts

    hi, lo = _scale_parts(scale)
    f32 = lambda x: torch.tensor(x, dtype=torch.float32).item()  # noqa: E731
    assert f32(hi) == hi
    assert abs(hi + f32(lo) - scale) <= 2.0**-48 * scale
