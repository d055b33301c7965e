"""Arrays in (.npy, .csv, .parquet), index/score tables out, written atomically.

``.npy`` files are memory-mapped (read in place, never copied whole, never unpickled); ``.csv`` files are
plain numbers with an optional header row; ``.parquet`` needs pyarrow (``pip install pyarrow``): every
column must be numeric, one column for a vector, K columns for an [N, K] matrix.

>>> import numpy as np, tempfile, os
>>> d = tempfile.mkdtemp(); p = os.path.join(d, "y.csv")
>>> _ = write_table(p, {"index": np.array([3, 1]), "score": np.array([0.5, 0.25])})
>>> read_array(p, what="scores", columns=2).tolist()
[[3.0, 0.5], [1.0, 0.25]]
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import numpy as np

from prunekit.errors import (InputError, apply_umask, check_output_name, check_writable, follow_link, hidden_name,
                             place_file)

__all__ = ["read_array", "read_named", "read_labels", "read_class_labels", "read_label_groups", "read_labeled_table",
           "resolve_numeric_labels", "read_table_columns", "index_order", "label_groups", "read_vector", "read_matrix",
           "numbered_header", "check_real", "write_table", "check_output_file", "FORMATS"]

FORMATS = (".npy", ".csv", ".parquet")


def _suffix(path: Path, what: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"{what} file {path} must be .npy, .csv or .parquet")
    return suffix


_MISSING = {"", "na", "n/a", "#n/a", "null", "none", "nan", "-nan", "<na>"}  # how tools write a missing value


def _is_float(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _read_csv(path: Path, what: str) -> tuple[np.ndarray, list[str] | None]:
    """Rows of numbers from UTF-8 text (a byte-order mark is dropped), and the header: a first row that is not
    numbers (None without one). Blank lines at the ends are ignored; a blank line or an empty cell between rows
    is a missing value (pandas writes NaN so) and refused, as is a first row of missing values (R's ``NA``) and
    the numeric header pandas writes for unnamed columns (``0,1,...`` over float rows), which could be a row."""
    rows, header = _csv_rows(path, what)
    return _csv_numbers(rows, path, what), header


def _csv_rows(path: Path, what: str, *, named: bool = False) -> tuple[list[tuple[int, list[str]]], list[str] | None]:
    """`_read_csv`'s ``((line, cells) rows, header)`` before the cells are read as numbers; ``named=True``: the
    first row is the header whatever it holds."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            try:
                rows = [(reader.line_num, r) for r in reader]
            except csv.Error as e:
                raise InputError(f"{what} file {path} line {reader.line_num} is not valid CSV ({e}); "
                                 "fix that line or give a .npy file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{what} file {path} is not UTF-8 text (it holds the byte {e.object[e.start]:#04x}); "
                         "save it as UTF-8 CSV, or give a .npy file") from None
    except OSError as e:
        raise InputError(f"{what} file {path} cannot be read ({e.strerror})") from None

    def blank(row):
        return not any(c.strip() for c in row)

    while rows and blank(rows[-1][1]):
        rows.pop()
    while rows and blank(rows[0][1]):
        rows.pop(0)
    if not rows:
        raise InputError(f"{what} file {path} is empty")
    header = None
    first = [c.strip() for c in rows[0][1]]
    if not all(_is_float(c) for c in first) or named:
        if len(first) > 1 and first[0] == "" and all(first[1:]):  # read as a missing value in row 1
            raise InputError(f"{what} file {path}: the first row starts with an empty cell above a column of row "
                             "numbers, as pandas' to_csv writes its index; save with to_csv(path, index=False) "
                             "(or as .npy)")
        if all(_is_float(c) or c.lower() in _MISSING for c in first) and not named:
            raise InputError(f"{what} file {path} line {rows[0][0]} holds a missing value "
                             f"({next(c for c in first if not _is_float(c))!r}); fill or drop it")
        header, rows = first, rows[1:]
    elif first == [str(i) for i in range(len(first))] and len(rows) > 1 and all(
            any(ch in c for ch in ".eEnN") for _, r in rows[1:] for c in r if c.strip()):
        raise InputError(f"{what} file {path}: the first row {','.join(first)!r} looks like the header pandas writes "
                         "for unnamed columns (to_csv(index=False)) above rows of decimals; save with header=False or "
                         "named columns (or as .npy), or write that first row as decimals if it is data")
    if not rows:
        raise InputError(f"{what} file {path} has a header but no rows")
    return rows, header


def _csv_numbers(rows: list[tuple[int, list[str]]], path: Path, what: str) -> np.ndarray:
    def blank(row):
        return not any(c.strip() for c in row)

    width = len(rows[0][1])
    values = np.empty((len(rows), width))
    for i, (line, r) in enumerate(rows):
        if len(r) != width:
            if blank(r):
                raise InputError(f"{what} file {path} line {line} is empty: a missing value (pandas writes NaN as an "
                                 "empty cell); fill or drop that row in every file")
            raise InputError(f"{what} file {path}: line {line} has {len(r)} values, the first row has {width}")
        for j, c in enumerate(r):
            try:
                values[i, j] = float(c)
            except ValueError:
                gap = c.strip().lower() in _MISSING
                raise InputError(f"{what} file {path} line {line} holds "
                                 + ("a missing value" if gap else "a value that is not a number")
                                 + f" ({c!r}); " + ("fill or drop that row in every file" if gap else
                                                    "give numbers only, or a .npy file")) from None
    return values[:, 0] if width == 1 else values


def _table_path(path, column: str, what: str, other: str = "") -> tuple[Path, str]:
    """`path` and its suffix for reading column `column`: a .csv or .parquet file that exists."""
    path = Path(path).expanduser()
    suffix = _suffix(path, what)
    if suffix == ".npy":
        raise InputError(f"{what} file {path} is a .npy array, which has no column {column!r}; give a .csv with a "
                         f"header or a .parquet{other}")
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist")
    return path, suffix


def _header_index(rows, header: list[str], column: str, path: Path, what: str) -> int:
    """Where `column` is in a CSV `header`: once, with every row as wide as the header."""
    if column not in header:
        raise InputError(f"{what} file {path} has no column {column!r} in its header ({', '.join(header[:8])}"
                         f"{', ...' if len(header) > 8 else ''})")
    if header.count(column) > 1:
        raise InputError(f"{what} file {path} has two columns named {column!r}; rename one")
    for line, r in rows:
        if len(r) != len(header):  # an unquoted comma in a name shifted the cells
            if not any(c.strip() for c in r):
                raise InputError(f"{what} file {path} line {line} is empty: a missing value (pandas writes NaN as an "
                                 "empty cell); fill or drop that row")
            raise InputError(f"{what} file {path}: line {line} has {len(r)} values, the header {len(header)}")
    return header.index(column)


def read_labeled_table(path, column: str, *, what: str = "probabilities") -> tuple[np.ndarray, list[str], np.ndarray,
                                                                                     bool]:
    """One .csv (with a header) or .parquet table holding the labels in `column` and the class probabilities in
    every other column: ``(probs [N, K], class names (those columns' names), labels [N], named)``. Labels are
    class indices 0..K-1 or the class names; `named` says which."""
    path, suffix = _table_path(path, column, what, ", or the labels as their own file (--labels)")
    if suffix == ".csv":
        rows, header = _csv_rows(path, what, named=True)
        j = _header_index(rows, header, column, path, what)
        cells = [r[j].strip() for _, r in rows]
        text_column = False
        classes = header[:j] + header[j + 1:]
        try:
            probs = _csv_numbers([(line, r[:j] + r[j + 1:]) for line, r in rows], path, what)
        except InputError as e:
            raise InputError(f"{e}; every column but {column!r} is read as a class probability "
                             f"({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}): keep only the "
                             "label and the class columns") from None
    else:
        table = _parquet_table(path, what)
        cells = _parquet_cells(table, column, path, what)
        kind = table.column(column).type
        import pyarrow.types as pat

        if pat.is_dictionary(kind):  # pandas' categorical
            kind = kind.value_type
        text_column = pat.is_string(kind) or pat.is_large_string(kind)
        classes = [n for n in table.column_names if n != column and not (n.startswith("__index_level_")
                                                                          and n.endswith("__"))]
        cols = []
        for name in classes:
            col = table.column(name).to_numpy()
            if not np.issubdtype(col.dtype, np.number):
                raise InputError(f"{what} file {path}: column {name!r} is not numeric; every column but {column!r} "
                                 "is read as a class probability: keep only the label and the class columns")
            cols.append(col)
        if not cols:
            raise InputError(f"{what} file {path} has no probability columns besides {column!r}")
        probs = np.stack(cols, axis=1)
    if probs.ndim == 1:
        probs = probs[:, None]
    check_real(probs, path, what)
    if cells and not text_column and all(_is_float(c) for c in cells):
        labels, named = resolve_numeric_labels(np.array([float(c) for c in cells]), classes,
                                               f"{what} file {path} column {column!r}")
        return probs, classes, labels, named
    _check_distinct(classes, path, what)
    index = {c.strip(): i for i, c in enumerate(classes)}
    unknown = [i for i, c in enumerate(cells) if c not in index]
    if unknown:
        raise InputError(f"{what} file {path} row {unknown[0]}: {cells[unknown[0]]!r} in column {column!r} is not one "
                         f"of the classes the other columns name ({', '.join(map(repr, classes[:8]))}"
                         f"{', ...' if len(classes) > 8 else ''})")
    return probs, classes, np.array([index[c] for c in cells], dtype=np.int64), True


def _parquet_table(path: Path, what: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"reading {path} needs pyarrow: pip install pyarrow (or give .npy / .csv)") from None
    try:
        return pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types for broken files
        raise InputError(f"{what} file {path} is not a readable parquet file ({e})") from None


def _read_parquet(path: Path, what: str) -> tuple[np.ndarray, list[str]]:
    table = _parquet_table(path, what)
    cols = []
    names = [n for n in table.column_names if not (n.startswith("__index_level_") and n.endswith("__"))]
    for name in names:  # pandas stores a non-default index as __index_level_0__: an index, not data
        col = table.column(name).to_numpy()
        if not np.issubdtype(col.dtype, np.number):
            raise InputError(f"{what} file {path}: column {name!r} is not numeric")
        cols.append(col)
    if not cols:
        raise InputError(f"{what} file {path} has no columns")
    return (cols[0] if len(cols) == 1 else np.stack(cols, axis=1)), names


_NPY_MAGIC = b"\x93NUMPY"


def _npy_holds_objects(path: Path) -> bool:
    """Whether the .npy header at `path` declares Python objects (which only unpickling can read)."""
    from numpy.lib import format as npy_format

    try:
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            return read_header(f)[2].hasobject
    except (ValueError, OSError, EOFError):
        return False


def _read_npy(path: Path, what: str) -> np.ndarray:
    """A .npy file memory-mapped, never unpickled; anything else (text, random bytes, .npz) is an InputError."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise InputError(f"{what} file {path} cannot be read ({e.strerror})") from None
    if magic != _NPY_MAGIC:
        raise InputError(f"{what} file {path} is not a valid .npy file (it does not start with the .npy header; "
                         "empty, text or another format); write it with numpy.save, or give a .csv file")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        if _npy_holds_objects(path):  # object arrays need pickle: refused
            raise InputError(f"{what} file {path} holds Python objects, which only unpickling reads; save numbers, "
                             f"or text as a string array (numpy.asarray(values, dtype=str)) ({e})") from None
        raise InputError(f"{what} file {path} is not a valid .npy file ({e}); write it again with numpy.save") from None
    if isinstance(array, np.memmap):  # numpy reads a longer file without a word: bytes inserted shift every value
        extra = path.stat().st_size - array.offset - array.nbytes
        if extra:
            raise InputError(f"{what} file {path} is {extra} byte(s) longer than its .npy header describes "
                             f"({array.dtype} {list(array.shape)}), so it is damaged; write it again with numpy.save")
    return array


def read_array(path: str | os.PathLike, *, what: str, columns: int | None = None) -> np.ndarray:
    """Read a .npy (memory-mapped), .csv or .parquet array. `columns`: 1 for a vector, None for any matrix."""
    return _read(path, what=what, columns=columns)[0]


def read_named(path: str | os.PathLike, *, what: str) -> tuple[np.ndarray, list[str] | None]:
    """`read_array` and the column names of a .csv with a header row or a .parquet (None otherwise)."""
    return _read(path, what=what)


def _read(path: str | os.PathLike, *, what: str, columns: int | None = None) -> tuple[np.ndarray, list[str] | None]:
    """`read_array`, and the column names of a .csv with a header row or a .parquet (None otherwise)."""
    path = Path(path).expanduser()
    suffix = _suffix(path, what)
    if path.is_dir():
        raise InputError(f"{what} file {path} is a folder, not a file; give the .npy, .csv or .parquet file")
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist")
    if suffix == ".npy":
        array, names = _read_npy(path, what), None
    elif suffix == ".csv":
        array, names = _read_csv(path, what)
    else:
        array, names = _read_parquet(path, what)
    if columns == 1:
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 1:
            raise InputError(f"{what} file {path} must hold one value per example, got shape {array.shape}")
    elif columns is not None and (array.ndim != 2 or array.shape[1] != columns):
        raise InputError(f"{what} file {path} must have {columns} columns, got shape {array.shape}")
    if array.ndim == 0:
        raise InputError(f"{what} file {path} holds a single number, not one row per example")
    if array.shape[0] == 0:
        raise InputError(f"{what} file {path} has no rows")
    return array, names


def check_real(array: np.ndarray, path, what: str) -> None:
    """Refuse complex numbers: scores, probabilities and features are real."""
    if np.iscomplexobj(array):
        raise InputError(f"{what} file {path} must hold real numbers, got {array.dtype}; save the real part "
                         "(numpy.real) or the magnitude (numpy.abs)")


def _by_index(table: np.ndarray, path: Path, what: str) -> np.ndarray:
    """The value column of an ``index,<value>`` table (what `data score` writes), in index order; the index must
    list every example 0..N-1 once."""
    index, values = table[:, 0], table[:, 1]
    n = len(index)
    if not (np.all(np.isfinite(index)) and np.all(index == np.round(index))):
        raise InputError(f"{what} file {path}: its index column must hold whole numbers")
    order = np.argsort(index, kind="stable")
    if not np.array_equal(index[order], np.arange(n)):
        raise InputError(f"{what} file {path}: its index column must list every example 0..{n - 1} once (one score "
                         "per example, as `prunekit data score` writes); give the whole score table, not a selection")
    return values[order]


def read_vector(path, *, what: str) -> np.ndarray:
    """One finite real number per example: a single column, or the value column of an ``index,<name>`` table
    (rows put in index order)."""
    table, names = _read(path, what=what)
    indexed = table.ndim == 2 and table.shape[1] == 2 and bool(names) and names[0].lower() == "index"
    if indexed and np.issubdtype(table.dtype, np.number):
        v = _by_index(np.asarray(table, dtype=np.float64), Path(path), what)
    else:
        v = table[:, 0] if table.ndim == 2 and table.shape[1] == 1 else table
        if v.ndim != 1:
            raise InputError(f"{what} file {path} must hold one value per example (or be an index,<score> table "
                             f"with that header), got shape {table.shape}")
    if not np.issubdtype(v.dtype, np.number):
        raise InputError(f"{what} file {path} must be numeric, got {v.dtype}")
    check_real(v, path, what)
    bad = ~np.isfinite(v) & ~np.isposinf(v)  # +inf is a legal score (never-learned examples)
    if bad.any():
        raise InputError(f"{what} file {path} has NaN or -inf at row {int(np.argmax(bad))}")
    return v


def _label_texts(path: Path, what: str) -> list[str] | None:
    """The labels as text, one per example, when the file holds words (a one-column CSV, a parquet string
    column, a .npy of strings); None when it holds numbers. A CSV's first row may be a header (decided by the
    caller, who knows the class names)."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = _read_npy(path, what)
        return [str(v).strip() for v in array.reshape(-1).tolist()] if array.dtype.kind in "US" else None
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
            import pyarrow.types as pat

            table = pq.read_table(path)
        except Exception:  # unreadable, or no pyarrow: the numeric reader says why
            return None
        names = [n for n in table.column_names if not (n.startswith("__index_level_") and n.endswith("__"))]
        kind = table.column(names[0]).type if len(names) == 1 else None
        if kind is not None and pat.is_dictionary(kind):  # pandas' categorical
            kind = kind.value_type
        if kind is None or not (pat.is_string(kind) or pat.is_large_string(kind)):  # pandas' string[pyarrow]: large
            return None
        return [("" if v is None else str(v).strip()) for v in table.column(names[0]).to_pylist()]
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f)]
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    while rows and not any(c.strip() for c in rows[-1]):
        rows.pop()
    rows = [r or [""] for r in rows]  # a blank line between names: a missing name, not a sign of numbers
    if not rows or any(len(r) != 1 for r in rows):
        return None
    cells = [r[0].strip() for r in rows]
    return cells if not any(_is_float(c) for c in cells[1:]) else None  # numbers with a gap are no names


def _label_indices(path: Path, what: str) -> np.ndarray:
    y = np.asarray(read_array(path, what=what, columns=1))
    if not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise InputError(f"{what} file {path} must hold integer class indices")
    y = y.astype(np.int64)
    if (y < 0).any():
        row = int(np.argmax(y < 0))
        raise InputError(f"{what} file {path} must hold class indices >= 0; row {row} has {int(y[row])}")
    return y


FASHION_MNIST = "fashion-mnist"  # as a labels file: the zoo copy's training labels


def read_class_labels(path, *, what: str = "labels", classes: list[str] | None = None,
                      match_names: bool = False) -> tuple[np.ndarray, bool]:
    """``(labels, named)``: integer class labels >= 0 (floats with integer values are accepted: csv stores them
    so), and whether the file held class names. With `classes` (the class names, e.g. the probabilities' column
    names), labels written as those names are mapped to their column indices; a CSV header row is recognised by
    not being a class name. `match_names` only words the error for names without `classes`."""
    if str(path) == FASHION_MNIST and not Path(path).exists():  # the labels `data score --data fashion-mnist` used
        from prunekit import zoo

        return zoo.fashion_mnist()[1].astype(np.int64), False
    path = Path(path).expanduser()
    try:
        return _label_indices(path, what), False
    except InputError:  # numbers are read once; words only when they are not numbers
        texts = _label_texts(path, what) if path.is_file() else None
        if texts is None:
            raise
    if not classes:
        fix = ("name the probabilities' columns by class (a CSV header or parquet column names) so they can be "
               "matched, or give class indices 0..K-1" if match_names else "give class indices 0..K-1 "
               "(numpy.unique(names, return_inverse=True)[1] numbers them)")
        raise InputError(f"{what} file {path} holds class names ({texts[min(1, len(texts) - 1)]!r}, ...); {fix}")
    _check_distinct(classes, path, "probabilities")
    index = {c.strip(): i for i, c in enumerate(classes)}
    if path.suffix.lower() == ".csv" and texts and texts[0] not in index:
        texts = texts[1:]  # a header: not a class
    unknown = [i for i, t in enumerate(texts) if t not in index]
    if unknown:
        raise InputError(f"{what} file {path} row {unknown[0]}: {texts[unknown[0]]!r} is not one of the classes "
                         f"the probabilities' columns name ({', '.join(map(repr, classes[:8]))}"
                         f"{', ...' if len(classes) > 8 else ''})")
    if not texts:
        raise InputError(f"{what} file {path} has no rows")
    return np.array([index[t] for t in texts], dtype=np.int64), True


def resolve_numeric_labels(values: np.ndarray, classes: list[str] | None, where: str) -> tuple[np.ndarray, bool]:
    """``(labels, named)`` for labels written as numbers, beside class columns that may be named by numbers too:
    positions 0..K-1 when they can only be positions, the named columns when every label names one and they
    cannot all be positions (``-1``, ``0.5``, ``2019``), either when both readings agree (columns ``0..K-1`` in
    order); refused when both are possible and disagree (columns ``1,2,3``, labels ``1,2``). Without column names:
    positions."""
    values = np.asarray(values, dtype=np.float64)
    k = len(classes) if classes else None
    whole = bool(np.all(np.isfinite(values)) and np.all(values == np.round(values)))
    positions = whole and bool(np.all(values >= 0)) and (k is None or bool(np.all(values < k)))
    by_value = {}
    for i, c in enumerate(classes or []):
        if _is_float(c.strip()):
            by_value.setdefault(float(c), i)
    names = bool(by_value) and all(v in by_value for v in values.tolist())
    if names and len(by_value) < sum(_is_float(c.strip()) for c in classes):
        raise InputError(f"{where}: two class columns name the same number; class names must be distinct")
    if positions and names:
        mapped = np.array([by_value[v] for v in values.tolist()], dtype=np.int64)
        if np.array_equal(mapped, values.astype(np.int64)):
            return mapped, False
        raise InputError(f"{where}: the labels are numbers that are both class positions 0..{k - 1} and names of "
                         f"class columns ({', '.join(c.strip() for c in classes[:8])}{', ...' if k > 8 else ''}), "
                         "which disagree (label 1 is the second column or the column named 1); name the columns "
                         f"0..{k - 1} in order, or by class words")
    if names:
        return np.array([by_value[v] for v in values.tolist()], dtype=np.int64), True
    if positions:
        return values.astype(np.int64), False
    not_position = (~np.isfinite(values) | (values != np.round(values)) | (values < 0)
                    | (values >= (k if k is not None else np.inf)))
    not_name = np.array([v not in by_value for v in values.tolist()], dtype=bool)
    if not (not_position & not_name).any():  # each label fits one reading, but not all the same one
        i, j = int(np.argmax(not_name)), int(np.argmax(not_position))
        raise InputError(f"{where} mixes class positions (row {i}: {values[i]:g}) with names of class columns (row "
                         f"{j}: {values[j]:g}); write every label one way")
    bad = int(np.argmax(not_position & not_name))  # the first that neither reading places (not the first name)
    shown = f"{values[bad]:g}"
    raise InputError(f"{where} row {bad}: label {shown} is neither a class index 0..{k - 1 if k else 'K-1'}"
                     + (" nor the name of a class column" if classes else "") + " (integer labels >= 0 index the "
                     "probability columns)")


def _check_distinct(classes: list[str], path, what: str) -> None:
    seen = set()
    for c in (c.strip() for c in classes):
        if c in seen:
            raise InputError(f"{what} file {path} names two class columns {c!r}; class names must be distinct to "
                             "match the labels to them")
        seen.add(c)


def _parquet_cells(table, column: str, path: Path, what: str) -> list[str]:
    """Column `column` of a parquet `table` as text (a null: ""), named once."""
    if table.column_names.count(column) > 1:
        raise InputError(f"{what} file {path} has two columns named {column!r}; rename one")
    if column not in table.column_names:
        raise InputError(f"{what} file {path} has no column {column!r} ({', '.join(table.column_names[:8])}"
                         f"{', ...' if len(table.column_names) > 8 else ''})")
    return [("" if v is None else str(v).strip()) for v in table.column(column).to_pylist()]


def read_table_columns(path, columns: list[str], *, what: str, optional: tuple = ()) -> dict[str, list[str]]:
    """The cells of `columns` (by header name) of a .csv with a header row or a .parquet, as text (a parquet null:
    ""), read once; an `optional` column the table lacks is left out."""
    path, suffix = _table_path(path, columns[0], what)
    if suffix == ".csv":
        rows, header = _csv_rows(path, what, named=True)
        wanted = [c for c in columns if c not in optional or c in header]
        return {c: [r[j].strip() for _, r in rows] for c, j in
                ((c, _header_index(rows, header, c, path, what)) for c in wanted)}
    table = _parquet_table(path, what)
    return {c: _parquet_cells(table, c, path, what) for c in columns
            if c not in optional or c in table.column_names}


def index_order(cells: list[str], path, what: str) -> np.ndarray:
    """Row positions of examples 0..N-1 in a table whose ``index`` column holds `cells` (every example once, as
    `data score` writes it)."""
    index = np.array([float(c) if _is_float(c) else np.nan for c in cells])
    return _by_index(np.column_stack([index, np.arange(len(cells))]), Path(path), what).astype(np.int64)


def label_groups(cells: list[str], where: str) -> np.ndarray:
    """Group numbers of labels written as text: whole numbers >= 0 as they are, class names numbered in sorted
    order (what class balancing needs)."""
    gap = [i for i, c in enumerate(cells) if c.lower() in _MISSING or (_is_float(c) and not np.isfinite(float(c)))]
    if gap:
        raise InputError(f"{where} row {gap[0]}: a missing or non-finite label ({cells[gap[0]]!r}); fill or drop it")
    if all(_is_float(c) for c in cells):
        values = np.array([float(c) for c in cells])
        if np.all(values == np.round(values)) and np.all(values >= 0) and np.all(values < 2**53):
            return values.astype(np.int64)
    return np.unique(np.array(cells, dtype=object).astype(str), return_inverse=True)[1].astype(np.int64)


def read_label_groups(path, n: int, *, what: str = "labels") -> tuple[np.ndarray, str | None]:
    """``(groups, header)``: class labels of `n` examples as group numbers, for what needs only which examples
    share a class (class balancing): integer classes as they are, or class names numbered in sorted order. A CSV
    of names may have a header row: with ``n + 1`` rows the first is one, returned (else None)."""
    try:
        return read_class_labels(path, what=what)[0], None
    except InputError:
        p = Path(path).expanduser()
        texts = _label_texts(p, what) if p.is_file() else None
        if texts is None:
            raise
    header = None
    if p.suffix.lower() == ".csv" and len(texts) == n + 1:
        header, texts = texts[0], texts[1:]
    if any(not t for t in texts):
        raise InputError(f"{what} file {p} row {texts.index('')}: an empty class name; fill or drop it")
    return np.unique(np.array(texts, dtype=object).astype(str), return_inverse=True)[1].astype(np.int64), header


def read_labels(path, *, what: str = "labels") -> np.ndarray:
    """Integer class labels >= 0 (floats with integer values are accepted: csv stores them so); a file of class
    names is refused with how to number them (`read_class_labels` matches names to named columns)."""
    return read_class_labels(path, what=what)[0]


def read_matrix(path, *, what: str, names: bool = False):
    """An [N, K] real matrix; a .npy file stays memory-mapped. ``names=True``: ``(matrix, column names or
    None)``, the names from a CSV header or parquet columns."""
    m, columns = _read(path, what=what)
    if m.ndim != 2:
        raise InputError(f"{what} file {path} must be a 2-D [examples, columns] array, got shape {m.shape}")
    check_real(m, path, what)
    if not names:
        return m
    return m, (list(columns) if columns and len(columns) == m.shape[1] else None)


def numbered_header(path, m: np.ndarray) -> list[str] | None:
    """The cells of the first row of the probabilities CSV `path` (read as `m` [N, K], no header found) when that
    row may be a header of numbered class names such as ``2019,2020``: distinct whole numbers, one of them above 1,
    over rows in [0, 1]; else None. A first row that could be probabilities (``0,1``) is never one. The caller
    decides by the labels' count (a row of whole-number logits above the probabilities is not a header)."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".csv" or len(m) < 2:
        return None
    first, rest = np.asarray(m[0]), np.asarray(m[1:])
    if not (np.all(first == np.round(first)) and np.any(first > 1) and len(np.unique(first)) == len(first)
            and np.all((rest >= 0) & (rest <= 1))):
        return None
    rows, _ = _csv_rows(path, "probabilities")
    return [c.strip() for c in rows[0][1]]


def check_output_file(path: str | os.PathLike, *, overwrite: bool) -> Path:
    check_output_name(path)
    path = follow_link(Path(path).expanduser())  # a link is written where it points (a loop is named)
    _suffix(path, "output")
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists; pass --overwrite (in Python: overwrite=True) to replace it")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a file; choose another output file")
    if not path.parent.exists():
        raise InputError(f"folder {path.parent} does not exist")
    check_writable(path)  # not under a file, and writable
    return path


def write_table(path: str | os.PathLike, columns: dict[str, np.ndarray], *, overwrite: bool = True) -> Path:
    """Write named equal-length columns: .csv (header row), .parquet, or .npy (the first column alone).

    Written to a temporary file in the same folder, then renamed: an interrupted write leaves nothing.
    """
    path = check_output_file(path, overwrite=overwrite)
    names = list(columns)
    arrays = [np.asarray(columns[n]) for n in names]
    fd, tmp = tempfile.mkstemp(prefix=hidden_name(path.name, "tmp"), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if path.suffix.lower() == ".npy":
                np.save(f, arrays[0], allow_pickle=False)
            elif path.suffix.lower() == ".csv":
                import io as _io

                text = _io.StringIO()
                writer = csv.writer(text, lineterminator="\n")  # quotes a class name holding a comma
                writer.writerow(names)
                for r in zip(*[a.tolist() for a in arrays]):
                    writer.writerow([repr(v) if isinstance(v, float) else v for v in r])
                f.write(text.getvalue().encode())
            else:
                try:
                    import pyarrow as pa
                    import pyarrow.parquet as pq
                except ImportError:
                    raise InputError(f"writing {path} needs pyarrow: pip install pyarrow (or write .npy / .csv)") from None
                pq.write_table(pa.table({n: a for n, a in zip(names, arrays)}), f)
        apply_umask(tmp)
        place_file(tmp, path, overwrite=overwrite)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if e.errno is None:  # numpy's short write ("1000 requested and 496 written"): the disk is full
            import errno

            raise OSError(errno.ENOSPC, f"could not write all of it ({e}); no space left on the device?",
                          str(path)) from None
        raise
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
