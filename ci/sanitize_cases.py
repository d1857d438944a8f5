"""Cases for compute-sanitizer memcheck: strided, ragged-length, small-D, misaligned and
multi-split problems on the cuda backend, each checked against the reference."""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, "tests")
from flashdec_testing import assert_close, make_qkv, poisoned_like, randn  # noqa: E402

import flashdec  # noqa: E402


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    cases = 0
    for dtype in ("bfloat16", "float16", "float32"):
        for (b, hq, hkv, klen, d) in [(1, 8, 2, 1, 1), (2, 7, 1, 37, 3), (3, 16, 2, 1000, 80),
                                      (1, 32, 8, 4099, 128), (2, 4, 4, 513, 256), (1, 8, 1, 0, 64)]:
            q, k, v = make_qkv(b, hq, hkv, klen, d, dtype, "cuda", seed=cases)
            for splits in (None, 1, 3):
                out = flashdec.decode(q, k, v, poisoned_like(q), backend="cuda", num_splits=splits)
                assert_close(out, q, k, v)
                cases += 1
        # capacity prefix, NHD permute, non-unit innermost stride, misaligned base pointer
        k_cache = randn((2, 4, 700, 64), dtype, "cuda", gen)
        v_cache = randn((2, 4, 700, 64), dtype, "cuda", gen)
        q = randn((2, 8, 64), dtype, "cuda", gen)
        for k, v in [(k_cache[:, :, :333], v_cache[:, :, :333]),
                     (k_cache.reshape(2, 700, 4, 64).permute(0, 2, 1, 3),
                      v_cache.reshape(2, 700, 4, 64).permute(0, 2, 1, 3)),
                     (k_cache[..., ::2], v_cache[..., ::2]),
                     (k_cache.flatten()[1:1 + 2 * 4 * 600 * 32].view(2, 4, 600, 32),
                      v_cache.flatten()[3:3 + 2 * 4 * 600 * 32].view(2, 4, 600, 32))]:
            qq = q[..., : k.shape[-1]]
            out = flashdec.decode(qq, k, v, poisoned_like(qq), backend="cuda")
            assert_close(out, qq, k, v)
            cases += 1
    torch.cuda.synchronize()
    print(f"{cases} sanitizer cases passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
