"""Test harness shared by every test file: run a function on N gloo processes, or run a README torchrun line.

run_distributed(fn, world_size, *args) spawns world_size processes, joins them into one gloo process group (the
same environment variables torchrun sets, so the scripts' setup_distributed() just works), calls fn(*args) on each
and returns the per-rank results. An exception on any rank is raised here with that rank's traceback; a hang or a
crash fails after `timeout` seconds instead of blocking the suite.

run_distributed(..., nccl_rules=True) runs fn under NCCL's point-to-point rules, emulated on gloo (see NcclRules):
an unbatched send or receive blocks until its peer has posted the matching op; the ops of one
dist.batch_isend_irecv are posted together and progress together. Code that would hang on NCCL fails here, within
`nccl_timeout` seconds, with an error naming the rank, the peer and the op.

run_distributed(..., backend="nccl") runs the ranks on real GPUs instead (tests/test_gpu.py): rank r sets
LOCAL_RANK = r and calls torch.cuda.set_device(r) before the process group exists, as the scripts' setup does.
"""
import datetime
import functools
import io
import inspect
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


class NcclRules:
    """NCCL's point-to-point rules on gloo. NCCL may block a send until its receive is posted (and a receive until
    its send is): a lazily created pair communicator needs a handshake, and ops to one peer run in issue order on one
    stream. So each op first announces itself on a store that run_distributed hosts, under (group, global src,
    global dst, n-th op of that pair), and waits there for its peer's announcement before gloo sees it. An unbatched
    op waits alone; a batch announces all its ops, then waits for all of their peers. A cycle of waits times out as
    an error."""

    def __init__(self, store, timeout: float):
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d
        self.dist, self.c10d, self.store, self.timeout = dist, c10d, store, timeout
        self.sent, self.received = {}, {}  # (group name, peer) -> how many ops this rank has posted to/from peer
        self.originals = {name: getattr(dist, name) for name in ("isend", "irecv", "send", "recv",
                                                                 "batch_isend_irecv")}

    def install(self) -> None:
        """Replace torch.distributed's point-to-point functions by ones that obey the rules (this process only)."""
        o = self.originals
        for name, peer_arg in (("isend", "dst"), ("irecv", "src"), ("send", "dst"), ("recv", "src")):
            setattr(self.dist, name, self._unbatched(name, o[name], peer_arg))
        setattr(self.dist, "batch_isend_irecv", functools.wraps(o["batch_isend_irecv"])(
            lambda p2p_op_list: self._batch(p2p_op_list)))
        # P2POp checks `op in [isend, irecv]` against distributed_c10d's own functions: accept ours as well.
        check_op, to_original = self.c10d._check_op, {self.dist.isend: o["isend"], self.dist.irecv: o["irecv"]}
        self.c10d._check_op = lambda op: check_op(to_original.get(op, op))
        self.is_send = {self.dist.isend, o["isend"]}

    def _unbatched(self, name: str, original, peer_arg: str):
        signature = inspect.signature(original)

        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            group, group_peer = bound.get("group"), bound.get("group_" + peer_arg)
            self._no_tag(bound.get("tag", 0), name)
            if not self.c10d._rank_not_in_group(group):
                peer = self._global_peer(name, bound.get(peer_arg), group, group_peer)
                self._wait_for_peers([self._announce(name.endswith("send"), peer, group)], name)
            return original(*args, **kwargs)
        return functools.wraps(original)(call)

    def _batch(self, p2p_op_list):
        """Announce every op of the batch, wait for all their peers, then hand each op to gloo."""
        self.c10d._check_p2p_op_list(p2p_op_list)
        for op in p2p_op_list:
            self._no_tag(op.tag, "batch_isend_irecv")
        keys = [self._announce(op.op in self.is_send, op.peer, op.group) for op in p2p_op_list]
        self._wait_for_peers(keys, "batch_isend_irecv")
        works = []
        for op in p2p_op_list:  # gloo has no coalescing: batch_isend_irecv itself posts the ops one by one
            sending = op.op in self.is_send
            post = self.originals["isend" if sending else "irecv"]
            work = post(op.tensor, group=op.group, tag=op.tag,
                        **{"group_dst" if sending else "group_src": op.group_peer})
            works += [work] if work is not None else []
        return works

    @staticmethod
    def _no_tag(tag: int, name: str) -> None:
        """NCCL ignores tags and matches in issue order; gloo matches by tag, so a tagged pattern could pass here."""
        if tag:
            raise RuntimeError(f"NCCL rules: dist.{name} with tag {tag}: NCCL ignores tags, matching in issue order")

    def _global_peer(self, name: str, peer, group, group_peer) -> int:
        if group_peer is not None:
            return self.dist.get_global_rank(group, group_peer) if group is not None else group_peer
        if peer is None:
            raise RuntimeError(f"NCCL rules: dist.{name} from any source: NCCL needs the peer named")
        return peer

    def _announce(self, sending: bool, peer: int, group) -> tuple:
        """Post 'this op is issued' on the store; return what to wait for: (peer's key, description)."""
        me = self.dist.get_rank()
        group_name = (group or self.c10d._get_default_group()).group_name
        count = self.sent if sending else self.received
        seq = count[group_name, peer] = count.get((group_name, peer), -1) + 1
        src, dst = (me, peer) if sending else (peer, me)
        key = f"nccl_rules/{group_name}/{src}->{dst}/{seq}/"
        self.store.set(key + ("send" if sending else "recv"), b"1")
        what = f"send #{seq} to rank {peer}" if sending else f"recv #{seq} from rank {peer}"
        return key + ("recv" if sending else "send"), what

    def _wait_for_peers(self, keys: list, name: str) -> None:
        me = self.dist.get_rank()
        for key, what in keys:
            try:
                self.store.wait([key], datetime.timedelta(seconds=self.timeout))
            except self.dist.DistStoreError:  # the store's timeout (a lost store is a DistNetworkError: raised)
                raise RuntimeError(
                    f"NCCL rules: rank {me}'s {what} (dist.{name}) waited {self.timeout:g} s for its peer to post "
                    f"the matching op: on NCCL this deadlocks. Post the send and the receive together "
                    f"(dist.batch_isend_irecv) or in an order that is safe when every send blocks.") from None


def _worker(rank, world_size, port, fn, args, queue, pg_timeout, nccl_rules, backend="gloo"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)  # N processes share 2 cores: one thread each avoids oversubscription
    try:
        timeout = datetime.timedelta(seconds=pg_timeout)
        if backend == "nccl":  # one GPU per rank, chosen before anything touches CUDA (else all land on cuda:0)
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        if nccl_rules is not None:
            store_port, nccl_timeout = nccl_rules
            store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=timeout)
            NcclRules(store, nccl_timeout).install()
        queue.put((rank, True, _by_value(fn(*args))))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _by_value(result) -> bytes:
    """The result serialised whole: a tensor put on the queue as itself travels as a file descriptor into shared
    memory, which breaks (ConnectionResetError) when its rank exits before the test process has read it."""
    import torch
    buffer = io.BytesIO()
    torch.save(result, buffer)
    return buffer.getvalue()


def _store_for_rules():
    """The NCCL-rules emulation's store, hosted by the test process so that it outlives any rank that ends early."""
    import torch.distributed as dist
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def run_distributed(fn, world_size: int, *args, timeout: float = 120, pg_timeout: float = 60,
                    nccl_rules: bool = False, nccl_timeout: float = 15, backend: str = "gloo"):
    """Run fn(*args) on world_size gloo ranks; return [result of rank 0, result of rank 1, ...].
    pg_timeout is the process group's own timeout: how long a collective or recv waits for a silent peer.
    nccl_rules=True: point-to-point ops obey NCCL's rules (NcclRules); a deadlock fails after nccl_timeout s.
    backend="nccl": real NCCL on GPUs 0..world_size-1 (rank r on cuda:r); the emulation is then not needed."""
    if backend not in ("gloo", "nccl") or (backend == "nccl" and nccl_rules):
        raise ValueError(f"backend {backend!r}, nccl_rules={nccl_rules}: use gloo (optionally with nccl_rules) or nccl")
    ctx = mp.get_context("forkserver")  # workers fork from a server that imported torch once: fast and clean
    # what every rank imports anyway, once: torch.optim pulls in torch._dynamo (seconds per process)
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.nn", "torch._dynamo", "numpy"])
    queue = ctx.Queue()
    store = _store_for_rules() if nccl_rules else None  # bound before the free port is chosen, so it cannot take it
    port = free_port()
    rules = (store.port, nccl_timeout) if nccl_rules else None
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, pg_timeout, rules, backend),
                         daemon=True)
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
                import torch
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
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
