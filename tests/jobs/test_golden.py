"""Every job's numbers are what they were: a small run of each sweep's job on six models
(``tests/golden.py``) against the record made before the last refactor meant to change none.

On the CPU instruction set the record was made on, every column must be bit for bit equal;
on another one float sums may round differently, so each numeric column's sum and largest
magnitude must agree to a relative 1e-5 (text and integer columns still exactly)."""

from __future__ import annotations

import json

import pytest
import torch

from tests import golden

RECORDED = json.loads(golden.RECORD.read_text())


def assert_matches_record(name: str, got: dict) -> None:
    want = RECORDED["runs"][name]
    assert sorted(got) == sorted(want)
    exact = torch.backends.cpu.get_cpu_capability() == RECORDED["cpu_capability"]
    for table, columns in want.items():
        assert sorted(got[table]) == sorted(columns), table
        for column, w in columns.items():
            g = got[table][column]
            where = f"{name}: {table}.{column}"
            assert g["n"] == w["n"], where
            if exact or "sum" not in w:
                assert g["sha"] == w["sha"], where
            else:
                scale = max(w["absmax"], 1e-9)
                assert abs(g["sum"] - w["sum"]) <= 1e-5 * scale * max(1, w["n"]), where
                assert abs(g["absmax"] - w["absmax"]) <= 1e-5 * scale, where


@pytest.mark.parametrize("name", golden.MODELS)
def test_every_job_gives_the_recorded_numbers(name):
    assert_matches_record(name, golden.small_run(name))


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-pythia", "tiny-gemma2"])
def test_a_replica_in_stages_gives_the_recorded_numbers(name, stages):
    """The model's layers over 2 and 3 stages (all on the CPU here: ``core/stages.py``): every
    job's numbers are those of one stage, bit for bit, on the record's fast-path families (its
    SmolLM2 run was checked too, but is left out for time)."""
    assert_matches_record(name, golden.small_run(name, stages=stages))
