"""Installs ``gamma-pyiqa.pth`` into site-packages next to gamma, in regular and editable installs alike.

Python's ``site`` module runs the file's one line at interpreter start; it installs the hook of ``_gamma_pyiqa_hook``
(imports nothing heavy), which is what lets pyiqa's own command line, ``pyiqa gamma -t photos/``, find gamma's metrics
although it never imports gamma. Everything else about the package is declared in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "gamma-pyiqa.pth"  # sorts after setuptools' "__editable__.*.pth", whose finder the line needs when editable
# the hook is looked up first, so that a checkout moved or deleted under an editable install costs nothing at start-up
# rather than a traceback printed by every Python process
PTH_LINE = (
    "import importlib.util as _gamma_util; "
    "_gamma_util.find_spec('_gamma_pyiqa_hook') and __import__('_gamma_pyiqa_hook').install()\n"
)


class BuildPyWithHook(build_py):
    """Regular wheels: a file at the top of ``build_lib`` is installed into site-packages."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            Path(self.build_lib, PTH_NAME).write_text(PTH_LINE, encoding="utf-8")


class EditableWheelWithHook(editable_wheel):
    """Editable wheels: setuptools writes only its own ``.pth`` file and finder into them; this adds ours."""

    def _select_strategy(self, name, tag, build_lib):  # noqa: ANN001, ANN202 - setuptools' (private) signature
        return _AddHook(super()._select_strategy(name, tag, build_lib))


class _AddHook:
    """Wraps setuptools' editable strategy: whatever it writes into the wheel, plus ``gamma-pyiqa.pth``."""

    def __init__(self, strategy) -> None:  # noqa: ANN001
        self.strategy = strategy

    def __call__(self, wheel, files, mapping) -> None:  # noqa: ANN001
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH_NAME, PTH_LINE.encode("utf-8"))

    def __enter__(self) -> "_AddHook":
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.strategy.__exit__(*exc)


setup(cmdclass={"build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook})
