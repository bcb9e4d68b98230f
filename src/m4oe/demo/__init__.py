"""``m4oe demo``: the whole path on data shipped with the package, in a few minutes on a CPU."""
