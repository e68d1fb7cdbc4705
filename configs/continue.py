"""Continued pretraining of an existing T5 v1.1 on a new language or domain.

    t5lab train --config configs/continue.py:base --workdir runs/cpt \
        --config.init.from_hf=/models/t5-v1_1-base \
        --config.data.mixture="text:/data/new/*.txt=0.95,text:/data/c4-sample/*.txt=0.05" \
        --config.data.mixture_schedule="0.85=1,0"

The recipe (issue 19; the sources the README's continued-pretraining section cites):
- Re-warm: the rate ramps linearly from 0 to the peak over the first 1% of
  steps, then follows a cosine to 10% of the peak (Gupta et al. 2023,
  "Continual Pre-Training of Large Language Models: How to (re)warm your
  model?": re-warming is needed and its length matters little; the peak
  trades adaptation against forgetting).
- Replay: a share of the source corpus in the mixture (5% here, the second
  item; Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually
  Pre-train Large Language Models": a few percent of replay removes most of
  the forgetting).
- End-of-training upsampling: `data.mixture_schedule` changes the weights for
  the last part of the run (Blakeney et al. 2024, "Does your data spark joy?":
  upsampling the target domain over the last 10-20%), exactly under resume.

Presets are T5 v1.1's sizes (configs/t5_1_1.py); the model keys must match the
checkpoint's (init.from_hf checks them).
"""
import importlib.util
import os


def _t5_1_1():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "t5_1_1.py")
    spec = importlib.util.spec_from_file_location("t5lab_config_t5_1_1", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config(arg: str = "base"):
    c = _t5_1_1().get_config(arg)
    c.data.source = "mixture"      # the new data first, the replayed source corpus second
    c.data.objective = "span_corruption"
    if arg != "tiny":
        c.train.steps = 20_000
        c.optim.name, c.optim.schedule = "adafactor", "cosine"
        c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = max(1, c.train.steps // 100)
    c.optim.end_lr_fraction = 0.1
    return c
