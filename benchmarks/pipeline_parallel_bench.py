"""Our pipeline schedules (pipeline_parallel.py) against torch.distributed.pipelining's Schedule1F1B and
ScheduleGPipe on the same stage modules and batch: losses compared, median step time side by side with the ratio.

Run:   torchrun --nproc_per_node=2 benchmarks/pipeline_parallel_bench.py
       torchrun --nproc_per_node=4 benchmarks/pipeline_parallel_bench.py --microbatches 8 --steps 10
"""
import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage as TorchStage
from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pipeline_parallel as pp  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--microbatches", type=int, default=None, help="m (default: max(4, p), as 1F1B needs m >= p)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps; the first is a warm-up, left out")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per step (default: the multiple of m nearest above 16)")
    parser.add_argument("--d-model", type=int, default=128, help="width of the residual stream")
    parser.add_argument("--n-layer", type=int, default=None, help="transformer blocks (default: max(4, p))")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present, else cpu")
    return parser


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace, p: int) -> None:
    """Defaults that fit p stages, then one line per flag that cannot work, before any process group exists."""
    args.microbatches = max(4, p) if args.microbatches is None else args.microbatches
    args.n_layer = max(4, p) if args.n_layer is None else args.n_layer
    if args.batch_size is None:
        args.batch_size = max(1, args.microbatches) * -(-16 // max(1, args.microbatches))
    for flag in ("microbatches", "steps", "batch_size", "d_model", "n_layer", "seq_len"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give at least 1")
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: give at least 2 (the first step is a warm-up, not timed)")
    if args.n_layer < p:
        parser.error(f"--n-layer {args.n_layer}: {p} stages need at least {p} layers (try --n-layer {p})")
    if args.microbatches < p:
        parser.error(f"--microbatches {args.microbatches}: PyTorch's Schedule1F1B needs at least one per stage "
                     f"(try --microbatches {p})")
    if args.batch_size % args.microbatches:
        parser.error(f"--batch-size {args.batch_size} is not divisible by --microbatches {args.microbatches}")
    if args.d_model % 4:
        parser.error(f"--d-model {args.d_model}: give a multiple of the 4 attention heads")


def time_schedule(who: str, kind: str, cfg, batches, args, rank: int, n: int, device) -> tuple[float, list]:
    """Median step time (ms, after the first step) and the losses of our runner or PyTorch's schedule."""
    torch.manual_seed(0)
    stage = pp.PipelineStage(pp.TinyGPT(cfg).to(device), rank, n)
    opt = torch.optim.SGD(stage.parameters(), lr=0.1)
    m, mb = args.microbatches, args.batch_size // args.microbatches
    if who == "ours":
        runner = pp.StageRunner(stage, (mb, cfg.seq_len, cfg.d_model))
    else:
        loss_fn = lambda logits, y: F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
        torch_cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[kind]
        sched = torch_cls(TorchStage(stage, rank, n, device), n_microbatches=m, loss_fn=loss_fn)
    times, losses = [], []
    for x, y in batches:
        dist.barrier()
        t0 = pp.now(device)
        if who == "ours":
            loss = runner.run(kind, list(x.split(mb)), list(y.split(mb)))
        else:
            out = []
            if rank == 0:
                sched.step(x)
            elif rank == n - 1:
                sched.step(target=y, losses=out)
            else:
                sched.step()
            loss = sum(l.item() for l in out) / m if out else 0.0
        opt.step()
        opt.zero_grad()
        times.append(pp.now(device) - t0)
        losses.append(loss)
    return statistics.median(times[1:]) * 1e3, losses


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    validate(parser, args, int(os.environ.get("WORLD_SIZE", 1)))
    rank, n, device = pp.setup_distributed(args.device)
    cfg = pp.GPTConfig(d_model=args.d_model, n_layer=args.n_layer, n_head=4, seq_len=args.seq_len, tie_weights=False)
    data = pp.load_text()
    gen = torch.Generator().manual_seed(0)
    batches = [tuple(t.to(device) for t in pp.get_batch(data, args.batch_size, cfg.seq_len, gen))
               for _ in range(args.steps)]
    rows = [(kind, {who: time_schedule(who, kind, cfg, batches, args, rank, n, device) for who in ("ours", "torch")})
            for kind in ("gpipe", "1f1b")]
    if rank == n - 1:  # the last stage knows the losses
        print(f"TinyGPT d={cfg.d_model}, {cfg.n_layer} layers over p = {n} stages, batch {args.batch_size}×{cfg.seq_len} "
              f"in m = {args.microbatches} micro-batches, SGD, median of {args.steps - 1} steps, {device}")
        print(f"{'schedule':<8} {'ours ms':>9} {'torch ms':>9} {'ours/torch':>10} {'max |loss diff|':>16}")
        for kind, res in rows:
            (t_o, l_o), (t_t, l_t) = res["ours"], res["torch"]
            print(f"{kind:<8} {t_o:>9.1f} {t_t:>9.1f} {t_o / t_t:>10.2f} {max(abs(a - b) for a, b in zip(l_o, l_t)):>16.2e}")
    pp.cleanup()


if __name__ == "__main__":
    main()
