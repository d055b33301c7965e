"""`prunekit data ...` and `prunekit.data.io`: files in, tables out, bad input refused with nothing written."""

from __future__ import annotations

import csv
import doctest
import hashlib
import json
import re
import warnings

import numpy as np
import pytest

from prunekit.cli import main
from prunekit.select import select_examples
from prunekit.data import find_label_issues, io, order_label_issues
from prunekit.data.methods import confident
from prunekit.errors import InputError


def noisy(n=3000, k=4, seed=0):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    given = np.where(rng.random(n) < 0.15, rng.integers(0, k, n), true)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), true] += 3
    p = np.exp(logits)
    return given, (p / p.sum(1, keepdims=True)).astype(np.float32)


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_doctests():
    assert doctest.testmod(io).failed == 0
    assert doctest.testmod(confident).failed == 0


@pytest.mark.parametrize("fmt", ["npy", "csv", "parquet"])
def test_label_issues_from_each_format(tmp_path, fmt, capsys):
    labels, probs = noisy()
    if fmt == "npy":
        np.save(tmp_path / "y.npy", labels)
        np.save(tmp_path / "p.npy", probs)
    elif fmt == "csv":
        np.savetxt(tmp_path / "y.csv", labels, fmt="%d", header="label", comments="")
        np.savetxt(tmp_path / "p.csv", probs, delimiter=",", fmt="%.9g")
        probs = io.read_matrix(tmp_path / "p.csv", what="p")  # what the CLI sees after parsing
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"label": labels}), tmp_path / "y.parquet")
        pq.write_table(pa.table({f"p{j}": probs[:, j] for j in range(probs.shape[1])}), tmp_path / "p.parquet")
    before = digest(tmp_path)
    out = tmp_path / "issues.csv"
    assert main(["data", "label-issues", "--labels", str(tmp_path / f"y.{fmt}"), "--probs", str(tmp_path / f"p.{fmt}"),
                 "--filter", "both", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    expected = order_label_issues(find_label_issues(labels, probs, filter_by="both"), labels, probs)
    assert [int(r["index"]) for r in rows] == expected.tolist()
    assert all(int(r["label"]) == labels[int(r["index"])] for r in rows)
    quality = [float(r["self_confidence"]) for r in rows]
    assert quality == sorted(quality)  # worst first
    assert "label issues among 3000 examples" in capsys.readouterr().out
    after = digest(tmp_path)
    after.pop("issues.csv")
    assert after == before  # inputs untouched


def test_label_issues_npy_output_and_json(tmp_path, capsys):
    labels, probs = noisy()
    np.save(tmp_path / "y.npy", labels)
    np.save(tmp_path / "p.npy", probs)
    out = tmp_path / "issues.npy"
    assert main(["data", "label-issues", "--labels", str(tmp_path / "y.npy"), "--probs", str(tmp_path / "p.npy"),
                 "--out", str(out), "--json", "--rank-by", "normalized_margin"]) == 0
    summary = json.loads(capsys.readouterr().out)
    got = np.load(out)
    assert summary["issues"] == len(got)
    assert got.tolist() == find_label_issues(labels, probs, return_indices_ranked_by="normalized_margin").tolist()
    assert np.allclose(np.asarray(summary["noise_matrix"]).sum(axis=0), 1)  # over the given labels, per true one
    assert summary["noise_matrix_axes"].startswith("noise_matrix[given][true] = P(given label | true label)")


def bad_inputs(tmp_path):
    labels, probs = noisy(200, 3)
    cases = {}
    np.save(tmp_path / "y.npy", labels)
    np.save(tmp_path / "p.npy", probs)
    out_of_range = labels.copy()
    out_of_range[5] = 3
    np.save(tmp_path / "y_range.npy", out_of_range)
    cases["labels out of range"] = ("y_range.npy", "p.npy", r"labels must lie in \[0, 3\).*example 5 has label 3")
    unnormalised = probs * 0.9
    np.save(tmp_path / "p_sum.npy", unnormalised)
    cases["rows not summing to 1"] = ("y.npy", "p_sum.npy", "must sum to 1")
    nan = probs.copy()
    nan[7, 1] = np.nan
    np.save(tmp_path / "p_nan.npy", nan)
    cases["NaN"] = ("y.npy", "p_nan.npy", "NaN")
    np.save(tmp_path / "y_short.npy", labels[:-1])
    cases["shape mismatch"] = ("y_short.npy", "p.npy", "199 entries but --probs has 200 rows")
    np.save(tmp_path / "y_missing.npy", np.where(labels == 2, 0, labels))
    cases["class with no examples"] = ("y_missing.npy", "p.npy", "have no examples.*--allow-missing-classes")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases["pickled npy"] = ("obj.npy", "p.npy", "only unpickling reads")
    # files named .npy that are no numpy at all were called "cannot be read without unpickling" (or an EOFError
    # traceback when empty)
    (tmp_path / "random.npy").write_bytes(bytes(range(256)) * 4)
    cases["random bytes npy"] = ("random.npy", "p.npy", r"random\.npy is not a valid \.npy file.*numpy\.save")
    (tmp_path / "text.npy").write_text("0\n1\n2\n")
    cases["text npy"] = ("text.npy", "p.npy", r"text\.npy is not a valid \.npy file.*numpy\.save")
    (tmp_path / "empty.npy").write_bytes(b"")
    cases["empty npy"] = ("empty.npy", "p.npy", r"empty\.npy is not a valid \.npy file")
    (tmp_path / "cut.npy").write_bytes((tmp_path / "p.npy").read_bytes()[:-100])
    cases["truncated npy"] = ("y.npy", "cut.npy", r"cut\.npy is not a valid \.npy file")
    (tmp_path / "y.txt").write_text("0\n1\n")
    cases["unknown format"] = ("y.txt", "p.npy", r"must be \.npy, \.csv or \.parquet")
    cases["missing file"] = ("nope.npy", "p.npy", "does not exist")
    return cases


def test_label_issues_bad_input_exit_2_nothing_written(tmp_path, capsys):
    for name, (y, p, match) in bad_inputs(tmp_path).items():
        out = tmp_path / "issues.csv"
        before = digest(tmp_path)
        code = main(["data", "label-issues", "--labels", str(tmp_path / y), "--probs", str(tmp_path / p), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2, name
        assert err.startswith("prunekit: error:") and len(err.strip().splitlines()) == 1, (name, err)
        assert re.search(match, err), (name, err)
        assert not out.exists() and digest(tmp_path) == before, name


def test_existing_output_refused_unless_overwrite(tmp_path, capsys):
    labels, probs = noisy(300, 3)
    np.save(tmp_path / "y.npy", labels)
    np.save(tmp_path / "p.npy", probs)
    out = tmp_path / "issues.csv"
    out.write_text("keep me")
    args = ["data", "label-issues", "--labels", str(tmp_path / "y.npy"), "--probs", str(tmp_path / "p.npy"), "--out", str(out)]
    assert main(args) == 2 and out.read_text() == "keep me"
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0 and out.read_text().startswith("index,label,predicted")


def test_an_output_file_that_is_a_link_is_written_where_it_points_and_a_loop_is_named(tmp_path, capsys):
    """A linked --out was replaced by a regular file (the target kept the old result); a loop was a traceback."""
    from prunekit.inference.sampling import write_jsonl

    np.save(tmp_path / "s.npy", np.arange(10.0))
    (tmp_path / "shared").mkdir()
    target = tmp_path / "shared" / "keep.npy"
    (tmp_path / "keep.npy").symlink_to(target)  # dangling until written
    args = ["data", "select", "--scores", str(tmp_path / "s.npy"), "--out", str(tmp_path / "keep.npy")]
    assert main(args + ["--keep", "0.5"]) == 0 and (tmp_path / "keep.npy").is_symlink()
    assert main(args + ["--keep", "0.2", "--overwrite"]) == 0 and (tmp_path / "keep.npy").is_symlink()
    assert len(np.load(target)) == 2
    (tmp_path / "paths.jsonl").symlink_to(tmp_path / "shared" / "paths.jsonl")
    write_jsonl(tmp_path / "paths.jsonl", [{"a": 1}])
    assert (tmp_path / "paths.jsonl").is_symlink() and (tmp_path / "shared" / "paths.jsonl").read_text() == '{"a": 1}\n'
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    capsys.readouterr()
    assert main(["data", "select", "--scores", str(tmp_path / "s.npy"), "--keep", "0.5", "--out",
                 str(tmp_path / "loop")]) == 2
    err = capsys.readouterr().err
    assert "cannot follow its symbolic links" in err and "Traceback" not in err


def test_output_that_is_an_input_a_folder_or_under_a_file_is_refused(tmp_path, capsys):
    # --out INPUT --overwrite replaced the input file; --out FOLDER --overwrite and --out FILE/x.csv were tracebacks
    labels, probs = noisy(300, 3)
    np.save(tmp_path / "y.npy", labels)
    np.save(tmp_path / "p.npy", probs)
    np.save(tmp_path / "s.npy", probs[:, 0])
    (tmp_path / "folder.csv").mkdir()
    before = {name: (tmp_path / name).read_bytes() for name in ("y.npy", "p.npy", "s.npy")}
    issues = ["data", "label-issues", "--labels", str(tmp_path / "y.npy"), "--probs", str(tmp_path / "p.npy"), "--out"]
    select = ["data", "select", "--scores", str(tmp_path / "s.npy"), "--keep", "0.5", "--out"]
    for args, out, match in [(issues, "y.npy", "would replace the input"), (issues, "p.npy", "would replace the input"),
                             (select, "s.npy", "would replace the input"), (issues, "folder.csv", "is a folder"),
                             (issues, "y.npy/x.csv", "which is a file, not a folder")]:
        assert main(args + [str(tmp_path / out), "--overwrite"]) == 2, out
        err = capsys.readouterr().err
        assert "Traceback" not in err and match in err, (out, err)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.csv", "p.npy", "s.npy", "y.npy"]


def test_write_table_leaves_nothing_on_interrupt(tmp_path, monkeypatch):
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.write_table(tmp_path / "t.npy", {"index": np.arange(3)})
    assert list(tmp_path.iterdir()) == []


def test_read_labels_rejects_fractions(tmp_path):
    np.savetxt(tmp_path / "y.csv", [0, 1.5, 2])
    with pytest.raises(InputError, match="integer class indices"):
        io.read_labels(tmp_path / "y.csv")


def test_select_and_score_commands(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    for method in ("el2n", "forgetting", "grand_last_layer", "prototypes"):
        out = tmp_path / f"{method}.npy"
        assert main(["data", "score", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                     "--method", method, "--runs", "2", "--epochs", "2", "--clusters", "3", "--out", str(out), "--quiet"]) == 0
        note = f"--clusters is not used by --method {method}; ignored"
        assert (note in capsys.readouterr().err) == (method != "prototypes")  # a flag that does nothing is named
        scores = np.load(out)
        assert scores.shape == (240,) and np.isfinite(scores[~np.isposinf(scores)]).all()
    probs_out = tmp_path / "probs.npy"
    assert main(["data", "score", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--method", "probs",
                 "--folds", "3", "--epochs", "2", "--out", str(probs_out), "--quiet"]) == 0
    probs = np.load(probs_out)
    assert probs.shape == (240, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    keep_out = tmp_path / "keep.npy"
    assert main(["data", "select", "--scores", str(tmp_path / "el2n.npy"), "--keep", "0.25", "--strategy", "hard",
                 "--labels", str(tmp_path / "y.npy"), "--balanced", "--out", str(keep_out)]) == 0
    kept = np.load(keep_out)
    assert len(kept) == 60 and np.all(np.diff(kept) > 0)
    from prunekit.select import select_examples

    assert kept.tolist() == np.flatnonzero(select_examples(np.load(tmp_path / "el2n.npy"), 0.25, strategy="hard",
                                                           labels=y, balanced=True)).tolist()
    capsys.readouterr()
    for bad, match in ((["--keep", "0"], "keep"), (["--keep", "1.5"], "keep"), (["--keep", "0.5", "--balanced"], "--balanced needs --labels")):
        code = main(["data", "select", "--scores", str(tmp_path / "el2n.npy"), "--out", str(tmp_path / "k2.npy"), *bad])
        assert code == 2 and match in capsys.readouterr().err and not (tmp_path / "k2.npy").exists()
    code = main(["data", "score", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy")[:-4] + "_none.npy",
                 "--method", "el2n", "--out", str(tmp_path / "s.npy")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("case,match", [
    ("negative", r"labels file .*y_neg\.npy must hold class indices >= 0; row 3 has -1"),  # select exited 0
    ("fraction", r"labels file .*y_frac\.csv must hold integer class indices"),
    ("garbage-scores", r"scores file .*garbage\.npy is not a valid \.npy file"),  # was "without unpickling"
])
def test_select_refuses_bad_labels_and_non_numpy_files(case, match, tmp_path, capsys):
    scores = np.linspace(0, 1, 8)
    np.save(tmp_path / "s.npy", scores)
    np.save(tmp_path / "y_neg.npy", np.array([0, 1, 0, -1, 1, 0, 1, 0]))
    (tmp_path / "y_frac.csv").write_text("0\n1\n0\n1.5\n1\n0\n1\n0\n")
    np.save(tmp_path / "y.npy", np.array([0, 1] * 4))
    (tmp_path / "garbage.npy").write_text("these are not numbers\n")
    scores_file, labels_file = {"negative": ("s.npy", "y_neg.npy"), "fraction": ("s.npy", "y_frac.csv"),
                                "garbage-scores": ("garbage.npy", "y.npy")}[case]
    before = digest(tmp_path)
    out = tmp_path / "keep.npy"
    code = main(["data", "select", "--scores", str(tmp_path / scores_file), "--keep", "0.5", "--balanced",
                 "--labels", str(tmp_path / labels_file), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("prunekit: error:") and len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err
    assert not out.exists() and digest(tmp_path) == before


def test_select_balances_on_class_names(tmp_path, capsys):
    # label-issues took class names and select --balanced refused them, though balancing needs only the groups
    rng = np.random.default_rng(0)
    scores = rng.random(12)
    np.save(tmp_path / "s.npy", scores)
    names = ["shirt", "bag", "coat"] * 4
    y = np.unique(names, return_inverse=True)[1]
    expected = np.flatnonzero(select_examples(scores, 0.5, labels=y, balanced=True)).tolist()
    (tmp_path / "plain.csv").write_text("\n".join(names) + "\n")
    (tmp_path / "header.csv").write_text("label\n" + "\n".join(names) + "\n")
    np.save(tmp_path / "names.npy", np.array(names))
    for file in ("plain.csv", "header.csv", "names.npy"):
        out = tmp_path / f"keep-{file}.csv"
        assert main(["data", "select", "--scores", str(tmp_path / "s.npy"), "--keep", "0.5", "--balanced", "--labels",
                     str(tmp_path / file), "--out", str(out)]) == 0, capsys.readouterr().err
        assert np.loadtxt(out, delimiter=",", skiprows=1)[:, 0].astype(int).tolist() == expected
        assert ("first row ('label') is read as a header" in capsys.readouterr().err) == (file == "header.csv")
    (tmp_path / "gap.csv").write_text("\n".join(names[:5] + ["", *names[6:]]) + "\n")
    capsys.readouterr()
    assert main(["data", "select", "--scores", str(tmp_path / "s.npy"), "--keep", "0.5", "--balanced", "--labels",
                 str(tmp_path / "gap.csv"), "--out", str(tmp_path / "k.csv")]) == 2
    assert "row 5: an empty class name" in capsys.readouterr().err


def test_score_still_refuses_negative_labels(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((4, 3), dtype=np.float32))
    np.save(tmp_path / "y.npy", np.array([0, 1, -1, 0]))
    out = tmp_path / "s.npy"
    code = main(["data", "score", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                 "--method", "el2n", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("prunekit: error:") and ">= 0" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# ---- bad files and options found by a QA sweep: one-line error, exit 2, nothing written, inputs untouched -----

def _csv_cases(tmp_path):
    (tmp_path / "latin1.csv").write_bytes("score\n0.5\ncaf\xe9\n".encode("latin-1"))  # crashed: UnicodeDecodeError
    (tmp_path / "binary.csv").write_bytes(bytes([0x30, 0x2C, 0x84, 0xFF, 0x00, 0x9C]) * 50)
    (tmp_path / "bigfield.csv").write_text("0.1\n" + "1" * 140_000 + "\n")  # crashed: _csv.Error, field limit
    return {"latin1": (r"latin1\.csv is not UTF-8 text", "latin1.csv"),
            "binary": (r"binary\.csv is not UTF-8 text", "binary.csv"),
            "bigfield": (r"bigfield\.csv line 2 is not valid CSV \(field larger than field limit", "bigfield.csv")}


def _refused(args, out, folder, capsys, match):
    def files():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}

    before = files()
    code = main(args)
    # notes on options the method ignores (the shared --runs / --epochs of these cases) may come first
    err = "".join(line for line in capsys.readouterr().err.splitlines(True) if not line.startswith("prunekit: note:"))
    assert code == 2, err
    assert err.startswith("prunekit: error:") and len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err
    assert not out.exists() and files() == before
    return err


def _score_files(tmp_path, n=24, d=4):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(n, d)).astype(np.float32))
    np.save(tmp_path / "y.npy", np.arange(n) % 3)
    np.save(tmp_path / "s.npy", rng.random(n))


@pytest.mark.parametrize("case", ["latin1", "binary", "bigfield"])
@pytest.mark.parametrize("command", ["select", "label-issues", "score"])
def test_non_utf8_binary_and_malformed_csv_refused(case, command, tmp_path, capsys):
    match, name = _csv_cases(tmp_path)[case]
    _score_files(tmp_path)
    np.save(tmp_path / "p.npy", np.full((24, 3), 1 / 3))
    bad, out = str(tmp_path / name), tmp_path / "out.npy"
    args = {"select": ["select", "--scores", bad, "--keep", "0.5"],
            "label-issues": ["label-issues", "--labels", bad, "--probs", str(tmp_path / "p.npy")],
            "score": ["score", "--data", bad, "--labels", str(tmp_path / "y.npy"), "--method", "el2n",
                      "--quiet"]}[command]
    _refused(["data", *args, "--out", str(out)], out, tmp_path, capsys, match)


def test_csv_with_byte_order_mark_keeps_its_first_value(tmp_path):
    # "\ufeff0.3" was taken for a header, shifting every index by one
    (tmp_path / "s.csv").write_bytes(b"\xef\xbb\xbf0.3\n0.1\n0.2\n")
    assert io.read_vector(tmp_path / "s.csv", what="scores").tolist() == [0.3, 0.1, 0.2]
    (tmp_path / "h.csv").write_bytes(b"\xef\xbb\xbfscore\n0.3\n0.1\n")  # a header after a BOM is still a header
    assert io.read_vector(tmp_path / "h.csv", what="scores").tolist() == [0.3, 0.1]
    out = tmp_path / "kept.csv"
    assert main(["data", "select", "--scores", str(tmp_path / "s.csv"), "--keep", "1", "--out", str(out)]) == 0
    assert out.read_text().splitlines() == ["index,score", "0,0.3", "1,0.1", "2,0.2"]


def test_csv_missing_values_and_pandas_headers_are_refused_not_misread(tmp_path, capsys):
    """pandas writes NaN as an empty cell (a blank line in one column) and unnamed columns as a '0,1' header; R
    writes NA. The blank line was dropped and '0,1' read as a row, shifting every later index with exit 0."""
    pd = pytest.importorskip("pandas")  # installed with cleanlab (the test extra)

    def refused(name, text, match):
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=match):
            io.read_array(tmp_path / name, what="scores")

    refused("blank.csv", "score\n0.9\n0.1\n\n0.8\n", "line 4 is empty: a missing value")
    refused("cell.csv", "a,b\n0.5,0.5\n0.2,\n", "line 3 holds a missing value")
    refused("na.csv", "NA\n0.3\n0.2\n", "line 1 holds a missing value .'NA'.")
    pd.DataFrame(np.array([[0.25, 0.75], [0.5, 0.5]])).to_csv(tmp_path / "p.csv", index=False)
    pd.Series([0.3, 0.1, 0.2]).to_csv(tmp_path / "s.csv", index=False)
    for name in ("p.csv", "s.csv"):
        with pytest.raises(InputError, match="looks like the header pandas writes for unnamed columns"):
            io.read_array(tmp_path / name, what="scores")
    # what still reads: blank lines at the ends, a named header, integers as data, the same files without header
    (tmp_path / "ok.csv").write_text("\n0\n1\n2\n\n\n")
    assert io.read_vector(tmp_path / "ok.csv", what="labels").tolist() == [0, 1, 2]
    pd.Series([0.3, 0.1, 0.2], name="score").to_csv(tmp_path / "named.csv", index=False)
    assert io.read_vector(tmp_path / "named.csv", what="scores").tolist() == [0.3, 0.1, 0.2]
    pd.Series([0.3, 0.1, 0.2]).to_csv(tmp_path / "plain.csv", index=False, header=False)
    assert io.read_vector(tmp_path / "plain.csv", what="scores").tolist() == [0.3, 0.1, 0.2]
    out = tmp_path / "kept.csv"
    _refused(["data", "select", "--scores", str(tmp_path / "s.csv"), "--keep", "0.5", "--out", str(out)], out,
             tmp_path, capsys, "looks like the header pandas writes")


def test_parquet_index_columns_are_not_data_and_id_columns_are_named(tmp_path, capsys):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1]])
    frame = pd.DataFrame(probs, columns=["a", "b", "c"], index=[10, 11, 12, 13])  # a filtered frame's index
    frame.to_parquet(tmp_path / "p.parquet")
    assert io.read_array(tmp_path / "p.parquet", what="probabilities").tolist() == probs.tolist()
    with_id = np.column_stack([np.arange(100, 104), probs])
    np.savetxt(tmp_path / "id.csv", with_id, delimiter=",", header="id,a,b,c", comments="")
    np.save(tmp_path / "y.npy", np.array([0, 1, 2, 0]))
    out = tmp_path / "issues.csv"
    # it said "class(es) [3] have no examples"; with --allow-missing-classes, "pass softmax outputs, not logits"
    _refused(["data", "label-issues", "--labels", str(tmp_path / "y.npy"), "--probs", str(tmp_path / "id.csv"),
              "--out", str(out)], out, tmp_path, capsys, "only column 0 leaves .0, 1.: if it holds ids")


def test_select_says_labels_without_balanced_are_unused_and_score_refuses_channels_last(tmp_path, capsys):
    _score_files(tmp_path)
    out = tmp_path / "kept.csv"
    assert main(["data", "select", "--scores", str(tmp_path / "s.npy"), "--labels", str(tmp_path / "y.npy"),
                 "--keep", "0.5", "--out", str(out)]) == 0
    assert "--labels is used with --balanced only; ignored" in capsys.readouterr().err
    for strategy, said in (("hard", True), ("random", False)):  # hard/easy draw nothing: the seed changed nothing
        assert main(["data", "select", "--scores", str(tmp_path / "s.npy"), "--keep", "0.5", "--strategy", strategy,
                     "--seed", "3", "--out", str(tmp_path / f"{strategy}.csv")]) == 0
        assert ("--seed is used with --strategy random or ccs only" in capsys.readouterr().err) == said
    np.save(tmp_path / "img.npy", np.zeros((24, 28, 28, 1), dtype=np.uint8))  # trained as flat vectors, unsaid
    _refused(["data", "score", "--data", str(tmp_path / "img.npy"), "--labels", str(tmp_path / "y.npy"), "--method",
              "el2n", "--quiet", "--out", str(tmp_path / "sc.npy")], tmp_path / "sc.npy", tmp_path, capsys,
             "looks like channels-last images")


def test_label_issues_takes_class_names_matched_to_named_probability_columns(tmp_path, capsys):
    rng = np.random.default_rng(0)
    n, names = 300, ["cat", "dog", "bird, small"]
    y = rng.integers(0, 3, n)
    probs = rng.dirichlet(np.ones(3) * 0.3, n)
    probs[np.arange(n), y] += 1.5
    probs /= probs.sum(1, keepdims=True)
    probs[:20] = probs[:20, ::-1]  # some confident disagreements
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "p.npy", probs)
    by_index = tmp_path / "by_index.csv"
    assert main(["data", "label-issues", "--labels", str(tmp_path / "y.npy"), "--probs", str(tmp_path / "p.npy"),
                 "--out", str(by_index)]) == 0
    with open(tmp_path / "p.csv", "w", newline="") as f:  # the header names the classes
        w = csv.writer(f)
        w.writerow(names)
        w.writerows([[repr(float(v)) for v in row] for row in probs])
    with open(tmp_path / "y.csv", "w", newline="") as f:
        csv.writer(f).writerows([["label"]] + [[names[i]] for i in y])
    np.save(tmp_path / "y_text.npy", np.array([names[i] for i in y]))
    want = list(csv.DictReader(by_index.read_text().splitlines()))
    for labels in ("y.csv", "y_text.npy"):
        out = tmp_path / f"named_{labels}.csv"
        assert main(["data", "label-issues", "--labels", str(tmp_path / labels), "--probs", str(tmp_path / "p.csv"),
                     "--out", str(out)]) == 0
        got = list(csv.DictReader(out.read_text().splitlines()))  # the comma inside a name is quoted
        assert [r["index"] for r in got] == [r["index"] for r in want] and len(got) >= 8
        assert all(r["label_name"] == names[int(r["label"])] and r["predicted_name"] == names[int(r["predicted"])]
                   for r in got)
    capsys.readouterr()
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        csv.writer(f).writerows([["label"], ["cat"], ["cow"]] + [["dog"]] * (n - 2))
    out = tmp_path / "x.csv"
    _refused(["data", "label-issues", "--labels", str(tmp_path / "bad.csv"), "--probs", str(tmp_path / "p.csv"),
              "--out", str(out)], out, tmp_path, capsys, "row 1: 'cow' is not one of the classes")
    _refused(["data", "label-issues", "--labels", str(tmp_path / "y.csv"), "--probs", str(tmp_path / "p.npy"),
              "--out", str(out)], out, tmp_path, capsys, "holds class names .* name the probabilities' columns")


def _planted_issues(tmp_path, n: int, flipped: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels y [n] in 0..2 and probabilities [n, 3] whose first `flipped` rows disagree confidently (y.npy, p.npy),
    and the issue indices label-issues finds from those .npy files."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, n)
    probs = rng.dirichlet(np.ones(3) * 0.3, n)
    probs[np.arange(n), y] += 1.5
    probs /= probs.sum(1, keepdims=True)
    probs[:flipped] = probs[:flipped, ::-1]
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "p.npy", probs)
    want = tmp_path / "want.csv"
    assert main(["data", "label-issues", "--labels", str(tmp_path / "y.npy"), "--probs", str(tmp_path / "p.npy"),
                 "--out", str(want)]) == 0
    want_index = [r["index"] for r in csv.DictReader(want.read_text().splitlines())]
    assert len(want_index) >= 8
    return y, probs, want_index


def test_label_issues_reads_a_header_of_numbered_class_names(tmp_path, capsys):
    """A probabilities CSV headed 2019,2020,2021 (years as classes) had its header read as one more example: 'labels
    has 300 entries but --probs has 301 rows', with labels given as indices or as the years."""
    years = ["2019", "2020", "2021"]
    y, probs, want_index = _planted_issues(tmp_path, 300, 20)
    with open(tmp_path / "p.csv", "w", newline="") as f:
        csv.writer(f).writerows([years] + [[repr(float(v)) for v in row] for row in probs])
    with open(tmp_path / "y_years.csv", "w", newline="") as f:
        csv.writer(f).writerows([["label"]] + [[years[i]] for i in y])
    for labels in ("y.npy", "y_years.csv"):
        out = tmp_path / f"got_{labels}.csv"
        assert main(["data", "label-issues", "--labels", str(tmp_path / labels), "--probs", str(tmp_path / "p.csv"),
                     "--out", str(out)]) == 0
        got = list(csv.DictReader(out.read_text().splitlines()))
        assert [r["index"] for r in got] == want_index
        note = f"the first row of {tmp_path / 'p.csv'} (2019,2020,2021) is read as its header"
        assert note in capsys.readouterr().err
        if labels == "y_years.csv":  # the years are the columns' names, not positions 2019..2021
            assert all(r["label_name"] == years[int(r["label"])] for r in got)
    capsys.readouterr()
    with open(tmp_path / "p2.csv", "w", newline="") as f:  # a first row of whole numbers that could be data stays data
        csv.writer(f).writerows([[0, 1, 0]] + [[repr(float(v)) for v in row] for row in probs])
    out = tmp_path / "x.csv"
    _refused(["data", "label-issues", "--labels", str(tmp_path / "y.npy"), "--probs", str(tmp_path / "p2.csv"),
              "--out", str(out)], out, tmp_path, capsys, "labels has 300 entries but --probs has 301 rows")
    # a label that fits no class under the header: it is named (the run said 'labels has 300 entries but --probs
    # has 301 rows', reading the header as a row once the labels did not fit it); a label of neither reading is
    # named, not the first name; positions and names mixed are said to be mixed
    bad = y.copy()
    bad[7] = 3
    np.save(tmp_path / "y_bad.npy", bad)
    _refused(["data", "label-issues", "--labels", str(tmp_path / "y_bad.npy"), "--probs", str(tmp_path / "p.csv"),
              "--out", str(out)], out, tmp_path, capsys, "row 7: label 3 is neither a class index 0..2 nor the name")
    with open(tmp_path / "y_years_bad.csv", "w", newline="") as f:
        csv.writer(f).writerows([["label"]] + [[years[i]] for i in y[:-1]] + [["2022"]])
    _refused(["data", "label-issues", "--labels", str(tmp_path / "y_years_bad.csv"), "--probs", str(tmp_path / "p.csv"),
              "--out", str(out)], out, tmp_path, capsys, "row 299: label 2022 is neither")
    with open(tmp_path / "y_mixed.csv", "w", newline="") as f:
        csv.writer(f).writerows([["label"], [0]] + [[years[i]] for i in y[1:]])
    _refused(["data", "label-issues", "--labels", str(tmp_path / "y_mixed.csv"), "--probs", str(tmp_path / "p.csv"),
              "--out", str(out)], out, tmp_path, capsys,
             r"mixes class positions \(row 0: 0\) with names of class columns \(row 1: 20\d\d\); write every label "
             "one way")
    # whole-number logits in the first row, as many labels as rows: a row (the logits error), not a header
    (tmp_path / "logits.csv").write_text("2,0\n0.9,0.1\n0.2,0.8\n0.6,0.4\n")
    np.save(tmp_path / "y4.npy", np.array([0, 0, 1, 0]))
    _refused(["data", "label-issues", "--labels", str(tmp_path / "y4.npy"), "--probs", str(tmp_path / "logits.csv"),
              "--out", str(out)], out, tmp_path, capsys, r"row 0 does not \(pass softmax outputs, not logits\)")


def test_label_issues_reads_labels_and_probabilities_from_one_table(tmp_path, capsys):
    # one table with a label column and a column per class (what a DataFrame of predictions is) had to be split
    names = ["shirt", "2", "bag"]  # a class named "2": names are matched before indices
    y, probs, want_index = _planted_issues(tmp_path, 200, 15)
    tables = {}
    for kind, cell in (("names", lambda i: names[i]), ("indices", str)):
        path = tmp_path / f"{kind}.csv"
        with open(path, "w", newline="") as f:  # the label column in the middle
            w = csv.writer(f)
            w.writerow([names[0], "label", *names[1:]])
            w.writerows([[repr(float(p[0])), cell(i), *(repr(float(v)) for v in p[1:])] for i, p in zip(y, probs)])
        tables[kind] = path
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    tables["parquet"] = tmp_path / "t.parquet"
    pq.write_table(pa.table({"label": [names[i] for i in y], **{c: probs[:, j] for j, c in enumerate(names)}}),
                   tables["parquet"])
    for kind, path in tables.items():
        out = tmp_path / f"got-{kind}.csv"
        assert main(["data", "label-issues", "--probs", str(path), "--label-column", "label", "--out", str(out)]) == 0
        got = list(csv.DictReader(out.read_text().splitlines()))
        assert [r["index"] for r in got] == want_index, kind
        assert all(int(r["label"]) == y[int(r["index"])] for r in got)
    capsys.readouterr()
    out = tmp_path / "x.csv"
    for args, match in (([], "one of the two"), (["--labels", str(tmp_path / "y.npy"), "--label-column", "label"],
                                                 "one of the two")):
        _refused(["data", "label-issues", "--probs", str(tables["names"]), *args, "--out", str(out)], out, tmp_path,
                 capsys, match)
    _refused(["data", "label-issues", "--probs", str(tables["names"]), "--label-column", "y", "--out", str(out)], out,
             tmp_path, capsys, r"has no column 'y' in its header \(shirt, label, 2, bag\)")
    _refused(["data", "label-issues", "--probs", str(tmp_path / "p.npy"), "--label-column", "label", "--out",
              str(out)], out, tmp_path, capsys, "is a .npy array, which has no column 'label'")
    with open(tmp_path / "cow.csv", "w", newline="") as f:
        csv.writer(f).writerows([["label", *names], ["cow", 0.2, 0.3, 0.5]] + [["bag", 0.2, 0.3, 0.5]] * 5)
    _refused(["data", "label-issues", "--probs", str(tmp_path / "cow.csv"), "--label-column", "label", "--out",
              str(out)], out, tmp_path, capsys, "row 0: 'cow' in column 'label' is not one of the classes")
    with open(tmp_path / "far.csv", "w", newline="") as f:  # it named --labels, a flag not given
        csv.writer(f).writerows([["label", *names], [3, 0.2, 0.3, 0.5]] + [[1, 0.2, 0.3, 0.5]] * 5)
    _refused(["data", "label-issues", "--probs", str(tmp_path / "far.csv"), "--label-column", "label", "--out",
              str(out)], out, tmp_path, capsys,
             r"column 'label' row 0: label 3 is neither a class index 0\.\.2 nor the name")
    with open(tmp_path / "extra.csv", "w", newline="") as f:  # a score column read as a class: "apply a softmax"
        csv.writer(f).writerows([["label", *names, "score"]] + [["bag", 0.2, 0.3, 0.5, 0.9]] * 5)
    _refused(["data", "label-issues", "--probs", str(tmp_path / "extra.csv"), "--label-column", "label", "--out",
              str(out)], out, tmp_path, capsys, r"is read as a class probability \(shirt, 2, bag, score\): keep only")
    with open(tmp_path / "ids.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "label", *names]] + [[f"a{i}", "bag", 0.2, 0.3, 0.5] for i in range(5)])
    _refused(["data", "label-issues", "--probs", str(tmp_path / "ids.csv"), "--label-column", "label", "--out",
              str(out)], out, tmp_path, capsys, r"not a number \('a0'\).*; every column but 'label' is read as a class")
    with open(tmp_path / "indexed.csv", "w", newline="") as f:  # pandas' to_csv with its index: row numbers
        csv.writer(f).writerows([["", "label", *names]] + [[i, "bag", 0.2, 0.3, 0.5] for i in range(5)])
    _refused(["data", "label-issues", "--probs", str(tmp_path / "indexed.csv"), "--label-column", "label", "--out",
              str(out)], out, tmp_path, capsys, "as pandas' to_csv writes its index")
    with open(tmp_path / "twice.csv", "w", newline="") as f:
        csv.writer(f).writerows([["label", "bag", "coat", "bag"]] + [["bag", 0.2, 0.3, 0.5]] * 5)
    _refused(["data", "label-issues", "--probs", str(tmp_path / "twice.csv"), "--label-column", "label", "--out",
              str(out)], out, tmp_path, capsys, "names two class columns 'bag'")


def test_whole_number_labels_beside_columns_named_by_other_whole_numbers_are_refused(tmp_path, capsys):
    # columns "1","2","3" and labels 1..2: read as positions with every class present, as names (shifted by one)
    # once class 0 was missing; --labels always read positions. Both readings fit and disagree: refused.
    rng = np.random.default_rng(0)
    y = rng.integers(1, 3, 40)  # class 0 absent
    probs = np.full((40, 3), 0.1)
    probs[np.arange(40), y] = 0.8
    with open(tmp_path / "t.csv", "w", newline="") as f:
        csv.writer(f).writerows([["1", "2", "3", "label"]] + [[*p, int(c)] for p, c in zip(probs, y)])
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({c: probs[:, j] for j, c in enumerate(["1", "2", "3"])}), tmp_path / "p.parquet")
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "x.csv"
    for args in (["--probs", str(tmp_path / "t.csv"), "--label-column", "label"],
                 ["--probs", str(tmp_path / "p.parquet"), "--labels", str(tmp_path / "y.npy")]):
        _refused(["data", "label-issues", *args, "--allow-missing-classes", "--out", str(out)], out, tmp_path, capsys,
                 r"are both class positions 0\.\.2 and names of class columns \(1, 2, 3\), which disagree")


@pytest.mark.parametrize("names,labels", [(["-1", "1"], [-1, 1]), (["0.5", "1.5"], [0.5, 1.5]),
                                          (["2019", "2020", "2021"], [2019, 2020, 2021]), (["1", "2", "3"], [1, 2, 3]),
                                          (["0", "1", "2"], [0, 1, 2])])
def test_numbers_that_can_only_be_class_names_are_matched_to_the_columns(names, labels, tmp_path, capsys):
    # they were refused as "not class indices" (--label-column read every number as a position)
    rng = np.random.default_rng(0)
    k, n = len(names), 60
    y = np.arange(n) % k
    probs = rng.dirichlet(np.ones(k), n) * 0.2
    probs[np.arange(n), y] += 0.8
    with open(tmp_path / "t.csv", "w", newline="") as f:
        rows = [[*(repr(float(v)) for v in p), labels[c]] for p, c in zip(probs, y)]
        csv.writer(f).writerows([[*names, "label"]] + rows)
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "p.npy", probs)
    want, got = tmp_path / "want.csv", tmp_path / "got.csv"
    assert main(["data", "label-issues", "--labels", str(tmp_path / "y.npy"), "--probs", str(tmp_path / "p.npy"),
                 "--out", str(want)]) == 0
    assert main(["data", "label-issues", "--probs", str(tmp_path / "t.csv"), "--label-column", "label", "--out",
                 str(got)]) == 0, capsys.readouterr().err
    assert [r["index"] for r in csv.DictReader(open(got))] == [r["index"] for r in csv.DictReader(open(want))]
    # the --labels route, with the columns named in a parquet: the same rule (it refused -1 and 0.5)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({c: probs[:, j] for j, c in enumerate(names)}), tmp_path / "p.parquet")
    np.save(tmp_path / "raw.npy", np.array([float(labels[c]) for c in y]))
    got2 = tmp_path / "got2.csv"
    assert main(["data", "label-issues", "--labels", str(tmp_path / "raw.npy"), "--probs",
                 str(tmp_path / "p.parquet"), "--out", str(got2)]) == 0, capsys.readouterr().err
    assert [r["index"] for r in csv.DictReader(open(got2))] == [r["index"] for r in csv.DictReader(open(want))]


def test_score_refuses_an_id_column_in_the_features(tmp_path, capsys):
    _score_files(tmp_path)
    x = np.load(tmp_path / "x.npy")
    np.savetxt(tmp_path / "x.csv", np.column_stack([np.arange(100, 124), x]), delimiter=",",
               header="id,a,b,c,d", comments="")  # the id was trained on as a feature, unsaid
    out = tmp_path / "el2n.npy"
    _refused(["data", "score", "--data", str(tmp_path / "x.csv"), "--labels", str(tmp_path / "y.npy"), "--method",
              "el2n", "--quiet", "--out", str(out)], out, tmp_path, capsys, "has a column 'id', which looks like")


@pytest.mark.parametrize("command", ["select", "label-issues", "score-data", "score-embeddings"])
def test_complex_arrays_refused(command, tmp_path, capsys):
    _score_files(tmp_path)
    np.save(tmp_path / "c1.npy", np.linspace(0, 1, 24) + 1j)  # select crashed: TypeError in isposinf
    np.save(tmp_path / "c2.npy", np.full((24, 3), 1 / 3) + 0j)
    np.save(tmp_path / "c3.npy", np.ones((24, 4), dtype=np.complex64))  # score only warned (ComplexWarning)
    y, out = str(tmp_path / "y.npy"), tmp_path / "out.npy"
    score = ["score", "--labels", y, "--quiet", "--epochs", "1", "--runs", "1"]
    args = {"select": (["select", "--scores", str(tmp_path / "c1.npy"), "--keep", "0.5"], "c1"),
            "label-issues": (["label-issues", "--labels", y, "--probs", str(tmp_path / "c2.npy")], "c2"),
            "score-data": ([*score, "--data", str(tmp_path / "c3.npy"), "--method", "el2n"], "c3"),
            "score-embeddings": ([*score, "--data", str(tmp_path / "x.npy"), "--method", "prototypes",
                                  "--clusters", "2", "--embeddings", str(tmp_path / "c2.npy")], "c2")}
    cmd, name = args[command]
    _refused(["data", *cmd, "--out", str(out)], out, tmp_path, capsys,
             rf"{name}\.npy must hold real numbers, got complex")


@pytest.mark.parametrize("case,extra,match", [
    ("zero-width", [], r"has shape \(24, 0\): no values per example"),  # scored as an MLP with no inputs
    ("sparse-labels", [], r"labels imply 1000001 classes .* only 24 examples; remap the labels to 0\.\.K-1"),
    ("lr", ["--lr", "1e30"], r"training diverged at --lr 1e\+30.*lower --lr"),  # was "outputs has 72 infinite values"
    ("huge-data", [], r"training diverged .*scale the data .*largest magnitude is 1e\+3"),
    ("lr-forgetting", ["--lr", "1e30", "--method", "forgetting"], "training diverged"),
    ("lr-probs", ["--lr", "1e30", "--method", "probs", "--folds", "2"], "training diverged"),
    ("lr-prototypes", ["--lr", "1e30", "--method", "prototypes", "--clusters", "2"], "training diverged"),
    ("clusters0", ["--method", "prototypes", "--clusters", "0"], r"^prunekit: error: --clusters must be an integer"),
    ("clusters>N", ["--method", "prototypes", "--clusters", "30"], r"--clusters 30 needs at least 30 examples"),
    ("zero-embedding", ["--method", "prototypes", "--clusters", "3"],
     r"row 3 of \S+e0\.npy is all zeros \(1 such row\(s\)\).*drop or fix those rows$"),  # said "cosine=False"
    ("folds>N", ["--method", "probs", "--folds", "30"], r"--folds 30 needs at least 30 examples"),
    ("seed", ["--seed", "-1"], r"--seed must be an integer >= 0, got -1"),  # select refused it, score did not
    ("seed-huge", ["--seed", str(2**64)], r"--seed must be below 2\*\*63"),  # was torch's overflow traceback
    ("nan-data", [], r"data file \S+x_nan\.npy has NaN or Inf .* in 2 row\(s\), the first row 3; clean it first$"),
    ("f64-overflow", [], r"x_big\.npy has NaN or Inf \(or values too large for float32\) in 1 row"),
])
def test_score_refuses_bad_data_and_options(case, extra, match, tmp_path, capsys):
    _score_files(tmp_path)
    data, labels = tmp_path / "x.npy", tmp_path / "y.npy"
    if case == "zero-width":
        np.save(data := tmp_path / "x0.npy", np.zeros((24, 0), dtype=np.float32))
    elif case == "sparse-labels":
        np.save(labels := tmp_path / "y_sparse.npy", np.r_[np.arange(23) % 3, 10**6])
    elif case == "zero-embedding":
        emb = np.random.default_rng(2).normal(size=(24, 5))
        emb[3] = 0
        np.save(tmp_path / "e0.npy", emb)
        extra = [*extra, "--embeddings", str(tmp_path / "e0.npy")]
    elif case == "huge-data":
        np.save(data := tmp_path / "x_huge.npy", np.full((24, 4), 1e30, dtype=np.float32))
    elif case in ("nan-data", "f64-overflow"):
        x = np.load(data).astype(np.float64)
        x[[3, 7] if case == "nan-data" else [5], 1] = np.nan if case == "nan-data" else 1e300
        np.save(data := tmp_path / ("x_nan.npy" if case == "nan-data" else "x_big.npy"), x)
    out = tmp_path / "out.npy"
    method = [] if "--method" in extra else ["--method", "el2n"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no UserWarning (non-writable array) before the message
        err = _refused(["data", "score", "--data", str(data), "--labels", str(labels), *method, "--epochs", "1",
                        "--runs", "1", *extra, "--quiet", "--out", str(out)], out, tmp_path, capsys, match)
    assert "outputs has" not in err and "k must" not in err


def test_score_prototypes_on_memory_mapped_float64_embeddings_warns_nothing(tmp_path, capsys):
    _score_files(tmp_path)
    np.save(tmp_path / "emb.npy", np.random.default_rng(1).normal(size=(24, 5)))  # float64: mapped read-only
    out = tmp_path / "proto.npy"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was: UserWarning, the given NumPy array is not writable
        assert main(["data", "score", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                     "--method", "prototypes", "--clusters", "3", "--embeddings", str(tmp_path / "emb.npy"),
                     "--out", str(out), "--quiet"]) == 0
    assert np.load(out).shape == (24,)
    capsys.readouterr()
    assert main(["data", "score", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                 "--method", "prototypes", "--clusters", "3", "--embeddings", str(tmp_path / "emb.npy"),
                 "--model", "cnn", "--out", str(tmp_path / "p2.npy"), "--quiet"]) == 0  # no shape check either
    assert "--model is not used by --method prototypes with --embeddings" in capsys.readouterr().err
    assert np.array_equal(np.load(tmp_path / "p2.npy"), np.load(out))


def test_folder_named_like_a_file_and_negative_seed_refused(tmp_path, capsys):
    _score_files(tmp_path)
    (tmp_path / "folder.npy").mkdir()
    out = tmp_path / "out.csv"
    _refused(["data", "label-issues", "--labels", str(tmp_path / "y.npy"), "--probs", str(tmp_path / "folder.npy"),
              "--out", str(out)], out, tmp_path, capsys, r"folder\.npy is a folder, not a file")  # was "does not exist"
    _refused(["data", "select", "--scores", str(tmp_path / "s.npy"), "--keep", "0.5", "--strategy", "random",
              "--seed", "-1", "--out", str(out)], out, tmp_path, capsys, r"--seed must be an integer >= 0, got -1")
    np.save(tmp_path / "scalar.npy", np.float64(3.0))  # was an IndexError traceback
    with pytest.raises(InputError, match="holds a single number"):
        io.read_matrix(tmp_path / "scalar.npy", what="embeddings")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_select_reads_the_index_score_table_that_score_writes(suffix, tmp_path, capsys):
    # `data score --out x.csv` writes index,<method>; `data select` refused it ("got shape (N, 2)")
    pytest.importorskip("pyarrow") if suffix == ".parquet" else None
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", (x[:, 0] > 0).astype(np.int64))
    table = tmp_path / f"el2n{suffix}"
    assert main(["data", "score", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--method",
                 "el2n", "--runs", "1", "--epochs", "2", "--out", str(table), "--quiet"]) == 0
    assert main(["data", "score", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--method",
                 "el2n", "--runs", "1", "--epochs", "2", "--out", str(tmp_path / "el2n.npy"), "--quiet"]) == 0
    scores = np.load(tmp_path / "el2n.npy")
    assert np.allclose(io.read_vector(table, what="scores"), scores, rtol=1e-6)
    for out, scores_file in ((tmp_path / "k_table.npy", table), (tmp_path / "k_npy.npy", tmp_path / "el2n.npy")):
        assert main(["data", "select", "--scores", str(scores_file), "--keep", "0.25", "--out", str(out)]) == 0
    assert np.load(tmp_path / "k_table.npy").tolist() == np.load(tmp_path / "k_npy.npy").tolist()
    # rows in another order are put back in index order
    shuffled = tmp_path / "shuffled.csv"
    order = rng.permutation(60)
    io.write_table(shuffled, {"index": order, "el2n": scores[order]}, overwrite=False)
    assert np.allclose(io.read_vector(shuffled, what="scores"), scores, rtol=1e-6)
    # a selection (some indices only) is not a score per example
    capsys.readouterr()
    assert main(["data", "select", "--scores", str(tmp_path / "k_table.npy"), "--keep", "0.5",
                 "--out", str(tmp_path / "k2.npy")]) == 0  # a plain vector of numbers is still read as scores
    keep_csv = tmp_path / "keep.csv"
    assert main(["data", "select", "--scores", str(table), "--keep", "0.25", "--out", str(keep_csv)]) == 0
    capsys.readouterr()
    code = main(["data", "select", "--scores", str(keep_csv), "--keep", "0.5", "--out", str(tmp_path / "k3.npy")])
    err = capsys.readouterr().err
    assert code == 2 and "not a selection" in err and not (tmp_path / "k3.npy").exists()
    bad = tmp_path / "gaps.csv"
    io.write_table(bad, {"index": np.array([0, 2, 3]), "el2n": np.array([0.1, 0.2, 0.3])}, overwrite=False)
    code = main(["data", "select", "--scores", str(bad), "--keep", "0.5", "--out", str(tmp_path / "k4.npy")])
    err = capsys.readouterr().err
    assert code == 2 and "must list every example 0..2 once" in err and not (tmp_path / "k4.npy").exists()


def test_score_and_label_issues_name_the_options_a_method_ignores(tmp_path, capsys):
    # --runs / --score-epoch / training options / --frac-noise were taken and silently did nothing
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", (x[:, 0] > 0).astype(np.int64))
    np.save(tmp_path / "e.npy", x)
    common = ["data", "score", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--quiet"]
    cases = [
        (["--method", "probs", "--folds", "2", "--epochs", "1", "--runs", "2", "--score-epoch", "1"],
         ["--runs is not used by --method probs", "--score-epoch is not used by --method probs"]),
        (["--method", "forgetting", "--epochs", "2", "--runs", "1", "--score-epoch", "1"],
         ["--score-epoch is not used by --method forgetting"]),
        (["--method", "prototypes", "--embeddings", str(tmp_path / "e.npy"), "--clusters", "2", "--epochs", "3",
          "--lr", "0.1"],
         ["--epochs is not used by --method prototypes with --embeddings", "--lr is not used by --method prototypes"]),
        (["--method", "el2n", "--epochs", "2", "--runs", "1", "--score-epoch", "1", "--lr", "0.1"], []),
    ]
    for i, (options, notes) in enumerate(cases):
        assert main([*common, *options, "--out", str(tmp_path / f"s{i}.npy")]) == 0
        err = capsys.readouterr().err
        for note in notes:
            assert note in err, (options, err)
        assert err.count("prunekit: note:") == len(notes), err
    probs = np.full((40, 2), 0.1)
    probs[np.arange(40), rng.integers(0, 2, 40)] = 0.9
    np.save(tmp_path / "p.npy", probs)
    for filter_by, noted in (("prune_by_noise_rate", False), ("predicted_neq_given", True)):
        out = tmp_path / f"issues_{filter_by}.csv"
        assert main(["data", "label-issues", "--labels", str(tmp_path / "y.npy"), "--probs", str(tmp_path / "p.npy"),
                     "--filter", filter_by, "--frac-noise", "0.5", "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert ("--frac-noise is used by the prune_by_noise_rate" in err) == noted, err


def test_fashion_mnist_labels_are_named_as_data_score_names_the_data(tmp_path, capsys, monkeypatch):
    """`data score --data fashion-mnist` then `label-issues --labels y.npy`: no CLI way gave y.npy."""
    from prunekit import zoo

    if not (zoo.cache_dir() / "datasets" / "fashion_mnist.npz").is_file():
        pytest.skip("Fashion-MNIST is not in the cache (make assets)")
    monkeypatch.chdir(tmp_path)
    y = zoo.fashion_mnist()[1]
    probs = np.full((len(y), 10), 0.02, dtype=np.float32)
    probs[np.arange(len(y)), y] = 0.82
    flipped = np.arange(0, len(y), 1000)  # 60 planted errors: the model is sure of another class
    probs[flipped] = 0.02
    probs[flipped, (y[flipped] + 1) % 10] = 0.82
    np.save("p.npy", probs)
    assert main(["data", "label-issues", "--labels", "fashion-mnist", "--probs", "p.npy", "--out", "issues.csv",
                 "--json"]) == 0
    found = sorted(int(r["index"]) for r in csv.DictReader(open("issues.csv")))
    assert found == flipped.tolist()
    np.save("d.npy", np.arange(len(y), dtype=np.float64))
    assert main(["data", "select", "--scores", "d.npy", "--keep", "0.1", "--labels", "fashion-mnist", "--balanced",
                 "--out", "keep.npy"]) == 0
    assert np.bincount(y[np.load("keep.npy")], minlength=10).tolist() == [600] * 10


def test_a_csv_with_pandas_index_column_says_index_false(tmp_path, capsys):
    probs = tmp_path / "p.csv"
    probs.write_text(",0,1\n0,0.9,0.1\n1,0.2,0.8\n")  # pandas' DataFrame(p).to_csv(path)
    np.save(tmp_path / "y.npy", np.array([0, 1]))
    assert main(["data", "label-issues", "--labels", str(tmp_path / "y.npy"), "--probs", str(probs), "--out",
                 str(tmp_path / "i.csv")]) == 2
    assert "as pandas' to_csv writes its index; save with to_csv(path, index=False)" in capsys.readouterr().err


def test_score_probs_notes_classes_no_example_has(tmp_path, capsys):
    """Labels {1, 2, 5} gave 6 columns that label-issues then refused, with nothing said at the score."""
    rng = np.random.default_rng(0)
    y = rng.choice([1, 2, 5], size=60)
    np.save(tmp_path / "x.npy", rng.normal(size=(60, 4)).astype(np.float32) + y[:, None])
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "p.npy"
    assert main(["data", "score", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--method",
                 "probs", "--folds", "2", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    assert "no example has class(es) 0, 3, 4 of 0..5" in capsys.readouterr().err and np.load(out).shape == (60, 6)
    assert main(["data", "label-issues", "--labels", str(tmp_path / "y.npy"), "--probs", str(out), "--out",
                 str(tmp_path / "i.csv"), "--allow-missing-classes"]) == 0


def test_class_name_labels_in_pandas_string_and_categorical_parquet_columns(tmp_path, capsys):
    """string[pyarrow] (large_string) and categorical (dictionary) columns were "not numeric"."""
    pd = pytest.importorskip("pandas")
    names = ["cat", "dog", "cat", "bird", "dog", "cat"]
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), [1, 2, 1, 0, 2, 1]] = 0.8
    pd.DataFrame(probs, columns=["bird", "cat", "dog"]).to_parquet(tmp_path / "p.parquet")
    for kind, column in (("large", pd.Series(names, dtype="string[pyarrow]")), ("cat", pd.Categorical(names))):
        pd.DataFrame({"y": column}).to_parquet(tmp_path / f"{kind}.parquet")
        assert main(["data", "label-issues", "--labels", str(tmp_path / f"{kind}.parquet"), "--probs",
                     str(tmp_path / "p.parquet"), "--out", str(tmp_path / f"{kind}.csv")]) == 0, capsys.readouterr().err


def test_a_full_stdout_says_it_was_stdout_and_non_utf8_arguments_are_refused(tmp_path, capsys, monkeypatch):
    """After the work was saved, a failing stdout exited 1 with a bare "No space left on device" (a retrying
    script redid the work); an argument with non-UTF-8 bytes was a traceback in the tokenizer or at the save."""
    import errno
    import sys

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    np.save(tmp_path / "s.npy", np.arange(10.0))
    monkeypatch.setattr(sys, "stdout", Full())
    assert main(["data", "select", "--scores", str(tmp_path / "s.npy"), "--keep", "0.5", "--out",
                 str(tmp_path / "k.npy")]) == 1
    monkeypatch.undo()
    assert "could not write to standard output (No space left on device)" in capsys.readouterr().err
    assert len(np.load(tmp_path / "k.npy")) == 5
    bad = str(tmp_path / "caf") + b"\xe9.npy".decode("utf-8", "surrogateescape")
    assert main(["data", "select", "--scores", str(tmp_path / "s.npy"), "--keep", "0.5", "--out", bad]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "holds bytes that are not UTF-8" in err and "Traceback" not in err
    # an input only read may have such a name (it worked before the check), and a closed stdout (None) prints nothing
    odd = tmp_path / ("sc" + b"\xe9".decode("utf-8", "surrogateescape") + ".npy")
    np.save(odd, np.arange(10.0))
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["data", "select", "--scores", str(odd), "--keep", "0.5", "--out", str(tmp_path / "k2.npy")]) == 0


def test_score_refuses_a_run_blown_up_by_its_learning_rate_at_the_score_epoch(tmp_path, capsys):
    """EL2N now stops at --score-epoch; the refusal came from a NaN in a later epoch, and the run wrote scores of
    two values (every prediction certain) instead (found in review)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", (x[:, 0] > 0).astype(np.int64))
    args = ["data", "score", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--method",
            "el2n", "--runs", "2", "--epochs", "6", "--score-epoch", "1", "--batch-size", "32", "--quiet"]
    assert main([*args, "--lr", "20", "--out", str(tmp_path / "bad.npy")]) == 2
    assert "after epoch 1 every prediction is certain" in capsys.readouterr().err
    assert not (tmp_path / "bad.npy").exists()
    assert main([*args, "--out", str(tmp_path / "ok.npy")]) == 0
    assert len(np.unique(np.load(tmp_path / "ok.npy").round(6))) > 2


def _linear_task(tmp_path):
    from conftest import linear_task

    linear_task(tmp_path)


def test_data_train_on_kept_examples_reports_held_out_accuracy(tmp_path, capsys):
    # the data-diet loop ended in Python: score, select, then no command trained on the kept examples
    from prunekit import train

    _linear_task(tmp_path)
    x, y = np.load(tmp_path / "x.npy"), np.load(tmp_path / "y.npy")
    keep = np.sort(np.random.default_rng(1).choice(240, 120, replace=False))
    np.save(tmp_path / "keep.npy", keep)
    args = ["data", "train", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--test-data",
            str(tmp_path / "xt.npy"), "--test-labels", str(tmp_path / "yt.npy"), "--epochs", "3", "--json", "--quiet"]
    assert main([*args, "--keep", str(tmp_path / "keep.npy")]) == 0
    got = json.loads(capsys.readouterr().out)
    # the same run by hand: same-steps = 3 epochs over all 240 examples in batches of 128 = 6 steps
    import torch

    model = train.seeded_model(lambda: train.mlp(6, 3), 0)
    train.train(model, torch.from_numpy(x[keep]), torch.from_numpy(y[keep]), steps=6, seed=0, progress=False)
    want = train.accuracy(model, torch.from_numpy(np.load(tmp_path / "xt.npy")), np.load(tmp_path / "yt.npy"))
    assert (got["kept"], got["examples"], got["steps"], got["test_examples"]) == (120, 240, 6, 120)
    assert got["test_accuracy"] == want
    # select's table and a boolean mask name the same examples; same-epochs takes fewer steps
    with open(tmp_path / "keep.csv", "w") as f:
        f.write("index,score\n" + "".join(f"{i},0.5\n" for i in keep[::-1]))
    mask = np.zeros(240, bool)
    mask[keep] = True
    np.save(tmp_path / "mask.npy", mask)
    for file in ("keep.csv", "mask.npy"):
        assert main([*args, "--keep", str(tmp_path / file)]) == 0
        assert json.loads(capsys.readouterr().out)["test_accuracy"] == want
    assert main([*args, "--keep", str(tmp_path / "keep.npy"), "--budget", "same-epochs"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["kept"] == 240  # no --keep: all
    assert main([*args, "--budget", "same-epochs"]) == 0  # the same run: it said nothing
    assert "every example trains (no --keep), so --budget same-epochs is the same run" in capsys.readouterr().err
    np.save(tmp_path / "all.npy", np.ones(240, bool))
    assert main([*args, "--keep", str(tmp_path / "all.npy"), "--budget", "same-epochs"]) == 0
    assert "every example trains (the keep file keeps all), so --budget" in capsys.readouterr().err
    # a held-out set whose lengths differ was blamed on the training files ("data has 240 ... labels has 120")
    bad = [*args[:6], "--test-data", str(tmp_path / "xt.npy"), "--test-labels", str(tmp_path / "y.npy"), "--quiet"]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert f"--test-data {tmp_path / 'xt.npy'} has 120 examples but --test-labels {tmp_path / 'y.npy'} has 240" in err


@pytest.mark.parametrize("keep,match", [
    (np.array([0, 5, 240]), "row 2: index 240 is not an example of the data"),
    (np.array([0.0, 1e30]), "row 1: index 1000000000000000019884624838656 is not an example"),  # was a negative
    ((np.arange(240) % 2).astype(np.int64), "it looks like a 0/1 mask: save it as a boolean .npy"),
    (np.array([0, 5, 5]), "lists an example twice"),
    (np.array([0.5, 1.0]), "whole-number example indices"),
    (np.arange(60) + 7j, "must hold real numbers, got complex128"),  # a ComplexWarning, then trained on np.arange(60)
    (np.zeros(10, bool), "boolean mask of shape"),
    (np.zeros(240, bool), "keeps no example"),
    (np.zeros(0, np.int64), "has no rows"),
])
def test_data_train_refuses_bad_keep_files(keep, match, tmp_path, capsys):
    _linear_task(tmp_path)
    np.save(tmp_path / "keep.npy", keep)
    code = main(["data", "train", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                 "--test-data", str(tmp_path / "xt.npy"), "--test-labels", str(tmp_path / "yt.npy"),
                 "--keep", str(tmp_path / "keep.npy"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err


def test_data_train_keep_csv_needs_a_header_and_held_out_inputs_their_training_dtype(tmp_path, capsys):
    # pd.Series(kept).to_csv(index=False) writes the header "0": it was read as index 0, trained on silently
    _linear_task(tmp_path)
    (tmp_path / "keep.csv").write_text("0\n6\n10\n12\n")
    base = ["data", "train", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--quiet"]
    held_out = ["--test-data", str(tmp_path / "xt.npy"), "--test-labels", str(tmp_path / "yt.npy")]
    assert main([*base, *held_out, "--keep", str(tmp_path / "keep.csv")]) == 2
    assert "has no header row, so its first row could be a header (pandas writes '0') or an index" in \
        capsys.readouterr().err
    (tmp_path / "keep.csv").write_text("index\n0\n6\n10\n12\n")
    assert main([*base, *held_out, "--keep", str(tmp_path / "keep.csv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == 4
    # uint8 training pixels are scaled by 1/255, float held-out ones were not: accuracy fell, unsaid
    x = np.random.default_rng(0).integers(0, 256, (240, 6)).astype(np.uint8)
    np.save(tmp_path / "x8.npy", x)
    np.save(tmp_path / "xt255.npy", x[:120].astype(np.float32))
    np.save(tmp_path / "xt01.npy", x[:120].astype(np.float32) / 255)  # the same scale: accepted
    train8 = ["data", "train", "--data", str(tmp_path / "x8.npy"), "--labels", str(tmp_path / "y.npy"), "--quiet",
              "--test-labels", str(tmp_path / "yt.npy")]
    assert main([*train8, "--test-data", str(tmp_path / "xt255.npy")]) == 2
    assert "the training inputs reach 1 and the held-out inputs 255" in capsys.readouterr().err
    assert main([*train8, "--test-data", str(tmp_path / "xt01.npy")]) == 0


def test_data_train_uses_the_fashion_mnist_test_split(tmp_path, capsys, monkeypatch):
    from prunekit import zoo

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8)
    y = np.arange(64) % 10
    monkeypatch.setattr(zoo, "fashion_mnist", lambda: (x, y, x[:20], y[:20]))
    assert main(["data", "train", "--data", "fashion-mnist", "--epochs", "1", "--json", "--quiet"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["test"] == "fashion-mnist test split" and got["test_examples"] == 20 and got["kept"] == 64
    xt = tmp_path / "xt.npy"
    np.save(xt, x[:5, :27])  # another shape than the training images
    np.save(tmp_path / "yt.npy", y[:5])
    assert main(["data", "train", "--data", "fashion-mnist", "--test-data", str(xt), "--test-labels",
                 str(tmp_path / "yt.npy"), "--quiet"]) == 2
    assert "held-out inputs are shaped (756,) per example, the training inputs (1, 28, 28)" in capsys.readouterr().err
    assert main(["data", "train", "--data", "fashion-mnist", "--test-data", str(xt), "--quiet"]) == 2
    assert "give --test-data and --test-labels together" in capsys.readouterr().err


def test_select_reads_scores_and_labels_from_one_table(tmp_path, capsys):
    # a DataFrame of scores and labels had to be split into two files for select
    rng = np.random.default_rng(3)
    n, names = 30, ["coat", "bag", "shirt"]
    scores = rng.random(n)
    y = np.arange(n) % 3
    np.save(tmp_path / "s.npy", scores)
    np.save(tmp_path / "y.npy", y)
    want = tmp_path / "want.npy"
    assert main(["data", "select", "--scores", str(tmp_path / "s.npy"), "--keep", "0.5", "--labels",
                 str(tmp_path / "y.npy"), "--balanced", "--out", str(want)]) == 0
    with open(tmp_path / "t.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "label", "el2n", "other"]]
                                + [[f"a{i}", names[c], repr(float(s)), 7] for i, (c, s) in enumerate(zip(y, scores))])
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"label": [names[c] for c in y], "el2n": scores}), tmp_path / "t.parquet")
    for table in ("t.csv", "t.parquet"):
        out = tmp_path / f"got-{table}.npy"
        assert main(["data", "select", "--scores", str(tmp_path / table), "--score-column", "el2n", "--label-column",
                     "label", "--keep", "0.5", "--balanced", "--out", str(out)]) == 0
        assert np.load(out).tolist() == np.load(want).tolist()
    capsys.readouterr()
    out = tmp_path / "x.npy"
    base = ["data", "select", "--scores", str(tmp_path / "t.csv"), "--keep", "0.5", "--out", str(out)]
    for extra, match in ((["--score-column", "id"], "column 'id' row 0: 'a0' is not a number"),
                         (["--score-column", "nope"], "has no column 'nope' in its header (id, label, el2n, other)"),
                         (["--score-column", "el2n", "--label-column", "label", "--labels", str(tmp_path / "y.npy")],
                          "not both"),
                         (["--score-column", "el2n", "--balanced"], "--balanced needs --labels (or --label-column)")):
        _refused([*base, *extra], out, tmp_path, capsys, re.escape(match))


def test_select_one_table_follows_its_index_column_and_refuses_bad_labels(tmp_path, capsys):
    # a data-score table sorted by score in pandas: its rows are not the examples' order
    rng = np.random.default_rng(5)
    scores = rng.random(12)
    y = np.arange(12) % 3
    np.save(tmp_path / "s.npy", scores)
    np.save(tmp_path / "y.npy", y)
    want = tmp_path / "want.npy"
    assert main(["data", "select", "--scores", str(tmp_path / "s.npy"), "--keep", "0.5", "--labels",
                 str(tmp_path / "y.npy"), "--balanced", "--out", str(want)]) == 0
    order = np.argsort(scores)
    with open(tmp_path / "t.csv", "w", newline="") as f:
        csv.writer(f).writerows([["index", "el2n", "label"]]
                                + [[int(i), repr(float(scores[i])), int(y[i])] for i in order])
    out = tmp_path / "got.npy"
    assert main(["data", "select", "--scores", str(tmp_path / "t.csv"), "--score-column", "el2n", "--label-column",
                 "label", "--keep", "0.5", "--balanced", "--out", str(out)]) == 0
    assert np.load(out).tolist() == np.load(want).tolist()
    capsys.readouterr()
    x = tmp_path / "x.npy"
    for rows, extra, match in (
            ([[0, 0.5, "nan"], [1, 0.2, "a"]], [], "row 0: a missing or non-finite label ('nan')"),
            ([[0, 0.5, "a"], [1, 0.2, "a", "b"]], [], "line 3 has 4 values, the header 3"),
            ([[0, 0.5, "a"], [0, 0.2, "b"]], [], "its index column must list every example 0..1 once"),
            ([[0, 0.5, "a"], [1, 0.2, "b"]], ["--label-column", "el2n"], "both name 'el2n'")):
        with open(tmp_path / "bad.csv", "w", newline="") as f:
            csv.writer(f).writerows([["index", "el2n", "label"]] + rows)
        args = ["data", "select", "--scores", str(tmp_path / "bad.csv"), "--score-column", "el2n", "--keep", "0.5",
                "--balanced", "--out", str(x)]
        _refused([*args, *(extra or ["--label-column", "label"])], x, tmp_path, capsys, re.escape(match))


def test_probabilities_that_are_all_certain_are_noted(tmp_path, capsys):
    _score_files(tmp_path)
    args = ["data", "score", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--method",
            "probs", "--folds", "2", "--epochs", "2", "--quiet"]
    assert main([*args, "--lr", "1e8", "--out", str(tmp_path / "blown.npy")]) == 0  # finite, so not refused
    assert "every out-of-fold probability is 0 or 1" in capsys.readouterr().err
    assert set(np.unique(np.round(np.load(tmp_path / "blown.npy"), 6))) <= {0.0, 1.0}
    assert main([*args, "--out", str(tmp_path / "fine.npy")]) == 0
    assert "every out-of-fold probability" not in capsys.readouterr().err


@pytest.mark.parametrize("device, match", [("cuda:7", "sees no CUDA device|torch sees"), ("gpu", "must be a device")])
def test_data_score_and_train_check_device_before_reading_or_writing(tmp_path, capsys, monkeypatch, device, match):
    import torch

    from prunekit import zoo
    from prunekit.data import io as dio

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")

    def no_read(*_a, **_k):
        raise AssertionError("data was read before --device was checked")

    _linear_task(tmp_path)
    monkeypatch.setattr(dio, "read_named", no_read)
    monkeypatch.setattr(zoo, "fashion_mnist", no_read)
    out = tmp_path / "scores.npy"
    data = ["--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy")]
    for argv in (["score", *data, "--method", "el2n", "--out", str(out)],
                 ["train", *data, "--test-data", str(tmp_path / "xt.npy"), "--test-labels", str(tmp_path / "yt.npy")],
                 ["score", "--data", "fashion-mnist", "--method", "el2n", "--out", str(out)]):
        assert main(["data", *argv, "--device", device]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("prunekit: error: --device") and re.search(match, err), err
    assert not out.exists()


def test_data_train_records_its_device_and_divergence_check_takes_cpu_inputs(tmp_path, capsys):
    import torch

    from prunekit.data.cli import _diverged

    _linear_task(tmp_path)
    assert main(["data", "train", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                 "--test-data", str(tmp_path / "xt.npy"), "--test-labels", str(tmp_path / "yt.npy"), "--epochs", "1",
                 "--json", "--quiet", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cpu"
    model = torch.nn.Linear(6, 3).double()  # inputs are moved to the model's device and dtype
    assert _diverged([model], torch.randn(5, 6)) is False
