"""`peft.utils.peft_types`: the enums live in fastpeft/peft_types.py (imported by the configs)."""

from fastpeft.peft_types import PeftType, TaskType

__all__ = ["PeftType", "TaskType"]
