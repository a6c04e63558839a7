"""Mixed-adapter batches from several threads on ONE model (issue 18 item 13): each call's batch
metadata and banks belong to the call, so concurrent batches are bit-identical to the same
batches run one by one."""

import threading
import warnings

import pytest
import torch

import fastpeft
from fastpeft import batching

ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "b": dict(r=1, lora_alpha=3, target_modules=["q_proj", "v_proj"]),
    "c": dict(r=8, lora_alpha=8, target_modules=["q_proj", "o_proj"]),
    "d": dict(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"]),
}
CHOICES = [*ADAPTERS, "__base__"]


def make_peft(make_model):
    torch.manual_seed(0)
    model = None
    for name, kwargs in ADAPTERS.items():
        config = fastpeft.LoraConfig(init_lora_weights=False, **kwargs)
        if model is None:
            model = fastpeft.get_peft_model(make_model("llama"), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    for n, p in model.named_parameters():  # non-zero B everywhere
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def batches(count, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        rows, seq = 2 + i % 4, 1 + (5 * i) % 9  # prefill and decode shapes, both CPU paths
        names = [CHOICES[int(j)] for j in torch.randint(0, len(CHOICES), (rows,), generator=g)]
        out.append((torch.randint(1, 96, (rows, seq), generator=g), names))
    return out


def forward(model, ids, names):
    with torch.no_grad():
        return model(input_ids=ids, adapter_names=names).logits


def test_concurrent_mixed_batches_equal_sequential(make_model):
    model = make_peft(make_model)
    work = batches(24)
    want = [forward(model, ids, names) for ids, names in work]
    got: list = [None] * len(work)
    errors: list = []
    start = threading.Barrier(4)

    def worker(k):
        try:
            start.wait()
            for _ in range(2):  # every batch twice: more overlap between threads
                for i in range(k, len(work), 4):
                    got[i] = forward(model, *work[i])
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    torch_threads = torch.get_num_threads()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.set_num_threads(torch_threads)
    assert not errors, errors
    wrong = [i for i in range(len(work)) if not torch.equal(got[i], want[i])]
    assert not wrong, f"{len(wrong)} of {len(work)} concurrent batches differ from sequential"
    assert all(layer.mixed_batch is None for _, layer in model.base_model.adapter_layers())


def test_binding_is_per_thread(make_model):
    """Inside one thread's mixed call, another thread sees no batch on the same layers."""
    model = make_peft(make_model)
    layer = next(layer for _, layer in model.base_model.adapter_layers())
    seen = {}
    with fastpeft.multi.mixed_batch(model, ["a", "b"]) as batch:
        seen["here"] = layer.mixed_batch
        t = threading.Thread(target=lambda: seen.__setitem__("other", batching.batch_for(layer)))
        t.start()
        t.join()
    assert seen["here"] is batch and seen["other"] is None and layer.mixed_batch is None


def test_adapter_added_during_a_call_leaves_it_unchanged(make_model):
    """A bank rebuilt or grown by another call (here: a new adapter synced mid-forward) does not
    change the banks an in-flight call reads."""
    model = make_peft(make_model)
    ids, names = torch.randint(1, 96, (3, 4)), ["a", "c", "__base__"]
    want = forward(model, ids, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fastpeft.multi.mixed_batch(model, names):
            for i in range(40):  # grows every bank several times over
                model.add_adapter(f"n{i}", fastpeft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
                with fastpeft.multi.mixed_batch(model, [f"n{i}"]):
                    pass
            got = model.base_model(input_ids=ids).logits
    assert torch.equal(got, want)


def test_add_adapter_touches_only_its_own_parameters(make_model, monkeypatch):
    """Flat registration (issue 24): adding an inactive adapter does not revisit the parameters of
    those already registered (no per-add pass over the whole model), and trainability is as a
    full set_adapter would leave it."""
    model = make_peft(make_model)
    model.base_model.set_adapter("a")
    visits = []
    real = torch.Tensor.requires_grad_

    def counting(self, flag=True):
        visits.append(self)
        return real(self, flag)

    monkeypatch.setattr(torch.Tensor, "requires_grad_", counting)
    model.add_adapter("new", fastpeft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    monkeypatch.undo()
    new = {id(p) for n, p in model.named_parameters() if ".new." in n}
    assert len(visits) == len(new) and {id(p) for p in visits} == new
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.base_model.set_adapter("a")
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
