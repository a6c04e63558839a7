"""One file per PEFT method: its config dataclass, its layer(s), its injection rule, and one
`fastpeft.registry.register` call that makes it known (peft_type -> config, tuner or encoder).
"""
