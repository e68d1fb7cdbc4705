"""TensorBoard event files written without TensorFlow, and the FLOPs count."""
import struct

from t5lab import metrics


def test_crc32c_known_vector():
    # RFC 3720 / iSCSI check value for "123456789".
    assert metrics.crc32c(b"123456789") == 0xE3069283


def _read_records(path):
    data = open(path, "rb").read()
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        (hcrc,) = struct.unpack("<I", data[i + 8:i + 12])
        assert hcrc == metrics._masked_crc(data[i:i + 8])
        payload = data[i + 12:i + 12 + n]
        (dcrc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
        assert dcrc == metrics._masked_crc(payload)
        out.append(payload)
        i += 16 + n
    return out


def test_event_file_round_trip(tmp_path):
    w = metrics.MetricWriter(str(tmp_path))
    w.write(7, {"loss": 2.5})
    w.close()
    (tb,) = list((tmp_path / "tensorboard").iterdir())
    records = _read_records(tb)
    assert b"brain.Event:2" in records[0]
    # step=7 as field 2 varint, tag "loss", float 2.5 as field 2 fixed32 inside the value.
    assert b"\x10\x07" in records[1] and b"loss" in records[1]
    assert struct.pack("<f", 2.5) in records[1]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines == ['{"step": 7, "loss": 2.5}']


def test_tensorboard_reads_our_events(tmp_path):
    import pytest
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    w = metrics.MetricWriter(str(tmp_path))
    w.write(3, {"loss": 1.25})
    w.close()
    acc = ea.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(3, 1.25)]


def test_model_flops_dense_formula():
    class M:
        num_heads, head_dim, num_layers, num_decoder_layers, arch = 2, 8, 1, -1, "decoder"
    # 6 * params * tokens + 12 * layers * (heads*head_dim) * length * tokens
    got = metrics.model_flops_per_step(M, {"decoder": 100, "head": 50}, 0, 10, 0, 5)
    assert got == 6 * 150 * 10 + 12 * 1 * 16 * 5 * 10


class _Tty(__import__("io").StringIO):
    def isatty(self):
        return True


def test_progress_eta_skips_the_compiled_first_step_and_warnings_get_their_own_line():
    import warnings
    timing = metrics.Progress(total=100, start=0, enabled=False)
    assert timing.eta(1, now=50.0) != timing.eta(1, now=50.0)          # NaN: one point, no rate yet
    assert timing.eta(11, now=70.0) == 2.0 * 89                         # 20 s for 10 steps, 89 left
    out = _Tty()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        bar = metrics.Progress(total=100, start=0, stream=out)
        bar.update(5, {"loss": 1.5})
        assert not out.getvalue().endswith("\n")
        warnings.warn("something odd")
        assert out.getvalue().endswith("\n")                           # the line was ended first
        bar.message("note")
    assert "\n\n" not in out.getvalue() and out.getvalue().endswith("note\n")
