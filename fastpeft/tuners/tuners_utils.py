"""`peft.tuners.tuners_utils`: the base classes of every tuner and adapter layer."""

from fastpeft.inject import is_target as check_target_module_exists
from fastpeft.methods.base import AdapterLayer as BaseTunerLayer
from fastpeft.methods.base import BaseTuner

__all__ = ["BaseTuner", "BaseTunerLayer", "check_target_module_exists"]
