"""PEFT's module paths and low-level names in fastpeft: `fastpeft.tuners.*`, `fastpeft.utils`,
`install_as_peft()`, and the state-dict functions against real PEFT's on the same model."""

import sys

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import compat_alias
from fastpeft.utils import (PeftType, TaskType, get_base_model_state_dict, get_peft_model_state_dict,  # at PEFT's path
                            inject_adapter_in_model, set_base_model_state_dict, set_peft_model_state_dict)

peft = pytest.importorskip("peft")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


def _mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture
def aliased():
    compat_alias.install_as_peft()
    try:
        yield
    finally:
        compat_alias.uninstall_as_peft()


def test_install_as_peft_aliases_submodules(aliased):
    import peft as aliased_peft
    from peft.tuners.lora import LoraConfig, LoraLayer, LoraModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import PeftType as AliasedPeftType
    from peft.utils import get_peft_model_state_dict as aliased_get

    assert aliased_peft is fastpeft
    assert LoraConfig is fastpeft.LoraConfig and LoraModel is fastpeft.LoraModel
    assert issubclass(LoraLayer, BaseTunerLayer)
    assert AliasedPeftType is PeftType and aliased_get is get_peft_model_state_dict
    import peft.tuners.adalora.layer as adalora_layer  # a submodule not imported before the alias

    assert adalora_layer is sys.modules["fastpeft.tuners.adalora.layer"]


def test_uninstall_restores_real_peft(aliased):
    compat_alias.uninstall_as_peft()
    import peft as again

    assert again is not fastpeft and again.LoraConfig is peft.LoraConfig
    compat_alias.install_as_peft()  # the fixture uninstalls again


@pytest.mark.parametrize("name", ["PeftType", "TaskType"])
def test_enums_match_peft(name):
    ours, theirs = getattr(fastpeft.utils, name), getattr(peft, name)
    assert {m.name for m in theirs} <= {m.name for m in ours}
    for member in theirs:
        assert ours[member.name] == member.value == member  # str-enums: equal as strings


@pytest.mark.parametrize("config_kw", [dict(target_modules=["lin0"]), dict(target_modules=["lin0", "lin1"], use_dora=True)])
def test_state_dict_keys_match_peft(config_kw):
    ours = fastpeft.get_peft_model(_mlp(), fastpeft.LoraConfig(**config_kw))
    theirs = peft.get_peft_model(_mlp(), peft.LoraConfig(**config_kw))
    sd_ours, sd_theirs = get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert sorted(sd_ours) == sorted(sd_theirs)
    assert all(sd_ours[k].shape == sd_theirs[k].shape for k in sd_ours)


def test_state_dict_round_trip_between_libraries():
    theirs = peft.get_peft_model(_mlp(), peft.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    ours = fastpeft.get_peft_model(_mlp(), fastpeft.LoraConfig(target_modules=["lin0"]), adapter_name="other")
    result = set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs), adapter_name="other")
    assert result.unexpected_keys == []
    x = torch.randn(3, 10)
    torch.testing.assert_close(ours(x), theirs(x))


def test_inject_adapter_in_model_matches_peft():
    ours = inject_adapter_in_model(fastpeft.LoraConfig(target_modules=["lin0"]), _mlp())
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["lin0"]), _mlp())
    assert isinstance(ours, MLP) and set(ours.peft_config) == {"default"}
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    sd_theirs = peft.get_peft_model_state_dict(theirs)
    assert sorted(get_peft_model_state_dict(ours)) == sorted(sd_theirs)
    result = set_peft_model_state_dict(ours, {k: v + 1 for k, v in sd_theirs.items()})
    assert result.unexpected_keys == []
    torch.testing.assert_close(ours.lin0.lora_B["default"].weight, sd_theirs["lin0.lora_B.weight"] + 1)


def test_base_model_state_dict_matches_peft():
    ours = fastpeft.get_peft_model(_mlp(), fastpeft.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    theirs = peft.get_peft_model(_mlp(), peft.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    base_ours, base_theirs = get_base_model_state_dict(ours), peft.get_base_model_state_dict(theirs)
    assert sorted(base_ours) == sorted(base_theirs) == sorted(_mlp().state_dict())
    zeros = {k: torch.zeros_like(v) for k, v in base_ours.items()}
    set_base_model_state_dict(ours, zeros)
    assert all((v == 0).all() for v in get_base_model_state_dict(ours).values())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        set_base_model_state_dict(ours, {**zeros, "nope": torch.zeros(1)})


def test_unknown_adapter_is_a_value_error():
    model = fastpeft.get_peft_model(_mlp(), fastpeft.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="not found"):
        get_peft_model_state_dict(model, adapter_name="nope")


def test_task_type_values():
    assert TaskType.CAUSAL_LM == "CAUSAL_LM" and PeftType.LORA == "LORA"
