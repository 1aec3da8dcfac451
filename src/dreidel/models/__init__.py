"""dreidel.models: one implementation per model family; linear layers come from the layer registry."""

from dreidel.models import whisper

__all__ = ["whisper"]
