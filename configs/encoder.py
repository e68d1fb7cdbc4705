"""Encoder-only model with an MLM head (exports to T5EncoderModel).

Presets: tiny (tests), small, base.
"""
from t5lab.config import schema

# name: (d_model, d_ff, num_heads, head_dim, num_layers)
SIZES = {
    "tiny": (64, 160, 4, 16, 2),
    "small": (512, 1024, 6, 64, 8),
    "base": (768, 2048, 12, 64, 12),
}


def get_config(arg: str = "small"):
    if arg not in SIZES:
        raise ValueError(f"configs/encoder.py: unknown preset {arg!r}; one of {sorted(SIZES)}")
    c = schema()
    m = c.model
    m.arch = "encoder"
    m.d_model, m.d_ff, m.num_heads, m.head_dim, m.num_layers = SIZES[arg]
    m.activation, m.gated_mlp = "gelu_tanh", True
    m.vocab_size = 512 if arg == "tiny" else 32128
    c.data.objective = "mlm"
    if arg == "tiny":
        c.data.inputs_length, c.data.targets_length = 64, 64
        c.train.batch_size, c.train.steps = 8, 20
        c.optim.warmup_steps = 5
    else:
        c.data.inputs_length, c.data.targets_length = 512, 512
        c.train.batch_size, c.train.steps = 256, 100_000
    return c
