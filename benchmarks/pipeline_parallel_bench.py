"""Our pipeline schedules (pipeline_parallel.py) against torch.distributed.pipelining's Schedule1F1B and
ScheduleGPipe on the same stage modules and batch: losses compared, median step time side by side with the ratio.

Run:   torchrun --nproc_per_node=2 benchmarks/pipeline_parallel_bench.py
       torchrun --nproc_per_node=4 benchmarks/pipeline_parallel_bench.py --microbatches 8 --steps 10
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage as TorchStage
from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pipeline_parallel as pp  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args(argv)
    rank, n, device = pp.setup_distributed()
    cfg = pp.GPTConfig(d_model=args.d_model, n_layer=args.n_layer, n_head=4, seq_len=args.seq_len, tie_weights=False)
    data = pp.load_text()
    gen = torch.Generator().manual_seed(0)
    batches = [pp.get_batch(data, args.batch_size, cfg.seq_len, gen) for _ in range(args.steps)]
    m, mb = args.microbatches, args.batch_size // args.microbatches
    loss_fn = lambda logits, y: F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
    rows = []
    for kind, torch_cls in (("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)):
        results = {}
        for who in ("ours", "torch"):
            torch.manual_seed(0)
            stage = pp.PipelineStage(pp.TinyGPT(cfg).to(device), rank, n)
            opt = torch.optim.SGD(stage.parameters(), lr=0.1)
            if who == "ours":
                runner = pp.StageRunner(stage, rank, n)
                actions = pp.schedule(kind, n, m, rank)
            else:
                sched = torch_cls(TorchStage(stage, rank, n, device), n_microbatches=m, loss_fn=loss_fn)
            times, losses = [], []
            for x, y in batches:
                dist.barrier()
                t0 = time.perf_counter()
                if who == "ours":
                    loss = runner.run(actions, list(x.split(mb)), list(y.split(mb)), (mb, cfg.seq_len, cfg.d_model))
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
                times.append(time.perf_counter() - t0)
                losses.append(loss)
            results[who] = (statistics.median(times[1:]) * 1e3, losses)
        rows.append((kind, results))
    if rank == n - 1:  # the last stage knows the losses
        print(f"TinyGPT d={cfg.d_model}, {cfg.n_layer} layers over p = {n} stages, batch {args.batch_size}×{cfg.seq_len} "
              f"in m = {m} micro-batches, SGD, median of {args.steps - 1} steps")
        print(f"{'schedule':<8} {'ours ms':>9} {'torch ms':>9} {'ours/torch':>10} {'max |loss diff|':>16}")
        for kind, res in rows:
            (t_o, l_o), (t_t, l_t) = res["ours"], res["torch"]
            print(f"{kind:<8} {t_o:>9.1f} {t_t:>9.1f} {t_o / t_t:>10.2f} {max(abs(a - b) for a, b in zip(l_o, l_t)):>16.2e}")
    pp.cleanup()


if __name__ == "__main__":
    main()
