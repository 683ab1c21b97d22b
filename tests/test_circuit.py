"""Circuit evaluation (sweeps/engine/circuit_eval.py, sweeps/circuit.py) against hooks on full forwards."""

import json
import random

import numpy as np
import pytest
import torch

from sweeps.engine import attribution as A
from sweeps.engine import circuit_eval as CE
from sweeps.engine import models
from tasks import build_task, check_task
from tests import reference


def _task(tokenizer, n=4):
    return build_task(check_task("ioi"), tokenizer, n, 0)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-pythia", "tiny-gemma2", "tiny-olmo2", "tiny-qwen3"])
def test_empty_circuit_is_the_corrupt_run_and_full_circuit_the_clean_run(loaded_model, name):
    """At both levels, on sequential, parallel, grouped-query and post-norm (Gemma 2, OLMo 2) models."""
    m = loaded_model(name)
    task = _task(m.tokenizer)
    graph = A.build_graph(m.weights.cfg)
    runner = CE.CircuitRunner(m.weights, graph, task)
    assert abs(runner.clean_metric - runner.corrupt_metric) > 1e-3
    none, every = set(), set(graph.upstream)
    for mask in (torch.zeros(graph.n_edges, dtype=torch.bool), CE.node_edge_mask(graph, none)):
        assert runner.metric(mask) == pytest.approx(runner.corrupt_metric, abs=1e-4)
    for mask in (torch.ones(graph.n_edges, dtype=torch.bool), CE.node_edge_mask(graph, every)):
        assert runner.metric(mask) == pytest.approx(runner.clean_metric, abs=1e-4)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-pythia"])
def test_node_circuits_equal_hooks_that_patch_the_nodes_outside(loaded_model, name):
    m = loaded_model(name)
    task = _task(m.tokenizer)
    graph = A.build_graph(m.weights.cfg)
    runner = CE.CircuitRunner(m.weights, graph, task)
    rng = random.Random(0)
    for trial in range(3):
        nodes = {u for u in graph.upstream if rng.random() < 0.5}
        ours = runner.metric(CE.node_edge_mask(graph, nodes))
        expected = reference.node_circuit_metric_by_hooks(m.bridge, task, nodes, list(graph.upstream))
        assert ours == pytest.approx(expected, rel=1e-4, abs=1e-4), nodes


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-pythia"])
def test_edge_circuits_equal_a_per_input_reference(loaded_model, name):
    """Random edge circuits (sequential, grouped-query, parallel) against hooks that edit each
    split input by the out-of-circuit upstream nodes' (this run − corrupt run) outputs."""
    m = loaded_model(name)
    task = _task(m.tokenizer, n=3)
    graph = A.build_graph(m.weights.cfg)
    runner = CE.CircuitRunner(m.weights, graph, task)
    triples = [(u, d.name, d.input) for d, p in zip(graph.downstream, graph.prefix) for u in graph.upstream[:p]]
    gen = torch.Generator().manual_seed(0)
    for keep in (0.3, 0.7):
        mask = torch.rand(graph.n_edges, generator=gen) < keep
        ours = runner.metric(mask)
        expected = reference.circuit_metric_by_hooks(m.bridge, task, graph, {t for t, k in zip(triples, mask) if k})
        assert ours == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert abs(ours - runner.clean_metric) > 1e-4 and abs(ours - runner.corrupt_metric) > 1e-4


def test_areas_of_known_curves():
    assert CE.area_scores([0, 0.5, 1], [1, 1, 1]) == pytest.approx((1.0, 0.0))
    assert CE.area_scores([0, 1], [0, 1]) == pytest.approx((0.5, 0.5))
    cpr, cmd = CE.area_scores([1, 0, 0.5], [2, 0, 1])  # unsorted input; overshoot counts in CMD
    assert cpr == pytest.approx(1.0) and cmd == pytest.approx(0.5)
    assert np.isnan(CE.faithfulness(1.0, 2.0, 2.0))


def test_top_mask_picks_the_largest_magnitudes():
    mask = CE.top_mask(torch.tensor([0.1, -3.0, 2.0, float("nan"), 0.5]), 2)
    assert mask.tolist() == [False, True, True, False, False]
