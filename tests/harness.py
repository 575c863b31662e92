"""Test harness shared by every test file: run a function on N gloo processes, or run a README torchrun line.

run_distributed(fn, world_size, *args) spawns world_size processes, joins them into one gloo process group (the
same environment variables torchrun sets, so the scripts' setup_distributed() just works), calls fn(*args) on each
and returns the per-rank results. An exception on any rank is raised here with that rank's traceback; a hang or a
crash fails after `timeout` seconds instead of blocking the suite.
"""
import datetime
import os
import queue as queue_mod
import re
import shlex
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, pg_timeout):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)  # N processes share 2 cores: one thread each avoids oversubscription
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout))
        queue.put((rank, True, fn(*args)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 120, pg_timeout: float = 60):
    """Run fn(*args) on world_size gloo ranks; return [result of rank 0, result of rank 1, ...].
    pg_timeout is the process group's own timeout: how long a collective or recv waits for a silent peer."""
    ctx = mp.get_context("forkserver")  # workers fork from a server that imported torch once: fast and clean
    ctx.set_forkserver_preload(["torch", "torch.distributed", "numpy"])
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, pg_timeout), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors, clean = {}, [], False
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks: no answer from ranks "
                                   f"{sorted(set(range(world_size)) - set(results))} after {timeout:.0f} s")
            try:
                rank, ok, value = queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead and not errors:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                if errors and all(p.exitcode is not None for p in procs):
                    break
                continue
            if ok:
                results[rank] = value
            else:
                errors.append((rank, value))
                # The other ranks may now wait forever on the dead one: give them a little time, then stop.
                deadline = min(deadline, time.monotonic() + 15)
        if errors:
            rank, tb = errors[0]  # the first to fail is the likeliest cause; the others often just lost their peer
            others = f" (then ranks {sorted(r for r, _ in errors[1:])} too)" if len(errors) > 1 else ""
            raise RuntimeError(f"rank {rank} of {world_size} failed{others}:\n{tb}")
        clean = True
        return [results[r] for r in range(world_size)]
    finally:
        for p in procs:
            p.join(timeout=10 if clean else 0.5)
            if p.is_alive():
                p.kill()
                p.join()


def readme_command(script: str) -> str:
    """The README's torchrun line for `script` (the first one in a code span or block)."""
    text = (ROOT / "README.md").read_text()
    for line in re.findall(r"torchrun[^`\n|]*", text):
        if re.search(rf"\s{re.escape(script)}(\s|$)", line):
            return line.strip()
    raise AssertionError(f"README.md has no torchrun line for {script}")


def run_torchrun(command: str, extra_args: str = "", timeout: float = 180, env: dict | None = None):
    """Run a `torchrun ...` command line from the repo root on a free port; return the CompletedProcess."""
    words = shlex.split(command)
    assert words[0] == "torchrun", command
    argv = [sys.executable, "-m", "torch.distributed.run", f"--master-port={free_port()}"] + words[1:]
    argv += shlex.split(extra_args)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def run_script(args: list[str], timeout: float = 180, check: bool = True):
    """Run `python <args>` from the repo root (one process); return the CompletedProcess."""
    proc = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check:
        assert proc.returncode == 0, f"python {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def cli_error(main, args: list[str], capsys) -> str:
    """Call a script's main(args) in this process and return the one-line error it exits with (argparse's exit 2).
    In-process, so it is cheap; a traceback instead of the clean exit fails the test."""
    import pytest
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2, exit_info.value.code
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""
