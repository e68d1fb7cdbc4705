"""The training loop: config + workdir in, checkpoints and metrics out.

    python -m t5lab.train --config configs/ul2.py:tiny --workdir runs/x [--config.key=value ...]

`run` in four steps: `_check_inputs` (config, data, tokenizer, mesh, program
shapes, before anything is written); `_start` (the workdir's latest checkpoint
with its data position, or a Hugging Face checkpoint, or random init);
`_record` (config.json and the tokenizer into the workdir); `_train_loop`
(steps, metrics, evals, checkpoints on schedule, on SIGTERM/SIGINT and at the
end).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from t5lab import batch as contract, checkpointing, sharding, storage
from t5lab import config as config_lib
from t5lab import metrics as metrics_lib
from t5lab.train_step import (build_program, global_batch, num_denoisers, params_by_stack,
                              schedule_batch_shape)

log = logging.getLogger("t5lab")



class NonFiniteLoss(RuntimeError):
    pass


class RunInterrupted(Exception):
    """SIGTERM/SIGINT: the state was saved; the run is not finished."""

    def __init__(self, signal_name: str, step: int, message: str):
        super().__init__(message)
        self.signal_name, self.step = signal_name, step

    @property
    def exit_status(self) -> int:  # what a shell reports for a process the signal ended
        return 128 + int(signal.Signals[self.signal_name])


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves and exits at the next step
    (multi-process: at the next step the processes compare flags)."""

    def __init__(self, check_every: int = 1):
        self.raised = None
        self.check_every = check_every
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed(self, step: int) -> bool:
        """All processes stop together: one process's signal stops them all.
        Comparing flags is a collective the host waits for, which drains the
        step pipeline, so processes compare only every `check_every` steps."""
        mine = self.raised is not None
        if jax.process_count() == 1:
            return mine
        if step % self.check_every:
            return False
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.int32(mine))))


class _WorkdirLock:
    """One trainer per workdir: an flock on WORKDIR/trainer.lock, which the
    kernel releases when its process dies, however it dies. (An object store
    has no such lock: gs:// workdirs are not locked.)"""

    def __init__(self, workdir: str):
        self.fd = None
        if storage.is_remote(workdir):
            return
        import fcntl
        path = os.path.join(workdir, "trainer.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise config_lib.ConfigError(f"--workdir {workdir}: in use by {holder}; stop that "
                                         f"trainer or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"trainer pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _run_tokenizer(config, workdir: str) -> str:
    """The run's tokenizer: WORKDIR/tokenizer.model from its first start on;
    before that, config.data.tokenizer or the default one."""
    from t5lab.data import pipeline, tokenizer as tok_lib
    saved = storage.join(workdir, "tokenizer.model")
    if storage.exists(saved):
        if storage.is_remote(saved):
            local = os.path.join(tempfile.mkdtemp(prefix="t5lab-tok-"), "tokenizer.model")
            storage.download(saved, local)
            saved = local
        given = config.data.tokenizer
        if given and os.path.isfile(given) and pipeline.file_digest(given) != pipeline.file_digest(saved):
            raise config_lib.ConfigError(
                f"config.data.tokenizer: {given} is not the tokenizer this run trained with "
                f"({storage.join(workdir, 'tokenizer.model')}); leave the key out to resume")
        path = saved
    else:
        path = tok_lib.resolve(config)
    size = tok_lib.Tokenizer(path).vocab_size
    if size > config.model.vocab_size:
        raise config_lib.ConfigError(
            f"config.model.vocab_size: {config.model.vocab_size} is smaller than the tokenizer's "
            f"{size} pieces ({path})")
    return path


def _check_workdir_config(workdir: str, config) -> None:
    saved = storage.join(workdir, "config.json")
    if not storage.exists(saved):
        return
    old = json.loads(storage.read_text(saved))["model"]
    for key in config_lib.ARCH_KEYS:
        if key in old and old[key] != config.model[key]:
            raise checkpointing.CheckpointMismatch(
                f"{workdir} holds a run with config.model.{key}={old[key]!r}, but this config has "
                f"{config.model[key]!r}. Use another --workdir, or the same model keys to resume.")


def _check_batch(config, mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    b, k = config.train.batch_size, config.train.microbatches
    if (b // k) % shards:
        raise config_lib.ConfigError(
            f"config.train.batch_size: {b} rows" + (f" in {k} microbatches" if k > 1 else "") +
            f" do not split over the mesh's data x fsdp = {shards} batch shards")


def _params_from_hf(config, program):
    from t5lab import hf
    params, hf_cfg = hf.load_pretrained(config.init.from_hf, scan_layers=config.model.scan_layers)
    for key in config_lib.ARCH_KEYS:
        if hf_cfg.model[key] != config.model[key]:
            raise config_lib.ConfigError(
                f"config.model.{key}: is {config.model[key]!r} but the Hugging Face checkpoint "
                f"{config.init.from_hf} has {hf_cfg.model[key]!r}")
    shardings = program.state_shardings["params"]
    return jax.tree_util.tree_map(
        lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx: np.asarray(a)[idx]),
        params, shardings)


def _data_state(data_iter, fingerprint: dict) -> dict:
    """All lanes' positions (gathered from every process) and the fingerprint."""
    mine = data_iter.get_state()["lanes"]
    lanes = np.array([mine[str(lane)] for lane in data_iter.lanes], np.int64)
    if lanes.max(initial=0) >= 2**31:
        raise OverflowError("data position beyond int32")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        lanes = np.asarray(multihost_utils.process_allgather(lanes.astype(np.int32))).reshape(-1, lanes.shape[1])
    return {"fingerprint": fingerprint, "lanes": lanes.tolist()}


@dataclasses.dataclass
class _Run:
    """What a run is made of once its inputs have been checked."""
    config: Any
    workdir: str
    tok_path: str
    train_ds: Any
    mesh: Any
    program: Any
    is_main: bool


def run(config, workdir: str, *, progress: bool = True) -> dict:
    """Trains to config.train.steps (or train.stop_at_step); returns the last metrics.
    The steps, in order: check every input, start (resume, Hugging Face or
    random), record the run in its workdir, train."""
    sharding.initialize_distributed()
    r = _check_inputs(config, workdir)
    if r.is_main:
        storage.makedirs(r.workdir)
    lock = _WorkdirLock(r.workdir) if r.is_main else None
    try:
        ckpts = checkpointing.Checkpoints(r.workdir, config.checkpoint)
        data_iter = iter(r.train_ds)
        try:
            state, origin, notes, data_restarted = _start(r, ckpts, data_iter)
            _record(r)
        except BaseException:
            data_iter.close()  # its worker processes too
            raise
        return _train_loop(r, ckpts, data_iter, state, origin, notes, data_restarted, progress)
    finally:
        if lock:
            lock.release()


def _check_inputs(config, workdir: str) -> _Run:
    """Everything that can fail on bad input, before anything is written: the
    config, the workdir, the tokenizer, the data (one document read), the mesh,
    the batch split and the compiled program's shapes."""
    config_lib.validate(config)
    from t5lab.data import pipeline
    workdir = storage.absolute(workdir)
    try:
        storage.check(workdir)
        _check_workdir_config(workdir, config)
        tok_path = _run_tokenizer(config, workdir)
        train_ds = pipeline.make_dataset(config, "train", tokenizer_path=tok_path)
        pipeline.probe(train_ds)
        mesh = sharding.make_mesh(config.mesh)
        _check_batch(config, mesh)
        program = build_program(config, mesh)
    except (config_lib.ConfigError, checkpointing.CheckpointMismatch, FileNotFoundError):
        raise
    except storage.StorageError as e:
        raise config_lib.ConfigError(f"--workdir {e}") from None
    except (ValueError, KeyError) as e:  # the data, tokenizer or optimizer refused the input
        raise config_lib.ConfigError(e.args[0] if e.args else repr(e)) from e
    return _Run(config, workdir, tok_path, train_ds, mesh, program, jax.process_index() == 0)


def _start(r: _Run, ckpts, data_iter):
    """(train state, where it came from, notes for the terminal, whether the
    data stream restarted): the latest intact checkpoint with its data
    position, else the Hugging Face checkpoint of init.from_hf, else random."""
    from t5lab.data import pipeline
    config, program = r.config, r.program
    notes = []
    latest = ckpts.latest_intact_step(report=notes.append)
    if latest is None:
        state = program.init_state(jax.random.key(config.train.seed))
        if config.init.from_hf:
            state["params"] = _params_from_hf(config, program)
            return state, f"initialised from Hugging Face checkpoint {config.init.from_hf}", notes, False
        return state, "initialised at random", notes, False
    saved = ckpts.restore_data(latest)
    diff = pipeline.fingerprint_difference(saved["fingerprint"], r.train_ds.fingerprint)
    if diff and not config.train.allow_data_change:
        raise config_lib.ConfigError(
            f"config.data: the data changed since checkpoint {latest} ({diff}); resuming would "
            f"replay its position into other data. Restore the data, or continue deliberately "
            f"with --config.train.allow_data_change=true (the stream restarts at step {latest})")
    state = ckpts.restore(latest, program.abstract_state)
    # One batch per step: the stream's batch count (which picks a mixture
    # schedule's phase) is the step.
    if diff:
        notes.append(f"data changed ({diff}): the data stream restarts at step {latest}")
        data_iter.set_state({"lanes": {str(i): [0, 0, 0] for i in data_iter.lanes}, "batches": latest})
    else:
        data_iter.set_state({"lanes": {str(i): p for i, p in enumerate(saved["lanes"])},
                             "batches": latest})
    return state, f"resumed from {ckpts.root}/{latest}", notes, bool(diff)


def _record(r: _Run) -> None:
    """The workdir keeps the config it was last run with and the tokenizer of its first start."""
    if not r.is_main:
        return
    storage.write_text(storage.join(r.workdir, "config.json"), r.config.to_json_best_effort(indent=2))
    if not storage.exists(storage.join(r.workdir, "tokenizer.model")):
        storage.upload(r.tok_path, storage.join(r.workdir, "tokenizer.model"))


def _train_loop(r: _Run, ckpts, data_iter, state, origin, notes, data_restarted, progress) -> dict:
    """Steps to the end (or train.stop_at_step): metrics every train.log_every
    steps, read one step late so dispatch never waits; evals; checkpoints on
    schedule, on a stop signal and at the end."""
    from t5lab.data.denoising import DENOISER_NAMES
    config, program, workdir = r.config, r.program, r.workdir
    start = int(jax.device_get(state["step"]))
    writer = metrics_lib.MetricWriter(workdir, enabled=r.is_main, resume_step=start)
    if data_restarted:
        writer.write(start, {"data_restarted": 1.0})
    end = config.train.stop_at_step or config.train.steps
    bar = metrics_lib.Progress(config.train.steps, start, enabled=r.is_main and progress)
    for note in notes:
        bar.message(f"t5lab: {note}")
    bar.message(f"t5lab: {config.model.arch} model, {_count(state['params']) / 1e6:.2f}M params, "
                f"mesh {dict(r.mesh.shape)} on {jax.device_count()} devices "
                f"({jax.process_count()} processes); {origin}")

    flops_per_step = _model_flops(config, state["params"])
    peak = metrics_lib.peak_tflops(jax.devices()[0].device_kind,
                                   config.train.peak_tflops_per_device)
    names = DENOISER_NAMES if num_denoisers(config) else ()
    window, last = [], {}
    t_window = time.time()
    pending = None  # (step, device metrics): read one step late so dispatch never waits
    fingerprint = r.train_ds.fingerprint

    def finish(step_done: int, m_dev):
        nonlocal t_window, window, last
        m = jax.device_get(m_dev)
        bad = [k for k in ("loss", "grad_norm") if not np.isfinite(m[k])]
        bad += [] if m["params_finite"] else ["parameters"]
        if bad and config.train.stop_on_nonfinite:
            raise NonFiniteLoss(f"step {step_done}: non-finite {', '.join(bad)} (loss {m['loss']}); "
                                f"stopped without saving it. The last checkpoint, "
                                f"{ckpts.latest_step()}, holds finite parameters ({ckpts.root})")
        window.append(m)
        if step_done % config.train.log_every == 0 or step_done == end:
            dt = (time.time() - t_window) / len(window)
            last = _window_summary(window, names, dt, config, flops_per_step, peak)
            last.update(_skipped(data_iter))
            writer.write(step_done, last)
            bar.update(step_done, last)
            window, t_window = [], time.time()

    def flush():
        nonlocal pending
        if pending is not None:
            finish(*pending)
            pending = None

    def save(step_now, force=False):
        flush()  # never save a state whose loss, gradients or parameters were not finite
        ckpts.save(step_now, state, _data_state(data_iter, fingerprint), force=force)

    # The signal handlers stay until the final save is sealed: a late SIGTERM cannot cut it.
    with _StopFlag(config.train.stop_check_every) as stop:
        try:
            step = start
            while step < end:
                batch = global_batch(next(data_iter), program.batch_sharding)
                state, m_dev = program.train_step(state, batch)
                if pending is not None:
                    finish(*pending)
                step += 1
                pending = (step, m_dev)
                if config.train.eval_every and step % config.train.eval_every == 0:
                    flush()
                    ev = evaluate(config, program, state["params"], r.tok_path, names)
                    writer.write(step, ev)
                    bar.message(f"step {step} " + " ".join(f"{k}={v:.4g}" for k, v in ev.items()))
                if stop.agreed(step):
                    save(step, force=True)
                    raise RunInterrupted(stop.raised or "SIGTERM", step,
                                         f"{stop.raised or 'stop'} received: saved step {step} to "
                                         f"{ckpts.root}; the run is not finished: run the same "
                                         f"command to resume.")
                if config.checkpoint.every and step % config.checkpoint.every == 0:
                    save(step)
            save(step, force=True)
        except RunInterrupted:
            ckpts.close()  # the saved step must be complete (and sealed) before the exit
            raise
        except BaseException:
            with contextlib.suppress(Exception):  # the error that stopped the run is the one to show
                ckpts.close()
            raise
        else:
            ckpts.close()
        finally:
            data_iter.close()
            writer.close()
        bar.message(f"done: step {step}. Checkpoint: {ckpts.root}/{step}\n"
                    f"Export to Hugging Face: t5lab export --workdir {workdir} --out {workdir}/hf")
    return last


def evaluate(config, program, params, tok_path: str, names) -> dict:
    from t5lab.data import pipeline
    it = iter(pipeline.make_dataset(config, "eval", tokenizer_path=tok_path, num_workers=0))
    total = None
    try:
        for _ in range(config.train.eval_steps):
            sums = jax.device_get(program.eval_step(params, global_batch(next(it), program.batch_sharding)))
            total = sums if total is None else jax.tree_util.tree_map(np.add, total, sums)
    finally:
        it.close()
    w = max(float(total["weight"]), 1.0)
    out = {"eval/loss": float(total["ce"]) / w, "eval/accuracy": float(total["correct"]) / w}
    for i, name in enumerate(names):
        if total["den_weight"][i] > 0:
            out[f"eval/loss_{name}"] = float(total["den_ce"][i] / total["den_weight"][i])
    return out


def _skipped(data_iter) -> dict:
    """Documents skipped since this start, by reason, summed over every process
    and its workers (read at log steps only: a host sync)."""
    from t5lab.data import sources
    counts = np.array([data_iter.skipped[r] for r in sources.SKIP_METRICS], np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        counts = np.asarray(multihost_utils.process_allgather(counts.astype(np.int32))).reshape(
            -1, len(counts)).sum(0)
    return {name: int(n) for name, n in zip(sources.SKIP_METRICS.values(), counts)}


def _window_summary(window, names, step_s, config, flops_per_step, peak) -> dict:
    mean = {k: float(np.mean([m[k] for m in window])) for k in
            ("loss", "z_loss", "accuracy", "grad_norm", "lr", "nonpad_fraction")}
    if names:
        den_ce = np.sum([m["denoiser_loss"] * m["denoiser_tokens"] for m in window], axis=0)
        den_w = np.sum([m["denoiser_tokens"] for m in window], axis=0)
        for i, name in enumerate(names):
            if den_w[i] > 0:
                mean[f"loss_{name}"] = float(den_ce[i] / den_w[i])
    tokens = math.prod(schedule_batch_shape(config))
    mean["step_s"] = step_s
    mean["tokens_per_s"] = tokens / step_s
    mean["nonpad_tokens_per_s"] = tokens * mean["nonpad_fraction"] / step_s
    if peak:
        mean["mfu"] = flops_per_step / step_s / (jax.device_count() * peak * 1e12)
    return mean


def _model_flops(config, params, head: bool = True) -> float:
    """Model FLOPs per step (t5lab.metrics); head=False leaves out the output
    projection (what remat does not recompute)."""
    m, d, b = config.model, config.data, config.train.batch_size
    counts = params_by_stack(params)
    if m.tie_embeddings:
        counts["head"] += m.vocab_size * m.d_model
    if not head:
        counts["head"] = 0
    lengths = contract.stack_lengths(m.arch, d.inputs_length, d.targets_length)
    enc_len, dec_len = lengths["encoder"], lengths["decoder"]
    if m.arch == "encoder":
        counts["encoder"] += counts.pop("head")
    return metrics_lib.model_flops_per_step(m, counts, b * enc_len, b * dec_len, enc_len, dec_len)


def _count(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    config, flags = config_lib.parse_args(argv)
    unknown = set(flags) - {"workdir", "debug"}
    if unknown:
        raise config_lib.ConfigError(f"unknown flag --{sorted(unknown)[0]}")
    if config.init.from_hf:
        from t5lab import hf
        explicit = {a[len("--config."):].partition("=")[0] for a in argv if a.startswith("--config.")}
        try:
            config = hf.adopt_model(config, explicit)
        except ValueError as e:
            raise config_lib.ConfigError(str(e)) from None
    run(config, flags.get("workdir", "runs/default"))


if __name__ == "__main__":  # `python -m t5lab.train ...` is `t5lab train ...`
    from t5lab import cli
    sys.exit(cli.main(["train", *sys.argv[1:]]))
