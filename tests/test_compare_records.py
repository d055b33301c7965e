"""`prunekit compare` on hand-written prunekit.json records (no prune run): budgets, blanks, notes, alignment."""
import json

from prunekit.cli import main
from prunekit.compare import summarize, table


def _rec(folder, **meta):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prunekit.json").write_text(json.dumps(meta))
    return folder


def _weights(folder, evaluation=None, **extra):
    meta = dict(method="magnitude", layers=[], sequential=False, ratio=0.5, pattern=None, total_sparsity=0.5,
                wall_seconds=3.0, evaluation=evaluation or {}, **extra)
    return _rec(folder, **meta)


def _ev(ppl_dense, ppl_pruned, sha="a" * 64, windows=2, seqlen=64):
    text = {"sha256": sha} if sha is not None else {}
    return {"dense": {"ppl": ppl_dense, "windows": windows, "seqlen": seqlen, "text": text},
            "pruned": {"ppl": ppl_pruned, "windows": windows, "seqlen": seqlen, "text": text}}


def test_method_seconds_add_a_depth_runs_recovery_and_stay_blank_when_unrecorded(tmp_path):
    """compare's only time was the whole command's (loading, dense and pruned evaluation, speed rounds, saving)."""
    depth = dict(method="every-other", dense_layers=4, kept_layers=[0, 2], wall_seconds=30.0)
    recovered = summarize(_rec(tmp_path / "a", seconds=2.0, recovery={"steps": 5, "seconds": 7.5}, **depth))
    assert (recovered["method_seconds"], recovered["seconds"]) == (9.5, 30.0)
    assert summarize(_rec(tmp_path / "b", seconds=2.0, recovery=None, **depth))["method_seconds"] == 2.0
    assert summarize(_rec(tmp_path / "c", **depth))["method_seconds"] is None  # recorded before it was
    assert summarize(_rec(tmp_path / "d", seconds=2.0, recovery={"steps": 5}, **depth))["method_seconds"] is None
    row = summarize(_weights(tmp_path / "w", seconds=1.25))
    assert (row["method_seconds"], row["seconds"]) == (1.25, 3.0)
    md, _ = table([row], [])
    assert md.splitlines()[0].endswith("| speedup (prefill / decode) | method s | wall s |")
    assert md.splitlines()[2].endswith("|  | 1.2 | 3.0 |")


def test_bool_is_no_number(tmp_path):
    row = summarize(_weights(tmp_path / "r", evaluation={"e": {"dense": {"ppl": True, "windows": True, "seqlen": 64},
                                                            "pruned": {"ppl": 2.0}}}, ))
    assert row["evaluation"]["e"]["dense"] is None and row["evaluation"]["e"]["windows"] is None


def test_zero_blocks_removed_is_plural(tmp_path):
    row = summarize(_rec(tmp_path / "d", method="every-other", dense_layers=4, kept_layers=[0, 1, 2, 3]))
    assert row["removed"] == "0 blocks"


def test_recovery_is_in_the_budget(tmp_path):
    row = summarize(_rec(tmp_path / "d", method="every-other", dense_layers=4, kept_layers=[0, 2],
                         recovery={"distilled": True, "trainable": "lora", "steps": 50}))
    assert row["budget"] == "2 of 4 blocks, recovered (KD, lora, 50 steps)"
    row = summarize(_rec(tmp_path / "e", method="every-other", dense_layers=4, kept_layers=[0, 2],
                         recovery={"distilled": False, "trainable": "full", "steps": 5}))
    assert row["budget"] == "2 of 4 blocks, recovered (full, 5 steps)"


def test_structured_params_before_then_after(tmp_path):
    row = summarize(_rec(tmp_path / "s", method="uniform-structured", structure="mlp", ratio=0.25,
                         params_before=1000, params_after=750))
    assert row["removed"] == "params 1,000 -> 750"
    row = summarize(_rec(tmp_path / "t", method="uniform-structured", structure="mlp", ratio=0.25,
                         params_after=750))  # no params_before: blank, no traceback
    assert row["removed"] is None


def test_dit_record_without_evaluation(tmp_path):
    row = summarize(_rec(tmp_path / "dit", kind="dit", method="tinyfusion", dense_layers=12, kept_layers=[0, 1],
                         evaluation=None))
    assert row["evaluation"] == {}


def test_malformed_pair_is_no_traceback(tmp_path):
    row = summarize(_weights(tmp_path / "r", evaluation={"e": {"dense": {"ppl": 2.0}, "pruned": 3.0}}))
    assert row["evaluation"] == {}


def test_windows_and_sha_come_from_the_dense_record(tmp_path):
    ev = _ev(2.0, 3.0)
    ev["pruned"] = {"ppl": 3.0}  # what a record written without the pruned side's text/windows holds
    row = summarize(_weights(tmp_path / "r", evaluation={"e": ev}))
    assert row["evaluation"]["e"]["sha256"] == "a" * 64 and row["evaluation"]["e"]["windows"] == 2


def test_non_string_sha_is_no_file(tmp_path, capsys):
    a = _weights(tmp_path / "a", evaluation={"e": _ev(2.0, 3.0, sha=123), "f": _ev(2.0, 3.0, sha=123)})
    assert summarize(a)["evaluation"]["e"]["sha256"] is None
    assert main(["compare", str(a)]) == 0  # was: TypeError 'int' object is not subscriptable
    assert "same file" not in capsys.readouterr().err


def test_speed_that_is_not_an_object(tmp_path):
    row = summarize(_weights(tmp_path / "r", speed=[1, 2]))
    assert row["prefill_speedup"] is None and row["forward_speedup"] is None


def test_non_finite_perplexity_is_blank_and_said(tmp_path):
    rows = [summarize(_weights(tmp_path / "r", evaluation={"e": _ev(2.0, float("inf"))}))]
    md, notes = table(rows, ["e"])
    assert "| 2.000 |  |" in md and "inf" not in md
    assert any("records no score for e" in n for n in notes)


def test_numeric_columns_right_aligned_from_the_first_perplexity(tmp_path):
    md, _ = table([summarize(_weights(tmp_path / "r", evaluation={"e": _ev(2.0, 3.0)}))], ["e"])
    assert md.splitlines()[1] == "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"


def test_blank_removed_cell(tmp_path):
    row = summarize(_rec(tmp_path / "s", method="x", structure="mlp", ratio=0.25))
    md, _ = table([row], [])
    assert "| None |" not in md and " | ratio 0.25 (mlp) |  | " in md


def test_one_speedup_shows_the_other_as_dash(tmp_path):
    row = summarize(_weights(tmp_path / "r", speed={"speedup": {"decode": 1.25}}))
    md, _ = table([row], [])
    assert "| - / 1.25x |" in md


def test_pipe_in_a_run_name_is_escaped(tmp_path):
    row = summarize(_weights(tmp_path / "a|b"))
    md, _ = table([row], [])
    assert "a\\|b" in md and md.splitlines()[2].count(" | ") == md.splitlines()[0].count(" | ")


def test_both_scores_missing_is_said(tmp_path):
    ev = _ev(None, None)
    _, notes = table([summarize(_weights(tmp_path / "r", evaluation={"e": ev}))], ["e"])
    assert any("records no score for e" in n for n in notes)


def test_no_spurious_notes_for_one_file_one_shape(tmp_path):
    a = summarize(_weights(tmp_path / "a", evaluation={"e": _ev(2.0, 3.0)}))
    b = summarize(_weights(tmp_path / "b", evaluation={"e": _ev(2.0, 4.0)}))
    c = summarize(_weights(tmp_path / "c", evaluation={"e": _ev(2.0, 5.0, sha=None)}))  # a record without sha256
    assert table([a, b, c], ["e"])[1] == []
    d = summarize(_weights(tmp_path / "d", evaluation={"x": _ev(2.0, 3.0, sha=None), "y": _ev(2.0, 3.0, sha=None)}))
    assert table([d], ["x", "y"])[1] == []


def test_text_list_tolerates_a_trailing_comma_and_refuses_an_empty_one(tmp_path, capsys):
    a = _weights(tmp_path / "a", evaluation={"e": _ev(2.0, 3.0)})
    assert main(["compare", str(a), "--text", "e,"]) == 0
    capsys.readouterr()
    assert main(["compare", str(a), "--text", ","]) == 2


def test_texts_in_the_order_first_seen(tmp_path, capsys):
    a = _weights(tmp_path / "a", evaluation={"zeta": _ev(2.0, 3.0, sha="b" * 64), "alpha": _ev(2.0, 3.0)})
    assert main(["compare", str(a), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["texts"] == ["zeta", "alpha"]


def test_zero_forward_speedup_shown(tmp_path):
    row = summarize(_rec(tmp_path / "dit", kind="dit", method="t", dense_layers=2, kept_layers=[0],
                         speed={"speedup": 0.0}))
    assert "0.00x (forward)" in table([row], [])[0]


def test_depth_rows_carry_the_parameter_counts_their_speed_measured(tmp_path):
    row = summarize(_rec(tmp_path / "d", method="shortgpt", dense_layers=4, kept_layers=[0, 2],
                         speed={"dense": {"params": 1000}, "pruned": {"params": 600}, "speedup": {"prefill": 1.9}}))
    assert (row["params_before"], row["params_after"]) == (1000, 600)
    row = summarize(_rec(tmp_path / "e", method="shortgpt", dense_layers=4, kept_layers=[0, 2]))
    assert row["params_after"] is None


def test_dsnot_rows_name_their_base(tmp_path, capsys):
    rows = [summarize(_rec(tmp_path / b, method="dsnot", layers=[], sequential="block", ratio=0.5, pattern=None,
                           total_sparsity=0.5, options={"base": b, "skip": []})) for b in ("wanda", "sparsegpt")]
    md, _ = table(rows, [])
    assert "| dsnot (base=wanda) |" in md and "| dsnot (base=sparsegpt) |" in md
    assert rows[1]["options"]["base"] == "sparsegpt"
