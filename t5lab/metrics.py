"""Where metrics go: DIR/metrics.jsonl, TensorBoard event files (written here
without TensorFlow), and a progress line on the terminal. Plus the model-FLOPs
count behind MFU. Only process 0 writes.

The event writer is ours, not tensorboardX's: scalar events are ~60 lines of
record framing and protobuf fields (tests/test_metrics.py reads them back
with TensorBoard's own reader), and tensorboardX would add itself and
protobuf to every install for that.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import struct
import sys
import tempfile
import time

from t5lab import storage

# Peak dense bf16 TFLOP/s per device, for MFU when config.train.peak_tflops_per_device is 0.
PEAK_TFLOPS = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
    "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0,
    "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0,
}


def peak_tflops(device_kind: str, configured: float) -> float | None:
    if configured > 0:
        return configured
    for prefix, value in PEAK_TFLOPS.items():
        if device_kind.startswith(prefix):
            return value
    return None


def model_flops_per_step(model_cfg, num_params: dict, enc_tokens: int, dec_tokens: int,
                         enc_len: int, dec_len: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) of the matmuls the model
    asks for, without recomputation: 6 * params touched per token, plus attention
    scores and values (2 matmuls of length x head dims, causal or not counted in full).

    num_params: {"encoder": n, "decoder": n, "head": n} matmul parameters per stack."""
    hd = model_cfg.num_heads * model_cfg.head_dim
    dec_layers = model_cfg.num_decoder_layers if model_cfg.num_decoder_layers > 0 else model_cfg.num_layers
    flops = 6.0 * (num_params.get("encoder", 0) * enc_tokens
                   + (num_params.get("decoder", 0) + num_params.get("head", 0)) * dec_tokens)
    flops += 12.0 * model_cfg.num_layers * hd * enc_len * enc_tokens if enc_tokens else 0.0
    if dec_tokens:
        flops += 12.0 * dec_layers * hd * dec_len * dec_tokens
        if model_cfg.arch == "encoder_decoder":  # cross-attention reads the encoder
            flops += 12.0 * dec_layers * hd * enc_len * dec_tokens
    return flops


# ------------------------------------------------------------------ TensorBoard
def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint((num << 3) | wire) + payload


def _len_field(num: int, data: bytes) -> bytes:
    return _field(num, 2, _varint(len(data)) + data)


def encode_event(step: int, wall_time: float, scalars: dict | None = None,
                 file_version: str | None = None) -> bytes:
    """A tensorflow.Event protobuf: wall_time=1 (double), step=2, file_version=3,
    summary=5 { value=1 { tag=1, simple_value=2 (float) } }."""
    ev = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version:
        ev += _len_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _len_field(1, _len_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
            for tag, v in scalars.items())
        ev += _len_field(5, values)
    return ev


def tfrecord(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def _keep_rows_up_to(path: str, step: int) -> None:
    """Drops the rows after `step` (and a line torn by a crash): a run resumed
    from its checkpoint at `step` writes those steps again, so each step is
    logged once, by the run that continued."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class MetricWriter:
    """JSONL + TensorBoard for process 0; a no-op elsewhere.

    Object stores (gs://...) cannot append, so for a remote workdir both files
    are written in a local staging folder and copied up whole, at most every
    `upload_every` seconds and on close."""

    def __init__(self, workdir: str, enabled: bool = True, upload_every: float = 30.0,
                 resume_step: int | None = None):
        self.enabled = enabled
        if not enabled:
            return
        self._remote = workdir if storage.is_remote(workdir) else None
        self._upload_every, self._uploaded = upload_every, 0.0
        local = tempfile.mkdtemp(prefix="t5lab-metrics-") if self._remote else workdir
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._files = {"metrics.jsonl": os.path.join(local, "metrics.jsonl"),
                       f"tensorboard/{name}": os.path.join(local, "tensorboard", name)}
        os.makedirs(os.path.join(local, "tensorboard"), exist_ok=True)
        if self._remote:
            storage.makedirs(storage.join(self._remote, "tensorboard"))
            old = storage.join(self._remote, "metrics.jsonl")
            if storage.exists(old):  # a resumed run appends to the earlier lines
                storage.download(old, self._files["metrics.jsonl"])
        if resume_step is not None:
            _keep_rows_up_to(self._files["metrics.jsonl"], resume_step)
        self._jsonl = open(self._files["metrics.jsonl"], "a")
        self._tb = open(self._files[f"tensorboard/{name}"], "ab")
        self._tb.write(tfrecord(encode_event(0, time.time(), file_version="brain.Event:2")))

    def write(self, step: int, scalars: dict):
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        finite = {k: v for k, v in clean.items() if math.isfinite(v)}
        self._tb.write(tfrecord(encode_event(step, time.time(), finite)))
        self._tb.flush()
        if self._remote and time.time() - self._uploaded >= self._upload_every:
            self._upload()

    def _upload(self):
        for rel, local in self._files.items():
            storage.upload(local, storage.join(self._remote, *rel.split("/")))
        self._uploaded = time.time()

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            if self._remote:
                self._upload()
                shutil.rmtree(os.path.dirname(self._files["metrics.jsonl"]), ignore_errors=True)
            self.enabled = False


class Progress:
    """One updating line with ETA on a terminal; plain lines otherwise. The ETA
    is timed from the first update on (the first step's compilation is not a
    step's cost); a warning or log record printed meanwhile starts on a line
    of its own instead of being glued to the progress line."""

    def __init__(self, total: int, start: int, enabled: bool = True, stream=None):
        self.total, self.start, self.enabled = total, start, enabled
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._first = None      # (time, step) of the first update
        self._open = False      # the terminal's cursor ends a progress line
        if self.enabled and self.tty:
            self._hook_output()

    def _hook_output(self):
        import logging
        import warnings
        show = warnings.showwarning

        def showwarning(*args, **kwargs):
            self._break_line()
            show(*args, **kwargs)
        warnings.showwarning = showwarning

        class _Break(logging.Filter):
            def filter(_, record):
                self._break_line()
                return True
        for handler in logging.getLogger().handlers or [logging.lastResort]:
            handler.addFilter(_Break())

    def _break_line(self):
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False

    def eta(self, step: int, now: float | None = None) -> float:
        now = time.time() if now is None else now
        if self._first is None:
            self._first = (now, step)
        t0, s0 = self._first
        return (now - t0) / (step - s0) * (self.total - step) if step > s0 else float("nan")

    def update(self, step: int, scalars: dict):
        if not self.enabled:
            return
        eta = self.eta(step)
        keys = ("loss", "accuracy", "lr", "tokens_per_s", "mfu")
        text = " ".join(f"{k}={_fmt(scalars[k])}" for k in keys if scalars.get(k) is not None)
        line = f"step {step}/{self.total} {text} eta {_hms(eta)}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self._open = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str):
        if self.enabled:
            self._break_line()
            self.stream.write(text + "\n")
            self.stream.flush()


def _fmt(v) -> str:
    v = float(v)
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
