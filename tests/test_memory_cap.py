"""Memory's chunk cap (max_chunks) and forget_choice(count=)."""
import numpy as np
import pytest

from prunekit.errors import InputError
from prunekit.inference.memory import Memory, forget_choice
from prunekit.inference.memory_embed import HashEmbedder

WORDS = ["apple", "river", "cloud", "stone", "maple", "tiger", "piano", "lemon", "comet", "violet"]


def mem(tmp_path, name="m.db", **kw):
    return Memory(tmp_path / name, embedder=HashEmbedder(dim=2048), synchronous="normal", **kw)


def test_forget_choice_refuses_a_negative_count_and_both_arguments():
    with pytest.raises(InputError, match="count must be an integer >= 0"):
        forget_choice(np.arange(3), np.arange(3), np.ones(3), count=-1)
    with pytest.raises(InputError, match="one of fraction= or count="):
        forget_choice(np.arange(3), np.arange(3), np.ones(3), 0.5, count=1)


def test_forget_choice_returns_positions_in_order():
    # lowest salience is the last chunk: positions come back sorted, not by salience
    assert forget_choice(np.arange(3), np.arange(3), np.array([0.5, 0.4, 0.1]), count=2).tolist() == [1, 2]


def test_a_turn_with_a_periodic_pass_and_the_cap_reports_both(tmp_path):
    m = mem(tmp_path, forget_every=2, forget_fraction=0.25, max_chunks=2, chunk_words=1, gamma=0.5, sos_every=0)
    m.add("apple. river.")  # turn 0: 2 chunks, at the cap
    added = m.add("cloud. stone.")  # turn 1: 4 chunks; the periodic pass drops 1, the cap 1 more
    assert m.store.count_chunks() == 2
    gone = [r for r in m.store.forgotten() if r.at_turn == 1]
    assert len(gone) == 2 and sorted(r.chunk_id for r in added.forgotten) == sorted(r.chunk_id for r in gone)
    m.close()


def test_cap_records_the_turn_that_removed_the_chunk(tmp_path):
    m = mem(tmp_path, forget_every=0, max_chunks=1, sos_every=0)
    m.add(WORDS[0])
    m.add(WORDS[1])
    assert [(r.turn, r.at_turn) for r in m.store.forgotten()] == [(0, 1)]
    m.close()


def test_memory_add_says_which_recorded_forgetting_options_a_run_changes(tmp_path, capsys):
    """Lowering a store's --max-chunks forgot down to the new cap in one add, and only 'forgot 7 chunks' said so."""
    from prunekit.cli import main

    store = str(tmp_path / "m.db")
    add = ["memory", "add", "--store", store, "--embedder", "hash"]
    assert main(add + ["--max-chunks", "10", f"{WORDS[0]} and {WORDS[1]}"]) == 0
    assert "forgetting options changed" not in capsys.readouterr().err  # a new store: nothing to change
    assert main(add + ["--max-chunks", "10", WORDS[2]]) == 0
    assert "forgetting options changed" not in capsys.readouterr().err  # given again, unchanged
    assert main(add + ["--max-chunks", "1", "--forget-every", "50", WORDS[3]]) == 0
    captured = capsys.readouterr()
    assert "forgot 2 chunks" in captured.out
    assert (f"prunekit: note: {store}'s forgetting options changed: --forget-every 100 -> 50, --max-chunks 10 -> 1; "
            "recorded for later adds") in captured.err
    assert main(add + [WORDS[4]]) == 0  # not given: the recorded ones, nothing changed
    assert "changed" not in capsys.readouterr().err
