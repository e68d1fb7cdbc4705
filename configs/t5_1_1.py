"""T5 v1.1 encoder-decoder (gated-gelu, untied head, relative bias per stack).

Presets: tiny (tests), small, base, large, xl, xxl (the published sizes).
    t5lab train --config configs/t5_1_1.py:small --workdir runs/small
"""
from t5lab.config import preset

# name: (d_model, d_ff, num_heads, head_dim, num_layers)
SIZES = {
    "tiny": (64, 160, 4, 16, 2),
    "small": (512, 1024, 6, 64, 8),
    "base": (768, 2048, 12, 64, 12),
    "large": (1024, 2816, 16, 64, 24),
    "xl": (2048, 5120, 32, 64, 24),
    "xxl": (4096, 10240, 64, 64, 24),
}


def get_config(arg: str = "small"):
    c = preset(arg, SIZES, "configs/t5_1_1.py", "encoder_decoder", "gelu_tanh")
    c.data.objective = "span_corruption"
    if arg == "tiny":
        c.data.inputs_length, c.data.targets_length = 64, 32
    else:  # T5's pretraining recipe
        c.data.inputs_length, c.data.targets_length = 512, 114
        c.train.batch_size, c.train.steps = 256, 100_000
        c.optim.name, c.optim.schedule = "adafactor", "rsqrt"
        c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 10_000
    return c
