"""Decoder-only model (prefix LM with UL2, or causal LM); RoPE or relative bias.

Presets: tiny (tests), small, base. RoPE decoders export to LlamaForCausalLM.
"""
from t5lab.config import preset

# name: (d_model, d_ff, num_heads, head_dim, num_layers)
SIZES = {
    "tiny": (64, 160, 4, 16, 2),
    "small": (512, 1408, 8, 64, 8),
    "base": (768, 2048, 12, 64, 12),
}


def get_config(arg: str = "small"):
    c = preset(arg, SIZES, "configs/decoder.py", "decoder", "silu")
    c.model.position = "rope"
    c.data.objective = "ul2"
    if arg == "tiny":
        c.data.inputs_length, c.data.targets_length = 32, 64
    else:
        c.data.inputs_length, c.data.targets_length = 512, 1024
        c.train.batch_size, c.train.steps = 256, 100_000
    return c
