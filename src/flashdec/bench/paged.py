"""The paged-KV section (:func:`paged_section`): flashdec over a paged cache (pages in random
order) against the same bytes as a contiguous cache (both given the lengths as seqlens), against torch SDPA on the gathered cache
with the gather counted (what a user without a paged decode does), and a FlashInfer-style
ragged batch against a uniform batch of the same bytes; graph mode, interleaved twice."""

from __future__ import annotations

from typing import Any

from .peers import na_reason
from .timing import ITERS, interleaved_us

# (B, H_q, H_kv, K, D, page sizes): K is every sequence's length (the capacity); bf16
PAGED_ROWS = ((8, 32, 8, 8192, 128, (16, 32, 64, 128, 256)),
              (1, 32, 8, 32768, 128, (16, 64)),
              (32, 32, 8, 2048, 128, (16, 64)))
RAGGED_ROW = (16, 32, 8, 32768, 128, 16)  # lengths 1..K, shuffled; its twin: uniform mean
PAGED_TARGET = 1.05   # paged / contiguous time
RAGGED_TARGET = 1.10  # ragged / uniform time at the same bytes


def _pool(torch: Any, x: Any, table: Any, page_size: int) -> Any:
    """The pool [B * max_pages, H_kv, page_size, D] holding x [B, H_kv, K, D] at the pages
    ``table`` [B, max_pages] names (the last page zero-padded)."""
    batch, heads, kv_len, dim = x.shape
    max_pages = table.shape[1]
    padded = torch.nn.functional.pad(x, (0, 0, 0, max_pages * page_size - kv_len))
    pages = padded.view(batch, heads, max_pages, page_size, dim).permute(0, 2, 1, 3, 4)
    pool = torch.empty(batch * max_pages, heads, page_size, dim, dtype=x.dtype, device=x.device)
    pool[table.reshape(-1).long()] = pages.reshape(-1, heads, page_size, dim)
    return pool


def row_case(torch: Any, dims: tuple, seed: int) -> tuple:
    """(q, k, v, out, seqlens, gen) of a full bf16 row (B, H_q, H_kv, K, D): a per-sequence
    cache, every sequence at K; ``gen`` the CUDA generator the tensors came from."""
    b, hq, hkv, klen, d = dims
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(b, hkv, klen, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    seqlens = torch.full((b,), klen, dtype=torch.int32, device="cuda")
    return q, k, v, torch.empty_like(q), seqlens, gen


def paged_copy(torch: Any, k: Any, v: Any, page_size: int, gen: Any) -> tuple:
    """(table, k_pool, v_pool): k and v [B, H_kv, K, D] in pools of ``page_size`` rows, the
    pages in random order."""
    batch, kv_len = k.shape[0], k.shape[2]
    max_pages = -(-kv_len // page_size)
    table = torch.randperm(batch * max_pages, device="cuda", generator=gen)
    table = table.view(batch, max_pages).to(torch.int32)
    return table, _pool(torch, k, table, page_size), _pool(torch, v, table, page_size)


def _paged_row(torch: Any, flashdec: Any, dims: tuple, page_size: int, iters: int) -> dict:
    import torch.nn.functional as F

    b, hq, hkv, klen, d = dims
    q, k, v, out_c, seqlens, gen = row_case(torch, dims, klen + page_size)
    out_p = torch.empty_like(q)
    table, k_pool, v_pool = paged_copy(torch, k, v, page_size, gen)
    # the contiguous twin gets the same lengths: with seqlens the split rule cuts finer
    # splits (live lengths may vary), so the twin without them is another layout
    contiguous = flashdec.plan(q, k, v, out_c, seqlens=seqlens, backend="cuda")
    paged = flashdec.plan(q, k_pool, v_pool, out_p, block_table=table, seqlens=seqlens,
                          backend="cuda")
    fns = {"contiguous": lambda: contiguous.run(q, k, v, out_c, seqlens=seqlens),
           "paged": lambda: paged.run(q, k_pool, v_pool, out_p, block_table=table,
                                      seqlens=seqlens)}

    def sdpa_gathered():
        ids = table.long()
        kk = k_pool[ids].permute(0, 2, 1, 3, 4).reshape(b, hkv, -1, d)[:, :, :klen]
        vv = v_pool[ids].permute(0, 2, 1, 3, 4).reshape(b, hkv, -1, d)[:, :, :klen]
        return F.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, enable_gqa=True)
    fns["sdpa (gather + attention)"] = sdpa_gathered
    fns["contiguous"]()
    fns["paged"]()
    err = (out_p.float() - out_c.float()).abs().max().item()
    row = {"dims": list(dims), "page_size": page_size, "kv_mb": 2 * k.numel() * 2 / 1e6,
           "max_abs_diff": err, "us": {}, "na": {}}
    try:
        row["us"] = interleaved_us(fns, iters)
    except Exception as exc:  # e.g. out of memory for the gather
        row["na"]["sdpa (gather + attention)"] = na_reason(exc)
        del fns["sdpa (gather + attention)"]
        row["us"] = interleaved_us(fns, iters)
    row["paged_over_contiguous"] = row["us"]["paged"] / row["us"]["contiguous"]
    return row


def ragged_case(torch: Any, row: tuple = RAGGED_ROW) -> tuple:
    """(q, k_pool, v_pool, table, out, lengths, mean) of the ragged paged row: lengths 1..K
    shuffled (int32, host), pages in random order, K and V pools of their own."""
    b, hq, hkv, klen, d, page_size = row
    gen = torch.Generator(device="cuda").manual_seed(5)
    lengths = torch.linspace(1, klen, b).round().to(torch.int32)
    lengths = lengths[torch.randperm(b, generator=torch.Generator().manual_seed(6))]
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    max_pages = klen // page_size
    k_pool = torch.randn(b * max_pages, hkv, page_size, d, device="cuda", dtype=torch.bfloat16,
                         generator=gen)
    v_pool = torch.randn_like(k_pool)
    table = torch.randperm(b * max_pages, device="cuda", generator=gen).view(b, max_pages)
    return (q, k_pool, v_pool, table.to(torch.int32), torch.empty_like(q), lengths,
            int(lengths.sum()) // b)


def _ragged_row(torch: Any, flashdec: Any, iters: int) -> dict:
    """Lengths 1..K shuffled against every sequence at their mean: the same bytes."""
    b, hq, hkv, klen, d, page_size = RAGGED_ROW
    q, k_pool, v_pool, table, out, lengths, mean = ragged_case(torch)
    calls = {}
    for name, values in (("ragged", lengths), ("uniform", torch.full((b,), mean))):
        seqlens = values.to(device="cuda", dtype=torch.int32)
        p = flashdec.plan(q, k_pool, v_pool, out, block_table=table, seqlens=seqlens,
                          backend="cuda")
        calls[name] = (lambda p=p, s=seqlens: p.run(q, k_pool, v_pool, out, block_table=table,
                                                    seqlens=s))
    us = interleaved_us(calls, iters)
    return {"dims": [b, hq, hkv, klen, d], "page_size": page_size, "mean_len": mean,
            "us": us, "ragged_over_uniform": us["ragged"] / us["uniform"]}


def paged_section(iters: int = ITERS) -> dict:
    """Every PAGED_ROWS row at each of its page sizes, and the ragged row (see the module)."""
    import torch

    import flashdec

    rows = [_paged_row(torch, flashdec, dims[:5], ps, iters)
            for dims in PAGED_ROWS for ps in dims[5]]
    return {"rows": rows, "ragged": _ragged_row(torch, flashdec, iters)}


def paged_text(section: dict | None) -> list[str]:
    """The section as table lines (none when not measured)."""
    if not section:
        return []
    lines = ["", "Paged KV (graph us, pages in random order, mean of two interleaved medians; "
             "the contiguous twin gets the same seqlens; "
             f"targets: paged / contiguous <= {PAGED_TARGET:.2f}, ragged / uniform <= "
             f"{RAGGED_TARGET:.2f})", "",
             "| B,H_q,H_kv,K,D | page | KV MB | contiguous | paged | paged / contiguous | "
             "SDPA on the gathered cache (gather included) | max abs diff paged - contiguous |",
             "|---|---|---|---|---|---|---|---|"]
    for row in section["rows"]:
        us = row["us"]
        sdpa = us.get("sdpa (gather + attention)")
        lines.append(f"| {','.join(map(str, row['dims']))} | {row['page_size']} | "
                     f"{row['kv_mb']:.0f} | {us['contiguous']:.1f} | {us['paged']:.1f} | "
                     f"{row['paged_over_contiguous']:.3f} | "
                     + (f"{sdpa:.1f}" if sdpa else "n/a") + f" | {row['max_abs_diff']:.1e} |")
    r = section["ragged"]
    lines += ["", f"Ragged paged batch {','.join(map(str, r['dims']))}, page {r['page_size']}, "
                  f"lengths 1..{r['dims'][3]} (mean {r['mean_len']}): {r['us']['ragged']:.1f} us "
                  f"against {r['us']['uniform']:.1f} us uniform at the mean: "
                  f"{r['ragged_over_uniform']:.3f}x"]
    return lines
