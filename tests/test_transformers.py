"""flashdec as a transformers attention implementation: greedy generation with
``attn_implementation="fdec"`` is token-identical to transformers' own implementation, in
fp32 on the CPU, for small random models (Llama; Gemma 2 with softcap and a sliding window),
batched prompts with left padding, dynamic and static caches; and every decode step went
through flashdec."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from flashdec import _api  # noqa: E402
from flashdec.integrations import transformers as fd_transformers  # noqa: E402

NEW_TOKENS = 12


def _llama():
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128)
    return config, transformers.LlamaForCausalLM


def _gemma2():
    config = transformers.Gemma2Config(vocab_size=96, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=128, sliding_window=6,
                                       attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
                                       query_pre_attn_scalar=16)
    return config, transformers.Gemma2ForCausalLM


def _prompts(batch: int, length: int, seed: int):
    """Random token ids [B, length]; row b left-padded by b tokens (pad id 0)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        ids[b, :b] = 0
        mask[b, :b] = 0
    return ids, mask


def _generate(model, implementation: str, ids, mask, **kwargs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                              do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("make, reference", [(_llama, "sdpa"), (_gemma2, "eager")],
                         ids=["llama", "gemma2-softcap-window"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generation_matches_transformers(make, reference, cache):
    config, cls = make()
    torch.manual_seed(0)
    model = cls(config).eval()
    ids, mask = _prompts(3, 9, seed=1)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    expected = _generate(model, reference, ids, mask, **extra)
    with mock.patch.object(fd_transformers._api, "decode", wraps=_api.decode) as calls:
        got = _generate(model, fd_transformers.NAME, ids, mask, **extra)
    assert torch.equal(got, expected)
    # every step after the prompt, in every layer, went through flashdec
    assert calls.call_count == (NEW_TOKENS - 1) * config.num_hidden_layers


def test_names_with_flash_are_refused():
    with pytest.raises(ValueError, match="FlashAttention"):
        fd_transformers.register("flashdec")


def test_a_mask_with_holes_is_left_to_sdpa_on_the_cpu():
    """Attended keys that are not one run per row (packed sequences): sdpa computes it."""
    config, cls = _llama()
    module = cls(config).model.layers[0].self_attn
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 1, 16, generator=gen)
    k, v = torch.randn(2, 2, 10, 16, generator=gen), torch.randn(2, 2, 10, 16, generator=gen)
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[1, 0, 0, 3:5] = False
    with mock.patch.object(fd_transformers._api, "decode") as calls:
        got, _ = fd_transformers.attention_forward(module, q, k, v, mask, scaling=0.25)
    assert calls.call_count == 0
    want, _ = transformers.integrations.sdpa_attention.sdpa_attention_forward(
        module, q, k, v, mask, scaling=0.25)
    assert torch.allclose(got, want)
