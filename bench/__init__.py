"""edgefleet benchmarks (``make bench``): results to JSON, a table on stdout."""
