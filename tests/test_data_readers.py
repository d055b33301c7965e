"""The data readers (label tables, one-table columns, label groups) and `data train`'s keep files and checks."""
import json

import numpy as np
import pytest

from prunekit.cli import main
from prunekit.data.io import (index_order, label_groups, read_label_groups, read_labeled_table, read_table_columns,
                              resolve_numeric_labels)
from prunekit.errors import InputError


def _probs(n=30, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    p = rng.dirichlet(np.ones(k), n) * 0.2
    p[np.arange(n), y] += 0.8
    return y, p


# -- read_labeled_table -----------------------------------------------------------------------------------
def test_labeled_table_label_cells_are_stripped(tmp_path):
    (tmp_path / "t.csv").write_text("label, cat, dog\n cat, 0.9, 0.1\n dog, 0.2, 0.8\n")
    probs, classes, labels, named = read_labeled_table(tmp_path / "t.csv", "label")
    assert classes == ["cat", "dog"] and labels.tolist() == [0, 1] and named


@pytest.mark.parametrize("kind", ["string", "dictionary", "large_string"])
def test_labeled_table_string_columns_are_names(kind, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    cells = ["0", "1", "0", "1"]
    types = {"string": pa.string(), "large_string": pa.large_string()}
    col = pa.array(cells).dictionary_encode() if kind == "dictionary" else pa.array(cells, types[kind])
    # columns named "1", "0": as names, label "0" is the second column; as positions it is the first
    pq.write_table(pa.table({"label": col, "1": [0.1, 0.9, 0.1, 0.9], "0": [0.9, 0.1, 0.9, 0.1]}),
                   tmp_path / "t.parquet")
    probs, classes, labels, named = read_labeled_table(tmp_path / "t.parquet", "label")
    assert classes == ["1", "0"] and labels.tolist() == [1, 0, 1, 0] and named


def test_labeled_table_pandas_index_column_is_no_class(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"label": ["a", "b"], "a": [0.9, 0.2], "b": [0.1, 0.8], "__index_level_0__": [10, 11]}),
                   tmp_path / "t.parquet")
    assert read_labeled_table(tmp_path / "t.parquet", "label")[1] == ["a", "b"]


def test_labeled_table_text_class_column_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"label": ["a", "b"], "a": [0.9, 0.2], "note": ["x", "y"]}), tmp_path / "t.parquet")
    with pytest.raises(InputError, match="column 'note' is not numeric"):
        read_labeled_table(tmp_path / "t.parquet", "label")


def test_labeled_table_with_no_class_column_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"label": ["a", "b"]}), tmp_path / "t.parquet")
    with pytest.raises(InputError, match="has no probability columns besides 'label'"):
        read_labeled_table(tmp_path / "t.parquet", "label")


def test_labeled_table_one_class_column_is_a_matrix(tmp_path):
    (tmp_path / "t.csv").write_text("label,a\na,1.0\na,1.0\n")
    probs = read_labeled_table(tmp_path / "t.csv", "label")[0]
    assert probs.shape == (2, 1)


def test_labeled_table_numeric_labels_are_positions_not_names(tmp_path):
    (tmp_path / "t.csv").write_text("label,a,b\n0,0.9,0.1\n1,0.2,0.8\n")
    assert read_labeled_table(tmp_path / "t.csv", "label")[3] is False
    (tmp_path / "u.csv").write_text("label,0,1\n0,0.9,0.1\n1,0.2,0.8\n")  # both readings agree: positions
    assert read_labeled_table(tmp_path / "u.csv", "label")[3] is False


# -- resolve_numeric_labels ---------------------------------------------------------------------------------
def test_resolve_numbers_that_are_only_names_are_named():
    labels, named = resolve_numeric_labels(np.array([-1.0, 1.0]), ["-1", "1"], "t")
    assert labels.tolist() == [0, 1] and named is True


@pytest.mark.parametrize("values,row,shown", [([0, -1, 1], 1, "-1"), ([0, 1, 3], 2, "3")])
def test_resolve_names_the_bad_row(values, row, shown):
    with pytest.raises(InputError, match=rf"t row {row}: label {shown} is neither a class index 0\.\.2"):
        resolve_numeric_labels(np.array(values, float), ["a", "b", "c"], "t")


def test_resolve_negative_whole_number_is_refused():
    with pytest.raises(InputError, match="label -1 is neither"):
        resolve_numeric_labels(np.array([0.0, -1.0]), ["a", "b"], "t")


def test_resolve_positions_beside_duplicate_numeric_names():
    labels, named = resolve_numeric_labels(np.array([0.0, 1.0, 2.0]), ["7", "7", "x"], "t")
    assert labels.tolist() == [0, 1, 2] and named is False


# -- read_table_columns / index_order / label_groups ---------------------------------------------------------
def test_table_columns_npy_names_the_first_wanted_column(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros(3))
    with pytest.raises(InputError, match="which has no column 'el2n'"):
        read_table_columns(tmp_path / "s.npy", ["el2n", "index"], what="scores", optional=("index",))


def test_table_columns_cells_are_stripped(tmp_path):
    (tmp_path / "t.csv").write_text("el2n,label\n0.5, \n0.2,a\n")
    cells = read_table_columns(tmp_path / "t.csv", ["el2n", "label"], what="scores")
    assert cells["label"] == ["", "a"]


def test_table_columns_missing_parquet_column_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"el2n": [0.5, 0.2]}), tmp_path / "t.parquet")
    with pytest.raises(InputError, match="has no column 'label'"):
        read_table_columns(tmp_path / "t.parquet", ["el2n", "label", "index"], what="scores", optional=("index",))


def test_index_order_refuses_text_in_the_index():
    with pytest.raises(InputError, match="index column must hold whole numbers"):
        index_order(["0", "a"], "t.csv", "scores")


def test_label_groups_refuse_inf_and_keep_negative_and_huge_numbers_apart():
    with pytest.raises(InputError, match="non-finite label"):
        label_groups(["0", "inf"], "t")
    assert len(set(label_groups(["-1", "0", "-1"], "t").tolist())) == 2 and \
        (label_groups(["-1", "0", "-1"], "t") >= 0).all()
    assert len(set(label_groups(["1e20", "2e20"], "t").tolist())) == 2
    assert len(set(label_groups(["9007199254740993", "9007199254740992"], "t").tolist())) == 2


def test_select_one_table_blank_label_cell_refused(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("index,el2n,label\n0,0.5,a\n1,0.2, \n2,0.3,b\n3,0.1,a\n")
    assert main(["data", "select", "--scores", str(tmp_path / "t.csv"), "--score-column", "el2n", "--label-column",
                 "label", "--keep", "0.5", "--balanced", "--out", str(tmp_path / "k.csv")]) == 2
    assert "row 1: a missing or non-finite label" in capsys.readouterr().err


# -- read_label_groups -------------------------------------------------------------------------------------
def test_label_groups_npy_with_one_name_too_many_is_refused(tmp_path, capsys):
    np.save(tmp_path / "s.npy", np.linspace(0, 1, 4))
    np.save(tmp_path / "y.npy", np.array(["label", "a", "b", "a", "b"]))
    assert read_label_groups(tmp_path / "y.npy", 4)[1] is None
    assert main(["data", "select", "--scores", str(tmp_path / "s.npy"), "--keep", "0.5", "--balanced", "--labels",
                 str(tmp_path / "y.npy"), "--out", str(tmp_path / "k.csv")]) == 2
    assert "labels has 5 entries but scores has 4" in capsys.readouterr().err


def test_integer_labels_have_no_header(tmp_path, capsys):
    np.save(tmp_path / "s.npy", np.linspace(0, 1, 4))
    np.save(tmp_path / "y.npy", np.array([0, 1, 0, 1]))
    assert read_label_groups(tmp_path / "y.npy", 4)[1] is None
    assert main(["data", "select", "--scores", str(tmp_path / "s.npy"), "--keep", "0.5", "--balanced", "--labels",
                 str(tmp_path / "y.npy"), "--out", str(tmp_path / "k.csv")]) == 0
    assert "read as a header" not in capsys.readouterr().err


# -- data train ----------------------------------------------------------------------------------------------
def _task(tmp_path):
    from conftest import linear_task

    linear_task(tmp_path)
    return ["data", "train", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--test-data",
            str(tmp_path / "xt.npy"), "--test-labels", str(tmp_path / "yt.npy"), "--quiet"]


def test_train_refuses_a_negative_keep_index(tmp_path, capsys):
    args = _task(tmp_path)
    np.save(tmp_path / "keep.npy", np.array([0, 5, -1]))
    assert main([*args, "--keep", str(tmp_path / "keep.npy")]) == 2
    assert "row 2: index -1 is not an example of the data" in capsys.readouterr().err


def test_train_keep_table_index_column_anywhere(tmp_path, capsys):
    args = _task(tmp_path)
    (tmp_path / "a.csv").write_text("index,score\n" + "".join(f"{i},0.5\n" for i in range(0, 240, 2)))
    (tmp_path / "b.csv").write_text("score,index\n" + "".join(f"0.5,{i}\n" for i in range(0, 240, 2)))
    (tmp_path / "c.csv").write_text("score,rank\n" + "".join(f"0.5,{i}\n" for i in range(0, 240, 2)))
    got = []
    for f in ("a.csv", "b.csv"):
        assert main([*args, "--json", "--keep", str(tmp_path / f)]) == 0
        got.append(json.loads(capsys.readouterr().out)["test_accuracy"])
    assert got[0] == got[1]
    assert main([*args, "--keep", str(tmp_path / "c.csv")]) == 2
    assert "has 2 columns and no 'index' column" in capsys.readouterr().err


def test_train_duplicate_hint_only_for_a_mask(tmp_path, capsys):
    args = _task(tmp_path)
    np.save(tmp_path / "keep.npy", np.array([0, 0, 1]))
    assert main([*args, "--keep", str(tmp_path / "keep.npy")]) == 2
    assert "0/1 mask" not in capsys.readouterr().err


def test_train_refuses_lr_zero_and_epochs_zero(tmp_path, capsys):
    args = _task(tmp_path)
    assert main([*args, "--lr", "0"]) == 2
    assert "--lr must be a positive number" in capsys.readouterr().err
    assert main([*args, "--epochs", "0"]) == 2


def test_train_all_zero_held_out_inputs_no_traceback(tmp_path, capsys):
    args = _task(tmp_path)
    np.save(tmp_path / "xt.npy", np.zeros((120, 6), np.float32))
    assert main([*args, "--json"]) == 0


def test_train_refuses_a_held_out_class_the_training_never_uses(tmp_path, capsys):
    args = _task(tmp_path)
    yt = np.load(tmp_path / "yt.npy")
    yt[0] = 3
    np.save(tmp_path / "yt.npy", yt)
    assert main(args) == 2
    assert "held-out label 3 is a class the training labels never use (0..2)" in capsys.readouterr().err


@pytest.mark.parametrize("budget", ["same-steps", "same-epochs"])
def test_train_seed_sets_weights_and_batch_order(budget, tmp_path, capsys):
    import torch

    from prunekit import train

    args = _task(tmp_path)
    assert main([*args, "--json", "--seed", "3", "--epochs", "2", "--budget", budget]) == 0
    got = json.loads(capsys.readouterr().out)
    x, y = torch.from_numpy(np.load(tmp_path / "x.npy")), torch.from_numpy(np.load(tmp_path / "y.npy"))
    model = train.seeded_model(lambda: train.mlp(6, 3), 3)
    train.train(model, x, y, steps=4, seed=3, progress=False)  # 2 epochs x ceil(240/128) = 4 steps
    want = train.accuracy(model, torch.from_numpy(np.load(tmp_path / "xt.npy")), np.load(tmp_path / "yt.npy"))
    assert got["test_accuracy"] == want


def test_train_diverged_is_said(tmp_path, capsys):
    args = _task(tmp_path)
    x = np.load(tmp_path / "x.npy") * 1e18
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "xt.npy", np.load(tmp_path / "xt.npy") * 1e18)
    assert main([*args, "--lr", "1e6"]) == 2
    assert "training diverged" in capsys.readouterr().err


def test_train_data_file_needs_held_out_data(tmp_path, capsys):
    args = _task(tmp_path)
    assert main(args[:6] + ["--quiet"]) == 2
    assert "--test-data and --test-labels are needed with a data file" in capsys.readouterr().err


def test_select_one_parquet_table_follows_its_index_column(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    scores = np.array([0.9, 0.1, 0.5, 0.3])
    order = np.argsort(scores)  # a table sorted by score: rows are not examples
    pq.write_table(pa.table({"index": order, "el2n": scores[order]}), tmp_path / "t.parquet")
    assert main(["data", "select", "--scores", str(tmp_path / "t.parquet"), "--score-column", "el2n", "--keep", "0.5",
                 "--out", str(tmp_path / "k.npy")]) == 0
    assert np.load(tmp_path / "k.npy").tolist() == [0, 2]  # the two hardest (highest) examples, by example index


def test_table_columns_header_of_numbers_is_a_header(tmp_path):
    (tmp_path / "t.csv").write_text("7,8\n0.5,1\n0.25,0\n")
    assert read_table_columns(tmp_path / "t.csv", ["8", "7"], what="scores") == {"8": ["1", "0"], "7": ["0.5", "0.25"]}


def test_resolve_without_classes_refuses_inf():
    with pytest.raises(InputError, match="label inf is neither"):
        resolve_numeric_labels(np.array([0.0, np.inf]), None, "t")


def test_train_keep_file_order_does_not_change_the_run(tmp_path):
    from prunekit.data.cli import _read_kept

    (tmp_path / "down.csv").write_text("index,score\n" + "".join(f"{i},0.5\n" for i in (9, 3, 7, 0)))
    assert _read_kept(tmp_path / "down.csv", 10).tolist() == [0, 3, 7, 9]  # the rows' order decides no batch


def test_a_npy_longer_than_its_header_says_is_refused(tmp_path):
    from prunekit.data.io import read_array

    np.save(tmp_path / "s.npy", np.linspace(0, 1, 120))
    good = (tmp_path / "s.npy").read_bytes()
    cut = len(good) - 8 * 60 + 3  # inside value 60: numpy read every later value shifted by a byte
    (tmp_path / "bad.npy").write_bytes(good[:cut] + b"\0" + good[cut:])
    assert np.load(tmp_path / "bad.npy").shape == (120,)  # numpy itself says nothing
    with pytest.raises(InputError, match=r"bad\.npy is 1 byte\(s\) longer than its \.npy header describes "
                                         r"\(float64 \[120\]\), so it is damaged"):
        read_array(tmp_path / "bad.npy", what="scores", columns=1)
    assert np.array_equal(read_array(tmp_path / "s.npy", what="scores", columns=1), np.linspace(0, 1, 120))
