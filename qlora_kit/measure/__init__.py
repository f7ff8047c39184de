"""Measured memory: what `estimate` predicts, measured on a real step, component by component.

breakdown.py  one configuration per process: static inventory + one profiled step, keyed like the estimate
timeline.py   read_events (the only reader of torch's private profiler tree) + replay
grid.py       `bench memory`'s grid (key=v1,v2 -> configurations), one subprocess each
report.py     `bench memory`'s markdown table and PNG chart

May import: everything below the CLI but infer/, export/, analysis/ (it runs train/'s step). Imported by the CLI.
"""
