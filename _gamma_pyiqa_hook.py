"""Makes gamma's metrics known to pyiqa in every Python process, at no cost until pyiqa is imported.

pyiqa looks a metric name up in its table ``pyiqa.default_model_configs.DEFAULT_CONFIGS`` before anything else
(``create_metric`` and its command line ``pyiqa gamma -t photos/`` alike), and no pyiqa plugin mechanism fills that
table: the ``pyiqa.archs`` entry points are read only later, when a network is built. So installing gamma also puts a
file ``gamma-pyiqa.pth`` into site-packages (see setup.py), whose one line Python's ``site`` module runs at start-up::

    import _gamma_pyiqa_hook; _gamma_pyiqa_hook.install()

:func:`install` adds a finder to ``sys.meta_path`` that finds nothing itself: when ``pyiqa`` is imported, it wraps
pyiqa's loader so that :func:`register` runs right after pyiqa's own import. :func:`register` adds gamma's rows to
pyiqa's metric table and names gamma's network class in pyiqa's arch registry by its import path
(``ARCH_REGISTRY.register_lazy``): gamma itself (torch, open_clip) is imported only when a gamma metric is created.
``import gamma`` calls :func:`install` too, which is what makes the metrics appear in a source checkout that was not
installed.

This module is imported at the start of every Python process of the environment, so it imports nothing but ``sys``
at the top (``logging``, ``importlib.util`` and pyiqa are imported inside the functions that run after pyiqa's import),
and its finder costs one string comparison per import.
"""

import sys

#: Name of gamma's network class in pyiqa's arch registry, and where pyiqa imports it from when a metric is built.
ARCH_NAME = "GammaMetric"
ARCH_IMPORT_PATH = "gamma.pyiqa_plugin:GammaMetric"
#: The same for PromptIQA (gamma's implementation, docs/promptiqa.md).
PROMPTIQA_ARCH_NAME = "PromptIQAMetric"
PROMPTIQA_ARCH_IMPORT_PATH = "gamma.pyiqa_plugin:PromptIQAMetric"
#: Every arch name registered: the two above and their old names (``GammaIQA``, ``GammaPromptIQA``), which configs
#: written for earlier versions name.
ARCHS = {ARCH_NAME: ARCH_IMPORT_PATH, PROMPTIQA_ARCH_NAME: PROMPTIQA_ARCH_IMPORT_PATH,
         "GammaIQA": "gamma.pyiqa_plugin:GammaIQA", "GammaPromptIQA": "gamma.pyiqa_plugin:GammaPromptIQA"}

#: Metric name -> its row in pyiqa's table (pyiqa's contract: no-reference, higher is better, scores about [0, 1]).
METRICS = {
    "gamma": {
        "metric_opts": {"type": ARCH_NAME, "weights": "gamma", "prompt_set": "naive"},
        "metric_mode": "NR",
        "lower_better": False,
        "score_range": "~0, ~1",
    },
    "gamma_sdp": {
        "metric_opts": {"type": ARCH_NAME, "weights": "gamma_sdp", "prompt_set": "sdp", "scene": "natural"},
        "metric_mode": "NR",
        "lower_better": False,
        "score_range": "~0, ~1",
    },
    # Scores on the ISP set's scale, which PromptIQA takes in [0, 1] (its head ends in a sigmoid):
    # create_metric('promptiqa', isp='isp.csv'); without isp=, the documented default ISP set (gamma.isp), logged.
    "promptiqa": {
        "metric_opts": {"type": PROMPTIQA_ARCH_NAME, "weights": "promptiqa"},
        "metric_mode": "NR",
        "lower_better": False,
        "score_range": "0, 1",
    },
}

_registered = False


def register() -> None:
    """Add gamma's metrics and network class to pyiqa. Imports pyiqa, not gamma; safe to call any number of times."""
    global _registered
    if _registered:
        return
    import logging

    from pyiqa.default_model_configs import DEFAULT_CONFIGS
    from pyiqa.utils.registry import ARCH_REGISTRY

    logger = logging.getLogger("gamma.pyiqa_plugin")
    for arch, import_path in ARCHS.items():
        if hasattr(ARCH_REGISTRY, "register_lazy"):
            ARCH_REGISTRY.register_lazy(arch, import_path, override=True)
            continue
        # a pyiqa without lazy registration: register the class itself, which imports gamma now
        import importlib

        module, _, attr = import_path.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        try:
            ARCH_REGISTRY.register(cls, override=True)
        except TypeError:  # a pyiqa without `override`
            if arch not in ARCH_REGISTRY:
                ARCH_REGISTRY.register(cls)
    for name, config in METRICS.items():
        existing = DEFAULT_CONFIGS.get(name)
        if existing is not None and existing.get("metric_opts", {}).get("type") not in ARCHS:
            logger.warning("pyiqa already defines a metric %r; leaving it as it is", name)
            continue
        DEFAULT_CONFIGS[name] = {key: (dict(value) if isinstance(value, dict) else value)
                                 for key, value in config.items()}
    _registered = True
    logger.debug("registered %s in pyiqa", ", ".join(METRICS))


def is_registered() -> bool:
    """Whether :func:`register` has run in this process."""
    return _registered


class _RegisterAfterPyiqa:
    """A ``sys.meta_path`` finder that finds nothing itself: it makes the import of ``pyiqa`` end with register()."""

    def __init__(self) -> None:
        self._busy = False

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname != "pyiqa" or self._busy:
            return None
        import importlib.util

        self._busy = True
        try:
            spec = importlib.util.find_spec("pyiqa")  # the real spec, from the finders after this one
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        exec_pyiqa = spec.loader.exec_module

        def exec_module(module: object) -> None:
            exec_pyiqa(module)
            try:
                register()
            except Exception as exc:  # noqa: BLE001 - never break pyiqa's import because of gamma
                import logging

                logging.getLogger("gamma.pyiqa_plugin").warning("could not register gamma's metrics in pyiqa: %s", exc)

        spec.loader.exec_module = exec_module  # this loader instance serves only this import of pyiqa
        return spec


def install() -> None:
    """Have :func:`register` run as soon as pyiqa is imported (at once if it already is). Idempotent."""
    module = sys.modules.get("pyiqa")
    if module is not None:
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            return  # pyiqa is importing right now: our finder (if it served this import) registers when it is done
        try:
            register()
        except Exception as exc:  # noqa: BLE001
            import logging

            logging.getLogger("gamma.pyiqa_plugin").warning("could not register gamma's metrics in pyiqa: %s", exc)
        return
    if not any(isinstance(finder, _RegisterAfterPyiqa) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPyiqa())
