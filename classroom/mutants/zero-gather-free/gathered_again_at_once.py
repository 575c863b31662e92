# Frees the unit, then gathers it straight back "for backward": the parameters stay whole between forward and
# backward, and the forward all-gathers twice.
unit.free()
unit.gather(self.group)
