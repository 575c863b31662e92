# Returns (rows, bands) instead of (bands, rows): the pair is found, then handed back the wrong way round.
best, opt = float("inf"), (0, 0)
for b in range(1, num_perm + 1):
    for r in range(1, num_perm // b + 1):
        fp = integrate(lambda s: 1 - (1 - s ** r) ** b, 0.0, threshold)
        fn = integrate(lambda s: (1 - s ** r) ** b, threshold, 1.0)
        err = fp_weight * fp + fn_weight * fn
        if err < best:
            best, opt = err, (r, b)
return opt
