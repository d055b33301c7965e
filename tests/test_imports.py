"""The package's public names load on first use (`prunekit._lazy`): the parser does not import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_parser_and_help_do_not_import_torch():
    out = _run("import sys, contextlib, io\n"
               "import prunekit, prunekit.cli as c\n"
               "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
               "    c.main(['--help'])\n"
               "c._parser().parse_args(['generate', 'm', '--prompt', 'x', '--kv', 'h2o'])\n"
               "print(sorted(m for m in ('torch', 'transformers', 'prunekit.registry') if m in sys.modules))")
    assert out == "[]"


def test_lazy_names_are_the_defining_modules_objects():
    import prunekit
    import prunekit.depth as depth
    import prunekit.inference.kv as kv
    from prunekit.evaluate import perplexity
    from prunekit.inference.kv.policies import POLICIES
    from prunekit.depth.tinyfusion import TinyFusionResult

    assert prunekit.perplexity is perplexity and prunekit.registry.get("wanda").name == "wanda"
    assert set(prunekit.__all__) <= set(dir(prunekit))
    assert tuple(POLICIES) == kv.POLICY_NAMES  # the help's list of policies is the table's
    assert callable(depth.tinyfusion) and not isinstance(depth.tinyfusion, type(sys))  # the function, not the module
    assert depth.TinyFusionResult is TinyFusionResult
    from prunekit.inference.memory import HashEmbedder  # the README's "pass any embedder (HashEmbedder ...)"
    from prunekit.inference.memory_embed import HashEmbedder as defined

    assert HashEmbedder is defined
    for package in ("prunekit", "prunekit.cnn", "prunekit.data", "prunekit.depth", "prunekit.structured",
                    "prunekit.inference.kv"):
        module = __import__(package, fromlist=["_"])
        for name in module.__all__:
            assert getattr(module, name) is not None, (package, name)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        prunekit.nonexistent  # noqa: B018


def test_a_later_submodule_import_keeps_the_function_of_the_same_name():
    out = _run("import prunekit.depth as d\n"
               "f = d.tinyfusion\n"
               "import importlib; m = importlib.import_module('prunekit.depth.tinyfusion')\n"
               "print(d.tinyfusion is f, callable(d.tinyfusion), m.__name__)")
    assert out == "True True prunekit.depth.tinyfusion"
    out = _run("import importlib; m = importlib.import_module('prunekit.depth.tinyfusion')\n"
               "import prunekit.depth as d\n"
               "print(d.tinyfusion is m.tinyfusion)")
    assert out == "True"


def test_modules_of_plain_subpackages_are_attributes_after_import_prunekit():
    """The eager imports made `prunekit.weights.io` reachable after a bare `import prunekit`; scripts rely on it."""
    out = _run("import prunekit\n"
               "print(prunekit.weights.io.load_model.__name__, prunekit.inference.reasoning.vote.__name__,\n"
               "      prunekit.data.methods.el2n.el2n.__name__, prunekit.weights.methods.wanda.__name__)\n"
               "print(all(n in dir(prunekit) for n in ('registry', 'depth', 'weights', 'zoo')),\n"
               "      hasattr(prunekit.depth, 'no.such'))")
    assert out.splitlines() == ["load_model vote el2n prunekit.weights.methods.wanda", "True False"]


def test_python_dash_m_prunekit_is_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "prunekit", "compare", "-"], capture_output=True, text=True)
    assert proc.returncode == 2 and "prunekit reads and writes files" in proc.stderr


def test_the_version_is_the_one_pyproject_declares():
    """prunekit.__version__ (recorded in every prunekit.json) and the package metadata are written in two places."""
    import re
    from pathlib import Path

    import prunekit

    declared = re.search(r'^version = "([^"]+)"', (Path(__file__).parents[1] / "pyproject.toml").read_text(), re.M)
    assert declared and prunekit.__version__ == declared.group(1)
