"""flashdec.decode inside torch.compile(fullgraph=True): the ``flashdec::decode`` custom op
stands for it while torch traces (its fake implementation gives the shapes), and at run time
calls decode itself. Checked on CPU with the torch backend (CI has no GPU) against eager
decode, bitwise: the compiled call runs the same backend on the same inputs."""

from __future__ import annotations

import pytest
import torch

import flashdec
from flashdec import ContractError
from flashdec_testing import assert_close, make_qkv

COMPILE = {"fullgraph": True, "backend": "aot_eager"}


def _same(a, b):
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(x, y)


def test_opcheck_schema_and_fake():
    """torch's own checks of the op: schema, fake tensors, dispatch."""
    from flashdec import _torch_op  # noqa: F401  (registers the op)

    q, k, v = make_qkv(2, 8, 2, 40, 32, "float32", "cpu", seed=1)
    seqlens = torch.tensor([40, 7], dtype=torch.int32)
    for return_lse in (False, True):
        args = (q, k, v, seqlens, None, None, None, None, None, 30.0, 20, None, None,
                return_lse, None, "torch")
        torch.library.opcheck(torch.ops.flashdec.decode.default, args)


def test_compiled_decode_matches_eager_with_every_feature():
    q, k, v = make_qkv(3, 8, 2, 96, 64, "float32", "cpu", seed=2)
    seqlens = torch.tensor([96, 1, 50], dtype=torch.int32)
    leftpad = torch.tensor([0, 0, 10], dtype=torch.int32)
    scales = torch.rand(2) + 0.5

    def step(q, k, v):
        y, lse = flashdec.decode(q * 0.5, k, v, seqlens=seqlens, window_left=40, softcap=10.0,
                                 cache_leftpad=leftpad, k_scale=scales, v_scale=1.5,
                                 return_lse=True)
        return torch.nn.functional.silu(y), lse

    _same(torch.compile(step, **COMPILE)(q, k, v), step(q, k, v))


def test_compiled_decode_of_a_paged_fp8_cache():
    q, k, v = make_qkv(2, 16, 4, 64, 32, "bfloat16", "cpu", seed=3, kv_dtype="float8_e4m3fn")
    pages = k.view(2, 4, 4, 16, 32).permute(0, 2, 1, 3, 4).reshape(8, 4, 16, 32)
    v_pages = v.view(2, 4, 4, 16, 32).permute(0, 2, 1, 3, 4).reshape(8, 4, 16, 32)
    table = torch.arange(8, dtype=torch.int32).view(2, 4)
    seqlens = torch.tensor([64, 33], dtype=torch.int32)

    def step(q):
        return flashdec.decode(q, pages, v_pages, block_table=table, seqlens=seqlens,
                               k_scale=0.25, v_scale=2.0)

    got = torch.compile(step, **COMPILE)(q)
    _same(got, step(q))
    assert_close(got, q, k, v, seqlens=[64, 33], k_scale=0.25, v_scale=2.0)


def test_compiled_decode_fills_out_and_lse_out():
    q, k, v = make_qkv(2, 4, 4, 30, 16, "float32", "cpu", seed=4)
    out, lse = torch.full_like(q, float("nan")), torch.full((2, 4), float("nan"))

    def step(q, out, lse):
        return flashdec.decode(q, k, v, out, lse_out=lse, seqlens=[30, 3])  # host lengths

    y, l = torch.compile(step, **COMPILE)(q, out, lse)
    assert y is out and l is lse
    assert_close(out, q, k, v, lse=lse, seqlens=[30, 3])


def test_compiled_decode_with_dynamic_shapes():
    compiled = torch.compile(lambda q, k, v: flashdec.decode(q, k, v), dynamic=True, **COMPILE)
    for batch, kv_len in ((2, 50), (3, 70)):
        q, k, v = make_qkv(batch, 8, 2, kv_len, 32, "float32", "cpu", seed=kv_len)
        _same(compiled(q, k, v), flashdec.decode(q, k, v))


def test_compiled_decode_refuses_tensors_that_require_grad():
    q, k, v = make_qkv(1, 4, 4, 20, 16, "float32", "cpu", seed=5)
    q.requires_grad_()
    with pytest.raises(ContractError, match=r"\bq requires grad"):
        flashdec.decode(q, k, v)
    with pytest.raises(Exception, match=r"q requires grad"):
        torch.compile(lambda q: flashdec.decode(q, k, v), **COMPILE)(q)


def test_compiled_decode_refuses_an_unknown_option():
    q, k, v = make_qkv(1, 4, 4, 20, 16, "float32", "cpu", seed=6)
    with pytest.raises(Exception, match=r"unknown backend option num_split"):
        torch.compile(lambda q: flashdec.decode(q, k, v, num_split=2), **COMPILE)(q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_decode_on_the_cuda_backend_inside_a_cuda_graph():
    """The compiled call runs the cuda backend's kernels and can be captured: replays see the
    new contents of Q and seqlens."""
    q, k, v = make_qkv(2, 16, 4, 512, 128, "bfloat16", "cuda", seed=7)
    seqlens = torch.tensor([512, 100], dtype=torch.int32, device="cuda")
    compiled = torch.compile(lambda q: flashdec.decode(q, k, v, seqlens=seqlens, backend="cuda"),
                             **COMPILE)
    _same(compiled(q), flashdec.decode(q, k, v, seqlens=seqlens, backend="cuda"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        compiled(q)
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        y = compiled(q)
    q.copy_(torch.randn_like(q))
    seqlens.copy_(torch.tensor([3, 512], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, q, k, v, seqlens=[3, 512])
