"""Tokens/s of flashdec's serving engine, flashdec attention against the SDPA baseline, at a
few numbers of concurrent streams; and the decode step's attention time alone.

GPU (default): a Llama-3.2-1B-shaped model (16 layers, 32 query / 8 KV heads, head_dim 64,
1.24B parameters) with random weights in bf16 (the lent GPU has no network); each decode step
a CUDA-graph replay. CPU (``--model default``): SmolLM2-135M-Instruct, fp32, eager.

Each stream: a random prompt of --prompt-len tokens, then --max-tokens greedy tokens (no
end-of-sequence: every stream runs to the end). All streams are submitted at once; the first
engine step prefills them (one at a time) and decodes once; the rest are decode steps.
Printed per row: decode tokens/s (the steps after the first), end-to-end tokens/s (prefill
included), and the attention of one step alone (one call per layer, CUDA-graph replays on the
GPU, at the batch's final lengths). flashdec and SDPA alternate, each measured twice (best
kept).

    python bench/serve_engine.py [--streams 1 8 32 64] [--prompt-len 512] [--max-tokens 128]
    python bench/serve_engine.py --model default --device cpu --streams 1 4 --max-tokens 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import flashdec
from flashdec.serve.engine import Engine, SamplingParams

LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                   num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
                   rms_norm_eps=1e-5, tie_word_embeddings=True,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192})


class CountingTokenizer:
    """Text is not what is measured here: each token reads as one character."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "x" * len(ids)


def load(name: str, device: str):
    import transformers
    if name == "llama-1b":
        config = transformers.LlamaConfig(**LLAMA_32_1B)
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(
                config, dtype=torch.bfloat16, attn_implementation="sdpa")
        model.generation_config.eos_token_id = None
        return model.eval().requires_grad_(False), CountingTokenizer()
    from flashdec.serve.models import load_model
    loaded = load_model(None if name == "default" else name, device=device)
    loaded.model.generation_config.eos_token_id = None
    return loaded.model, CountingTokenizer()


def run_streams(engine: Engine, prompts, max_tokens: int) -> tuple[float, float]:
    """(decode tokens/s, end-to-end tokens/s) of ``prompts`` run together to max_tokens."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    done = []
    for prompt in prompts:
        engine.submit(prompt, params, done.append)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    engine.step()  # prefills every stream and decodes once
    sync()
    first = time.perf_counter()
    while engine.step():
        pass
    sync()
    end = time.perf_counter()
    decoded = len(prompts) * (max_tokens - 2)
    return decoded / (end - first), len(prompts) * max_tokens / (end - start)


def attention_us(engine: Engine, batch: int, length: int) -> float:
    """One decode step's attention alone: a call per layer at ``batch`` x ``length`` keys."""
    m = engine.m
    device = engine.device
    q = torch.randn(batch, m.num_heads, m.head_dim, device=device, dtype=m.dtype)
    k, v = engine.k_cache[0][:batch], engine.v_cache[0][:batch]
    lengths = torch.full((batch,), length, dtype=torch.int32, device=device)
    if engine.attn == "flashdec":
        def call():
            return flashdec.decode(q, k, v, seqlens=lengths, scale=m.scale)
    else:
        mask = (torch.arange(engine.capacity, device=device)[None] < lengths[:, None])[:, None,
                                                                                        None]
        q4 = q[:, :, None]

        def call():
            return torch.nn.functional.scaled_dot_product_attention(
                q4, k, v, attn_mask=mask, scale=m.scale, enable_gqa=True)
    reps = 20
    if device.type != "cuda":
        call()
        start = time.perf_counter()
        for _ in range(reps):
            call()
        return (time.perf_counter() - start) / reps * 1e6 * len(m.layers)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    samples = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(samples) * len(m.layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-1b", help="llama-1b (random), default, or "
                        "a name/path for flashdec.serve.models.load_model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    model, tokenizer = load(args.model, args.device)
    params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model}: {params / 1e9:.2f}B parameters, {model.dtype}, "
          f"{args.device}; prompt {args.prompt_len} tokens, {args.max_tokens} new per stream")
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    seq_len = args.prompt_len + args.max_tokens + 1
    print("streams | attn | decode tok/s | end-to-end tok/s | attention per step (us)")
    for streams in args.streams:
        prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
                   for _ in range(streams)]
        engines = {attn: Engine(model, tokenizer, attn=attn, max_batch=streams,
                                max_seq_len=seq_len) for attn in ("flashdec", "sdpa")}
        for engine in engines.values():  # warm-up: kernels, the step's graph for this batch
            run_streams(engine, prompts, 4)
        best: dict[str, tuple[float, float]] = {}
        for _ in range(2):
            for attn, engine in engines.items():
                decode, e2e = run_streams(engine, prompts, args.max_tokens)
                old = best.get(attn, (0.0, 0.0))
                best[attn] = (max(old[0], decode), max(old[1], e2e))
        for attn, engine in engines.items():
            attn_us = attention_us(engine, streams, args.prompt_len + args.max_tokens)
            print(f"{streams} | {attn} | {best[attn][0]:.0f} | {best[attn][1]:.0f} | "
                  f"{attn_us:.1f}", flush=True)
        ratio = best["flashdec"][0] / best["sdpa"][0]
        print(f"{streams} | flashdec / sdpa decode tokens/s | {ratio:.2f}x", flush=True)
        del engines
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
