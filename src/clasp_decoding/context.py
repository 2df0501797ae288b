"""The model registry: one :class:`~.state.ModelState` (runner and learned per-model state) per model.

``runner_for(model)`` is how every face of the package (API, server, benchmark, Hugging Face adapter)
reaches a model's runner, so all of them share its numerics, its controller estimates and, on CUDA, its
graphs.
"""

from __future__ import annotations

import os
import warnings
import weakref

from . import numerics
from .runner import ModelRunner
from .state import ModelState

_states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Per model; the states never hold their model (the runner keeps a weak reference), so a model the user
drops is freed, with its runner, quantized copies and graphs."""


class NumericsNotice(UserWarning):
    """The project installed its numerics on a model (said once per model)."""


def _announce(model, runner: ModelRunner) -> None:
    report = runner.numerics
    kernels = {
        "kernel": f"the project's row-invariant CPU kernels ({numerics.linear_kernels(model)})",
        "padded": "torch's kernels with single rows padded",
        "invariant": "torch's kernels",
        "inexact": "torch's kernels (not row-exact here)",
    }[report.linear_mode]
    warnings.warn(
        f"clasp-decoding installed its numerics on this {type(model).__name__}: linear layers on {kernels}"
        f"{', attention row by row' if report.attention_rowwise else ''}"
        f"{' (prompts too)' if report.prompt_rowwise else ' in verifications' if report.attention_rowwise else ''}. "
        "model.generate on it now "
        "computes with them too (it is the exact reference for our plain decoding); its greedy text can differ "
        "from an untouched model's where two tokens tie within rounding. clasp_decoding.restore(model) takes "
        "them off.",
        NumericsNotice,
        stacklevel=4,
    )


def model_state(model) -> ModelState:
    """The (cached) state of ``model``: on CUDA with the graph runner (unless ``CLASP_CUDA_GRAPHS=0``), with
    ``CLASP_GRAPH_CAPACITY`` cache slots (default 4096); elsewhere with the eager runner."""
    state = _states.get(model)
    if state is None:
        devices = {p.device.type for p in model.parameters()}
        if devices == {"cuda"} and os.environ.get("CLASP_CUDA_GRAPHS", "1") != "0":
            return use_graphs(model, capacity=int(os.environ.get("CLASP_GRAPH_CAPACITY", "4096")))
        state = _states[model] = ModelState(ModelRunner(model))
        _announce(model, state.runner)
    return state


def runner_for(model) -> ModelRunner:
    """The runner of ``model`` (see :func:`model_state`)."""
    return model_state(model).runner


def use_graphs(model, capacity: int = 4096, *, capture: bool | None = None, compile_layers: bool = False, **kwargs):
    """Run ``model`` through the static-shape graph runner from now on, its graphs captured here, before
    any generation (``capture=False``: the same static code, eagerly). A model placed over several devices
    keeps the eager runner (with a warning): one set of graphs serves one device. Returns the model's
    state."""
    from .graph_runner import GraphRunner

    announce = model not in _states
    eager = ModelRunner(model) if announce else _states[model].runner
    if not eager.single_device:
        warnings.warn(
            "This model is placed over several devices; CUDA graphs serve one device, so it runs on the eager runner.",
            stacklevel=2,
        )
        state = _states.setdefault(model, ModelState(eager))
    else:
        runner = GraphRunner(model, capacity, capture=capture, compile_layers=compile_layers, **kwargs)
        state = _states[model] = ModelState(runner)
        runner.prepare()
    if announce:
        _announce(model, state.runner)
    return state


def restore(model) -> bool:
    """Give ``model`` back as it was loaded: the project's numerics (attention backend, linear kernels) off,
    its runner and learned state dropped. Returns whether anything was installed. The next generation with
    it installs them again."""
    _states.pop(model, None)
    return numerics.restore(model)
