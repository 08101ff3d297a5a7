"""hmora benchmarks: memory, memory traffic, launches and time of every implementation, measured not guessed.

`hmora-bench` (benchmarks.cli) runs a suite; `pytest benchmarks/ --benchmark-enable` runs the microbenchmarks.
"""
