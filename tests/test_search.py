"""The search loop's last check: a run stopped between held-out checks keeps its latest progress (edge_ti/search.py)."""
import json

import numpy as np
import pytest
from safetensors import safe_open

from edge_ti import search

TARGET = np.array([3.0, -2.0, 1.5, 2.5])     # far from z = 0: the mean keeps improving for many generations


def _loss(zs, generation):
    return np.sum((zs - TARGET) ** 2, axis=1)


def _heldout(zs):
    return np.sum((zs - TARGET) ** 2, axis=1)


def _run(budget, path=None, state=None):
    state = state or search.SearchState("key", 4, 0.3, 6, 0)
    return search.run(state, _loss, _heldout, search.Limits(budget=budget, patience=0), eval_every=5,
                      checkpoint=path)


def test_a_run_stopped_between_checks_scores_its_mean_once_more_and_writes_it_when_better():
    state = _run(6 * 13)                                      # 13 generations: checks after 5 and 10 only
    z, loss = state.last_check
    assert loss == _heldout(z[None])[0] and state.heldout_evaluations == 2 * 2  # the last check is not counted in
    assert loss < state.best_heldout                          # three more generations of a steady descent
    written, written_loss = search.written_z(state)
    assert np.array_equal(written, z) and written_loss == loss
    state.last_check = (z, state.best_heldout + 1.0)          # a worse mean: the best checked candidate is written
    assert np.array_equal(search.written_z(state)[0], state.best_z)


def test_a_run_stopped_on_a_check_has_no_last_check():
    assert _run(6 * 10).last_check is None


def test_the_last_check_is_not_saved_and_a_resumed_run_ends_as_an_uninterrupted_one(tmp_path):
    path = str(tmp_path / "c.ckpt")
    first = _run(6 * 13, path)
    assert first.last_check is not None
    with safe_open(path, "np") as f:
        assert "last_check" not in json.loads(f.metadata()["edge_ti.checkpoint"])
    resumed = search.load_checkpoint(path, "key")
    assert resumed.last_check is None and np.array_equal(resumed.best_z, first.best_z)
    resumed = _run(6 * 21, path, resumed)
    direct = _run(6 * 21)
    assert resumed.asked_digest == direct.asked_digest and np.array_equal(resumed.best_z, direct.best_z)
    assert np.array_equal(resumed.last_check[0], direct.last_check[0]) and resumed.last_check[1] == direct.last_check[1]


def test_checkpoints_are_written_every_few_seconds_and_always_after_the_last_generation(tmp_path, monkeypatch):
    path = str(tmp_path / "c.ckpt")
    writes, save = [], search.save_checkpoint
    monkeypatch.setattr(search, "save_checkpoint", lambda p, state: (writes.append(state.generation), save(p, state)))
    state = search.run(search.SearchState("key", 4, 0.3, 6, 0), _loss, _heldout,
                       search.Limits(budget=6 * 12, patience=0), eval_every=5, checkpoint=path, checkpoint_every=3600.0)
    assert writes == [12] and search.load_checkpoint(path, "key").generation == 12   # the last one, once

    def stop_at_7(record, state):  # Ctrl-C after generation 7: that generation is saved, not lost
        if record["generation"] == 7:
            raise KeyboardInterrupt
    writes.clear()
    with pytest.raises(KeyboardInterrupt):
        search.run(search.SearchState("key", 4, 0.3, 6, 0), _loss, _heldout, search.Limits(budget=6 * 12),
                   eval_every=5, checkpoint=path, checkpoint_every=3600.0, on_generation=stop_at_7)
    saved = search.load_checkpoint(path, "key")
    assert writes == [7] and saved.generation == 7
    resumed = _run(6 * 12, path, saved)  # and it resumes to where the uninterrupted run ended
    assert resumed.asked_digest == state.asked_digest and np.array_equal(resumed.best_z, state.best_z)
