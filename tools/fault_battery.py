"""Fault battery: does this installation's `t5lab train` lose anything when runs die?

    python tools/fault_battery.py [--trials 4] [--steps 60] [--every 10] [--keep-workdirs DIR]

Runs a small job once uninterrupted (the reference), then, each in a fresh
workdir and restarted with the same command until it finishes:

  sigterm    --trials random SIGTERMs: the run must save and exit 143
  kill-9     --trials random SIGKILLs, half of them just after a checkpoint
             step (while its async save is in flight)
  corrupt    the latest checkpoint damaged 6 ways (flipped bits in the arrays,
             a truncated file, the seal, the data position or the state
             metadata deleted, a garbled data position); `t5lab export` of it
             must refuse, the restart must resume from the newest intact step
  two        a second trainer started on a running trainer's workdir must be
             refused at once (exit 2) while the first finishes
  full-disk  a save onto a full tmpfs: exit 1 with one line, then (space
             freed) the run resumes (needs root to mount a tmpfs; else skipped)

A trial survives when the finished run's parameters are bit-identical to the
reference and metrics.jsonl holds every step once with the reference's losses.
It loses data when the run finished with other parameters or losses, or left
no restorable checkpoint. Prints one line per category and exits 1 on any loss.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Battery:
    def __init__(self, args, base: str):
        self.args, self.base = args, base
        self.cmd = [sys.executable, "-m", "t5lab.cli", "train", "--config", args.config,
                    f"--config.train.steps={args.steps}", f"--config.checkpoint.every={args.every}",
                    "--config.train.log_every=1", "--config.train.eval_every=0",
                    "--config.checkpoint.async_save=true"]
        cache = os.path.join(base, "jax-cache")  # restarts skip recompiling
        self.env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache,
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                    "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        self.n = 0

    def workdir(self, name):
        self.n += 1
        return os.path.join(self.base, f"{self.n:03d}-{name}")

    def start(self, wd, *extra):
        return subprocess.Popen(self.cmd + ["--workdir", wd, *extra], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env, cwd=ROOT)

    def run(self, wd, *extra, timeout=900):
        p = self.start(wd, *extra)
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err

    def finish(self, wd, tries=5) -> bool:
        """Restarts until the run ends with status 0."""
        for _ in range(tries):
            rc, _, err = self.run(wd)
            if rc == 0:
                return True
            print(f"    restart failed ({rc}): {err.strip().splitlines()[-1] if err.strip() else ''}")
        return False

    # ---------------------------------------------------------------- results
    @staticmethod
    def record(wd):
        """(params, [(step, loss)]) of a finished run, or None when it cannot be read."""
        from t5lab import checkpointing
        import jax
        import numpy as np
        try:
            params = [np.asarray(x) for x in jax.tree_util.tree_leaves(checkpointing.restore_params(wd))]
        except Exception as e:  # noqa: BLE001  a lost checkpoint is a result here, not a crash
            print(f"    no restorable checkpoint in {wd}: {e}")
            return None
        rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
        return params, [(r["step"], r["loss"]) for r in rows if "loss" in r]

    def verdict(self, wd, finished: bool) -> str:
        """"survived", "lost" or "failed" (did not finish, nothing lost)."""
        got = self.record(wd)
        if got is None:
            return "lost"
        if not finished:
            return "failed"
        params, losses = got
        same_params = len(params) == len(self.ref[0]) and all(
            a.shape == b.shape and a.tobytes() == b.tobytes() for a, b in zip(params, self.ref[0]))
        if same_params and losses == self.ref[1]:
            return "survived"
        steps = [s for s, _ in losses]
        why = ("other parameters" if not same_params else
               f"{len(steps) - len(set(steps))} duplicated metric rows" if len(steps) != len(set(steps))
               else "other losses")
        print(f"    {wd}: {why}")
        return "lost"

    # ------------------------------------------------------------- categories
    def reference(self):
        wd = self.workdir("reference")
        rc, _, err = self.run(wd)
        if rc:
            sys.exit(f"fault_battery: the uninterrupted run failed ({rc}): {err[-2000:]}")
        self.ref = self.record(wd)

    def _signal_at_random(self, wd, sig, after_checkpoint: bool):
        p = self.start(wd)
        target = random.randint(2, self.args.steps - 2)
        if after_checkpoint:
            target = random.randrange(self.args.every, self.args.steps, self.args.every)
        for line in p.stdout:
            if line.startswith(f"step {target}/"):
                time.sleep(random.uniform(0, 0.3) if after_checkpoint else random.uniform(0, 1))
                p.send_signal(sig)
                break
        p.communicate(timeout=300)
        return p.returncode

    def sigterm(self):
        out = []
        for _ in range(self.args.trials):
            wd = self.workdir("sigterm")
            rc = self._signal_at_random(wd, signal.SIGTERM, False)
            if rc not in (0, 143):
                print(f"    SIGTERM exit status {rc}, expected 143")
            out.append(self.verdict(wd, rc in (0, 143) and self.finish(wd)))
        return out

    def kill9(self):
        out = []
        for t in range(self.args.trials):
            wd = self.workdir("kill9")
            self._signal_at_random(wd, signal.SIGKILL, after_checkpoint=t % 2 == 1)
            out.append(self.verdict(wd, self.finish(wd)))
        return out

    def corrupt(self):
        def largest(d):
            files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]
            return max(files, key=os.path.getsize)

        def flip(path):
            with open(path, "r+b") as f:
                f.seek(os.path.getsize(path) // 2)
                b = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([b[0] ^ 0x40]))

        def metadata(d):
            hits = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(d, "state")) for f in fs
                    if "metadata" in f.lower()]
            os.remove(hits[0])

        def garble(d):
            data = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(d, "data")) for f in fs]
            with open(data[0], "w") as f:
                f.write('{"lanes": [[')

        kinds = {"flipped bits": lambda d: flip(largest(os.path.join(d, "state"))),
                 "truncated": lambda d: os.truncate(largest(d), os.path.getsize(largest(d)) // 2),
                 "no seal": lambda d: os.remove(os.path.join(d, "t5lab_checksums.json")),
                 "no data position": lambda d: shutil.rmtree(os.path.join(d, "data")),
                 "no state metadata": metadata, "garbled data position": garble}
        out = []
        mid = (self.args.steps // self.args.every // 2 + 1) * self.args.every
        for name, damage in kinds.items():
            wd = self.workdir("corrupt")
            self.run(wd, f"--config.train.stop_at_step={mid}")
            damage(os.path.join(wd, "checkpoints", str(mid)))
            export = subprocess.run([sys.executable, "-m", "t5lab.cli", "export", "--workdir", wd,
                                     "--out", os.path.join(wd, "hf")], capture_output=True, text=True,
                                    env=self.env, cwd=ROOT)
            if export.returncode == 0:
                print(f"    export of a checkpoint with {name} exited 0")
                out.append("lost")
                continue
            out.append(self.verdict(wd, self.finish(wd)))
        return out

    def two(self):
        out = []
        for _ in range(self.args.trials):
            wd = self.workdir("two")
            a = self.start(wd)
            for line in a.stdout:
                if line.startswith("step 2/"):
                    break
            # A tiny run would finish before the second trainer has started: pause the
            # first (it keeps its lock, as a busy trainer does) while the second starts.
            a.send_signal(signal.SIGSTOP)
            t0 = time.time()
            try:
                rc_b, _, err_b = self.run(wd, timeout=300)
            finally:
                a.send_signal(signal.SIGCONT)
            refused = rc_b == 2 and "in use by" in err_b and time.time() - t0 < 120
            if not refused:
                print(f"    second trainer: exit {rc_b}: {err_b.strip()[-300:]}")
            a.communicate(timeout=900)
            result = self.verdict(wd, a.returncode == 0)
            out.append(result if refused or result == "lost" else "failed")
        return out

    def full_disk(self):
        mnt = os.path.join(self.base, "small-disk")
        os.makedirs(mnt)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", mnt],
                          capture_output=True).returncode:
            return None
        try:
            wd = os.path.join(mnt, "run")
            mid = (self.args.steps // self.args.every // 2 + 1) * self.args.every
            self.run(wd, f"--config.train.stop_at_step={mid}")
            st = os.statvfs(mnt)
            filler = os.path.join(mnt, "filler")
            with open(filler, "wb") as f:
                f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 64_000))
            rc, _, err = self.run(wd)
            one_line = rc == 1 and "no space left" in err and "Traceback" not in err
            if not one_line:
                print(f"    full disk: exit {rc}: {err.strip()[-500:]}")
            os.remove(filler)
            result = self.verdict(wd, self.finish(wd))
            return [result if one_line or result == "lost" else "failed"]
        finally:
            subprocess.run(["umount", "-l", mnt])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="example: python tools/fault_battery.py --trials 8",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=4, help="trials per random category (default 4)")
    ap.add_argument("--steps", type=int, default=60, help="train.steps of each run (default 60)")
    ap.add_argument("--every", type=int, default=10, help="checkpoint.every")
    ap.add_argument("--config", default="configs/t5_1_1.py:tiny", help="FILE.py[:preset] of the runs")
    ap.add_argument("--seed", type=int, default=0, help="seeds the random kill moments")
    ap.add_argument("--only", default="", help="comma-separated categories to run")
    ap.add_argument("--keep-workdirs", default="", help="write workdirs here and keep them")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process only reads checkpoints
    random.seed(args.seed)
    base = args.keep_workdirs or tempfile.mkdtemp(prefix="t5lab-faults-")
    os.makedirs(base, exist_ok=True)
    b = Battery(args, base)
    t0 = time.time()
    b.reference()
    categories = {"sigterm": b.sigterm, "kill-9": b.kill9, "corrupt": b.corrupt, "two": b.two,
                  "full-disk": b.full_disk}
    chosen = [c for c in (args.only.split(",") if args.only else categories)]
    lines, lost = [], 0
    for name in chosen:
        print(f"  {name} ...", flush=True)  # each category's line follows when it is done
        res = categories[name]()
        if res is None:
            lines.append(f"{name:10s} skipped (cannot mount a tmpfs here)")
            print(f"  {lines[-1]}", flush=True)
            continue
        lost += res.count("lost")
        lines.append(f"{name:10s} trials {len(res):2d} / survived {res.count('survived'):2d} / "
                     f"data lost {res.count('lost'):2d}")
        print(f"  {lines[-1]}", flush=True)
    if not args.keep_workdirs:
        shutil.rmtree(base, ignore_errors=True)
    print(f"fault battery: {args.steps} steps, checkpoint every {args.every}, "
          f"{time.time() - t0:.0f} s")
    print("\n".join(lines))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
