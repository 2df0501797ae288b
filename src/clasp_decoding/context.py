"""The model registry: one :class:`~.state.ModelState` (runner and learned per-model state) per model.

``runner_for(model)`` is how every face of the package (API, server, benchmark, Hugging Face adapter)
reaches a model's runner, so all of them share its numerics, its controller estimates and, on CUDA, its
graphs.
"""

from __future__ import annotations

import os
import weakref

from .runner import ModelRunner
from .state import ModelState

_states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_state(model) -> ModelState:
    """The (cached) state of ``model``: on CUDA with the graph runner (unless ``CLASP_CUDA_GRAPHS=0``), with
    ``CLASP_GRAPH_CAPACITY`` cache slots (default 4096); elsewhere with the eager runner."""
    state = _states.get(model)
    if state is None:
        on_cuda = next(model.parameters()).device.type == "cuda"
        if on_cuda and os.environ.get("CLASP_CUDA_GRAPHS", "1") != "0":
            return use_graphs(model, capacity=int(os.environ.get("CLASP_GRAPH_CAPACITY", "4096")))
        state = _states[model] = ModelState(ModelRunner(model))
    return state


def runner_for(model) -> ModelRunner:
    """The runner of ``model`` (see :func:`model_state`)."""
    return model_state(model).runner


def use_graphs(model, capacity: int = 4096, *, capture: bool | None = None, compile_layers: bool = False, **kwargs):
    """Run ``model`` through the static-shape graph runner from now on (``capture=False``: the same
    static code, eagerly; the CPU tests use it). Returns the model's state."""
    from .graph_runner import GraphRunner

    runner = GraphRunner(model, capacity, capture=capture, compile_layers=compile_layers, **kwargs)
    state = _states[model] = ModelState(runner)
    return state
