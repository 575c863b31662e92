# Weighs the false positives with fn_weight and the false negatives with fp_weight.
best, opt = float("inf"), (0, 0)
for b in range(1, num_perm + 1):
    for r in range(1, num_perm // b + 1):
        fp = integrate(lambda s: 1 - (1 - s ** r) ** b, 0.0, threshold)
        fn = integrate(lambda s: (1 - s ** r) ** b, threshold, 1.0)
        err = fn_weight * fp + fp_weight * fn
        if err < best:
            best, opt = err, (b, r)
return opt
