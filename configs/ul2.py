"""UL2 encoder-decoder (gated-silu) trained with the mixture of denoisers.

Presets: tiny (tests), small, base, 20b (32+32 layers, d_model 4096, d_ff 16384,
16 heads x 256, as published).

Denoiser rates: by default S 20%, R 40%, X 40% (t5lab.data.denoising.UL2_PAPER_RATES,
where the source is cited). `SIZE,uniform` (e.g. configs/ul2.py:small,uniform) or
--config.data.ul2_rates="" samples the seven denoisers uniformly instead, as the
paper's appendix ul2_objective does when given no rates.
"""
from t5lab.config import ConfigError, preset
from t5lab.data.denoising import UL2_PAPER_RATES

# name: (d_model, d_ff, num_heads, head_dim, num_layers)
SIZES = {
    "tiny": (64, 160, 4, 16, 2),
    "small": (512, 1536, 8, 64, 8),
    "base": (768, 2048, 12, 64, 12),
    "20b": (4096, 16384, 16, 256, 32),
}
MIXTURES = ("paper", "uniform")


def get_config(arg: str = "small"):
    size, _, mixture = arg.partition(",")
    mixture = mixture or "paper"
    if mixture not in MIXTURES:
        raise ConfigError(f"configs/ul2.py: unknown mixture {mixture!r} in {arg!r}; one of {MIXTURES}")
    c = preset(size, SIZES, "configs/ul2.py", "encoder_decoder", "silu")
    c.data.objective = "ul2"
    # "" is data.ul2_rates' uniform mixture (t5lab/config.py)
    c.data.ul2_rates = ",".join(str(r) for r in UL2_PAPER_RATES) if mixture == "paper" else ""
    if size == "tiny":
        c.data.inputs_length, c.data.targets_length = 64, 32
    else:
        c.data.inputs_length, c.data.targets_length = 512, 512
        c.train.batch_size, c.train.steps = 1024, 1_000_000
        c.optim.name, c.optim.schedule = "adafactor", "rsqrt"
        c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 10_000
        c.model.dtype, c.model.scan_layers = "bfloat16", True
    return c
