"""A seconds-long end-to-end check of an installed fastpeft, run by CI from a non-editable
install of a clean copy of the tree (`.ci/run`): everything a first user touches imports from
the installed package and works together."""
import torch

import fastpeft as peft


def test_lora_and_qlora_train_save_and_load(tmp_path, make_model, make_inputs, run_model):
    inputs = make_inputs("llama")
    base = peft.quantize_model(make_model("llama"), peft.NF4Config(compute_dtype=torch.float32))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    loss = run_model(model, inputs).float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    fresh = peft.quantize_model(make_model("llama"), peft.NF4Config(compute_dtype=torch.float32))
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(run_model(loaded, inputs), run_model(model.eval(), inputs))
