"""Config schema: presets load, overrides parse by type, bad keys are named."""
import pytest

from t5lab import config as config_lib
from t5lab.config import ConfigError

PRESETS = {
    "configs/t5_1_1.py": {"small": (512, 1024, 6, 64, 8), "base": (768, 2048, 12, 64, 12),
                          "large": (1024, 2816, 16, 64, 24), "xl": (2048, 5120, 32, 64, 24),
                          "xxl": (4096, 10240, 64, 64, 24)},
    "configs/ul2.py": {"20b": (4096, 16384, 16, 256, 32)},
}


@pytest.mark.parametrize("path,preset", [(p, n) for p, d in PRESETS.items() for n in d])
def test_published_sizes(path, preset):
    m = config_lib.load(f"{path}:{preset}").model
    assert (m.d_model, m.d_ff, m.num_heads, m.head_dim, m.num_layers) == PRESETS[path][preset]


def test_continue_presets_are_t5_1_1_shapes():
    for size in ("small", "base", "xl"):
        a, b = config_lib.load(f"configs/continue.py:{size}").model, config_lib.load(f"configs/t5_1_1.py:{size}").model
        assert a.to_dict() == b.to_dict()


def test_ul2_20b_is_gated_silu():
    m = config_lib.load("configs/ul2.py:20b").model
    assert m.activation == "silu" and m.gated_mlp and m.arch == "encoder_decoder"


@pytest.mark.parametrize("path", ["configs/t5_1_1.py", "configs/ul2.py", "configs/decoder.py",
                                  "configs/encoder.py", "configs/continue.py"])
def test_every_file_has_tiny(path):
    assert config_lib.load(f"{path}:tiny").model.d_model <= 128


def test_overrides_parse_by_type():
    c, flags = config_lib.parse_args(["--config", "configs/t5_1_1.py:tiny", "--config.model.num_layers=4",
                                      "--config.optim.learning_rate", "1e-3",
                                      "--config.model.scan_layers=true", "--workdir", "/tmp/x"])
    assert c.model.num_layers == 4 and c.optim.learning_rate == 1e-3 and c.model.scan_layers is True
    assert flags == {"workdir": "/tmp/x"}


@pytest.mark.parametrize("override,named", [
    ("model.num_layerz=3", "config.model.num_layerz"),
    ("modl.num_layers=3", "config.modl"),
    ("model.num_layers=three", "config.model.num_layers"),
    ("model.arch=rnn", "config.model.arch"),
    ("train.microbatches=3", "config.train.microbatches"),
    ("model.num_heads=6", "config.mesh.tensor"),
    ("optim.b2=1.0", "config.optim.b2"),
    ("model.position=rope", "config.model.position"),
    ("init.from_hf=/nonexistent/dir", "config.init.from_hf"),
    ("train.log_every=0", "config.train.log_every"),
    ("train.eval_steps=0", "config.train.eval_steps"),
    ("checkpoint.keep=0", "config.checkpoint.keep"),
    ("checkpoint.every=-1", "config.checkpoint.every"),
    ("train.stop_at_step=-5", "config.train.stop_at_step"),
    ("optim.learning_rate=nan", "config.optim.learning_rate"),
    ("train.z_loss=inf", "config.train.z_loss"),
    ("optim.end_lr_fraction=2", "config.optim.end_lr_fraction"),
])
def test_bad_values_name_the_key(override, named):
    extra = ["mesh.tensor=4"] if "num_heads" in override else []
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        config_lib.load("configs/t5_1_1.py:tiny", [override] + extra)


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="nope.py"):
        config_lib.load("configs/nope.py:tiny")


@pytest.mark.parametrize("body,named", [
    ("def get_config(:\n", "syntax error at line 1"),
    ("x = 1\n", "no get_config"),
    ("def get_config():\n    raise RuntimeError('boom')\n", "RuntimeError: boom"),
    ("import no_such_module_here\n", "ModuleNotFoundError"),
    ("def get_config():\n    return None\n", "returned NoneType"),
])
def test_a_config_file_that_does_not_load_is_one_error_naming_it(tmp_path, body, named):
    path = tmp_path / "mine.py"
    path.write_text(body)
    with pytest.raises(ConfigError, match="mine.py") as err:
        config_lib.load(str(path))
    assert named in str(err.value) and "\n" not in str(err.value)


def test_every_listed_choice_has_an_implementation():
    """The schema's choice lists are what the code implements, no more, no less."""
    from t5lab.models.layers import ACTIVATIONS
    from t5lab.models.transformer import REMAT_POLICIES
    assert set(ACTIVATIONS) == set(config_lib.ACTIVATIONS)
    assert set(REMAT_POLICIES) | {"none"} == set(config_lib.REMAT_POLICIES)
    from t5lab.optim import make_optimizer, schedules
    for name in config_lib.OPTIMIZERS:
        o = config_lib.schema().optim
        o.name = name
        make_optimizer(o, 100)
    for name in config_lib.SCHEDULES:
        o = config_lib.schema().optim
        o.schedule = name
        schedules.from_config(o, 100, (2, 8))(3)
