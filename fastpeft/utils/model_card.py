"""The model card (`README.md`) that `save_pretrained` writes beside an adapter, as PEFT does.

Its YAML front matter says `library_name: peft` (the format is PEFT's, so the hub lists the
adapter as a PEFT one) and names the base model. An existing card is kept: only the front matter
gains the keys it lacks.
"""

from __future__ import annotations

import os

CARD_NAME = "README.md"

_TEMPLATE = """---
{front}---

# Model card for an adapter of {base}

A parameter-efficient fine-tuning adapter ({peft_type}) for the base model `{base}`, in PEFT's
format: `adapter_config.json` holds the configuration and `adapter_model.safetensors` the adapter
weights. It loads with PEFT (`PeftModel.from_pretrained(base_model, path)`) or with fastpeft, its
Triton-kernel drop-in (`import fastpeft as peft`).

## Model details

- **Adapter type:** {peft_type}
- **Base model:** {base}
- **Library:** PEFT format, written by fastpeft

## Uses

Load the base model, then the adapter on top of it; merge it into the weights for deployment
(`merge_and_unload()`), or keep it separate to switch between several adapters at run time.

## How to use

```python
from transformers import AutoModel
from peft import PeftModel  # or: import fastpeft as peft

base = AutoModel.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "path/to/this/adapter")
```

## Training details

Fill in the data, the hyperparameters and the compute used to train this adapter.

## Evaluation

Fill in how the adapter was evaluated and its results.

## Limitations

An adapter inherits the biases and limitations of its base model; describe any of its own.
"""


def _front(base: str | None) -> dict[str, str]:
    out = {"library_name": "peft"}
    if base:
        out["base_model"] = base
    return out


def write_model_card(directory: str | os.PathLike, base_model: str | None, peft_type: str) -> None:
    """Create `directory/README.md`, or add the missing front-matter keys to an existing one."""
    path = os.path.join(directory, CARD_NAME)
    wanted = _front(base_model)
    if not os.path.isfile(path):
        front = "".join(f"{k}: {v}\n" for k, v in wanted.items())
        text = _TEMPLATE.format(front=front, base=base_model or "(unknown)", peft_type=peft_type)
    else:
        with open(path) as f:
            text = f.read()
        if text.startswith("---\n") and "\n---" in text[3:]:
            end = text.index("\n---", 3) + 1
            head, rest = text[4:end], text[end:]
        else:
            head, rest = "", "---\n" + text
        present = {line.split(":", 1)[0].strip() for line in head.splitlines() if ":" in line}
        head += "".join(f"{k}: {v}\n" for k, v in wanted.items() if k not in present)
        text = "---\n" + head + rest
    with open(path, "w") as f:
        f.write(text)
