from .eit import EIT, InputError

__all__ = ["EIT", "InputError"]
