"""Tools apart from the library: benchmarks, training curves, the memory budget."""
