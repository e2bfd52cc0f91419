"""pyiqa's own command line (``pyiqa gamma -t photos/``), which never imports gamma, after installing gamma.

The wheels are built from a copy of this source tree with setuptools' own build hooks (PEP 517 / PEP 660), so the
tests check what ``pip install .`` and ``pip install -e .`` install. Their files then go into a folder that a
subprocess adds as a site directory: ``site.addsitedir`` is the function that runs ``.pth`` files at interpreter start.
The subprocess starts with ``-S`` and gets the environment's packages on ``sys.path`` without their ``.pth`` files, so
an installation of gamma in the environment itself (and its start-up hook) cannot stand in for the one under test.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import gamma
from gamma.weights import release_state_dict

pyiqa = pytest.importorskip("pyiqa")

ROOT = Path(__file__).resolve().parents[1]
PTH_NAME = "gamma-pyiqa.pth"
PTH_LINE = ("import importlib.util as _gamma_util; "
            "_gamma_util.find_spec('_gamma_pyiqa_hook') and __import__('_gamma_pyiqa_hook').install()")

pytestmark = pytest.mark.slow  # builds two wheels; the subprocesses import torch and pyiqa


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    """{'regular': wheel, 'editable': wheel} of this source tree."""
    pytest.importorskip("setuptools", minversion="64")  # the first setuptools with editable wheels (PEP 660)
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "_gamma_pyiqa_hook.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "gamma", src / "gamma", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    code = f"from setuptools import build_meta as b; b.build_wheel({str(out)!r}); b.build_editable({str(out)!r})"
    done = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    built = {"editable" if ".editable-" in w.name else "regular": w for w in out.glob("*.whl")}
    assert set(built) == {"regular", "editable"}, sorted(out.iterdir())
    return built


def _site(wheel: Path, folder: Path) -> Path:
    """Unpack a wheel into a folder, as an installer does into site-packages."""
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(folder)
    return folder


def _python(site_dir: Path, code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose only gamma is the one installed in ``site_dir``."""
    packages = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    prelude = (
        "import site, sys\n"
        f"site.addsitedir({str(site_dir)!r})  # what interpreter start does with site-packages\n"
        f"sys.path.extend({packages!r})  # the environment's packages, without running their .pth files\n"
    )
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    environ.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-S", "-c", prelude + code], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=600)


def test_a_start_up_hook_whose_module_is_gone_is_silent(wheels, tmp_path):
    """An editable install whose checkout moved: the .pth line stays, the module is gone; Python must start quietly."""
    with zipfile.ZipFile(wheels["regular"]) as zf:
        zf.extract(PTH_NAME, tmp_path / "site")
    done = _python(tmp_path / "site", "import sys; print('RegisterAfterPyiqa' in str(sys.meta_path))", tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.strip() == "False"


def test_both_installs_put_the_start_up_hook_into_site_packages(wheels):
    for kind, wheel in wheels.items():
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            assert PTH_NAME in names, (kind, names)  # top level of the wheel: site-packages
            assert zf.read(PTH_NAME).decode().strip() == PTH_LINE
            dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
            entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
            if kind == "regular":
                assert "_gamma_pyiqa_hook.py" in names
            else:  # setuptools' editable finder must map the hook module, and its .pth must run before ours
                finder = next(n for n in names if n.endswith("_finder.py"))
                assert "'_gamma_pyiqa_hook':" in zf.read(finder).decode()
                assert sorted(n for n in names if n.endswith(".pth"))[-1] == PTH_NAME
    assert re.search(r"\[pyiqa\.archs\]\s+gamma = _gamma_pyiqa_hook:register", entry_points), entry_points
    # What pyiqa does with its plugins: load and call. Harmless here, where gamma is imported and registered.
    importlib.metadata.EntryPoint("gamma", "_gamma_pyiqa_hook:register", "pyiqa.archs").load()()


@pytest.mark.parametrize("kind", ["regular", "editable"])
def test_nothing_is_imported_until_pyiqa_is(wheels, kind, tmp_path):
    site_dir = _site(wheels[kind], tmp_path / "site")
    code = (
        "import json\n"
        "heavy = ('torch', 'numpy', 'gamma', 'pyiqa')\n"
        "at_start = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "hook = '_gamma_pyiqa_hook' in sys.modules\n"
        "import pyiqa\n"
        "after_pyiqa = 'gamma' in sys.modules\n"
        "names = pyiqa.list_models(metric_mode='NR')\n"
        "metric = pyiqa.create_metric('gamma', pretrained=False, model_name='gamma_test', device='cpu')\n"
        "print(json.dumps({'at_start': at_start, 'hook': hook, 'after_pyiqa': after_pyiqa,\n"
        "                  'listed': 'gamma' in names and 'gamma_sdp' in names, 'net': type(metric.net).__module__,\n"
        "                  'gamma_file': sys.modules['gamma'].__file__}))\n"
    )
    done = _python(site_dir, code, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["hook"] and got["at_start"] == [], got  # start-up: the hook module, nothing heavy
    assert got["after_pyiqa"] is False and got["listed"], got  # pyiqa knows the names before gamma is imported
    assert got["net"] == "gamma.pyiqa_plugin", got  # creating the metric imports gamma
    installed = Path(got["gamma_file"])  # the wheel's copy (regular), or the copy it was built from (editable)
    assert site_dir in installed.parents if kind == "regular" else site_dir not in installed.parents, got
    assert ROOT not in installed.parents, got


def test_pyiqa_command_line_scores_with_gamma(wheels, tmp_path, monkeypatch):
    """``pyiqa gamma -t folder`` after an editable install (as CI installs): the mean of pyiqa's own scores."""
    from skimage import data

    home = tmp_path / "home"
    home.mkdir()
    torch.manual_seed(0)
    torch.save(release_state_dict(gamma.create_model("gamma_test")), home / "Gamma.pth")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).resize((256, 192)).save(photos / f"{name}.png")

    script = next(ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == "pyiqa")
    module, _, func = script.value.partition(":")
    site_dir = _site(wheels["editable"], tmp_path / "site")
    code = (f"sys.argv = ['pyiqa', 'gamma', '-t', {str(photos)!r}, '--device', 'cpu']\n"
            f"from {module} import {func}\n{func}()\n")
    done = _python(site_dir, code, tmp_path, GAMMA_HOME=str(home))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "not implemented" not in done.stderr
    match = re.search(r"'gamma': \{'mean': (?:np\.float64\()?([-+0-9.eE]+)", done.stdout)
    assert match, done.stdout
    monkeypatch.setenv("GAMMA_HOME", str(home))
    monkeypatch.delenv("GAMMA_WEIGHTS", raising=False)
    metric = pyiqa.create_metric("gamma", device="cpu")  # the same metric in this process
    expected = sum(float(metric(str(p))) for p in sorted(photos.iterdir())) / 3
    assert float(match.group(1)) == pytest.approx(expected, rel=1e-4, abs=1e-6)
