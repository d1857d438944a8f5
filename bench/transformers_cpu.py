"""Greedy generation on the CPU with a SmolLM2-135M-shaped Llama (random weights: 30 layers,
9 query / 3 KV heads, D=64, hidden 576), attn_implementation "fdec" against "sdpa": tokens/s
after a 64-token prompt, batch 1 and 4, fp32, interleaved, best of two. Same tokens checked.
PYTHONPATH=src python3 bench/transformers_cpu.py [threads]"""

from __future__ import annotations

import sys
import time

import torch
import transformers

import flashdec.integrations.transformers as fd

NEW_TOKENS = 48


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=30, num_attention_heads=9,
                                      num_key_value_heads=3, max_position_embeddings=2048,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    for batch in (1, 4):
        ids = torch.randint(3, 49152, (batch, 64), generator=torch.Generator().manual_seed(1))
        results, rates = {}, {"sdpa": 0.0, fd.NAME: 0.0}
        for _ in range(2):
            for name in rates:
                model.set_attn_implementation(name)
                with torch.no_grad():
                    t0 = time.perf_counter()
                    out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                         do_sample=False, pad_token_id=0)
                    rate = batch * NEW_TOKENS / (time.perf_counter() - t0)
                rates[name] = max(rates[name], rate)
                results[name] = out
        same = torch.equal(results["sdpa"], results[fd.NAME])
        print(f"batch {batch}, {threads} thread(s): sdpa {rates['sdpa']:.1f} tokens/s, "
              f"{fd.NAME} {rates[fd.NAME]:.1f} tokens/s ({rates[fd.NAME] / rates['sdpa']:.2f}x); "
              f"same tokens: {same}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
