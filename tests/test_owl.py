"""OWL block ratios: the formula, the outlier count against a from-scratch one, and prune(profile="owl")."""

import json
import re

import pytest
import torch

import prunekit
from prunekit import cli
from prunekit.errors import InputError
from prunekit.weights import owl

from conftest import ids_from_text, tiny_model


def test_ratios_are_spread_over_two_lambda_and_average_the_target():
    ratios = owl.owl_ratios([1.0, 4.0, 2.0, 3.0], ratio=0.6, lam=0.1)
    # D' = [0, 0.2, 2/30, 4/30] (min-max to [0, 2 lambda]); density = D' - mean(D') + 0.4
    assert ratios == pytest.approx([0.7, 0.5, 0.7 - 2 / 30, 0.7 - 4 / 30])
    assert sum(ratios) / 4 == pytest.approx(0.6)
    assert owl.owl_ratios([2.0, 2.0], ratio=0.5, lam=0.1) == [0.5, 0.5]  # equal outliers: the uniform ratio
    assert owl.owl_ratios([5.0, 1.0, 3.0], ratio=0.5, lam=0.1, pruned=[True, False, True]) == pytest.approx(
        [0.4, 0.5, 0.6])  # a block with nothing to prune takes no part in the min, max or mean
    with pytest.raises(InputError, match="block 1 at a ratio of -0.0500.*lower owl_lambda"):
        owl.owl_ratios([1.0, 3.0], ratio=0.05, lam=0.1)


def _outliers_from_scratch(model, ids, m):
    """Per block: the share (%) of |W| * ||X|| over its Linears above m x their mean, from one dense forward."""
    sq, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: sq.__setitem__(name, args[0].double().square().sum((0, 1)))))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    out = []
    for i, block in enumerate(model.model.layers):
        scores = torch.cat([(mod.weight.double().abs() * sq[f"model.layers.{i}.{n}"].sqrt()).flatten()
                            for n, mod in block.named_modules() if isinstance(mod, torch.nn.Linear)])
        out.append(100.0 * int((scores > m * scores.mean()).sum()) / scores.numel())
    return out


def test_outlier_ratios_match_a_dense_forward_and_leave_the_model_alone(tok):
    model = tiny_model("llama")
    with torch.no_grad():  # plant outliers in block 1: a few large weights on its MLP input
        model.model.layers[1].mlp.up_proj.weight[:, :3] *= 40
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = ids_from_text(tok, 8, 64)
    got = owl.outlier_ratios(model, ids, m=5.0, batch_size=3, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert got == pytest.approx(_outliers_from_scratch(model, ids, 5.0), abs=0.02)  # a score at the threshold
    assert got[1] > got[0]  # the planted outliers


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "dsnot"])
def test_profile_owl_prunes_each_block_at_its_ratio_and_the_outlier_rich_block_least(method, tok):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[:, :3] *= 40
    ids = ids_from_text(tok, 8, 64)
    result = prunekit.prune(model, method=method, ratio=0.6, calibration=ids, profile="owl", owl_lambda=0.1,
                            progress=False)
    profile = result.profile
    assert profile["name"] == "owl" and (profile["m"], profile["lambda"]) == (5.0, 0.1)
    assert profile["ratios"] == pytest.approx([0.7, 0.5])  # two blocks: the target -/+ lambda
    assert profile["outlier_ratios"][1] > profile["outlier_ratios"][0]
    for layer in result.layers:
        ratio = profile["ratios"][int(layer.name.split(".")[2])]
        d_in = layer.shape[1]
        per_row = int(d_in * ratio) / d_in  # wanda and dsnot (on wanda) remove floor(d_in x ratio) per row
        expected = per_row if method in ("wanda", "dsnot") else ratio
        assert layer.sparsity == pytest.approx(expected, abs=1e-3), layer.name
    assert abs(result.total_sparsity - 0.6) < 0.01
    uniform = prunekit.prune(tiny_model("llama"), method=method, ratio=0.6, calibration=ids, progress=False)
    assert uniform.profile is None and {round(r.sparsity, 1) for r in uniform.layers} == {0.6}


def test_profile_owl_refuses_what_it_cannot_drive(tok):
    ids = ids_from_text(tok, 4, 32)
    for kwargs, message in [
        (dict(method="wanda", pattern="2:4", profile="owl"), "pattern 2:4 fixes every layer's ratio"),
        (dict(method="dpruner", ratio=0.5, profile="owl"), "drives the per-layer methods .* not dpruner"),
        (dict(method="wanda", ratio=0.5, profile="owl", owl_lambda=0.5), r"owl_lambda must be in \[0, 0.5\)"),
        (dict(method="wanda", ratio=0.5, profile="owl", owl_m=0), "owl_m must be > 0"),
        (dict(method="wanda", ratio=0.5, profile="layerwise"), "profile must be one of uniform, owl"),
        (dict(method="wanda", ratio=0.5, owl_m=3), "give profile='owl'"),
        (dict(method="magnitude", ratio=0.5, profile="owl", calibration=None), "needs calibration text"),
    ]:
        model = tiny_model("llama")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(InputError, match=message):
            prunekit.prune(model, **{"calibration": ids, **kwargs}, progress=False)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_cli_profile_owl_records_and_reports_the_block_ratios(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "owl"
    argv = ["prune", str(model_dir), "--method", "magnitude", "--ratio", "0.6", "--profile", "owl", "--owl-lambda",
            "0.05", "--calib", str(text_file), "--samples", "8", "--seqlen", "64", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    meta = json.loads((out / "prunekit.json").read_text())
    profile = meta["profile"]
    assert profile["name"] == "owl" and profile["lambda"] == 0.05 and len(profile["ratios"]) == 2
    assert sorted(profile["ratios"]) == pytest.approx([0.55, 0.65])
    for layer in meta["layers"]:
        assert layer["sparsity"] == pytest.approx(profile["ratios"][int(layer["name"].split(".")[2])], abs=1e-3)
    report = (out / "report.md").read_text()
    assert report.startswith("# prunekit: magnitude 60% unstructured (OWL block ratios)")
    assert "- block ratios: OWL (M=5, lambda=0.05)" in report
    capsys.readouterr()
    assert cli.main(["compare", str(out)]) == 0
    assert "0.6 unstructured, OWL block ratios" in capsys.readouterr().out
    assert cli.main(["methods"]) == 0
    listing = capsys.readouterr().out.split("\nsparsegpt ")[1].split("\ndsnot ")[0]
    assert "--profile owl: a ratio per block" in listing
    assert cli.main(["compare", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["profile"] == "owl"
    for extra, message in [(["--owl-m", "3"], "give --profile owl"),
                           (["--pattern", "2:4", "--profile", "owl"], "fixes every layer's ratio"),
                           (["--profile", "owl", "--owl-lambda", "0.7"], r"--owl-lambda must be in \[0, 0.5\)")]:
        argv = ["prune", str(model_dir), "--method", "wanda", *(["--ratio", "0.5"] if "--pattern" not in extra else []),
                *extra, "--out", str(tmp_path / "refused"), "--quiet"]
        assert cli.main(argv) == 2
        assert re.search(message, capsys.readouterr().err)
        assert not (tmp_path / "refused").exists()
