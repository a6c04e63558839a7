"""One file per PEFT method: its config dataclass, its layer(s) and its injection rule."""
