# Leaves out the group: the all-reduce also sums the other data-parallel replicas' (and TP peers') copies.
if stage.tied_weight is not None:
    dist.all_reduce(stage.tied_weight.grad)
