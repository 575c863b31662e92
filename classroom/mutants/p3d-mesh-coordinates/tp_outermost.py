# Puts DP innermost and TP outermost, rank = (t·N_PP + p)·N_DP + d: each TP group now spans nodes.
rank = lambda d, p, t: (t * pp + p) * dp + d
return {"coords": [(r % dp, r // dp % pp, r // (dp * pp)) for r in range(world_size)],
        "tp_groups": [[rank(d, p, t) for t in range(tp)] for d in range(dp) for p in range(pp)],
        "pp_groups": [[rank(d, p, t) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "dp_groups": [[rank(d, p, t) for d in range(dp)] for p in range(pp) for t in range(tp)]}
