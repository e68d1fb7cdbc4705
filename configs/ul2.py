"""UL2 encoder-decoder (gated-silu) trained with the mixture of denoisers.

Presets: tiny (tests), small, base, 20b (32+32 layers, d_model 4096, d_ff 16384,
16 heads x 256, as published).
"""
from t5lab.config import preset

# name: (d_model, d_ff, num_heads, head_dim, num_layers)
SIZES = {
    "tiny": (64, 160, 4, 16, 2),
    "small": (512, 1536, 8, 64, 8),
    "base": (768, 2048, 12, 64, 12),
    "20b": (4096, 16384, 16, 256, 32),
}


def get_config(arg: str = "small"):
    c = preset(arg, SIZES, "configs/ul2.py", "encoder_decoder", "silu")
    c.data.objective = "ul2"
    if arg == "tiny":
        c.data.inputs_length, c.data.targets_length = 64, 32
    else:
        c.data.inputs_length, c.data.targets_length = 512, 512
        c.train.batch_size, c.train.steps = 1024, 1_000_000
        c.optim.name, c.optim.schedule = "adafactor", "rsqrt"
        c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 10_000
        c.model.dtype, c.model.scan_layers = "bfloat16", True
    return c
