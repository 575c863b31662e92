# Writes the S-curve as 1 - (1 - s^b)^r: a band matches when all its r rows agree, so the power of s is r, not b.
best, opt = float("inf"), (0, 0)
for b in range(1, num_perm + 1):
    for r in range(1, num_perm // b + 1):
        fp = integrate(lambda s: 1 - (1 - s ** b) ** r, 0.0, threshold)
        fn = integrate(lambda s: (1 - s ** b) ** r, threshold, 1.0)
        err = fp_weight * fp + fn_weight * fn
        if err < best:
            best, opt = err, (b, r)
return opt
