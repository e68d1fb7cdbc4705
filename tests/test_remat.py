"""Every remat policy saves what its name says, scanned and unscanned: counted
with jax.ad_checkpoint.print_saved_residuals on a tiny encoder-decoder whose
dims tell the residuals apart (d_ff 90, heads x head_dim 3 x 6, lengths 12
and 8). The counts are of layer instances: a scanned residual [L, ...] counts L."""
import re

import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import print_saved_residuals

from t5lab import models
from test_models import init, make_config

LAYERS = 2          # per stack: 2 encoder + 2 decoder layers
ATTENTIONS = 6      # 2 encoder self, 2 decoder self, 2 decoder cross
# (mlp wi_0/wi_1 outputs, q/k/v projections, attention logits, weights @ v)
EXPECTED = {
    "full": (0, 0, 0, 0),
    "minimal": (0, 0, 0, 0),
    "dots": (2 * 2 * LAYERS, 3 * ATTENTIONS, ATTENTIONS, ATTENTIONS),
    "dots_no_batch": (2 * 2 * LAYERS, 3 * ATTENTIONS, 0, 0),   # no batched einsums
}


def _counts(text: str, scanned: bool):
    mlp = qkv = logits = values = named = 0
    for line in text.splitlines():
        m = re.match(r"\s*\w+\[([\d,]*)\] (.*)", line)
        if not m or "from the argument" in m.group(2):
            continue
        if "RelativePositionBias" in m.group(2):
            continue  # the stack's bias [1, H, Q, K], outside the layers
        shape = tuple(int(d) for d in m.group(1).split(",") if d)
        if scanned and "output of scan" in m.group(2):
            n, shape = shape[0], shape[1:]   # a stacked residual: one per layer
        else:
            n = 1
        named += n * ("named 'attention_out'" in m.group(2))
        if shape[-1] == 90:
            mlp += n
        elif shape[-2:] == (3, 6):
            qkv += n
        elif len(shape) == 4 and shape[1] == 3 and shape[2] in (12, 8):
            logits += n
        elif len(shape) == 4 and shape[1:3] == (3, 6):   # dot_general's [B, H, D, Q] layout
            values += n
    return (mlp, qkv, logits, values), named


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("policy", sorted(EXPECTED))
def test_remat_policy_saves_what_its_name_says(policy, scan, capsys):
    config = make_config(arch="encoder_decoder", head_dim=6, d_ff=90, remat_policy=policy, scan_layers=scan,
                         num_layers=LAYERS)
    model, _, params = init(config)
    batch = models.dummy_batch(config, 2)
    capsys.readouterr()
    print_saved_residuals(lambda p: jnp.mean(model.apply({"params": p}, batch) ** 2), params)
    counts, named = _counts(capsys.readouterr().out, scan)
    assert counts == EXPECTED[policy]
    if policy == "minimal" and not scan:
        assert named == ATTENTIONS   # the tagged outputs are what it keeps


def test_without_remat_the_layers_keep_their_activations(capsys):
    """The baseline the policies cut down: no remat saves inside the layers."""
    config = make_config(arch="encoder_decoder", head_dim=6, d_ff=90, num_layers=LAYERS)
    model, _, params = init(config)
    batch = models.dummy_batch(config, 2)
    capsys.readouterr()
    print_saved_residuals(lambda p: jnp.mean(model.apply({"params": p}, batch) ** 2), params)
    text = capsys.readouterr().out
    assert len([l for l in text.splitlines() if "from the argument" not in l]) > 60
