"""Optimizers for t5lab: AdamW, Adafactor (T5's settings) and SOAP, built from
the `optim` config group. Knows nothing about models: the trainer says which
parameters decay through `decay_mask`.
"""
from __future__ import annotations

import optax

from t5lab import config
from t5lab.optim import schedules
from t5lab.optim.adafactor import adafactor
from t5lab.optim.soap import optimizer_state_bytes, scale_by_soap, soap, soap_state_specs

__all__ = ["make_optimizer", "adafactor", "soap", "scale_by_soap", "schedules", "optimizer_state_bytes",
           "soap_state_specs"]


def make_optimizer(o, total_steps: int, decay_mask=None, stacked_mask=None, batch_shape=None):
    """Returns (optax.GradientTransformation, schedule) for config group `o`.

    decay_mask: pytree of bools or callable params -> pytree of bools; decoupled
      weight decay (lr_t * weight_decay * param) only where True. None decays all.
    stacked_mask: where True, a parameter's leading axis stacks independent
      layers (scanned models): SOAP gives each slice its own preconditioner,
      Adafactor its own factoring, update clipping and parameter scale, so a
      scanned model trains as its unscanned twin.
    Gradients are clipped to global norm `o.clip_norm` before anything else.
    """
    schedule = schedules.from_config(o, total_steps, batch_shape)  # (rows, tokens/row): power counts tokens
    if o.name == "adamw":
        core = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=decay_mask)
    elif o.name == "adafactor":
        # T5: factored second moment, decay_rate 0.8, update clipping 1.0,
        # relative step (parameter scale), no momentum. optax adds its decay
        # after the learning rate, so the rate is scheduled to stay decoupled.
        core = adafactor(schedule, decay_rate=0.8, clipping_threshold=1.0,
                         multiply_by_parameter_scale=True, factored=True, momentum=None,
                         weight_decay_rate=lambda step: o.weight_decay * schedule(step),
                         weight_decay_mask=decay_mask, stacked_mask=stacked_mask)
    elif o.name == "soap":
        core = soap(schedule, b1=o.b1, b2=o.b2, shampoo_beta=o.soap_shampoo_beta, eps=o.eps,
                    weight_decay=o.weight_decay, weight_decay_mask=decay_mask,
                    precondition_frequency=o.soap_precondition_frequency,
                    max_precond_dim=o.soap_max_precond_dim, merge_dims=o.soap_merge_dims,
                    precondition_1d=o.soap_precondition_1d, stacked_mask=stacked_mask)
    else:
        raise ValueError(f"optim.name: {o.name!r} is not one of {config.OPTIMIZERS}")
    if o.clip_norm < 0:
        raise ValueError(f"optim.clip_norm must be >= 0, got {o.clip_norm}")
    if o.clip_norm > 0:
        core = optax.chain(optax.clip_by_global_norm(o.clip_norm), core)
    return core, schedule
