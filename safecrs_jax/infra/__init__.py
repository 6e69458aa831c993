"""Infrastructure: storage (local and gs://), sharding and multi-host start, provenance,
the run lock, chips and FLOPs, metric writers."""
