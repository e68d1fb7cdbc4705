"""`t5lab train|export`: the command line.

usage: t5lab COMMAND [options]     (t5lab COMMAND --help: its options)

commands:
  train   pretrain a model, or resume one:
            t5lab train [--config FILE.py[:preset]] [--workdir DIR] [--config.KEY=VALUE ...]
  export  write a run's model as a Hugging Face transformers directory:
            t5lab export --workdir DIR [--out DIR] [--step N]

Exit status: 0 done; 2 bad input (one line naming the key or file, nothing
written); 1 the run failed (non-finite values, a save that failed, data that
ran dry; one line); 143 (SIGTERM) or 130 (SIGINT): state saved, the run is
not finished, the same command resumes it. --debug shows the traceback.

example:
  t5lab train --config configs/ul2.py:tiny --workdir runs/tiny && t5lab export --workdir runs/tiny
"""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile

USAGE = __doc__.split("\n\n", 1)[1]

TRAIN_USAGE = """\
usage: t5lab train [--config FILE.py[:preset]] [--config.KEY=VALUE ...] [--workdir DIR] [--debug]
       (python -m t5lab.train takes the same arguments)

Pretrain a model in DIR (checkpoints, config.json, metrics.jsonl), or resume
the run DIR already holds.

options:
  --config FILE.py[:preset]  a config file and one of its presets: configs/*.py, e.g.
                             configs/ul2.py:tiny, configs/t5_1_1.py:small; without it the
                             schema's defaults (a small UL2 model on the embedded corpus)
  --config.KEY=VALUE         set one key (also --config.KEY VALUE), KEY being GROUP.NAME with
                             GROUP one of model, data, optim, train, checkpoint, mesh, init;
                             every key, its default and why: schema() in t5lab/config.py
  --workdir DIR              the run's directory, local or gs:// (default runs/default)
  --debug                    show the traceback of an error instead of its one line
  -h, --help                 this help

exit status:
  0          finished
  1          the run failed: non-finite values, a save that failed (e.g. a full
             disk), data that is unusable or ran dry; one line
  2          bad input, refused before any work: one line naming the key or file
  143 / 130  SIGTERM / SIGINT: state saved, the run is not finished; rerun the
             same command to resume it

example:
  t5lab train --config configs/ul2.py:tiny --workdir runs/tiny --config.train.steps=50
"""

EXPORT_USAGE = """\
usage: t5lab export --workdir DIR [--out DIR] [--step N] [--debug]

Write a t5lab run's model as a Hugging Face transformers directory, with the
run's tokenizer when it has one; load it with from_pretrained(DIR).

options:
  --workdir DIR  the run's directory (holds config.json and checkpoints/)
  --out DIR      where to write (default WORKDIR/hf; needed when the workdir is remote)
  --step N       the checkpoint step to export (default the newest)
  --debug        show the traceback of an error instead of its one line
  -h, --help     this help

exit status: 0 written; 2 bad input (not a workdir, a damaged checkpoint; one line).

example:
  t5lab export --workdir runs/tiny --out hf/tiny
"""

COMMANDS = {"train": TRAIN_USAGE, "export": EXPORT_USAGE}


def _export(argv: list[str]) -> None:
    from t5lab import checkpointing, config as config_lib, hf, storage
    _, flags = config_lib.parse_args(argv)
    unknown = set(flags) - {"workdir", "out", "step"}
    if unknown or "workdir" not in flags:
        raise config_lib.ConfigError(EXPORT_USAGE.splitlines()[0])
    workdir = flags["workdir"]
    cfg_path = storage.join(workdir, "config.json")
    if not storage.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: not a t5lab workdir (no config.json)")
    if storage.is_remote(workdir) and "out" not in flags:
        raise config_lib.ConfigError(f"--out: give a local directory to export {workdir} into")
    config = config_lib.schema()
    for group, values in json.loads(storage.read_text(cfg_path)).items():
        for key, value in values.items():
            config[group][key] = value
    step = int(flags["step"]) if "step" in flags else None
    params = checkpointing.restore_params(workdir, config, step=step)
    out = flags.get("out", os.path.join(workdir, "hf"))
    with tempfile.TemporaryDirectory() as tmp:
        spm = storage.join(workdir, "tokenizer.model")
        if storage.exists(spm):
            storage.download(spm, os.path.join(tmp, "tokenizer.model"))
            spm = os.path.join(tmp, "tokenizer.model")
        else:
            spm = None
        hf.save_pretrained(params, config, out, spm_model=spm)
    print(f"wrote {out}: load it with transformers' from_pretrained({out!r})")


def _quiet_failed_saves():
    """A failed save is reported in one line by the trainer; without --debug,
    Orbax's own error records of it (a traceback per writer thread) are dropped."""
    import logging
    logging.getLogger("absl").addFilter(
        lambda record: not (record.levelno >= logging.ERROR and "orbax" in record.pathname))


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the process's own command line: a fresh process may re-exec
        from t5lab import hostenv
        hostenv.reexec_with_hugepages()
        argv = sys.argv[1:]
    if argv[:1] in (["-h"], ["--help"], ["help"]):
        print(USAGE, end="")
        return 0
    if not argv or argv[0] not in COMMANDS:  # refused before the imports below start JAX
        problem = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"t5lab: {problem}\n\n{USAGE}", file=sys.stderr, end="")
        return 2
    command, rest = argv[0], argv[1:]
    if "-h" in rest or "--help" in rest:  # before any config is loaded or JAX imported
        print(COMMANDS[command], end="")
        return 0
    debug = "--debug" in rest
    rest = [a for a in rest if a != "--debug"]
    from t5lab import checkpointing, config as config_lib, storage
    from t5lab.data.pipeline import DataError
    try:
        if command == "train":
            from t5lab import train
            if not debug:
                _quiet_failed_saves()
            try:
                train.main(rest)
                for sig in (signal.SIGTERM, signal.SIGINT):  # finished: a late signal changes nothing
                    signal.signal(sig, signal.SIG_IGN)
            except train.RunInterrupted as e:
                print(f"t5lab: {e}", flush=True)
                return e.exit_status
            except (train.NonFiniteLoss, checkpointing.CheckpointWriteError, DataError) as e:
                if debug:
                    raise
                print(f"t5lab: error: {e}", file=sys.stderr)
                if isinstance(e, checkpointing.CheckpointWriteError):
                    # The failed save's pending tensorstore writes would print a traceback
                    # each into Orbax's closed event loop while the interpreter exits.
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(1)
                return 1
        else:
            _export(rest)
    except (config_lib.ConfigError, checkpointing.CheckpointMismatch, checkpointing.DamagedCheckpoint,
            FileNotFoundError, storage.StorageError) as e:
        if debug:
            raise
        print(f"t5lab: error: {e}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
