"""No foreign noise: importing fastpeft and running a forward of every method, QLoRA and a
mixed-adapter batch (and a greedy generate) under `-W error::FutureWarning -W error::DeprecationWarning`
raises nothing. A fresh interpreter, so no earlier import has already spent a warning."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import torch
    import fastpeft
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0)).eval()

    ids = torch.randint(1, 96, (2, 7))
    mask = torch.ones_like(ids)
    qv = ["q_proj", "v_proj"]
    configs = {
        "lora": fastpeft.LoraConfig(r=4, target_modules=qv),
        "dora": fastpeft.LoraConfig(r=4, target_modules=qv, use_dora=True),
        "adalora": fastpeft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=qv),
        "ia3": fastpeft.IA3Config(),
        "bitfit": fastpeft.BitFitConfig(biases="all", add_bias=True),
        "adapter": fastpeft.AdapterConfig(variant="houlsby", reduction_factor=4),
        "prompt_tuning": fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "prefix_tuning": fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "ptuning": fastpeft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16),
        "mam": fastpeft.MAMConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, reduction_factor=4),
        "unipelt": fastpeft.UniPELTConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, r=4, reduction_factor=4),
    }
    for name, config in configs.items():
        model = fastpeft.get_peft_model(llama(), config)
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()  # train-mode path too
        with torch.no_grad():
            model.eval()(input_ids=ids, attention_mask=mask)
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
        print(name, "ok")
    gpt = fastpeft.get_peft_model(gpt2(), fastpeft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    gpt(input_ids=ids, attention_mask=mask)
    prefix = fastpeft.get_peft_model(gpt2(), fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    prefix.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    base = fastpeft.quantize_model(llama(), fastpeft.NF4Config(blocksize=32))
    fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, target_modules=qv))(input_ids=ids, attention_mask=mask)
    mixed = fastpeft.get_peft_model(llama(), fastpeft.LoraConfig(r=4, target_modules=qv)).eval()
    mixed.add_adapter("b", fastpeft.LoraConfig(r=4, target_modules=qv))
    with torch.no_grad():
        mixed(input_ids=ids, attention_mask=mask, adapter_names=["default", "b"])
    print("all ok")
''')


def test_import_and_forwards_raise_no_future_or_deprecation_warning(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": ""}
    proc = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-W", "error::DeprecationWarning", "-c", SCRIPT],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "all ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
