"""`prunekit compare`: one table of several prune outputs, read from their prunekit.json records."""

import copy
import json

import numpy as np
import pytest

from prunekit.cli import main
from prunekit.compare import summarize

def _prune(model_dir, text_file, out, *method, seqlen="64", eval_text=None):
    assert main(["prune", str(model_dir), *method, "--calib", str(text_file), "--samples", "4", "--seqlen", "32",
                 "--eval", eval_text or str(text_file), "--eval-tokens", "128", "--eval-seqlen", seqlen, "--out",
                 str(out), "--quiet"]) == 0


def test_compare_tables_weights_structured_and_depth_runs(model_dir, text_file, tmp_path, capsys):
    runs = {"wanda": ("--method", "wanda", "--pattern", "2:4"), "mag": ("--method", "magnitude", "--ratio", "0.5"),
            "widths": ("--method", "uniform-structured", "--ratio", "0.25", "--no-speed"),
            "depth": ("--method", "every-other", "--layers", "1", "--no-speed")}
    for name, method in runs.items():
        _prune(model_dir, text_file, tmp_path / name, *method)
    capsys.readouterr()
    folders = [str(tmp_path / n) for n in runs]
    assert main(["compare", *folders, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["run"]: r for r in out["rows"]}
    assert out["texts"] == [str(text_file)] and list(rows) == folders
    for name in runs:  # every figure is the one the run's own record holds
        meta = json.loads((tmp_path / name / "prunekit.json").read_text())
        ev = rows[str(tmp_path / name)]["evaluation"][str(text_file)]
        assert ev["dense"] == meta["evaluation"][str(text_file)]["dense"]["ppl"]
        assert ev["pruned"] == meta["evaluation"][str(text_file)]["pruned"]["ppl"]
        assert rows[str(tmp_path / name)]["seconds"] == meta["wall_seconds"]
        # the method's own time (a depth run's selection): the wall time also holds loading, evaluation, saving
        assert rows[str(tmp_path / name)]["method_seconds"] == meta["seconds"] < meta["wall_seconds"]
    assert [rows[f]["kind"] for f in folders] == ["weights", "weights", "structured", "depth"]
    assert rows[folders[0]]["budget"] == "2:4" and rows[folders[0]]["removed"] == "sparsity 0.5000"
    assert (rows[folders[0]]["pattern"], rows[folders[0]]["ratio"], rows[folders[0]]["sparsity"]) == ("2:4", 0.5, 0.5)
    assert rows[folders[1]]["pattern"] is None and rows[folders[1]]["kept_layers"] is None
    assert rows[folders[3]]["kept_layers"] == [1] and rows[folders[3]]["dense_layers"] == 2
    assert rows[folders[2]]["params_after"] < rows[folders[2]]["params_before"] and rows[folders[2]]["ratio"] == 0.25
    assert rows[folders[1]]["budget"] == "0.5 unstructured"
    assert rows[folders[3]]["budget"] == "1 of 2 blocks" and rows[folders[3]]["removed"] == "1 block"
    assert rows[folders[2]]["removed"].startswith("params ")
    assert main(["compare", *folders]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| run | kind | method | budget | removed |") and len(md) == 2 + len(runs)
    assert md[2].startswith(f"| {folders[0]} | weights | wanda | 2:4 | sparsity 0.5000 |")


def test_compare_shows_the_layers_a_weight_run_left_dense(model_dir, text_file, tmp_path, capsys):
    """From a new user's walk-through: a --skip run's row said "sparsity 0.3000" with nothing to say that it is of
    the layers pruned (`prunekit eval` gave the folder 0.225, over every block Linear)."""
    _prune(model_dir, text_file, tmp_path / "skip", "--method", "magnitude", "--ratio", "0.5", "--skip", "*down_proj")
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "skip"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["budget"] == "0.5 unstructured, dense *down_proj"
    assert row["removed"] == "sparsity 0.5000 of the pruned layers" and row["sparsity"] == 0.5
    assert main(["eval", str(tmp_path / "skip"), "--text", str(text_file), "--seqlen", "32", "--tokens", "64",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sparsity"] < 0.45  # down_proj is dense


def test_compare_shows_the_compute_dtype(model_dir, text_file, tmp_path, capsys):
    """A run computed in bfloat16 (prune --compute-dtype) is marked in the table and its JSON row; a record without
    the field (every run before the flag) computed in float32."""
    _prune(model_dir, text_file, tmp_path / "fp32", "--method", "wanda", "--ratio", "0.5")
    _prune(model_dir, text_file, tmp_path / "bf16", "--method", "wanda", "--ratio", "0.5", "--compute-dtype",
           "bfloat16")
    old = tmp_path / "old"
    _prune(model_dir, text_file, old, "--method", "wanda", "--ratio", "0.5")
    meta = json.loads((old / "prunekit.json").read_text())
    del meta["compute_dtype"]
    (old / "prunekit.json").write_text(json.dumps(meta))
    capsys.readouterr()
    folders = [str(tmp_path / n) for n in ("fp32", "bf16", "old")]
    assert main(["compare", *folders, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["compute_dtype"] for r in rows] == ["float32", "bfloat16", "float32"]
    assert main(["compare", *folders]) == 0
    md = capsys.readouterr().out.splitlines()
    assert f"| {folders[0]} | weights | wanda | " in md[2]
    assert f"| {folders[1]} | weights | wanda [bfloat16] | " in md[3]
    assert f"| {folders[2]} | weights | wanda | " in md[4]


def test_compare_notes_texts_scored_differently_and_refuses_what_it_cannot_read(model_dir, text_file, tmp_path,
                                                                                capsys):
    _prune(model_dir, text_file, tmp_path / "a", "--method", "magnitude", "--ratio", "0.5")
    _prune(model_dir, text_file, tmp_path / "b", "--method", "magnitude", "--ratio", "0.5", seqlen="32")
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "scored on different windows by different runs (2 x 64, 4 x 32)" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0  # a script is told too
    out, err = capsys.readouterr()
    said = json.loads(out)["notes"]
    assert len(said) == 1 and "(2 x 64, 4 x 32)" in said[0] and f"prunekit: note: {said[0]}" in err
    assert main(["prune", str(model_dir), "--method", "magnitude", "--ratio", "0.3", "--out", str(tmp_path / "n"),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "n")]) == 0
    assert f"{tmp_path / 'n'} records no score for {text_file} (a prune without that --eval" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a"), str(model_dir)]) == 2  # a model folder, no record
    assert "has no prunekit.json" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a"), "--text", "wiki"]) == 2
    assert f"no run scored wiki; the runs scored {text_file}" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a"), "--text", f"{text_file},{text_file}"]) == 2  # two equal columns
    assert f"lists {text_file} twice; give each text once" in capsys.readouterr().err
    again = str(tmp_path / "x" / ".." / "a")
    (tmp_path / "x").mkdir()
    assert main(["compare", str(tmp_path / "a"), again, "--json"]) == 0
    out, err = capsys.readouterr()
    assert f"{tmp_path / 'a'} and {again} are one run folder: its row appears 2 times" in json.loads(out)["notes"]
    assert "are one run folder" in err and len(json.loads(out)["rows"]) == 2
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "prunekit.json").write_text("[1]")
    assert main(["compare", str(tmp_path / "c")]) == 2
    assert "holds a JSON list" in capsys.readouterr().err
    (tmp_path / "c" / "prunekit.json").write_text('{"method": "x"}')
    with pytest.raises(Exception, match="not a record of `prunekit prune`"):
        summarize(tmp_path / "c")


def test_compare_tells_apart_files_of_one_name_and_reads_dit_records(model_dir, text_file, tmp_path, capsys,
                                                                     monkeypatch):
    # two runs' `--eval e.txt` read different files: one column, no note, the 50% prune looked better than the 30%
    for name, words in (("a", "the cat sat on the mat. "), ("b", "a dog ran in the park. ")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "e.txt").write_text(words * 200)
    for name in ("a", "b"):
        monkeypatch.chdir(tmp_path / name)  # the same relative --eval string
        _prune(model_dir, text_file, "run", "--method", "magnitude", "--ratio", "0.5", eval_text="e.txt")
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")]) == 0
    assert "e.txt names different files in different runs (sha256 " in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "a")  # the same file as e.txt and ./e.txt: two columns, said
    _prune(model_dir, text_file, "run2", "--method", "magnitude", "--ratio", "0.3", eval_text="./e.txt")
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a" / "run"), str(tmp_path / "a" / "run2")]) == 0
    assert "e.txt and ./e.txt are the same file (sha256 " in capsys.readouterr().err
    # a DiT's record: one forward speedup and FIDs (the speed cell was blank, the FIDs dropped)
    dit = tmp_path / "dit"
    dit.mkdir()
    (dit / "prunekit.json").write_text(json.dumps({
        "kind": "dit", "method": "tinyfusion", "domain": "depth", "dense_layers": 12,
        "kept_layers": [0, 2, 4, 7, 8, 10],
        "recovery": None, "speed": {"speedup": 1.95, "dense_forward_s": 0.02, "pruned_forward_s": 0.01},
        "evaluation": {"settings": {}, "dense": {"fid": 29.26, "class_accuracy": 0.9}, "pruned": {"fid": 43.05}},
        "seconds": 5.0, "wall_seconds": 12.0}))
    assert main(["compare", str(dit), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["forward_speedup"] == 1.95 and row["evaluation"]["fid"]["pruned"] == 43.05
    assert row["budget"] == "6 of 12 blocks"
    assert main(["compare", str(dit)]) == 0
    assert "| 29.260 | 43.050 | 1.95x (forward) | 5.0 | 12.0 |" in capsys.readouterr().out
    meta = json.loads((dit / "prunekit.json").read_text())
    del meta["evaluation"]["pruned"]["fid"]  # a value missing from a record: blank, and said
    meta["speed"] = {"speedup": {"prefill": 1.5}}  # and no decode speedup: "1.50x / x" was shown
    (dit / "prunekit.json").write_text(json.dumps(meta))
    assert main(["compare", str(dit)]) == 0
    captured = capsys.readouterr()
    assert "| 29.260 |  | 1.50x / - | 5.0 | 12.0 |" in captured.out
    assert f"{dit} records no score for fid" in captured.err
    # a run that scored one of the texts shown only: its blank cell is said; a malformed record is no traceback
    meta = json.loads((tmp_path / "a" / "run" / "prunekit.json").read_text())
    meta["evaluation"]["e.txt"]["dense"]["windows"] = [1, 2]
    meta["evaluation"]["other.txt"] = meta["evaluation"]["e.txt"]
    (tmp_path / "a" / "run" / "prunekit.json").write_text(json.dumps(meta))
    assert main(["compare", str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")]) == 0
    err = capsys.readouterr().err
    assert f"{tmp_path / 'b' / 'run'} records no score for other.txt" in err


def test_compare_reads_a_folder_saved_from_the_python_api(llama, tok, tmp_path, capsys):
    import prunekit
    from conftest import ids_from_text

    ids = ids_from_text(tok, 4, 32)
    for bad in (ids.numpy().astype(np.float64), ids.bool()):
        with pytest.raises(prunekit.InputError, match="must be integer token ids"):
            prunekit.prune(llama, method="wanda", ratio=0.5, calibration=bad, progress=False)
    flipped = prunekit.prune(copy.deepcopy(llama), method="wanda", ratio=0.5, progress=False,
                             calibration=ids.numpy().astype(np.uint16)[:, ::-1])  # uint16, a reversed view
    assert abs(flipped.total_sparsity - 0.5) < 0.01
    result = prunekit.prune(llama, method="wanda", ratio=0.5, calibration=ids.numpy(), progress=False)  # numpy ids
    assert abs(result.total_sparsity - 0.5) < 0.01
    out = prunekit.save_pruned(llama, tok, tmp_path / "api", metadata=result)  # the result itself: its to_dict()
    assert main(["compare", str(out), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["method"] == "wanda" and row["method_seconds"] == result.seconds  # PruneResult's time: it was blank
    assert row["seconds"] is None  # no command ran: the method's time was shown as the wall time too
    ppl = prunekit.perplexity(llama, tok, prunekit.Text(name="t", text="hello world " * 40, documents=1), seqlen=16,
                              tokens=32, progress=False)
    assert float(ppl) == ppl.ppl


def test_prune_result_records_what_the_cli_records(llama, tok):
    """A second pruning through the API: the input's sparsity, the zeros SparseGPT made nonzero again, the model's
    sparsity and the pattern check are in the result (they were computed by the CLI only)."""
    import prunekit
    from conftest import ids_from_text

    ids = ids_from_text(tok, 4, 32)
    first = prunekit.prune(llama, method="magnitude", ratio=0.3, progress=False)
    assert first.input_sparsity == 0 and first.input_zeros_refilled == 0 and first.pattern_violations is None
    second = prunekit.prune(llama, method="sparsegpt", pattern="2:4", calibration=ids, progress=False)
    assert abs(second.input_sparsity - 0.3) < 0.01 and second.input_zeros_refilled > 0
    assert second.pattern_violations == [] and 0 < second.model_sparsity < second.total_sparsity
    assert second.model_sparsity == prunekit.sparsity(llama)["model_total"]
    record = second.to_dict()
    assert record["input_zeros_refilled"] == second.input_zeros_refilled and record["pattern_violations"] == []
