"""Encoder-only model with an MLM head (exports to T5EncoderModel).

Presets: tiny (tests), small, base.
"""
from t5lab.config import preset

# name: (d_model, d_ff, num_heads, head_dim, num_layers)
SIZES = {
    "tiny": (64, 160, 4, 16, 2),
    "small": (512, 1024, 6, 64, 8),
    "base": (768, 2048, 12, 64, 12),
}


def get_config(arg: str = "small"):
    c = preset(arg, SIZES, "configs/encoder.py", "encoder", "gelu_tanh")
    c.data.objective = "mlm"
    if arg == "tiny":
        c.data.inputs_length, c.data.targets_length = 64, 64
    else:
        c.data.inputs_length, c.data.targets_length = 512, 512
        c.train.batch_size, c.train.steps = 256, 100_000
    return c
