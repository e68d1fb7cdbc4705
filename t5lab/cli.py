"""`t5lab train|export`: the command line.

usage: t5lab COMMAND [options]     (t5lab COMMAND --help: its options)

commands:
  train   pretrain a model, or resume one:
            t5lab train [--config FILE.py[:preset]] [--workdir DIR] [--config.KEY=VALUE ...]
  export  write a run's model as a Hugging Face transformers directory:
            t5lab export --workdir DIR [--out DIR] [--step N] [--max_shard_size SIZE]
  prepare tokenize a corpus once into shards that training reads in seconds:
            t5lab prepare [--config FILE.py[:preset]] [--config.data.KEY=VALUE ...] --out DIR
  transfer-vocab
          give a Hugging Face checkpoint another SentencePiece vocabulary:
            t5lab transfer-vocab --from-hf SRC --tokenizer NEW.model --out DIR [--method fvt|overlap|random]
                                 [--extend] [--seed N]

Exit status: 0 done; 2 bad input (one line naming the key or file, nothing
written); 1 the run failed (non-finite values, a save that failed, data that
ran dry; one line); 143 (SIGTERM) or 130 (SIGINT): state saved, the run is
not finished, the same command resumes it. --debug shows the traceback.

example:
  t5lab train --config configs/ul2.py:tiny --workdir runs/tiny && t5lab export --workdir runs/tiny
"""
from __future__ import annotations

import os
import signal
import sys

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
usage: t5lab export --workdir DIR [--out DIR] [--step N] [--max_shard_size SIZE] [--debug]

Write a t5lab run's model as a Hugging Face transformers directory, with the
run's tokenizer when it has one; load it with from_pretrained(DIR). The
checkpoint's parameters are read into host memory a group at a time (never
onto an accelerator, never the optimizer state) and written as they are read.

options:
  --workdir DIR  the run's directory (holds config.json and checkpoints/)
  --out DIR      where to write (default WORKDIR/hf; needed when the workdir is remote)
  --step N       the checkpoint step to export (default the newest; one that
                 does not exist is refused, naming those that do)
  --max_shard_size SIZE
                 the largest weight file, as transformers' save_pretrained: a larger
                 model is written as model-0000i-of-0000N.safetensors shards with
                 model.safetensors.index.json (default 50GB; e.g. 5GB, 500MB, 2GiB)
  --debug        show the traceback of an error instead of its one line
  -h, --help     this help

exit status: 0 written; 2 bad input (not a workdir, no such step, a damaged
checkpoint; one line).

example:
  t5lab export --workdir runs/tiny --out hf/tiny
"""

PREPARE_USAGE = """\
usage: t5lab prepare --out DIR [--config FILE.py[:preset]] [--config.data.KEY=VALUE ...]
                     [--workers N] [--shards N] [--chunk_tokens N] [--shard I --num_shards M]
       t5lab prepare --merge --out DIR

Tokenize the configured source (text, JSONL, Parquet, TFDS, HF, the embedded
corpus) once with the run's tokenizer (config.data.tokenizer, or the default)
into ArrayRecord shards of token chunks and a manifest. Train on it with
--config.data.source=prepared --config.data.paths=DIR (DIR local or gs://).
Killed, the same command resumes without redoing finished shards.

A mixture (--config.data.source=mixture --config.data.mixture='KIND:ARG=W,...')
is prepared item by item into DIR/item-N-KIND, each a prepared directory as
above (the options below apply to each; an item already `prepared:` is
refused). The last line, also in DIR/mixture.json, is the override to train
with: --config.data.source=mixture --config.data.mixture='prepared:DIR/item-0-KIND=W,...'
(the same weights and order, so data.mixture_schedule is unchanged).

options:
  --out DIR           where to write: a local folder or a URL (gs://bucket/corpus)
  --config ...        as for `t5lab train`; the data keys and model.vocab_size matter
  --workers N         processes tokenizing in parallel (default: every core)
  --shards N          tasks the documents are cut into (default max(16, documents/200k))
  --chunk_tokens N    tokens per record, the unit of the global shuffle (default 4096)
  --shard I --num_shards M
                      run only tasks I, I+M, I+2M, ... (machine I of M, one --out);
                      the machine that finishes last writes the manifest
  --merge             write the manifest from the finished tasks in DIR
                      (after copying every machine's files into one DIR); for a
                      mixture give the same --config.data.mixture: each item, then mixture.json
  --debug             show the traceback of an error instead of its one line
  -h, --help          this help

exit status: 0 written (or this machine's part done); 2 bad input (one line).

example:
  t5lab prepare --config.data.source=jsonl --config.data.paths='corpus/*.jsonl' --out prepared/corpus
  t5lab train --config configs/ul2.py:tiny --config.data.source=prepared --config.data.paths=prepared/corpus
  t5lab prepare --config.data.source=mixture --config.data.mixture='text:a/*.txt=0.9,jsonl:b/*.jsonl=0.1' --out prepared/mix
"""

TRANSFER_VOCAB_USAGE = """\
usage: t5lab transfer-vocab --from-hf SRC --tokenizer NEW.model --out DIR
                            [--method fvt|overlap|random] [--extend] [--seed N] [--debug]

Write a copy of a Hugging Face checkpoint (T5, UMT5, T5 encoder, or t5lab's
Llama export) whose vocabulary is another SentencePiece model's, with its
tokenizer files and the config that `t5lab train --config.init.from_hf=DIR`
trains from. Every tensor but the token rows (shared.weight and an untied
lm_head.weight, by the same rule) is copied. pad, eos, unk, the sentinels
<extra_id_N> and [NLU] [NLG] [S2S] always take the source's rows of the same
role, whatever their ids. How the rest are made: t5lab/vocab_transfer.py.

options:
  --from-hf SRC          the source directory: config.json, its weights and its
                         SentencePiece model (spiece.model or tokenizer.model)
  --tokenizer NEW.model  the new SentencePiece model (e.g. tools/train_tokenizer.py's)
  --out DIR              where to write (not SRC)
  --method M             rows of pieces SRC lacks (default fvt); with fvt and overlap
                         a piece SRC has keeps its row:
                           fvt      the mean of SRC's rows of the piece's tokenization
                                    by SRC's tokenizer (Fast Vocabulary Transfer)
                           overlap  drawn from N(mean, cov) of SRC's rows
                           random   t5lab's initialiser, for every row but the ones
                                    above: the no-transfer baseline
  --extend               keep SRC's vocabulary (ids, pieces, rows) and append the new
                         pieces SRC's tokenizer splits into several, as one merged
                         SentencePiece model; their rows by --method
  --seed N               seed of the draws and the initialiser (default 0)
  --debug                show the traceback of an error instead of its one line
  -h, --help             this help

exit status: 0 written; 2 bad input, refused before any work (one line naming
the argument or file).

example:
  python tools/train_tokenizer.py --config.data.source=text --config.data.paths='de/*.txt' --out de.model
  t5lab transfer-vocab --from-hf hf/t5-small --tokenizer de.model --out hf/t5-small-de
  t5lab train --config configs/t5_1_1.py:small --config.init.from_hf=hf/t5-small-de --workdir runs/de
"""

COMMANDS = {"train": TRAIN_USAGE, "export": EXPORT_USAGE, "prepare": PREPARE_USAGE,
            "transfer-vocab": TRANSFER_VOCAB_USAGE}


def _prepare(argv: list[str], merge: bool) -> None:
    from t5lab import config as config_lib
    from t5lab.data import prepare, tokenizer
    config, flags = config_lib.parse_args(argv)
    ints = ("workers", "shards", "shard", "num_shards", "chunk_tokens")
    unknown = set(flags) - {"out", *ints}
    if unknown or "out" not in flags:
        raise config_lib.ConfigError(f"--{sorted(unknown)[0]}: unknown option" if unknown
                                     else PREPARE_USAGE.splitlines()[0])
    args = {}
    for k in ints:
        if k in flags:
            try:
                args[k] = int(flags[k])
            except ValueError:
                raise config_lib.ConfigError(f"--{k}: {flags[k]!r} is not an integer") from None
    mixture = config.data.source == "mixture"
    if mixture:  # refuses an item with nothing to prepare before a tokenizer is looked for
        items = prepare.mixture_items(config, flags["out"])
    if merge:
        m = prepare.merge_mixture(config, flags["out"]) if mixture else prepare.merge(flags["out"])
    else:
        args.setdefault("workers", len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count() or 1)
        run = prepare.prepare_mixture if mixture else prepare.prepare
        m = run(config, flags["out"], tok_path=tokenizer.resolve(config), **args)
    if m is None:
        print(f"prepare: this machine's tasks are done; the manifest{'s and mixture.json are' if mixture else ' is'} "
              f"written when all are")
        return

    def summary(path, m):
        t = m["splits"]["train"]
        return (f"wrote {path}: {t['documents']:,} train documents, {t['tokens']:,} tokens, "
                f"{t['records']:,} chunks; skipped {m['skipped'] or 'none'}")
    if not mixture:
        print(f"{summary(flags['out'], m)}; train with "
              f"--config.data.source=prepared --config.data.paths={flags['out']}")
        return
    for (path, _, _), item in zip(items, m["manifests"]):
        print(summary(path, item))
    print(f"wrote {flags['out'].rstrip('/')}/mixture.json; train with {m['override']}")


def _bound_host_memory() -> None:
    """Gives every allocation of 1 MiB or more its own mapping, returned to the
    OS when freed: glibc otherwise raises that threshold to the largest block
    freed so far, and the checkpoint reader's threads keep each group's freed
    buffers in their arenas (docs/models.md, host memory). Set only in an
    export's own process (a fixed threshold would change the allocator for
    anything run after it)."""
    import ctypes
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its own allocator's behaviour
        pass


def _export(argv: list[str]) -> None:
    from t5lab import config as config_lib, export, hf
    _, flags = config_lib.parse_args(argv)
    unknown = set(flags) - {"workdir", "out", "step", "max_shard_size"}
    if unknown or "workdir" not in flags:
        raise config_lib.ConfigError(EXPORT_USAGE.splitlines()[0])
    try:
        step = int(flags["step"]) if "step" in flags else None
    except ValueError:
        raise config_lib.ConfigError(f"--step: {flags['step']!r} is not an integer") from None
    max_shard_size = flags.get("max_shard_size", hf.DEFAULT_MAX_SHARD_SIZE)
    try:
        hf.parse_size(max_shard_size)
    except ValueError as e:
        raise config_lib.ConfigError(f"--max_shard_size: {e}") from None
    out = export.export_workdir(flags["workdir"], flags.get("out"), step=step,
                                max_shard_size=max_shard_size)
    print(f"wrote {out}: load it with transformers' from_pretrained({out!r})")


def _quiet_failed_saves():
    """A failed save is reported in one line by the trainer; without --debug,
    Orbax's own error records of it (a traceback per writer thread) are dropped."""
    import logging
    logging.getLogger("absl").addFilter(
        lambda record: not (record.levelno >= logging.ERROR and "orbax" in record.pathname))


def main(argv: list[str] | None = None) -> int:
    own_process = argv is None
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
        elif command == "prepare":
            try:
                _prepare([a for a in rest if a != "--merge"], "--merge" in rest)
            except (ValueError, KeyError) as e:  # the source or the output refused the input
                if debug:
                    raise
                print(f"t5lab: error: {str(e).strip(chr(39))}", file=sys.stderr)
                return 2
        elif command == "transfer-vocab":
            from t5lab import vocab_transfer
            vocab_transfer.main(rest)
        else:
            if own_process:
                _bound_host_memory()
                if "JAX_PLATFORMS" not in os.environ:
                    # Host memory only: Orbax asks JAX for the process index, which
                    # would otherwise start (and hold) the machine's accelerators,
                    # or fail on ones a training run holds.
                    import jax
                    jax.config.update("jax_platforms", "cpu")
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
