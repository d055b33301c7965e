"""prune --eval's dense perplexity, reused across runs only when the model files, text and windows are the same."""

import json
import time

import pytest

import prunekit
from prunekit import cli, evalcache

from conftest import tiny_model
from test_cli import prune_args

EVAL = ("--eval-tokens", "128", "--eval-seqlen", "64")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "evalcache"
    monkeypatch.setenv("PRUNEKIT_EVAL_CACHE", str(folder))
    return folder


@pytest.fixture
def scored(monkeypatch):
    """The `desc` of every perplexity the CLI computes."""
    calls, real = [], prunekit.perplexity

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(prunekit, "perplexity", counting)
    return calls


def _evaluation(out, text_file):
    return json.loads((out / "prunekit.json").read_text())["evaluation"][str(text_file)]


@pytest.mark.parametrize("method, extra", [("magnitude", ("--ratio", "0.5")),
                                           ("uniform-structured", ("--ratio", "0.25", "--no-speed")),
                                           ("shortgpt", ("--layers", "1", "--no-speed"))])
def test_a_second_run_reuses_the_dense_perplexity(method, extra, model_dir, text_file, tmp_path, cache, scored,
                                                  capsys):
    # a sweep scored the same dense model on the same windows in every run (35 s per text for SmolLM2 on 2 cores)
    first, second = tmp_path / "a", tmp_path / "b"
    assert cli.main(prune_args(model_dir, text_file, first, "--method", method, *extra, "--eval", str(text_file),
                               *EVAL)) == 0
    assert scored == [f"perplexity {text_file} dense", f"perplexity {text_file} pruned"]
    assert "reused" not in capsys.readouterr().err
    assert len(list(cache.glob("*.json"))) == 1
    scored.clear()
    assert cli.main(prune_args(model_dir, text_file, second, "--method", method, *extra, "--eval", str(text_file),
                               *EVAL)) == 0
    assert scored == [f"perplexity {text_file} pruned"]  # the dense model was not scored again
    assert f"reused the dense perplexity an earlier run measured on the same model files and windows: {text_file} " \
           "(scored 20" in capsys.readouterr().err
    dense1, dense2 = _evaluation(first, text_file)["dense"], _evaluation(second, text_file)["dense"]
    assert "cached" not in dense1 and dense2.pop("cached").startswith("20")
    assert dense2 == dense1
    # asked not to: scored again, the same figure
    scored.clear()
    assert cli.main(prune_args(model_dir, text_file, tmp_path / "c", "--method", method, *extra, "--eval",
                               str(text_file), *EVAL, "--no-dense-cache")) == 0
    assert scored == [f"perplexity {text_file} dense", f"perplexity {text_file} pruned"]
    assert _evaluation(tmp_path / "c", text_file)["dense"] == dense1


def test_changed_weights_or_windows_are_scored_again(model_dir, text_file, tmp_path, cache, scored):
    def run(out, *extra):
        scored.clear()
        assert cli.main(prune_args(model_dir, text_file, tmp_path / out, "--method", "magnitude", "--ratio", "0.5",
                                   "--eval", str(text_file), *extra)) == 0
        return _evaluation(tmp_path / out, text_file)["dense"]

    first = run("a", *EVAL)
    assert run("b", "--eval-tokens", "192", "--eval-seqlen", "64")["tokens"] == 192  # more tokens
    assert scored[0].endswith(" dense")
    assert run("c", "--eval-tokens", "128", "--eval-seqlen", "32")["seqlen"] == 32  # other windows
    assert scored[0].endswith(" dense")
    text_file.write_text(text_file.read_text()[::-1])  # the same file name, another text
    assert run("d", *EVAL)["text"]["sha256"] != first["text"]["sha256"]
    assert scored[0].endswith(" dense")
    tiny_model("llama", seed=1).save_pretrained(model_dir)  # other weights in the same folder
    text_file.write_text(text_file.read_text()[::-1])
    changed = run("e", *EVAL)
    assert scored[0].endswith(" dense") and "cached" not in changed and changed["ppl"] != first["ppl"]
    assert "cached" in run("f", *EVAL)  # and that is now what is reused


def test_a_damaged_or_unwritable_cache_is_passed_over(model_dir, text_file, tmp_path, cache, scored, monkeypatch):
    args = ("--method", "magnitude", "--ratio", "0.5", "--eval", str(text_file), *EVAL)
    assert cli.main(prune_args(model_dir, text_file, tmp_path / "a", *args)) == 0
    first = _evaluation(tmp_path / "a", text_file)["dense"]
    for damaged in ("{not json", json.dumps({"key": "other", "dense": first}), "[]",
                    json.dumps({"key": None, "dense": dict(first, ppl="high")})):
        entry, = cache.glob("*.json")
        if '"key": null' in damaged:  # the right key, a bad figure
            damaged = json.dumps({"key": json.loads(entry.read_text())["key"], "dense": dict(first, ppl="high")})
        entry.write_text(damaged)
        scored.clear()
        assert cli.main(prune_args(model_dir, text_file, tmp_path / "a", *args, "--overwrite")) == 0
        assert scored[0].endswith(" dense") and _evaluation(tmp_path / "a", text_file)["dense"] == first
    # a file where the cache folder should be: the run goes on, scoring the dense model
    blocked = tmp_path / "blocked"
    blocked.write_text("")
    monkeypatch.setenv("PRUNEKIT_EVAL_CACHE", str(blocked / "eval"))
    for out in ("b", "c"):
        scored.clear()
        assert cli.main(prune_args(model_dir, text_file, tmp_path / out, *args)) == 0
        assert scored[0].endswith(" dense")
    assert blocked.read_text() == ""


def test_the_cache_can_be_turned_off(model_dir, text_file, tmp_path, monkeypatch, scored, capsys):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PRUNEKIT_EVAL_CACHE", "off")
    for out in ("a", "b"):
        scored.clear()
        assert cli.main(prune_args(model_dir, text_file, tmp_path / out, "--method", "magnitude", "--ratio", "0.5",
                                   "--eval", str(text_file), *EVAL)) == 0
        assert scored[0].endswith(" dense")
    assert not (tmp_path / "cache").exists()
    monkeypatch.delenv("PRUNEKIT_EVAL_CACHE")
    assert evalcache.cache_folder() == tmp_path / "cache" / "eval"  # the default: beside the assets
    # the flag is for --eval
    assert cli.main(prune_args(model_dir, text_file, tmp_path / "d", "--method", "magnitude", "--ratio", "0.5",
                               "--no-dense-cache")) == 2
    assert "--no-dense-cache re-scores the dense model on the --eval texts" in capsys.readouterr().err


def test_only_the_most_recently_used_entries_are_kept(cache, monkeypatch, text_file):
    import os

    from prunekit.text import load_text

    monkeypatch.setattr(evalcache, "KEEP", 2)
    text = load_text(str(text_file), purpose="evaluation")
    dense = {"ppl": 2.0, "nll": 0.69, "tokens": 64, "seqlen": 64, "windows": 1, "text": text.describe()}
    files = evalcache.folder_files(text_file.parent)
    keys = [evalcache.key_for(text_file.parent, text, files=files, seqlen=64, tokens=n, fit=False, batch_size=4)
            for n in (64, 128, 192)]
    evalcache.store(keys[0], dense)
    evalcache.store(keys[1], dense)
    for i, path in enumerate(sorted(cache.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)):
        os.utime(path, ns=(10**18 + i, 10**18 + i))  # distinct times: the second written is the newer
    assert evalcache.lookup(keys[0])["dense"] == dense  # a use makes the first the most recent
    evalcache.store(keys[2], dense)
    assert evalcache.lookup(keys[1]) is None and evalcache.lookup(keys[0]) is not None
    assert evalcache.lookup(keys[2]) is not None and len(list(cache.glob("*.json"))) == 2
    # files of other names in the folder are not the cache's: a user's own .json files in a folder given as
    # PRUNEKIT_EVAL_CACHE were deleted down to the newest 500
    mine = [cache / f"run{i}.json" for i in range(3)]
    for path in mine:
        path.write_text("{}")
    stale = cache / ".prunekit-eval-tmp-x.json"  # a killed write's, two hours old
    stale.write_text("")
    os.utime(stale, ns=(time.time_ns() - 7200 * 10**9,) * 2)
    evalcache.store(keys[0], dense)
    assert all(path.read_text() == "{}" for path in mine) and not stale.exists()
    assert len([p for p in cache.iterdir() if p.name not in {m.name for m in mine}]) == 2
    # an entry is as readable as any file the user writes (mkstemp made it owner-only)
    from prunekit.errors import _umask

    assert all(p.stat().st_mode & 0o777 == 0o666 & ~_umask() for p in cache.glob("*.json") if p not in mine)


def test_a_folder_replaced_after_loading_is_not_filed_under_the_new_files(model_dir, text_file, tmp_path, cache,
                                                                          scored, monkeypatch):
    # the key was read from the folder when the dense model was scored: a folder replaced after the load filed the
    # old model's figure under the new files, and the next run reused it for the new model
    args = ("--method", "magnitude", "--ratio", "0.5", "--eval", str(text_file), *EVAL)
    assert cli.main(prune_args(model_dir, text_file, tmp_path / "a", *args)) == 0
    first = _evaluation(tmp_path / "a", text_file)["dense"]
    real_load = prunekit.load_model

    def load_then_replace(*a, **k):
        loaded = real_load(*a, **k)
        tiny_model("llama", seed=1).save_pretrained(model_dir)  # another model saved into the folder meanwhile
        return loaded

    monkeypatch.setattr(prunekit, "load_model", load_then_replace)
    scored.clear()
    assert cli.main(prune_args(model_dir, text_file, tmp_path / "b", *args)) == 0
    assert scored[0].endswith(" dense") and _evaluation(tmp_path / "b", text_file)["dense"] == first  # as loaded
    monkeypatch.setattr(prunekit, "load_model", real_load)
    scored.clear()
    assert cli.main(prune_args(model_dir, text_file, tmp_path / "c", *args)) == 0
    third = _evaluation(tmp_path / "c", text_file)["dense"]
    assert scored[0].endswith(" dense") and third["ppl"] != first["ppl"] and "cached" not in third


def test_a_copy_with_the_same_names_sizes_and_times_is_not_the_same_model(model_dir, text_file, tmp_path, cache,
                                                                        scored):
    # a model copied in with its files' sizes and modification times (cp -p, tar, rsync -t) reused the old figure
    import os
    import shutil

    args = ("--method", "magnitude", "--ratio", "0.5", "--eval", str(text_file), *EVAL)
    assert cli.main(prune_args(model_dir, text_file, tmp_path / "a", *args)) == 0
    first = _evaluation(tmp_path / "a", text_file)["dense"]
    other = tmp_path / "other"
    tiny_model("llama", seed=1).save_pretrained(other)
    for path in model_dir.iterdir():
        if (other / path.name).is_file():
            assert (other / path.name).stat().st_size == path.stat().st_size
            stat = path.stat()
            os.utime(other / path.name, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            shutil.copy2(other / path.name, path)
            assert path.stat().st_mtime_ns == stat.st_mtime_ns
    scored.clear()
    assert cli.main(prune_args(model_dir, text_file, tmp_path / "b", *args)) == 0
    assert scored[0].endswith(" dense") and _evaluation(tmp_path / "b", text_file)["dense"]["ppl"] != first["ppl"]


def test_an_odd_entry_or_no_home_folder_is_passed_over(model_dir, text_file, tmp_path, cache, scored, monkeypatch):
    import os

    args = ("--method", "magnitude", "--ratio", "0.5", "--eval", str(text_file), *EVAL)
    assert cli.main(prune_args(model_dir, text_file, tmp_path / "a", *args)) == 0
    first = _evaluation(tmp_path / "a", text_file)["dense"]
    entry, = cache.glob("*.json")
    key = json.loads(entry.read_text())["key"]
    for damaged in ("[" * 100000 + "]" * 100000,  # a RecursionError traceback
                    json.dumps({"key": key, "dense": first}),  # no time it was computed: "(scored None)"
                    None):  # a pipe where the entry was: the run waited for a writer
        entry.unlink()
        if damaged is None:
            os.mkfifo(entry)
        else:
            entry.write_text(damaged)
        scored.clear()
        assert cli.main(prune_args(model_dir, text_file, tmp_path / "a", *args, "--overwrite")) == 0
        assert scored[0].endswith(" dense") and _evaluation(tmp_path / "a", text_file)["dense"] == first
    # no home folder for the default cache (a container's user without a passwd entry): scored, not a traceback
    from prunekit import zoo

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("PRUNEKIT_EVAL_CACHE")
    monkeypatch.setattr(zoo, "cache_dir", no_home)
    scored.clear()
    assert cli.main(prune_args(model_dir, text_file, tmp_path / "b", *args)) == 0
    assert scored[0].endswith(" dense")
