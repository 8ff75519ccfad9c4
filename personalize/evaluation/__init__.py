"""The evaluation harness: subjects, settings, rows, metrics, reports, ToyBench."""
