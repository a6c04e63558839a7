"""Mixed-adapter batch on the CPU: fastpeft's `adapter_names=` against real peft's, same run.

The issue's CPU case: the bench's CPU Llama (fastpeft.bench.methods.load_model), `--rows` rows
over `--adapters` LoRA adapters (r=16 on every linear), a prefill of `--seq` tokens per row and a
decode step; wall clock, median of `--repeat` runs after a warm-up, one torch thread.

    python bench/bench_multi_lora.py [--rows 64 --adapters 16 --seq 16 --repeat 7] [--tiny]

`--tiny` runs the issue's CPU target model instead: the tiny Llama of `fastpeft bench --quick`.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

import fastpeft
from fastpeft.bench.methods import LLAMA_LINEARS, load_model


def _model(lib, base, adapters: int):
    def config():
        return lib.LoraConfig(r=16, lora_alpha=32, target_modules=LLAMA_LINEARS, init_lora_weights=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(copy.deepcopy(base), config())
        for i in range(1, adapters):
            model.add_adapter(f"mix{i}", config())
    return model.eval()


def _median_s(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny Llama (hidden 64) of `fastpeft bench --quick`")
    args = parser.parse_args()
    import peft

    torch.set_num_threads(1)
    base = load_model(None, "cpu", quick=args.tiny)
    names = ["default"] + [f"mix{i}" for i in range(1, args.adapters)]
    rows = [names[i % len(names)] for i in range(args.rows)]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.rows, args.seq), generator=g)
    results = {}
    for lib in (fastpeft, peft):
        model = _model(lib, base, args.adapters)  # outside inference mode: a trainable-style model
        with torch.inference_mode():
            prefill = _median_s(lambda: model(input_ids=ids, adapter_names=rows, use_cache=False), args.repeat)
            out = model(input_ids=ids, adapter_names=rows, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

            def step():
                model(input_ids=token, adapter_names=rows, past_key_values=cache, use_cache=True)
                cache.crop(-1)

            results[lib.__name__] = (prefill, _median_s(step, args.repeat))
    model_name = f"{'tiny' if args.tiny else 'bench'} Llama (hidden {base.config.hidden_size})"
    print(f"cpu, 1 thread, {model_name}: {args.rows} rows over {args.adapters} adapters (r=16, all linears), "
          f"prefill of {args.seq} tokens/row and one decode step; median of {args.repeat}")
    for phase, i in (("prefill", 0), ("decode", 1)):
        ours, theirs = results["fastpeft"][i], results["peft"][i]
        print(f"{phase:8s} fastpeft {ours * 1e3:8.2f} ms   peft {theirs * 1e3:8.2f} ms   "
              f"peft / fastpeft = {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
