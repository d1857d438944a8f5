"""A continuous-batching decode engine for Llama-architecture transformers models.

Requests join and leave a running batch between decode steps. Each step decodes one token for
every running sequence with one attention call per layer for the whole batch: flashdec's
``decode`` over a slot cache with per-sequence ``seqlens`` (or torch's SDPA with a length mask
over the same cache, ``attn="sdpa"``, the baseline a user without flashdec runs).

The cache. Each layer holds K and V as ``[max_batch, H_kv, capacity, D]``; the running
sequences occupy slots ``0..B-1`` so the step's cache is the view ``cache[:B]``, read in place.
When a sequence leaves, the last one moves into its slot (its live keys copied, not the
capacity). Prefill runs one new request at a time (causal SDPA over its prompt, keys written
into its slot), then the request joins the next decode step.

The model runs through its own modules (embeddings, norms, projections, rotary embedding, MLP,
head) in this module's loop, not through ``model.forward``, so the cache is this engine's and
the attention call is one call per layer per step. Supported: ``model_type`` llama, mistral
(without sliding window), qwen2 and qwen3 (per-head q/k norms).

On CUDA each batch size's decode step is captured once in a CUDA graph and replayed
(``cuda_graphs=True``, the default there): a 1B model's step is otherwise bound by the host's
kernel launches, and attention would not show.

Threading: :meth:`Engine.start` runs the loop on a background thread; :meth:`Engine.submit`
and :meth:`Engine.cancel` may be called from any thread; events reach each request's ``emit``
callback on the engine thread. Without ``start``, :meth:`Engine.step` drives the loop from the
caller (tests and benchmarks).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import threading
from typing import Any, Callable, Sequence

import torch

import flashdec

__all__ = ["Engine", "Finished", "QueueFullError", "Request", "SamplingParams", "TextDelta"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION = ("flashdec", "sdpa")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How a request samples. ``temperature`` 0 is greedy; ``top_p`` keeps the smallest set of
    tokens whose probability reaches it; ``seed`` makes sampling reproducible (one generator
    per request, so other requests in the batch do not change its draws); generation ends at
    the model's end-of-sequence token, at a ``stop`` string (not included in the text) or after
    ``max_tokens`` tokens."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) \
            else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")


@dataclasses.dataclass(frozen=True)
class TextDelta:
    """New text of a request (decoded incrementally; never part of a stop string)."""

    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    """The last event of a request. ``reason``: "stop" (end-of-sequence token or stop string),
    "length" (``max_tokens`` or the context is full), "cancelled", "error" (``message``)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    message: str | None = None


Event = TextDelta | Finished


class QueueFullError(RuntimeError):
    """The engine holds ``max_queue`` requests already (running and waiting)."""


class Request:
    """One generation: its prompt, sampling parameters, the tokens made so far and where its
    text stands. Created by :meth:`Engine.submit`."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams,
                 emit: Callable[[Event], None], device: torch.device) -> None:
        self.id = next(Request._ids)
        self.prompt = prompt
        self.params = params
        self.emit = emit
        self.tokens: list[int] = []
        self.sent = 0            # characters of the decoded text already emitted
        self.settled = ""        # the text of tokens[:settled_tokens], final
        self.settled_tokens = 0
        self.cancelled = False
        self.finished: Finished | None = None
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8),
                                                                              "little") >> 1
            self.generator.manual_seed(seed)

    @property
    def position(self) -> int:
        """Where the last sampled token's key goes: the keys already in the cache."""
        return len(self.prompt) + len(self.tokens) - 1


class _Model:
    """The model's modules and shapes, checked once."""

    def __init__(self, model: Any) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"the engine runs {', '.join(SUPPORTED_MODEL_TYPES)} models; "
                             f"this one is {config.model_type!r}")
        uses_window = getattr(config, "use_sliding_window", True)
        if getattr(config, "sliding_window", None) is not None and uses_window:
            raise ValueError("sliding-window attention models are not supported by the engine "
                             f"(config.sliding_window = {config.sliding_window})")
        base = model.model
        self.embed, self.layers, self.norm = base.embed_tokens, base.layers, base.norm
        self.rotary, self.head = base.rotary_emb, model.lm_head
        attn = self.layers[0].self_attn
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scale = float(attn.scaling)
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        self.rope = apply_rotary_pos_emb

    def qkv(self, layer: Any, x: Any, cos: Any, sin: Any) -> tuple[Any, Any, Any]:
        """Q, K, V of ``x`` [B, T, hidden] as [B, heads, T, D], rotated."""
        attn = layer.self_attn
        b, t = x.shape[:2]
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, t, self.num_heads, self.head_dim)
        k = attn.k_proj(h).view(b, t, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(h).view(b, t, self.num_kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k, v.transpose(1, 2)

    def finish_layer(self, layer: Any, x: Any, y: Any) -> Any:
        """The residual stream after attention output ``y`` [B, T, H_q * D] and the MLP."""
        x = x + layer.self_attn.o_proj(y)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def logits(self, x: Any) -> Any:
        return self.head(self.norm(x)).float()


class Engine:
    """Continuous batching over ``model`` (a transformers causal LM, eval mode, on its device).

    Parameters
    ----------
    model, tokenizer
        A Llama-architecture model and its tokenizer.
    attn : "flashdec" or "sdpa"
        The decode step's attention: flashdec's ``decode`` with ``seqlens``, or torch's SDPA
        over the cache with a length mask (sliced to the longest running sequence in eager
        mode; the whole capacity inside a CUDA graph, whose shapes are fixed).
    max_batch : int
        Sequences decoded together; more requests wait.
    max_queue : int
        Requests held at once (running + waiting); :meth:`submit` raises QueueFullError past it.
    max_seq_len : int
        Prompt + generated tokens per sequence (the slot capacity, rounded up to 16).
    cuda_graphs : bool, optional
        Capture each batch size's decode step (default: on for CUDA models).
    """

    def __init__(self, model: Any, tokenizer: Any, *, attn: str = "flashdec",
                 max_batch: int = 8, max_queue: int = 64, max_seq_len: int = 2048,
                 cuda_graphs: bool | None = None) -> None:
        if attn not in ATTENTION:
            raise ValueError(f"attn must be one of {ATTENTION}, got {attn!r}")
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue),
                            ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.attn = attn
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.m = _Model(model)
        limit = getattr(model.config, "max_position_embeddings", None) or max_seq_len
        self.max_seq_len = min(max_seq_len, limit)
        self.capacity = -(-self.max_seq_len // 16) * 16
        device = self.m.device
        self.device = device
        shape = (max_batch, self.m.num_kv_heads, self.capacity, self.m.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.m.dtype, device=device)
                        for _ in self.m.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.m.dtype, device=device)
                        for _ in self.m.layers]
        self.eos = _eos_ids(model, tokenizer)
        # the step's inputs live in fixed buffers, so a captured step replays with new values
        self._tokens = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self._positions = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs: dict[int, tuple[Any, Any]] = {}
        self._pool = None
        self.running: list[Request] = []
        self.waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0

    # -- requests -------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               emit: Callable[[Event], None]) -> Request:
        """Queue a request; thread-safe. Raises ValueError for a prompt the engine cannot take
        and QueueFullError when it holds ``max_queue`` requests already."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty: at least one token is needed")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; this server takes at most "
                             f"{self.max_seq_len - 1} (max_seq_len {self.max_seq_len}, room "
                             f"for one new token)")
        request = Request(prompt, params, emit, self.device)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self.running) + len(self.waiting) >= self.max_queue:
                raise QueueFullError(f"the server holds {self.max_queue} requests already; "
                                     f"try again later")
            self.waiting.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop ``request`` at the next step (its slot is freed); thread-safe."""
        with self._lock:
            request.cancelled = True
            self._wake.notify()

    def active_count(self) -> int:
        """Requests running or waiting."""
        with self._lock:
            return len(self.running) + len(self.waiting)

    # -- the loop ---------------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop on a background thread until :meth:`close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="flashdec-engine",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the loop; requests still held finish as "cancelled"."""
        with self._lock:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for request in [*self.running, *self.waiting]:
            self._finish(request, "cancelled")
        self.running.clear()
        self.waiting.clear()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self.running and not self.waiting:
                    self._wake.wait()
                if self._closed:
                    return
            self.step()

    def step(self) -> int:
        """One iteration: drop cancelled requests, prefill waiting ones into free slots, decode
        one token for every running sequence. Returns the requests still held."""
        with self._lock:
            admitted = []
            for request in list(self.waiting):
                if request.cancelled:
                    self.waiting.remove(request)
                    self._finish(request, "cancelled")
            while self.waiting and len(self.running) + len(admitted) < self.max_batch:
                admitted.append(self.waiting.popleft())
        for request in [r for r in self.running if r.cancelled]:
            self._release(request, "cancelled")
        try:
            with torch.inference_mode():
                for request in admitted:
                    self.running.append(request)
                    logits = self._prefill(len(self.running) - 1, request.prompt)
                    self._accept(request, self._sample(logits[None], [request])[0])
                if self.running:
                    self._accept_all(self._sample(self._decode_step(), self.running))
        except Exception as exc:  # the loop must survive: fail the batch, keep serving
            message = f"{type(exc).__name__}: {exc}"
            failed, self.running = self.running, []
            for request in failed:
                self._finish(request, "error", message)
        self.steps += 1
        return self.active_count()

    # -- model ------------------------------------------------------------------------------

    def _prefill(self, slot: int, prompt: list[int]) -> Any:
        """Run the prompt, write its keys into ``slot``; the last position's logits [V]."""
        m = self.m
        ids = torch.tensor([prompt], dtype=torch.int64, device=self.device)
        x = m.embed(ids)
        positions = torch.arange(len(prompt), device=self.device)[None]
        cos, sin = m.rotary(x, positions)
        n = len(prompt)
        for i, layer in enumerate(m.layers):
            q, k, v = m.qkv(layer, x, cos, sin)
            self.k_cache[i][slot, :, :n] = k[0]
            self.v_cache[i][slot, :, :n] = v[0]
            y = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=m.scale, enable_gqa=True)
            x = m.finish_layer(layer, x, y.transpose(1, 2).reshape(1, n, -1))
        return m.logits(x[0, -1])

    def _decode_step(self) -> Any:
        """Write each running sequence's last token and decode it: logits [B, V]."""
        batch = len(self.running)
        host = torch.tensor([[r.tokens[-1], r.position] for r in self.running],
                            dtype=torch.int64)
        self._tokens[:batch].copy_(host[:, 0])
        self._positions[:batch].copy_(host[:, 1])
        if not self.cuda_graphs:
            return self._step_body(batch, max(r.position for r in self.running) + 1)
        if batch not in self._graphs:
            self._graphs[batch] = self._capture(batch)
        graph, logits = self._graphs[batch]
        graph.replay()
        return logits

    def _capture(self, batch: int) -> tuple[Any, Any]:
        """The decode step of ``batch`` sequences as a CUDA graph, and its logits buffer."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._step_body(batch, self.capacity)  # warm-up: plans, kernels, workspaces
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._step_body(batch, self.capacity)
        return graph, logits

    def _step_body(self, batch: int, longest: int) -> Any:
        """The decode step over the fixed buffers' first ``batch`` entries; ``longest``: keys
        of the longest sequence (the SDPA baseline reads that many)."""
        m = self.m
        positions = self._positions[:batch]  # where each new key goes
        lengths = positions + 1              # the keys each sequence attends to
        x = m.embed(self._tokens[:batch])[:, None]
        cos, sin = m.rotary(x, positions[:, None])
        mask = None
        if self.attn == "sdpa":
            keys = torch.arange(longest, device=self.device)
            mask = (keys[None] < lengths[:, None])[:, None, None]  # [B, 1, 1, longest]
        for i, layer in enumerate(m.layers):
            q, k, v = m.qkv(layer, x, cos, sin)
            k_cache, v_cache = self.k_cache[i][:batch], self.v_cache[i][:batch]
            flashdec.append_kv(k_cache, v_cache, k[:, :, 0], v[:, :, 0], positions=positions)
            if self.attn == "flashdec":
                y = flashdec.decode(q[:, :, 0], k_cache, v_cache, seqlens=lengths, scale=m.scale)
            else:
                y = torch.nn.functional.scaled_dot_product_attention(
                    q, k_cache[:, :, :longest], v_cache[:, :, :longest], attn_mask=mask,
                    scale=m.scale, enable_gqa=True)[:, :, 0]
            x = m.finish_layer(layer, x, y.reshape(batch, 1, -1))
        return m.logits(x[:, 0])

    # -- sampling and text ------------------------------------------------------------------

    def _sample(self, logits: Any, requests: Sequence[Request]) -> list[int]:
        """One token per request from ``logits`` [B, V]: argmax for greedy requests, else
        temperature and top-p with the request's own generator."""
        tokens = logits.argmax(dim=-1)
        for row, request in enumerate(requests):
            p = request.params
            if p.temperature == 0:
                continue
            probs = torch.softmax(logits[row] / p.temperature, dim=-1)
            if p.top_p < 1.0:
                ordered, order = probs.sort(descending=True)
                before = ordered.cumsum(0) - ordered  # mass of the tokens ranked above
                ordered[before >= p.top_p] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, ordered)
            tokens[row] = torch.multinomial(probs, 1, generator=request.generator)[0]
        return tokens.tolist()

    def _accept_all(self, tokens: list[int]) -> None:
        for request, token in zip(list(self.running), tokens):
            self._accept(request, token)

    def _accept(self, request: Request, token: int) -> None:
        """Record ``token``, emit the text it completes, finish the request when done."""
        if token in self.eos:
            self._release(request, "stop")
            return
        request.tokens.append(token)
        text = _decoded(request, self.tokenizer)
        stops = [i for i in (text.find(s) for s in request.params.stop) if i >= 0]
        if stops:
            self._emit_text(request, text[:min(stops)])
            self._release(request, "stop")
            return
        full = (len(request.tokens) >= request.params.max_tokens
                or len(request.prompt) + len(request.tokens) >= self.max_seq_len)
        if full:
            self._emit_text(request, text)
            self._release(request, "length")
            return
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its bytes
            return
        self._emit_text(request, text[:len(text) - _held_back(text, request.params.stop)])

    def _emit_text(self, request: Request, text: str) -> None:
        if len(text) > request.sent:
            self._send(request, TextDelta(text[request.sent:]))
            request.sent = len(text)

    # -- slots ------------------------------------------------------------------------------

    def _release(self, request: Request, reason: str) -> None:
        """Finish a running request and give its slot to the last running sequence."""
        slot = self.running.index(request)
        last = len(self.running) - 1
        if slot != last:
            moved = self.running[last]
            # its keys; one more in case this step's token is not yet accepted (its key is
            # written, its position not yet advanced)
            n = min(moved.position + 1, self.capacity)
            for cache in (*self.k_cache, *self.v_cache):
                cache[slot, :, :n] = cache[last, :, :n]
            self.running[slot] = moved
        self.running.pop()
        self._finish(request, reason)

    def _finish(self, request: Request, reason: str, message: str | None = None) -> None:
        if request.finished is None:
            request.finished = Finished(reason, len(request.prompt), len(request.tokens),
                                        message)
            self._send(request, request.finished)

    def _send(self, request: Request, event: Event) -> None:
        try:
            request.emit(event)
        except Exception:  # a consumer that fails (a closed connection) stops its request
            request.cancelled = True

    # -- convenience ------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[tuple[str, Finished]]:
        """Run ``prompts`` to completion on the calling thread (the engine must not be
        started): each one's text and final event, in order."""
        if self._thread is not None:
            raise RuntimeError("generate drives the loop itself; the engine is started")
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        texts: list[list[str]] = [[] for _ in prompts]
        done: list[Finished | None] = [None] * len(prompts)

        def collect(i: int) -> Callable[[Event], None]:
            def emit(event: Event) -> None:
                if isinstance(event, TextDelta):
                    texts[i].append(event.text)
                else:
                    done[i] = event
            return emit

        for i, (prompt, p) in enumerate(zip(prompts, params)):
            self.submit(prompt, p, collect(i))
        while self.step():
            pass
        return [("".join(t), d) for t, d in zip(texts, done)]


# Tokens decoded before the unsettled ones, so that a token's text comes out as it reads
# in context (a leading space, a character split over tokens).
_CONTEXT_TOKENS = 4
_SETTLE_EVERY = 8


def _decoded(request: Request, tokenizer: Any) -> str:
    """The text of ``request.tokens``, decoding only the tokens since the last settled point
    (and a few before it for context): a step costs the same at token 10 and token 2000."""
    tokens, base = request.tokens, request.settled_tokens
    start = max(0, base - _CONTEXT_TOKENS)
    head = tokenizer.decode(tokens[start:base], skip_special_tokens=True)
    window = tokenizer.decode(tokens[start:], skip_special_tokens=True)
    if not window.startswith(head):  # a tokenizer whose text is not a concatenation
        return tokenizer.decode(tokens, skip_special_tokens=True)
    text = request.settled + window[len(head):]
    if len(tokens) - base >= _SETTLE_EVERY and not text.endswith("\ufffd"):
        request.settled, request.settled_tokens = text, len(tokens)
    return text


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that could begin a stop string."""
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:n]):
                held = n
                break
    return held


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The token ids that end a sequence: the tokenizer's and the generation config's."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    return frozenset(ids)

