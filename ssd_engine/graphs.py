"""CUDA graphs: one capture utility that every graph of the engine uses (model steps, the SSD round, the
tensor-parallel workers' forwards), and the Runner that keys a model's steps by shape.

A capture runs the function twice first (Triton compiles, cuBLAS picks its kernels), then records it. The warm-ups
must leave no trace: they draw random numbers (the generators are rewound) and may advance state that a later
step reads (the `state` tensors are saved before and restored after). KV writes need no restoring: a slot past a
row's committed length is always written before it is read, and a warm-up writes what the replay writes again."""
from __future__ import annotations

import gc
import threading

import torch

from ssd_engine.fast_model import on_device

# No capture may overlap another thread's capture or replay: while a capture is open the device's random generator
# is in capture mode, and a draw from another thread (the draft side's worker replaying a sampling step) would break
# it. Captures happen before or in the first rounds; a replay holds the lock for the microseconds of its launch.
LOCK = threading.RLock()


def capture(fn, pool, generators=(), state=(), warmups=2):
    """fn() recorded as a CUDA graph on the current device: (graph, fn's output of the capture, whose buffers each
    replay overwrites). `generators`: the random generators fn draws from, registered so each replay draws fresh
    numbers; `state`: tensors fn advances that must look untouched after the warm-ups."""
    with LOCK, _no_gc():
        saved = [t.clone() for t in state]
        rng = [g.get_state() for g in generators]
        stream = torch.cuda.Stream()        # on the current device (torch.cuda.graph's default one is made once)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmups):
                fn()
                for t, s in zip(state, saved):
                    t.copy_(s)
        torch.cuda.current_stream().wait_stream(stream)
        # register only the generators fn drew from (each registered one costs launches at every replay)
        used = [g for g, s in zip(generators, rng) if not torch.equal(g.get_state(), s)]
        for g, s in zip(generators, rng):
            g.set_state(s)
        graph = torch.cuda.CUDAGraph()
        for g in used:
            graph.register_generator_state(g)
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            out = fn()
        return graph, out


class _no_gc:
    """No garbage collection during a capture: a collected CUDA graph (an engine dropped in a reference cycle) would be
    destroyed in the middle of it, which invalidates the capture."""

    def __enter__(self):
        self.enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self.enabled:
            gc.enable()


class Graphed:
    """A step as a CUDA graph for fixed shapes: its inputs are copied into static buffers and the graph replayed.
    Captured at first use with the real inputs (run under on_device(the model's device))."""

    def __init__(self, fn, inputs: dict, pool, generators=(), state=()):
        self.static = {k: v.clone() for k, v in inputs.items()}
        self.graph, self.out = capture(lambda: fn(**self.static), pool, generators, state)

    def __call__(self, **inputs):
        with LOCK:
            for k, v in inputs.items():
                self.static[k].copy_(v)
            self.graph.replay()
        return self.out


class Runner:
    """Runs a model's steps, through CUDA graphs keyed by (name, shape) when enabled."""

    def __init__(self, model, use_graphs: bool):
        self.model, self.use_graphs, self.graphs = model, use_graphs, {}
        self.pool = torch.cuda.graph_pool_handle() if use_graphs else None
        self.generators = ()    # the random generators this device's steps draw from (set by the Engine)

    def step(self, cache, tokens, positions):
        fn = lambda tokens, positions: self.model.forward(tokens, positions, cache)  # noqa: E731
        return self.run(("step", id(cache), tuple(tokens.shape)), fn, tokens=tokens, positions=positions)

    def run(self, key, fn, state=(), **inputs):
        """fn(**inputs) as a CUDA graph keyed by `key` (which must name every constant fn closes over). The outputs
        are static buffers, overwritten by the next replay of the same graph. `state`: see capture."""
        with on_device(self.model.device):
            if not self.use_graphs:
                return fn(**inputs)
            if key not in self.graphs:
                self.graphs[key] = self._capture(fn, inputs, state)
            return self._replay(self.graphs[key], inputs)

    def _capture(self, fn, inputs, state):
        return Graphed(fn, inputs, self.pool, self.generators, state)

    def _replay(self, graph, inputs):
        return graph(**inputs)
