"""Benchmarks: ``python -m bench.<script>`` from an installed (editable) checkout; results in BENCHMARKS.md."""
