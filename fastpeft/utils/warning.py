"""`peft.utils.warning`: the category of PEFT's own warnings."""


class PeftWarning(UserWarning):
    """A warning about how an adapter is configured or used (PEFT's category)."""


__all__ = ["PeftWarning"]
