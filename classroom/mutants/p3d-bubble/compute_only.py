# Counts only the GEMMs in an idle slot: a slot of the schedule also holds a micro-batch's TP all-reduces and sends.
bubble = (pp - 1) / v * compute
