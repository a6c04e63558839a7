"""P-Tuning (v1) against real `peft`: MLP and LSTM encoders, checkpoints (the encoder's output), generate, training."""

import pytest
import torch

import fastpeft

peft = pytest.importorskip("peft")

ENCODERS = {"MLP": dict(encoder_hidden_size=10), "LSTM": dict(encoder_hidden_size=6, encoder_num_layers=2)}
CASES = [(arch, enc) for arch in ("llama", "gpt2", "bert") for enc in ENCODERS]


def config(encoder):
    return dict(encoder_reparameterization_type=encoder, **ENCODERS[encoder])


@pytest.mark.parametrize(("arch", "encoder"), CASES)
def test_same_parameters_as_peft(arch, encoder, pl_twins):
    ours, theirs = pl_twins(arch, "PromptEncoderConfig", **config(encoder))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize(("arch", "encoder"), CASES)
def test_checkpoints_save_the_encoder_output(arch, encoder, pl_twins, pl_check_checkpoints, tmp_path):
    ours, theirs = pl_twins(arch, "PromptEncoderConfig", **config(encoder))
    loaded = pl_check_checkpoints(ours, theirs, arch, tmp_path)
    with torch.no_grad():
        output = ours.prompt_encoder["default"](torch.arange(3)[None])[0]
    torch.testing.assert_close(loaded.prompt_encoder["default"].embedding.weight, output)
    assert [n for n, _ in loaded.prompt_encoder.named_parameters()] == ["default.embedding.weight"]


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_generate_matches_greedy_peft_forward(encoder, pl_twins, pl_check_generate):
    ours, theirs = pl_twins("llama", "PromptEncoderConfig", **config(encoder))
    pl_check_generate(ours, theirs, "llama")


@pytest.mark.parametrize(("arch", "encoder"), [("gpt2", "MLP"), ("bert", "LSTM")])
def test_training_step_matches_peft_and_touches_only_the_encoder(arch, encoder, pl_twins, pl_check_training_step):
    ours, theirs = pl_twins(arch, "PromptEncoderConfig", **config(encoder))
    pl_check_training_step(ours, theirs, arch)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="encoder_reparameterization_type must be 'MLP' or 'LSTM', got 'GRU'"):
        fastpeft.PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError, match="encoder_dropout must be in \\[0, 1\\), got 1.5"):
        fastpeft.PromptEncoderConfig(num_virtual_tokens=2, encoder_dropout=1.5)
