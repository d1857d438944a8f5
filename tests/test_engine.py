"""The continuous-batching engine (flashdec.serve.engine) on small random models, CPU, fp32:
greedy tokens equal to transformers' own generate for requests that join and leave a running
batch (both attention paths, slot moves included), stop strings, seeded sampling independent of
the batch, cancellation, and the request checks."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flashdec.serve.engine import (Engine, Finished, QueueFullError,  # noqa: E402
                                   SamplingParams, TextDelta)

VOCAB = 97


class WordTokenizer:
    """Token i reads as "w<i> ": the text shows the ids."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"w{i} " for i in ids)


def _model(model_type="llama", **extra):
    config_cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config,
                  "gemma2": transformers.Gemma2Config}[model_type]
    config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, max_position_embeddings=256, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager" if model_type == "gemma2" else "sdpa")
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.fixture(scope="module")
def llama():
    return _model()


def _prompts():
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (7, 1, 30, 12, 3)]


def _reference(model, prompt, max_tokens):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         min_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def _ids(text):
    return [int(w[1:]) for w in text.split()]


@pytest.mark.parametrize("attn", ["flashdec", "sdpa"])
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_greedy_matches_transformers_generate(model_type, attn, llama):
    model = llama if model_type == "llama" else _model(model_type)
    engine = Engine(model, WordTokenizer(), attn=attn, max_batch=3, max_seq_len=64)
    prompts = _prompts()
    lengths = [9, 4, 12, 6, 10]  # sequences leave at different steps; 5 requests, 3 slots
    results = engine.generate(prompts, [SamplingParams(max_tokens=n, temperature=0)
                                        for n in lengths])
    for prompt, n, (text, done) in zip(prompts, lengths, results):
        assert done == Finished("length", len(prompt), n)
        assert _ids(text) == _reference(model, prompt, n)
    assert engine.active_count() == 0


def test_sampling_seeded_and_independent_of_the_batch(llama):
    engine = Engine(llama, WordTokenizer(), max_batch=4, max_seq_len=64)
    prompts = _prompts()
    sampled = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    alone = engine.generate([prompts[0]], sampled)[0][0]
    crowd = engine.generate(prompts[:4], [sampled] + [SamplingParams(max_tokens=5,
                                                                     temperature=0.8)] * 3)
    assert crowd[0][0] == alone
    other = engine.generate([prompts[0]], SamplingParams(max_tokens=8, temperature=1.0,
                                                         top_p=0.9, seed=8))[0][0]
    assert other != alone  # 8 draws from a random model's wide distribution


def test_stop_strings_end_the_text_before_them(llama):
    engine = Engine(llama, WordTokenizer(), max_batch=2, max_seq_len=64)
    prompt = _prompts()[0]
    full = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0][0]
    words = full.split()
    stop = f"{words[3]} {words[4][:2]}"  # spans two tokens, ends inside the fifth
    text, done = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0,
                                                          stop=(stop, "never")))[0]
    assert text == full[:full.index(stop)] and len(text) < len(full)
    assert done.reason == "stop"


def test_events_stream_in_order_and_cancel_frees_the_slot(llama):
    engine = Engine(llama, WordTokenizer(), max_batch=1, max_seq_len=64)
    events = []
    first = engine.submit(_prompts()[0], SamplingParams(max_tokens=50, temperature=0),
                          events.append)
    queued = []
    engine.submit(_prompts()[1], SamplingParams(max_tokens=2, temperature=0), queued.append)
    engine.step()  # the first token from the prefill, the second from the decode step
    assert [type(e) for e in events] == [TextDelta, TextDelta] and not queued
    engine.cancel(first)
    while engine.step():
        pass
    assert events[-1] == Finished("cancelled", 7, 2)
    assert isinstance(queued[-1], Finished) and queued[-1].reason == "length"


def test_background_thread_serves_requests(llama):
    engine = Engine(llama, WordTokenizer(), max_batch=2, max_seq_len=64)
    engine.start()
    try:
        import threading
        done = threading.Event()
        events = []

        def emit(event):
            events.append(event)
            if isinstance(event, Finished):
                done.set()

        engine.submit(_prompts()[2], SamplingParams(max_tokens=5, temperature=0), emit)
        assert done.wait(30)
        assert _ids("".join(e.text for e in events[:-1])) == _reference(llama, _prompts()[2], 5)
    finally:
        engine.close()


def test_context_full_finishes_with_length(llama):
    engine = Engine(llama, WordTokenizer(), max_batch=1, max_seq_len=40)
    text, done = engine.generate([_prompts()[2]], SamplingParams(max_tokens=100,
                                                                 temperature=0))[0]
    assert done == Finished("length", 30, 10) and len(text.split()) == 10


def test_requests_it_cannot_take(llama):
    engine = Engine(llama, WordTokenizer(), max_batch=1, max_queue=2, max_seq_len=32)
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.submit([], SamplingParams(), print)
    with pytest.raises(ValueError, match="at most 31"):
        engine.submit(list(range(32)), SamplingParams(), print)
    engine.submit([1], SamplingParams(), print)
    engine.submit([2], SamplingParams(), print)
    with pytest.raises(QueueFullError, match="holds 2 requests"):
        engine.submit([3], SamplingParams(), print)
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="attn must be one of"):
        Engine(llama, WordTokenizer(), attn="eager")
    with pytest.raises(ValueError, match="this one is 'gemma2'"):
        Engine(_model("gemma2"), WordTokenizer())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attn", ["flashdec", "sdpa"])
def test_cuda_graph_steps_match_eager_and_transformers(attn):
    model = _model().to("cuda")
    prompts = _prompts()
    lengths = [9, 4, 12, 6, 10]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in lengths]
    graphed = Engine(model, WordTokenizer(), attn=attn, max_batch=3, max_seq_len=64)
    assert graphed.cuda_graphs
    eager = Engine(model, WordTokenizer(), attn=attn, max_batch=3, max_seq_len=64,
                   cuda_graphs=False)
    got = graphed.generate(prompts, params)
    assert sorted(graphed._graphs) == [1, 2, 3]  # the batch shrank as sequences left
    assert got == eager.generate(prompts, params)
    for prompt, n, (text, _) in zip(prompts, lengths, got):
        assert _ids(text) == _reference(model, prompt, n)


def test_incremental_text_equals_decoding_everything():
    """The engine decodes a window of tokens per step; with a real byte-level tokenizer the
    text must come out as decoding all tokens at once: multi-byte characters split over
    tokens, leading spaces, a long run past several settle points."""
    from flashdec.serve.engine import Request, _decoded
    from flashdec.serve.models import load_model
    tokenizer = load_model(None).tokenizer
    text = ("Déjà vu: 東京 in 2026 costs €12,345.67 — naïve café ☕ émojis 🎉🎉 and "
            "    indented code\n\tdef f(x):\n\t\treturn x ** 2  # ok\n") * 3
    ids = tokenizer.encode(text, add_special_tokens=False)
    request = Request([1], SamplingParams(), print, torch.device("cpu"))
    for i, token in enumerate(ids):
        request.tokens.append(token)
        got = _decoded(request, tokenizer)
        assert got == tokenizer.decode(ids[:i + 1], skip_special_tokens=True)
    assert got == text and request.settled_tokens > 0
