# Varies d inside a PP group and p inside a DP group: the pipeline's stages land in different replicas.
rank = lambda d, p, t: (d * pp + p) * tp + t
return {"coords": [(r // (pp * tp), r // tp % pp, r % tp) for r in range(world_size)],
        "tp_groups": [[rank(d, p, t) for t in range(tp)] for d in range(dp) for p in range(pp)],
        "pp_groups": [[rank(d, p, t) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "dp_groups": [[rank(d, p, t) for p in range(pp)] for d in range(dp) for t in range(tp)]}
